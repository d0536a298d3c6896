"""TLS and mutual TLS on the gRPC hop: a real shard (tiny model) serving with certificates made
here, and the gateway's shard pool as `build_shard_pool` builds it from settings."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.metrics import GatewayMetrics
from gateway.parts import build_shard_pool
from gateway.settings import GatewaySettings, SettingsError
from loraplex.grpc_tls import channel_credentials
from protos import shard_pb2, shard_pb2_grpc
from shard.settings import ShardSettings
from tests.support.shard_server import generate_request, running_shard, shard_test_settings

# The shard's certificate names only this DNS name (no IP): the gateway dials 127.0.0.1 and must
# verify the name it is told, as it does for pod IPs in Kubernetes.
SHARD_NAME = "shard.loraplex.test"
HEALTHCHECK = Path(__file__).resolve().parents[2] / "compose" / "container_healthcheck.py"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, issuer_key, issuer: x509.Name, *, ca: bool, dns: str | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    certificate = builder.sign(issuer_key or key, hashes.SHA256())
    return key, certificate


def _write(folder: Path, name: str, key, certificate) -> tuple[str, str]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """name -> (certificate, key) PEM files: a CA, a shard and a gateway signed by it, and a stranger CA."""
    folder = tmp_path_factory.mktemp("pki")
    files = {}
    for ca_name in ("ca", "stranger-ca"):
        ca_key, ca_cert = _certificate(ca_name, None, _name(ca_name), ca=True)
        files[ca_name] = _write(folder, ca_name, ca_key, ca_cert)
        if ca_name == "ca":
            files["shard"] = _write(folder, "shard", *_certificate("shard", ca_key, ca_cert.subject, ca=False, dns=SHARD_NAME))
            files["gateway"] = _write(folder, "gateway", *_certificate("gateway", ca_key, ca_cert.subject, ca=False))
    return files


def _gateway(address: str, **tls) -> GatewaySettings:
    return GatewaySettings.from_mapping({"shard_addresses": [address], "health_timeout_s": 5.0, **tls})


async def _probe(settings: GatewaySettings, checks: int = 1) -> tuple[list[str], str, list]:
    """(healthy shards, the last error of the one address, a Generate's chunks when healthy) after
    up to `checks` health checks (more than one where the shared machine may be slow to handshake)."""
    pool = build_shard_pool(settings, GatewayMetrics())
    await pool.start()
    try:
        for _ in range(checks - 1):
            if pool.healthy_shards():
                break
            await asyncio.sleep(0.5)
            await pool.check_all()
        healthy = pool.healthy_shards()
        chunks = []
        if healthy:
            chunks = [c async for c in pool.get(healthy[0]).stub.Generate(generate_request(adapter="alpha"), timeout=30)]
        return healthy, pool.all()[0].last_error, chunks
    finally:
        await pool.stop()


def _healthcheck(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), "--timeout", "10", "grpc", address, *args], capture_output=True, timeout=60)


def test_gateway_talks_mutual_tls_and_the_shard_refuses_who_lacks_a_client_certificate(tiny_model_dir, tiny_adapter_dirs, pki):
    shard_cert, shard_key = pki["shard"]
    gateway_cert, gateway_key = pki["gateway"]
    ca = pki["ca"][0]
    settings = shard_test_settings(
        tiny_model_dir, tiny_adapter_dirs, tls_cert_file=shard_cert, tls_key_file=shard_key, tls_client_ca_file=ca
    )

    async def scenario():
        async with running_shard(settings, load_timeout_s=300) as address:
            mutual = {"shard_tls_ca_file": ca, "shard_tls_server_name": SHARD_NAME}
            # The gateway with its client certificate: healthy, and a generation streams back.
            healthy, error, chunks = await _probe(
                _gateway(address, **mutual, shard_tls_cert_file=gateway_cert, shard_tls_key_file=gateway_key), checks=10
            )
            assert healthy == ["test-shard"], error
            assert chunks and chunks[-1].usage.completion_tokens == 6
            # TLS but no client certificate: the mTLS shard ends the handshake.
            healthy, error, _ = await _probe(_gateway(address, **mutual))
            assert healthy == [] and error.startswith("health check: UNAVAILABLE")
            # Plaintext to a TLS port: no answer, the shard stays out of the ring.
            healthy, error, _ = await _probe(_gateway(address))
            assert healthy == [] and error.startswith("health check: UNAVAILABLE")
            # A shard certificate from a CA the gateway does not trust is refused by the gateway.
            stranger = {"shard_tls_ca_file": pki["stranger-ca"][0], "shard_tls_server_name": SHARD_NAME}
            healthy, error, _ = await _probe(
                _gateway(address, **stranger, shard_tls_cert_file=gateway_cert, shard_tls_key_file=gateway_key)
            )
            assert healthy == [] and error.startswith("health check: UNAVAILABLE")
            # The same refusal, as any gRPC client sees it: the handshake, not the call, fails.
            credentials = channel_credentials(ca)
            options = (("grpc.ssl_target_name_override", SHARD_NAME),)
            async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await shard_pb2_grpc.ShardStub(channel).Stats(shard_pb2.StatsRequest(), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # The containers' healthcheck, given the files, passes; without them it cannot reach the shard.
            tls_args = ["--tls-ca", ca, "--tls-cert", gateway_cert, "--tls-key", gateway_key, "--tls-server-name", SHARD_NAME]
            assert (await asyncio.to_thread(_healthcheck, address, *tls_args)).returncode == 0
            assert (await asyncio.to_thread(_healthcheck, address)).returncode == 2

    asyncio.run(scenario())


def test_tls_settings_refuse_half_configurations(pki, tmp_path):
    cert, key = pki["shard"]
    with pytest.raises(SettingsError, match="both the certificate and its key"):
        ShardSettings.from_mapping({"model_dir": "m", "tls_cert_file": cert})
    with pytest.raises(SettingsError, match="mutual TLS"):
        ShardSettings.from_mapping({"model_dir": "m", "tls_client_ca_file": pki["ca"][0]})
    with pytest.raises(SettingsError, match="need shard_tls_ca_file"):
        GatewaySettings.from_mapping({"shard_tls_cert_file": cert, "shard_tls_key_file": key})
    with pytest.raises(SettingsError, match="cannot be read"):
        channel_credentials(str(tmp_path / "missing-ca.pem"))
