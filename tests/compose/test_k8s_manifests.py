"""compose/k8s as `kubectl kustomize` builds it, validated against the Kubernetes API schemas
(kubernetes-validate, strict: no unknown fields) and held to what a GPU cluster needs: settings
that load, restricted pods without service links, network policies that admit only the intended
callers, generated ConfigMaps that roll pods when edited, the MLflow schema upgrade before the
server, the base-model fill Job, autoscaling and scrape targets on the right ports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from deploy_files import OVERLAY, kustomize_build, k8s_tree_with_secrets, read_env_file

from gateway.settings import GatewaySettings
from shard.settings import ShardSettings

# An old Kubernetes still in support at many providers (gRPC probes are GA from 1.27) and the
# newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}


def find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict, docs: list[dict], pod_name: str) -> dict[str, str]:
    """What the container's process sees: envFrom ConfigMaps, then env (downward API filled in)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = pod_name
    return env


# ---------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_passes_the_kubernetes_api_schema(k8s_docs, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extras) is not installed")
    core = [d for d in k8s_docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    assert {d["kind"] for d in core} >= {"NetworkPolicy", "HorizontalPodAutoscaler", "StatefulSet", "Job", "PodDisruptionBudget"}
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)
    assert {(d["apiVersion"], d["kind"]) for d in k8s_docs} - {(d["apiVersion"], d["kind"]) for d in core} == CRD_KINDS


CRD_VALIDATION = Path(__file__).parent / "crd_validation"


def validate_crd_objects(docs: list[dict]) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if node is None or not (CRD_VALIDATION / "node_modules").is_dir():
        pytest.skip("CRD schema validators need node and `npm ci --prefix tests/compose/crd_validation` (.ci/run does both)")
    return subprocess.run(
        [node, "validate.mjs"], input=json.dumps(docs), cwd=CRD_VALIDATION, capture_output=True, text=True, timeout=60, check=False
    )


def test_keda_and_prometheus_operator_objects_pass_their_crd_schemas(k8s_docs):
    crds = [d for d in k8s_docs if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    result = validate_crd_objects(crds)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split("\n")[:-1]) == sorted(f"valid {d['kind']}/{d['metadata']['name']}" for d in crds)
    # The validators do reject what KEDA would: a threshold must be a string, replicas a number.
    broken = json.loads(json.dumps(find(crds, "ScaledObject", "loraplex-shard")))
    broken["spec"]["triggers"][0]["metadata"]["threshold"] = 8
    rejected = validate_crd_objects([broken])
    assert rejected.returncode == 1 and "threshold must be string" in rejected.stderr


def test_the_base_builds_alone_and_everything_is_in_the_namespace(k8s_tree, k8s_docs):
    base = kustomize_build(k8s_tree / "base")
    assert {d["kind"] for d in base} >= {"Namespace", "StatefulSet", "NetworkPolicy", "Job"}
    assert not {d["kind"] for d in base} & {"PodMonitor", "ScaledObject", "Secret"}
    namespace = find(k8s_docs, "Namespace", "loraplex")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in k8s_docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "loraplex", doc["metadata"]


def test_references_resolve(k8s_docs):
    names = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs}
    workloads = [d for d in k8s_docs if d["kind"] in WORKLOAD_KINDS]
    assert len(workloads) == 5
    for doc in workloads:
        pod = doc["spec"]["template"]
        if "selector" in doc["spec"]:
            assert doc["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for container in containers(doc):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in names
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, mount
        for volume in volumes.values():
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in names
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
    for doc in k8s_docs:
        if doc["kind"] in ("Service", "PodDisruptionBudget"):
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert any(selector.items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads), doc["metadata"]


# ---------------------------------------------------------------------------------- pods


def test_every_pod_is_restricted_and_gets_no_service_links(k8s_docs):
    """Pod Security `restricted`, plus a read-only root filesystem everywhere; no service links,
    which would inject LORAPLEX_GATEWAY_PORT=tcp://… from the Service `loraplex-gateway`."""
    for doc in (d for d in k8s_docs if d["kind"] in WORKLOAD_KINDS):
        spec = pod_spec(doc)
        name = doc["metadata"]["name"]
        assert spec["enableServiceLinks"] is False, name
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in containers(doc):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (name, container["name"])
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert "memory" in container["resources"]["limits"], (name, container["name"])


def test_settings_come_from_generated_configmaps_that_roll_the_pods_when_edited(k8s_tree, tmp_path):
    first = kustomize_build(k8s_tree / OVERLAY)
    edited = k8s_tree_with_secrets(tmp_path)
    env_file = edited / "base" / "shard.env"
    env_file.write_text(env_file.read_text().replace("LORAPLEX_SHARD_MAX_BATCH_SIZE=32", "LORAPLEX_SHARD_MAX_BATCH_SIZE=16"))
    second = kustomize_build(edited / OVERLAY)
    refs = []
    for docs in (first, second):
        shard = find(docs, "StatefulSet", "loraplex-shard")
        (source,) = next(c for c in pod_spec(shard)["containers"] if c["name"] == "shard")["envFrom"]
        refs.append(source["configMapRef"]["name"])
        assert find(docs, "ConfigMap", refs[-1])  # the reference follows the generated name
    assert refs[0] != refs[1] and all(r.startswith("loraplex-shard-settings-") for r in refs)
    gateway_a, gateway_b = (find(d, "Deployment", "loraplex-gateway") for d in (first, second))
    assert gateway_a["spec"]["template"] == gateway_b["spec"]["template"], "an edit of one service rolls only that one"


def test_shards_and_gateways_load_into_the_real_settings(k8s_docs):
    shard_set = find(k8s_docs, "StatefulSet", "loraplex-shard")
    shard_container = next(c for c in pod_spec(shard_set)["containers"] if c["name"] == "shard")
    shard = ShardSettings.load(environ=env_of(shard_container, k8s_docs, "loraplex-shard-0"))
    assert shard.shard_id == "loraplex-shard-0", "the pod name is the shard's stable identity"
    assert shard.device == "cuda" and shard.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in shard_container["ports"]}
    assert ports == {"grpc": shard.port, "metrics": shard.metrics_port}

    gateway_deployment = find(k8s_docs, "Deployment", "loraplex-gateway")
    (gateway_container,) = pod_spec(gateway_deployment)["containers"]
    gateway = GatewaySettings.load(environ=env_of(gateway_container, k8s_docs, "loraplex-gateway-abc"))
    assert {p["name"]: p["containerPort"] for p in gateway_container["ports"]} == {"http": gateway.port, "admin": gateway.admin_port}
    # The public Service carries the API port only: metrics and admin stay off it.
    service = find(k8s_docs, "Service", "loraplex-gateway")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    # Shared tenant limits: the Redis URL names the Valkey Service and its port.
    redis = urlparse(gateway.redis_url)
    valkey = find(k8s_docs, "Service", redis.hostname.split(".")[0])
    assert redis.port == valkey["spec"]["ports"][0]["port"] and gateway.workers >= 2

    # The headless shard Service is what the gateways resolve.
    service_name, namespace, *rest = gateway.shard_dns.split(".")
    assert rest == ["svc", "cluster", "local"] and namespace == "loraplex"
    headless = find(k8s_docs, "Service", service_name)
    assert headless["spec"]["clusterIP"] == "None" and shard_set["spec"]["serviceName"] == service_name
    (port,) = headless["spec"]["ports"]
    assert port["port"] == gateway.shard_dns_port == shard.port and port["targetPort"] == "grpc"
    assert shard_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The adapter tiers' byte bounds fit the pod: the host tier in half its memory limit, the disk
    # tier inside its volume with room for a download in flight.
    gib = 2**30
    assert shard_container["resources"]["limits"]["memory"] == "48Gi" and shard.host_cache_bytes <= 24 * gib
    cache_claim = next(t for t in shard_set["spec"]["volumeClaimTemplates"] if t["metadata"]["name"] == "adapter-cache")
    assert cache_claim["spec"]["resources"]["requests"]["storage"] == "20Gi" and 0 < shard.disk_cache_bytes <= 18 * gib


def test_termination_grace_covers_the_pre_stop_delay_and_each_drain(k8s_docs):
    shard_set = find(k8s_docs, "StatefulSet", "loraplex-shard")
    shard_container = next(c for c in pod_spec(shard_set)["containers"] if c["name"] == "shard")
    shard = ShardSettings.load(environ=env_of(shard_container, k8s_docs, "loraplex-shard-0"))
    assert pod_spec(shard_set)["terminationGracePeriodSeconds"] >= shard.drain_timeout() + 10

    gateway_deployment = find(k8s_docs, "Deployment", "loraplex-gateway")
    (container,) = pod_spec(gateway_deployment)["containers"]
    gateway = GatewaySettings.load(environ=env_of(container, k8s_docs, "loraplex-gateway-abc"))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop_s = float(command[1])
    # The pod leaves the Service's endpoints while preStop sleeps; then SIGTERM starts the drain.
    assert pre_stop_s >= 1 and gateway.drain_grace() >= gateway.request_timeout_s
    assert pod_spec(gateway_deployment)["terminationGracePeriodSeconds"] >= pre_stop_s + gateway.shutdown_budget()


def test_images_are_the_builds_each_workload_needs(k8s_docs):
    images = {(d["metadata"]["name"], c["name"]): c["image"] for d in k8s_docs if d["kind"] in WORKLOAD_KINDS for c in containers(d)}
    assert images[("loraplex-shard", "shard")] == "registry.example.com/loraplex:0.1.0-cu128"
    assert images[("loraplex-gateway", "gateway")] == "registry.example.com/loraplex:0.1.0-cpu"
    assert images[("loraplex-mlflow", "mlflow")] == images[("loraplex-mlflow", "db-upgrade")] == "registry.example.com/loraplex-mlflow:3.17.2"


def test_probes_use_declared_ports_and_shards_use_grpc_health(k8s_docs):
    probes_seen = 0
    for doc in (d for d in k8s_docs if d["kind"] in WORKLOAD_KINDS):
        for container in pod_spec(doc)["containers"]:
            declared = {p["containerPort"] for p in container.get("ports", [])} | {p["name"] for p in container.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None or "exec" in probe:
                    continue
                probes_seen += 1
                handler = next(k for k in ("grpc", "httpGet", "tcpSocket") if k in probe)
                port = probe[handler]["port"]
                assert not (handler == "grpc" and isinstance(port, str)), "grpc probes take a port number"
                assert port in declared, (doc["metadata"]["name"], kind, port)
    assert probes_seen >= 9
    shard = find(k8s_docs, "StatefulSet", "loraplex-shard")
    shard_container = next(c for c in pod_spec(shard)["containers"] if c["name"] == "shard")
    assert all("grpc" in shard_container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe"))
    (gateway,) = pod_spec(find(k8s_docs, "Deployment", "loraplex-gateway"))["containers"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz" and gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"


# ---------------------------------------------------------------------------------- MLflow


def test_mlflow_upgrades_its_schema_before_it_serves_without_a_password_on_any_command_line(k8s_docs, k8s_tree, tmp_path):
    mlflow = find(k8s_docs, "Deployment", "loraplex-mlflow")
    assert mlflow["spec"]["strategy"]["type"] == "Recreate" and mlflow["spec"]["replicas"] == 1
    (upgrade,) = pod_spec(mlflow)["initContainers"]
    assert upgrade["command"] == ["mlflow", "db", "upgrade", "$(MLFLOW_BACKEND_STORE_URI)"]
    store = read_env_file(k8s_tree / OVERLAY / "mlflow-store.env.example")
    assert urlparse(store["MLFLOW_BACKEND_STORE_URI"]).password is None and store["PGPASSWORD"]
    for container in containers(mlflow):
        assert {"secretRef": {"name": find_secret_name(k8s_docs, "loraplex-mlflow-store")}} in container["envFrom"]
    # The command is real: run it (the URI from the Secret, here a SQLite file) on an empty and
    # then an up-to-date database.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _ in range(2):
        argv = [word.replace("$(MLFLOW_BACKEND_STORE_URI)", uri) for word in upgrade["command"]]
        result = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=180, check=False)
        assert result.returncode == 0, result.stderr[-2000:]


def find_secret_name(docs: list[dict], prefix: str) -> str:
    (name,) = [d["metadata"]["name"] for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith(prefix)]
    return name


def test_mlflow_accepts_the_host_the_services_send(k8s_docs, is_allowed_host_header):
    (mlflow,) = pod_spec(find(k8s_docs, "Deployment", "loraplex-mlflow"))["containers"]
    env = {e["name"]: e["value"] for e in mlflow["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    service = find(k8s_docs, "Service", "loraplex-mlflow")
    for data in (d["data"] for d in k8s_docs if d["kind"] == "ConfigMap"):
        uri = urlparse(data.get("LORAPLEX_GATEWAY_REGISTRY_TRACKING_URI") or data["LORAPLEX_SHARD_REGISTRY_TRACKING_URI"])
        assert uri.hostname.split(".")[0] == service["metadata"]["name"] and uri.port == service["spec"]["ports"][0]["port"]
        assert is_allowed_host_header(allowed, uri.netloc), uri.netloc


# ---------------------------------------------------------------------------------- network


def pods_of(docs: list[dict]) -> dict[str, dict]:
    """app.kubernetes.io/name -> {labels, ports (name -> number)} of every workload's pods."""
    pods = {}
    for doc in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        labels = doc["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for c in pod_spec(doc)["containers"] for p in c.get("ports", [])}
        pods[labels["app.kubernetes.io/name"]] = {"labels": labels, "ports": ports}
    return pods


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def admitted(policies: list[dict], target: dict, port_name: str, source_labels: dict, source_namespace: dict) -> bool:
    """NetworkPolicy ingress semantics: a pod selected by any policy takes only what one of its
    rules admits; a rule matches when a `from` peer and a port match (absent = all)."""
    applying = [p for p in policies if selects(p["spec"]["podSelector"], target["labels"]) and "Ingress" in p["spec"]["policyTypes"]]
    assert applying, "every pod is under the default deny"
    for policy in applying:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p["port"] in (port_name, target["ports"][port_name]) for p in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                same_namespace = source_namespace.get("kubernetes.io/metadata.name") == "loraplex"
                if "namespaceSelector" in peer:
                    ns_ok = selects(peer["namespaceSelector"], source_namespace)
                    pod_ok = "podSelector" not in peer or selects(peer["podSelector"], source_labels)
                    if ns_ok and pod_ok:
                        return True
                elif same_namespace and selects(peer["podSelector"], source_labels):
                    return True
    return False


def test_network_policies_admit_only_the_intended_callers(k8s_docs):
    policies = [d for d in k8s_docs if d["kind"] == "NetworkPolicy"]
    pods = pods_of(k8s_docs)
    here = {"kubernetes.io/metadata.name": "loraplex"}
    elsewhere = {"kubernetes.io/metadata.name": "tenant-app"}
    publisher = {"app.kubernetes.io/name": "loraplex-publisher"}
    stranger = {"app": "anything"}

    def allowed(target: str, port: str, labels: dict, namespace: dict) -> bool:
        return admitted(policies, pods[target], port, labels, namespace)

    gateway, shard = pods["loraplex-gateway"]["labels"], pods["loraplex-shard"]["labels"]
    # Shards' plaintext gRPC: gateways only.
    assert allowed("loraplex-shard", "grpc", gateway, here)
    for labels, namespace in ((stranger, here), (pods["loraplex-mlflow"]["labels"], here), (gateway, elsewhere), (stranger, MONITORING)):
        assert not allowed("loraplex-shard", "grpc", labels, namespace)
    # MLflow: gateways, shards and publisher pods.
    for labels in (gateway, shard, publisher):
        assert allowed("loraplex-mlflow", "http", labels, here)
    assert not allowed("loraplex-mlflow", "http", stranger, here) and not allowed("loraplex-mlflow", "http", publisher, elsewhere)
    # Valkey: gateways only.
    assert allowed("loraplex-valkey", "redis", gateway, here) and not allowed("loraplex-valkey", "redis", shard, here)
    # Metrics and admin: the monitoring namespace only; the public API: anyone.
    assert allowed("loraplex-shard", "metrics", stranger, MONITORING) and not allowed("loraplex-shard", "metrics", gateway, here)
    assert allowed("loraplex-gateway", "admin", stranger, MONITORING) and not allowed("loraplex-gateway", "admin", stranger, elsewhere)
    assert allowed("loraplex-gateway", "http", stranger, elsewhere)


# ---------------------------------------------------------------------------------- operations


def test_base_model_fill_job_writes_the_volume_the_shards_wait_for(k8s_docs, tmp_path):
    job = find(k8s_docs, "Job", "loraplex-base-model-fill")
    claim = find(k8s_docs, "PersistentVolumeClaim", "loraplex-base-model")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    (fill,) = pod_spec(job)["containers"]
    job_volume = next(v for v in pod_spec(job)["volumes"] if v["name"] == "base-model")
    assert job_volume["persistentVolumeClaim"] == {"claimName": "loraplex-base-model"}
    assert {"secretRef": {"name": find_secret_name(k8s_docs, "loraplex-base-model-source")}} in fill["envFrom"]
    shard = find(k8s_docs, "StatefulSet", "loraplex-shard")
    shard_volume = next(v for v in pod_spec(shard)["volumes"] if v["name"] == "base-model")
    assert shard_volume["persistentVolumeClaim"] == {"claimName": "loraplex-base-model", "readOnly": True}
    (wait,) = pod_spec(shard)["initContainers"]
    marker = "/models/base/.loraplex-complete"
    assert marker in wait["command"][-1] and marker.split("/")[-1] in fill["command"][-1]
    # The fill script is idempotent: with the marker for the same URI it stops before copying.
    models = tmp_path / "models" / "base"
    models.mkdir(parents=True)
    (models / ".loraplex-complete").write_text("s3://bucket/model")
    script = fill["command"][-1].replace("/models/base", str(models))
    result = subprocess.run(
        ["sh", "-ec", script], env={"PATH": "/usr/bin:/bin", "BASE_MODEL_URI": "s3://bucket/model"},
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert result.returncode == 0 and "already copied" in result.stdout, result.stderr


def test_autoscaling_gateways_on_cpu_and_shards_on_queue_depth(k8s_docs):
    hpa = find(k8s_docs, "HorizontalPodAutoscaler", "loraplex-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "loraplex-gateway"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and hpa["spec"]["minReplicas"] >= 2
    gateway = find(k8s_docs, "Deployment", "loraplex-gateway")
    assert "replicas" not in gateway["spec"], "the autoscaler owns the gateway's replica count"
    assert find(k8s_docs, "PodDisruptionBudget", "loraplex-gateway")["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    scaled = find(k8s_docs, "ScaledObject", "loraplex-shard")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "loraplex-shard"}
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "loraplex_shard_queued_requests" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0
    assert scaled["spec"]["minReplicaCount"] >= 2 > find(k8s_docs, "PodDisruptionBudget", "loraplex-shard")["spec"]["maxUnavailable"]


def test_pod_monitors_scrape_the_metrics_ports_the_network_policies_open(k8s_docs):
    pods = pods_of(k8s_docs)
    for name, port in (("loraplex-gateway", "admin"), ("loraplex-shard", "metrics")):
        monitor = find(k8s_docs, "PodMonitor", name)
        assert selects(monitor["spec"]["selector"], pods[name]["labels"])
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == port and endpoint["path"] == "/metrics"
        assert port in pods[name]["ports"]


def test_gpu_nodes_component_pins_the_gpu_type_and_runtime_class(k8s_docs):
    spec = pod_spec(find(k8s_docs, "StatefulSet", "loraplex-shard"))
    assert spec["runtimeClassName"] == "nvidia"
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expression,) = term["matchExpressions"]
    assert expression["key"] == "nvidia.com/gpu.product" and expression["operator"] == "In" and expression["values"]
    # The patch adds to the base's anti-affinity and GPU toleration instead of replacing them.
    assert spec["affinity"]["podAntiAffinity"] and spec["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_base_model_from_an_image_copies_once_and_skips_after(k8s_tree, tmp_path):
    overlay = k8s_tree / "overlays" / "from-image"
    overlay.mkdir()
    overlay.joinpath("kustomization.yaml").write_text(
        "resources: [../../base]\ncomponents: [../../components/base-model-from-image]\n"
    )
    docs = kustomize_build(overlay)
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extras) is not installed")
    job = find(docs, "Job", "loraplex-base-model-fill")
    kubernetes_validate.validate(job, KUBERNETES_VERSIONS[-1], strict=True)
    (fill,) = pod_spec(job)["containers"]
    assert fill["securityContext"]["readOnlyRootFilesystem"] is True and "envFrom" not in fill
    assert {"name": "base-model", "mountPath": "/target"} in fill["volumeMounts"]
    image = {e["name"]: e["value"] for e in fill["env"]}["MODEL_IMAGE"]
    assert image == fill["image"]
    # Run the script with the image's /models and the volume as local folders.
    source, target = tmp_path / "image-models", tmp_path / "volume"
    (source / "sub").mkdir(parents=True)
    target.mkdir()
    (source / "config.json").write_text("{}")
    (source / "sub" / "model.safetensors").write_bytes(b"weights")
    script = fill["command"][-1].replace("/models", str(source)).replace("/target", str(target))
    runs = [
        subprocess.run(["sh", "-ec", script], env={"PATH": "/usr/bin:/bin", "MODEL_IMAGE": image},
                       capture_output=True, text=True, timeout=10, check=True).stdout
        for _ in range(2)
    ]
    assert "base model copied" in runs[0] and "already copied" in runs[1]
    assert (target / "sub" / "model.safetensors").read_bytes() == b"weights"
    assert (target / ".loraplex-complete").read_text() == image
