"""TLS and mutual TLS on the gRPC hop between gateway and shards: the credentials both sides build
from PEM files named in their settings.

Shard: a certificate and its key make it serve TLS; a client CA on top makes it mutual - a client
must present a certificate signed by that CA, or its handshake fails. Gateway: a CA makes its shard
channels (health checks included) TLS, verifying the shard's certificate against it; a client
certificate and key on top are what an mTLS shard asks for.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from loraplex.layered_settings import SettingsError


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from exc


def check_pair(cert_file: str, key_file: str, owner: str) -> None:
    """A certificate without its key (or the reverse) is a mistake, not a half-configured TLS."""
    if bool(cert_file) != bool(key_file):
        raise SettingsError(f"{owner}: set both the certificate and its key, or neither")


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    pair = (_read(key_file, "TLS key"), _read(cert_file, "TLS certificate"))
    client_ca = _read(client_ca_file, "TLS client CA") if client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def channel_credentials(ca_file: str, cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "TLS CA"),
        private_key=_read(key_file, "TLS key") if key_file else None,
        certificate_chain=_read(cert_file, "TLS certificate") if cert_file else None,
    )
