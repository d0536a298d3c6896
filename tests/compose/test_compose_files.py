"""compose/docker-compose.yml as `docker compose config` resolves it: the values load into the real
settings classes, references resolve, probes hit the ports the services listen on, images are
tagged by what they were built with, no secret is on a command line, MLflow upgrades its schema
before it starts and accepts the Host the services send it. Plus the files every deployment
shares (tenants example, Dockerfiles, README commands)."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml
from deploy_files import COMPOSE_DIR, REPO, SECRET_VALUES, run_compose_config

from gateway.settings import GatewaySettings
from gateway.tenants import TenantsFileError, parse_tenants, sha256_hex
from shard.settings import ShardSettings

SETTINGS_ENV = {"LORAPLEX_SHARD_": ShardSettings, "LORAPLEX_GATEWAY_": GatewaySettings}
ENV_NAME = re.compile(r"\bLORAPLEX_(?:SHARD|GATEWAY)_[A-Z0-9_]+\b")
SHARDS = ("shard-0", "shard-1")


def env_of(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def argv_of(service: dict) -> list[str]:
    return [str(word) for word in (service.get("entrypoint") or []) + (service.get("command") or [])]


def test_compose_refuses_to_start_without_the_secrets():
    result = run_compose_config(COMPOSE_DIR / ".env.example", "--quiet")
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in compose/.env" in result.stderr


def test_every_loraplex_env_var_named_in_compose_is_a_real_settings_field():
    named: dict[str, set[str]] = {}
    for path in sorted(p for p in COMPOSE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        for name in ENV_NAME.findall(path.read_text(errors="replace")):
            named.setdefault(name, set()).add(str(path.relative_to(COMPOSE_DIR)))
    assert len(named) >= 20, sorted(named)
    unknown = {}
    for name, where in named.items():
        prefix = next(p for p in SETTINGS_ENV if name.startswith(p))
        fields = {f.name for f in dataclasses.fields(SETTINGS_ENV[prefix])}
        if name[len(prefix):].lower() not in fields:
            unknown[name] = sorted(where)
    assert not unknown, f"env vars that are no settings field: {unknown}"


def test_compose_services_load_into_the_real_settings(compose):
    services = compose["services"]
    for shard_name in SHARDS:
        env = env_of(services[shard_name])
        settings = ShardSettings.load(environ=env)
        assert settings.shard_id == shard_name
        assert (settings.host, settings.port) == ("0.0.0.0", 50051)
        assert settings.device == "cuda" and settings.quantization == "nf4"
        assert settings.model_dir == "/models/base"
        assert settings.registry_tracking_uri == "http://mlflow:5000"
        assert str(settings.metrics_port) in services[shard_name]["expose"]
        assert env["OTEL_SERVICE_NAME"] and env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector:")
    gateway = GatewaySettings.load(environ=env_of(services["gateway"]))
    assert gateway.host == "0.0.0.0"
    assert gateway.registry_tracking_uri == "http://mlflow:5000"
    assert gateway.tenants_file.startswith("/etc/loraplex/tenants/")
    # Shared limits: the Redis URL names the valkey service; the admin port is not published.
    assert gateway.redis_url.startswith("redis://valkey:6379/") and gateway.workers >= 2
    assert gateway.redis_failure_policy == "open"
    assert str(gateway.admin_port) in services["gateway"]["expose"]
    assert [p["target"] for p in services["gateway"]["ports"]] == [gateway.port]
    # Every shard address is a compose service listening on that port.
    assert len(gateway.shard_addresses) == 2
    for address in gateway.shard_addresses:
        host, port = address.rsplit(":", 1)
        assert ShardSettings.load(environ=env_of(services[host])).port == int(port)
    # The collector and Prometheus scrape /metrics where the gateway serves it.
    collector = (COMPOSE_DIR / "otel-collector.yaml").read_text()
    assert f'targets: ["gateway:{gateway.admin_port}"]' in collector
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    (gateway_job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "loraplex-gateway"]
    assert gateway_job["static_configs"][0]["targets"] == [f"gateway:{gateway.admin_port}"]


# Time a stop needs beyond the drain itself: the shard's server stop and engine join, the gateway's parts.
STOP_MARGIN_S = 10.0


def go_duration_s(text: str) -> float:
    """A Go duration as compose writes it ("2m30s", "150s", "1m0.5s") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_stop_grace_covers_each_services_drain(compose):
    services = compose["services"]
    for shard_name in SHARDS:
        shard = ShardSettings.load(environ=env_of(services[shard_name]))
        assert go_duration_s(services[shard_name]["stop_grace_period"]) >= shard.drain_timeout() + STOP_MARGIN_S
    gateway = GatewaySettings.load(environ=env_of(services["gateway"]))
    assert gateway.drain_grace() >= gateway.request_timeout_s
    assert go_duration_s(services["gateway"]["stop_grace_period"]) >= gateway.shutdown_budget()


def test_compose_dependencies_wait_for_what_each_service_needs(compose):
    services = compose["services"]
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services and target != name
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no healthcheck"
            if spec["condition"] == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is a one-shot job"
    mlflow = services["mlflow"]["depends_on"]
    assert mlflow["mlflow-db-upgrade"]["condition"] == "service_completed_successfully"
    assert mlflow["minio-create-bucket"]["condition"] == "service_completed_successfully"
    assert services["mlflow-db-upgrade"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["valkey"]["condition"] == "service_healthy"


def test_compose_healthchecks_probe_the_port_each_service_listens_on(compose):
    services = compose["services"]
    for shard_name in SHARDS:
        test = services[shard_name]["healthcheck"]["test"]
        port = ShardSettings.load(environ=env_of(services[shard_name])).port
        assert test[:3] == ["CMD", "loraplex-healthcheck", "grpc"] and test[3] == f"127.0.0.1:{port}"
        assert str(port) in services[shard_name]["expose"]
    gateway_port = GatewaySettings.load(environ=env_of(services["gateway"])).port
    assert services["gateway"]["healthcheck"]["test"][-1] == f"http://127.0.0.1:{gateway_port}/readyz"
    assert "--port=5000" in argv_of(services["mlflow"])
    assert services["mlflow"]["healthcheck"]["test"][-1] == "http://127.0.0.1:5000/health"
    assert services["valkey"]["healthcheck"]["test"] == ["CMD", "valkey-cli", "ping"]


def test_compose_images_are_tagged_by_the_torch_build_they_hold(compose):
    built = {name: s for name, s in compose["services"].items() if "build" in s}
    assert set(built) == {"shard-0", "shard-1", "gateway", "adapters", "mlflow"}
    for name, service in built.items():
        if service["build"]["dockerfile"] != "compose/Dockerfile":
            continue
        variant = service["build"]["args"]["TORCH_INDEX_URL"].rstrip("/").rsplit("/", 1)[1]
        assert service["image"].endswith(f"-{variant}"), (name, service["image"], variant)
    assert compose["services"]["shard-0"]["image"] == "loraplex:0.1.0-cu128"
    assert compose["services"]["gateway"]["image"] == compose["services"]["adapters"]["image"] == "loraplex:0.1.0-cpu"


def test_no_secret_reaches_a_command_line_or_a_container_environment(compose):
    for name, service in compose["services"].items():
        exposed = " ".join(argv_of(service) + [f"{k}={v}" for k, v in env_of(service).items()])
        for secret in SECRET_VALUES.values():
            assert secret not in exposed, f"{name} shows a secret in its command or environment"
    services = compose["services"]
    assert env_of(services["postgres"])["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert env_of(services["minio"])["MINIO_ROOT_PASSWORD_FILE"] == "/run/secrets/minio_root_password"
    for name in ("mlflow", "mlflow-db-upgrade"):
        assert env_of(services[name])["PGPASSWORD_FILE"] == "/run/secrets/postgres_password"
        assert {"source": "postgres_password", "target": "/run/secrets/postgres_password"} in services[name]["secrets"]
    assert env_of(services["grafana"])["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert set(compose["secrets"]) == {"postgres_password", "minio_root_password", "grafana_admin_password"}


def test_loraplex_containers_run_without_capabilities_on_a_read_only_root(compose):
    for name in (*SHARDS, "gateway"):
        service = compose["services"][name]
        assert service["cap_drop"] == ["ALL"] and service["security_opt"] == ["no-new-privileges:true"], name
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
        writable = {v["target"] for v in service["volumes"] if not v.get("read_only")} | set(service["tmpfs"])
        settings = env_of(service)
        for path in (settings.get("LORAPLEX_SHARD_ADAPTER_CACHE_DIR"), settings.get("LORAPLEX_GATEWAY_REGISTRY_CACHE_DIR")):
            assert path is None or path in writable, (name, path)


def test_mlflow_entrypoint_turns_secret_files_into_the_variables_libpq_and_boto3_read(tmp_path):
    secret = tmp_path / "pgpass"
    secret.write_text("p@ss word")
    script = COMPOSE_DIR / "mlflow-entrypoint.sh"
    shown = subprocess.run(
        ["sh", str(script), "sh", "-c", 'printf "%s|%s|%s" "$PGPASSWORD" "${PGPASSWORD_FILE-unset}" "$SSL_CERT_FILE"'],
        env={"PATH": "/usr/bin:/bin", "PGPASSWORD_FILE": str(secret), "SSL_CERT_FILE": "/etc/ssl/cert.pem"},
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    assert shown == "p@ss word|unset|/etc/ssl/cert.pem"
    missing = subprocess.run(
        ["sh", str(script), "true"], env={"PATH": "/usr/bin:/bin", "AWS_SECRET_ACCESS_KEY_FILE": str(tmp_path / "absent")},
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert missing.returncode == 1 and "AWS_SECRET_ACCESS_KEY_FILE" in missing.stderr
    dockerfile = (COMPOSE_DIR / "mlflow.Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint"]' in dockerfile
    assert "!compose/mlflow-entrypoint.sh" in (COMPOSE_DIR / "mlflow.Dockerfile.dockerignore").read_text()


def run_mlflow_db_upgrade(argv: list[str], sqlite_uri: str) -> None:
    """The upgrade command a deployment runs, against a SQLite file instead of Postgres."""
    assert argv[:3] == ["mlflow", "db", "upgrade"] and len(argv) == 4
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", *argv[1:3], sqlite_uri], capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_compose_mlflow_schema_upgrade_is_a_command_that_works_on_new_and_existing_databases(compose, tmp_path):
    argv = argv_of(compose["services"]["mlflow-db-upgrade"])
    assert argv[3] == "postgresql://mlflow@postgres:5432/mlflow"  # no password in the URI
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_mlflow_db_upgrade(argv, uri)  # an empty database: creates the tables
    run_mlflow_db_upgrade(argv, uri)  # current schema: a no-op, not an error
    backend = next(a for a in argv_of(compose["services"]["mlflow"]) if a.startswith("--backend-store-uri="))
    assert backend.split("=", 1)[1] == argv[3]


def test_compose_mlflow_uses_postgres_and_minio_and_accepts_the_services_host_header(compose, is_allowed_host_header):
    mlflow = compose["services"]["mlflow"]
    command = " ".join(argv_of(mlflow))
    assert "--artifacts-destination=s3://" in command and "--workers=" in command
    env = env_of(mlflow)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for host in ("mlflow:5000", "localhost:5000", "127.0.0.1:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com")


def test_compose_runs_the_real_entrypoints_and_gives_each_shard_its_gpu_and_read_only_model(compose, compose_env):
    services = compose["services"]
    assert services["gateway"]["command"] == ["python", "-m", "gateway"]
    assert services["adapters"]["entrypoint"] == ["loraplex", "adapters"]
    device_ids = []
    for shard_name in SHARDS:
        assert services[shard_name]["command"] == ["python", "-m", "shard"]
        model = next(v for v in services[shard_name]["volumes"] if v["target"] == "/models/base")
        assert model["source"] == compose_env[1]["LORAPLEX_MODEL_DIR"] and model["read_only"] is True
        (device,) = services[shard_name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
        device_ids.append(device["device_ids"][0])
    assert len(set(device_ids)) == 2, "each shard gets its own GPU"


def test_otel_collector_config_wires_every_pipeline_to_defined_parts(compose):
    config = yaml.safe_load((COMPOSE_DIR / "otel-collector.yaml").read_text())
    assert "otlp" in config["receivers"] and {"debug", "prometheus"} <= set(config["exporters"])
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for part in pipeline.get(kind, []):
                assert part in config[kind], part
    (mount,) = compose["services"]["otel-collector"]["volumes"]
    assert mount["source"] == str(COMPOSE_DIR / "otel-collector.yaml")


def test_tenants_example_is_the_gateway_format_and_fails_closed_until_filled_in():
    text = (COMPOSE_DIR / "tenants.example.yaml").read_text()
    with pytest.raises(TenantsFileError):
        parse_tenants(text, "tenants.example.yaml")
    placeholders = sorted(set(re.findall(r"REPLACE_[A-Z0-9_]+", text)))
    assert len(placeholders) == 3
    filled = text
    for placeholder in placeholders:
        filled = filled.replace(placeholder, sha256_hex(placeholder.lower()))
    config = parse_tenants(filled, "filled-in example")
    assert {t.name for t in config.tenants} == {"acme", "globex"}
    assert config.admin_key_sha256 == sha256_hex("replace_with_sha256_of_the_admin_key")


def test_dockerfiles_pin_what_pyproject_pins_and_copy_every_package():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", d).groups() for d in pyproject["project"]["dependencies"] if "==" in d)
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert f"ARG TORCH_VERSION={pins['torch']}" in dockerfile
    assert "ARG TORCH_INDEX_URL=" in dockerfile and "--index-url \"${TORCH_INDEX_URL}\"" in dockerfile
    assert dockerfile.splitlines()[[i for i, line in enumerate(dockerfile.splitlines()) if line.startswith("FROM ")][0]].endswith("${PYTHON_IMAGE}")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    copied = set(re.findall(r"^COPY (\S+) \./\1$", dockerfile, flags=re.MULTILINE))
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, packages - copied
    for source in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.MULTILINE):
        if not source.startswith("--"):
            assert (REPO / source).exists(), source
    mlflow_dockerfile = (COMPOSE_DIR / "mlflow.Dockerfile").read_text()
    assert f"ARG MLFLOW_VERSION={pins['mlflow']}" in mlflow_dockerfile
    assert "psycopg2-binary==" in mlflow_dockerfile and "boto3==" in mlflow_dockerfile


def readme_adapter_commands() -> list[list[str]]:
    """`loraplex adapters …` lines of compose/README.md's shell blocks, as loraplex argv
    (`docker compose run --rm adapters X` runs `loraplex adapters X` in the container)."""
    text = (COMPOSE_DIR / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0])
            if words[:2] == ["loraplex", "adapters"]:
                commands.append(words[1:])
            elif words[:4] == ["docker", "compose", "run", "--rm"] and words[4:5] == ["adapters"]:
                commands.append(words[4:])
    return commands


def test_readme_adapter_commands_are_accepted_by_the_real_cli(compose):
    import argparse

    from registry.cli import add_adapter_commands

    parser = argparse.ArgumentParser(prog="loraplex", exit_on_error=False)
    add_adapter_commands(parser.add_subparsers(dest="command", required=True))
    commands = readme_adapter_commands()
    subcommands = {argv[1] for argv in commands}
    assert {"publish", "list", "versions", "promote", "canary", "rollback"} <= subcommands, subcommands
    for argv in commands:
        try:
            args = parser.parse_args(argv)
        except (argparse.ArgumentError, SystemExit) as error:
            raise AssertionError(f"README command rejected by the CLI: loraplex {' '.join(argv)}") from error
        assert callable(args.handler)
    # The compose CLI service mounts what the README's container commands use.
    service = compose["services"]["adapters"]
    assert service["entrypoint"] == ["loraplex", "adapters"]
    mounts = {volume["target"] for volume in service["volumes"]}
    assert {"/models/base", "/adapters"} <= mounts
    assert env_of(service)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
