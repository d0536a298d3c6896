"""Static checks of the deployment files in compose/ (no Docker engine or cluster here): they parse,
name only real settings, the values load into the real settings objects, references resolve,
probes hit declared ports, and MLflow accepts the Host the services will send it."""

from __future__ import annotations

import dataclasses
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from gateway.settings import GatewaySettings
from gateway.tenants import TenantsFileError, parse_tenants, sha256_hex
from shard.settings import ShardSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
K8S_DIR = COMPOSE_DIR / "k8s"
SETTINGS_ENV = {
    "LORAPLEX_SHARD_": ShardSettings,
    "LORAPLEX_GATEWAY_": GatewaySettings,
}
ENV_NAME = re.compile(r"\bLORAPLEX_(?:SHARD|GATEWAY)_[A-Z0-9_]+\b")
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


# ---------------------------------------------------------------------------------- helpers


def yaml_files() -> list[Path]:
    return sorted(p for p in COMPOSE_DIR.rglob("*") if p.suffix in (".yml", ".yaml"))


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """docker compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ over every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        current = env.get(name)
        if op in (":-", "-"):
            return current if current or (op == "-" and current is not None) else arg
        if op in (":?", "?"):
            if not current:
                raise AssertionError(f"compose would stop: ${{{name}}} unset ({arg})")
            return current
        return current or ""

    return _INTERPOLATION.sub(substitute, value)


@pytest.fixture(scope="module")
def compose_env() -> dict[str, str]:
    """The variables a user gets from .env.example, with its empty secrets filled in."""
    env = read_env_file(COMPOSE_DIR / ".env.example")
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert secret in env, f".env.example must name {secret}"
        env[secret] = env[secret] or f"test-{secret.lower()}"
    return env


@pytest.fixture(scope="module")
def compose(compose_env) -> dict:
    raw = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    return interpolate(raw, compose_env)


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S_DIR / name).read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def is_allowed_host_header():
    """MLflow's own Host-header check (it answers 403 to a Host it does not allow), imported once:
    importing mlflow.server takes seconds."""
    from mlflow.server.security_utils import is_allowed_host_header

    return is_allowed_host_header


def k8s_find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def compose_env_of(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: str(v) for k, v in environment.items()}


def k8s_env_of(container: dict, docs: list[dict], pod_name: str) -> dict[str, str]:
    """What the container's process sees: envFrom ConfigMaps, then env (downward API filled in)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(k8s_find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = pod_name
    return env


# ---------------------------------------------------------------------------------- tests


def test_every_yaml_file_parses():
    files = yaml_files()
    names = {p.relative_to(COMPOSE_DIR).as_posix() for p in files}
    assert {"docker-compose.yml", "otel-collector.yaml", "k8s/kustomization.yaml"} <= names
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_every_loraplex_env_var_named_in_compose_is_a_real_settings_field():
    named: dict[str, set[Path]] = {}
    for path in sorted(p for p in COMPOSE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        for name in ENV_NAME.findall(path.read_text(errors="replace")):
            named.setdefault(name, set()).add(path.relative_to(COMPOSE_DIR))
    assert len(named) >= 20, sorted(named)
    unknown = {}
    for name, where in named.items():
        prefix = next(p for p in SETTINGS_ENV if name.startswith(p))
        fields = {f.name for f in dataclasses.fields(SETTINGS_ENV[prefix])}
        if name[len(prefix):].lower() not in fields:
            unknown[name] = sorted(map(str, where))
    assert not unknown, f"env vars that are no settings field: {unknown}"


def test_compose_services_load_into_the_real_settings(compose):
    services = compose["services"]
    for shard_name in ("shard-0", "shard-1"):
        env = compose_env_of(services[shard_name])
        settings = ShardSettings.load(environ=env)
        assert settings.shard_id == shard_name
        assert (settings.host, settings.port) == ("0.0.0.0", 50051)
        assert settings.device == "cuda" and settings.quantization == "nf4"
        assert settings.model_dir == "/models/base"
        assert settings.registry_tracking_uri == "http://mlflow:5000"
        assert env["OTEL_SERVICE_NAME"] and env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector:")
    gateway = GatewaySettings.load(environ=compose_env_of(services["gateway"]))
    assert gateway.host == "0.0.0.0"
    assert gateway.registry_tracking_uri == "http://mlflow:5000"
    assert gateway.tenants_file.startswith("/etc/loraplex/tenants/")
    # Every shard address is a compose service listening on that port.
    assert len(gateway.shard_addresses) == 2
    for address in gateway.shard_addresses:
        host, port = address.rsplit(":", 1)
        assert ShardSettings.load(environ=compose_env_of(services[host])).port == int(port)


def test_compose_dependencies_name_existing_services_with_valid_conditions(compose):
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert target != name
            condition = spec.get("condition", "service_started")
            assert condition in DEPENDS_CONDITIONS, (name, target, condition)
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is a one-shot job"
    assert services["mlflow"]["depends_on"]["minio-create-bucket"]["condition"] == "service_completed_successfully"


def test_compose_healthchecks_probe_the_port_each_service_listens_on(compose):
    services = compose["services"]
    for shard_name in ("shard-0", "shard-1"):
        test = services[shard_name]["healthcheck"]["test"]
        port = ShardSettings.load(environ=compose_env_of(services[shard_name])).port
        assert test[:3] == ["CMD", "loraplex-healthcheck", "grpc"] and test[3] == f"127.0.0.1:{port}"
        assert str(port) in [str(p) for p in services[shard_name]["expose"]]
    gateway_port = GatewaySettings.load(environ=compose_env_of(services["gateway"])).port
    assert services["gateway"]["healthcheck"]["test"][-1] == f"http://127.0.0.1:{gateway_port}/readyz"
    assert any(str(p).endswith(f":{gateway_port}") for p in services["gateway"]["ports"])
    mlflow_command = " ".join(services["mlflow"]["command"])
    assert "--port=5000" in mlflow_command
    assert services["mlflow"]["healthcheck"]["test"][-1] == "http://127.0.0.1:5000/health"


def test_compose_runs_the_real_entrypoints_and_mounts_the_model_read_only(compose, compose_env):
    services = compose["services"]
    assert services["gateway"]["command"] == ["python", "-m", "gateway"]
    assert services["adapters"]["entrypoint"] == ["loraplex", "adapters"]
    for shard_name in ("shard-0", "shard-1"):
        assert services[shard_name]["command"] == ["python", "-m", "shard"]
        assert f"{compose_env['LORAPLEX_MODEL_DIR']}:/models/base:ro" in services[shard_name]["volumes"]
    devices = [services[s]["deploy"]["resources"]["reservations"]["devices"] for s in ("shard-0", "shard-1")]
    for reservation in devices:
        assert reservation[0]["driver"] == "nvidia" and reservation[0]["capabilities"] == ["gpu"]
        assert len(reservation[0]["device_ids"]) == 1
    assert devices[0][0]["device_ids"] != devices[1][0]["device_ids"], "each shard gets its own GPU"


def test_compose_mlflow_uses_postgres_and_minio_and_accepts_the_services_host_header(compose, is_allowed_host_header):
    mlflow = compose["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--backend-store-uri=postgresql://mlflow:" in command and "@postgres:5432/mlflow" in command
    assert "--artifacts-destination=s3://" in command and "--workers=" in command
    env = compose_env_of(mlflow)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for host in ("mlflow:5000", "localhost:5000", "127.0.0.1:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com")


def test_otel_collector_config_wires_every_pipeline_to_defined_parts(compose):
    config = yaml.safe_load((COMPOSE_DIR / "otel-collector.yaml").read_text())
    assert "otlp" in config["receivers"]
    assert {"debug", "prometheus"} <= set(config["exporters"])
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for part in pipeline.get(kind, []):
                assert part in config[kind], part
    scrape = config["receivers"]["prometheus"]["config"]["scrape_configs"][0]["static_configs"][0]["targets"]
    admin_port = GatewaySettings.load(environ=compose_env_of(compose["services"]["gateway"])).admin_port
    assert scrape == [f"gateway:{admin_port}"] and str(admin_port) in compose["services"]["gateway"]["expose"]
    mounted = compose["services"]["otel-collector"]["volumes"][0]
    assert mounted.startswith("./otel-collector.yaml:")


def test_k8s_kustomization_lists_existing_files_and_everything_is_in_the_namespace(k8s_docs):
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        assert (K8S_DIR / name).is_file(), name
    for generator in kustomization["secretGenerator"]:
        for entry in generator.get("files", []) + generator.get("envs", []):
            # The real files hold secrets and are created by the user; an example ships instead.
            example = COMPOSE_DIR / "tenants.example.yaml" if entry == "tenants.yaml" else K8S_DIR / f"{entry}.example"
            assert example.is_file(), example
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs}
    assert ("Namespace", "loraplex") in kinds
    for doc in k8s_docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == kustomization["namespace"] == "loraplex", doc["metadata"]


def test_k8s_references_resolve(k8s_docs):
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    secrets = {g["name"] for g in kustomization["secretGenerator"]}
    configmaps = {d["metadata"]["name"] for d in k8s_docs if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for d in k8s_docs if d["kind"] == "PersistentVolumeClaim"}
    workloads = [d for d in k8s_docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 3
    for doc in workloads:
        pod = doc["spec"]["template"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        template_claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for container in pod["spec"]["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in template_claims, mount
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    for doc in k8s_docs:
        if doc["kind"] in ("Service", "PodDisruptionBudget"):
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert any(selector.items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads), doc["metadata"]


def test_k8s_shard_service_is_headless_and_is_what_the_gateway_resolves(k8s_docs):
    gateway = k8s_find(k8s_docs, "Deployment", "loraplex-gateway")
    settings = GatewaySettings.load(environ=k8s_env_of(pod_containers(gateway)[0], k8s_docs, "gw"))
    service_name, namespace, *rest = settings.shard_dns.split(".")
    assert rest == ["svc", "cluster", "local"]
    service = k8s_find(k8s_docs, "Service", service_name)
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["namespace"] == namespace
    statefulset = k8s_find(k8s_docs, "StatefulSet", "loraplex-shard")
    assert statefulset["spec"]["serviceName"] == service_name
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    shard_container = pod_containers(statefulset)[0]
    shard = ShardSettings.load(environ=k8s_env_of(shard_container, k8s_docs, "loraplex-shard-0"))
    assert shard.shard_id == "loraplex-shard-0" and shard.device == "cuda" and shard.host == "0.0.0.0"
    (port,) = [p for p in service["spec"]["ports"]]
    assert port["port"] == settings.shard_dns_port == shard.port
    assert port["targetPort"] in {p["name"] for p in shard_container["ports"]}
    assert shard_container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert shard_container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_k8s_probes_use_declared_ports_and_shards_use_grpc_health(k8s_docs):
    probes_seen = 0
    for doc in k8s_docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in pod_containers(doc):
            declared = {p["containerPort"] for p in container["ports"]} | {p["name"] for p in container["ports"]}
            for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(probe_kind)
                if probe is None:
                    continue
                probes_seen += 1
                handler = next(k for k in ("grpc", "httpGet", "tcpSocket") if k in probe)
                port = probe[handler]["port"]
                if handler == "grpc":
                    assert isinstance(port, int), "grpc probes take a port number, not a name"
                assert port in declared, (doc["metadata"]["name"], probe_kind, port)
    assert probes_seen >= 8
    shard = pod_containers(k8s_find(k8s_docs, "StatefulSet", "loraplex-shard"))[0]
    for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" in shard[probe_kind], probe_kind
    gateway = pod_containers(k8s_find(k8s_docs, "Deployment", "loraplex-gateway"))[0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_k8s_gateway_has_a_disruption_budget_and_mlflow_accepts_the_service_host(k8s_docs, is_allowed_host_header):
    pdb = k8s_find(k8s_docs, "PodDisruptionBudget", "loraplex-gateway")
    gateway = k8s_find(k8s_docs, "Deployment", "loraplex-gateway")
    assert gateway["spec"]["replicas"] > pdb["spec"]["minAvailable"] >= 1
    mlflow = pod_containers(k8s_find(k8s_docs, "Deployment", "loraplex-mlflow"))[0]
    mlflow_env = {e["name"]: e["value"] for e in mlflow["env"]}
    assert mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    allowed = mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    mlflow_service = k8s_find(k8s_docs, "Service", "loraplex-mlflow")
    for workload, pod_name in (("Deployment", "loraplex-gateway"), ("StatefulSet", "loraplex-shard")):
        container = pod_containers(k8s_find(k8s_docs, workload, pod_name))[0]
        env = k8s_env_of(container, k8s_docs, pod_name + "-0")
        uri = env.get("LORAPLEX_GATEWAY_REGISTRY_TRACKING_URI") or env["LORAPLEX_SHARD_REGISTRY_TRACKING_URI"]
        parsed = urlparse(uri)
        assert parsed.hostname.split(".")[0] == mlflow_service["metadata"]["name"]
        assert parsed.port == mlflow_service["spec"]["ports"][0]["port"]
        assert is_allowed_host_header(allowed, parsed.netloc), parsed.netloc


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
    mounts = {volume.split(":")[1] for volume in service["volumes"]}
    assert {"/models/base", "/adapters"} <= mounts
    assert compose_env_of(service)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
