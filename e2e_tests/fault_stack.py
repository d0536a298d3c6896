"""A whole stack started in-process (LocalStack) so tests can break its parts: kill a shard,
restart MLflow, tamper with artifacts, move aliases through MLflow's REST API.

One stack per session (`fault_stack`), shared by the registry and gateway end-to-end tests. Each
test leaves the registry as it found it (aliases, canary tag) or works on versions of its own; a
test that kills a shard starts it again before it ends.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loraplex.stack.local_stack import LocalStack, LocalStackConfig, RunningStack, shard_is_serving
from loraplex.stack.redis_server import RedisServer
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.waiting import wait_until

MLFLOW_API = "/api/2.0/mlflow"

# Fast enough that the deadlines of issues 4 and 5 (5 s to follow a promotion, 2 s to drop a dead
# shard) are met with room to spare on a busy 2-core machine.
FAST_GATEWAY_ENV = {
    "LORAPLEX_GATEWAY_REGISTRY_POLL_INTERVAL_S": "0.5",
    "LORAPLEX_GATEWAY_HEALTH_INTERVAL_S": "0.25",
    "LORAPLEX_GATEWAY_HEALTH_TIMEOUT_S": "0.5",
    "LORAPLEX_GATEWAY_SHADOW_AGGREGATE_EVERY": "5",
    "LORAPLEX_GATEWAY_REQUEST_TIMEOUT_S": "60",
    # Serving status reaches MLflow within a second or two; a writer that dies is replaced within 3 s.
    "LORAPLEX_GATEWAY_SERVING_STATUS_INTERVAL_S": "0.5",
    "LORAPLEX_GATEWAY_SERVING_STATUS_LEASE_S": "3",
    # One process, sharing its store (tenant limits, shadow totals, the serving-status lease) with
    # any other gateway a test starts against this stack.
    "LORAPLEX_GATEWAY_WORKERS": "1",
}


@dataclass
class FaultStack:
    stack: LocalStack
    running: RunningStack
    base_dir: Path
    adapter_dirs: dict[str, Path]
    work_dir: Path
    traces: OtlpReceiver  # every process of the stack exports its spans here over OTLP/HTTP
    store: RedisServer  # the Valkey the gateway shares its state through, as replicas of a cluster do

    # ---- clients -----------------------------------------------------------------------------
    @property
    def gateway_url(self) -> str:
        return self.running.gateway_url

    @property
    def gateway_admin_url(self) -> str:
        return self.running.gateway_admin_url

    @property
    def mlflow_url(self) -> str:
        return self.running.mlflow_url

    @property
    def tenant_key(self) -> str:
        return self.running.keys.tenant_keys["acme"]

    def tenant_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tenant_key}"}

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.running.keys.admin_key}"}

    def http(self, timeout_s: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.gateway_url, timeout=timeout_s)

    def admin_http(self, timeout_s: float = 60.0) -> httpx.Client:
        """The gateway's admin port: metrics and the admin API."""
        return httpx.Client(base_url=self.gateway_admin_url, timeout=timeout_s)

    def complete(self, client: httpx.Client, model: str, **extra) -> httpx.Response:
        body = {"model": model, "prompt": self.running.demo_prompt, "max_tokens": 1, "temperature": 0, **extra}
        return client.post("/v1/completions", json=body, headers=self.tenant_headers())

    def registry(self):
        from registry import AdapterRegistry

        return AdapterRegistry(self.mlflow_url, self.work_dir / "test-registry-cache")

    # ---- MLflow, exactly as its UI calls it -----------------------------------------------------
    def set_alias(self, name: str, alias: str, version: str) -> None:
        reply = httpx.post(
            f"{self.mlflow_url}{MLFLOW_API}/registered-models/alias",
            json={"name": name, "alias": alias, "version": str(version)},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text

    def delete_alias(self, name: str, alias: str) -> None:
        reply = httpx.request(
            "DELETE", f"{self.mlflow_url}{MLFLOW_API}/registered-models/alias", json={"name": name, "alias": alias}, timeout=10
        )
        assert reply.status_code == 200, reply.text

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        reply = httpx.post(
            f"{self.mlflow_url}{MLFLOW_API}/registered-models/set-tag", json={"name": name, "key": key, "value": value}, timeout=10
        )
        assert reply.status_code == 200, reply.text

    def alias_version(self, name: str, alias: str) -> str | None:
        reply = httpx.get(f"{self.mlflow_url}{MLFLOW_API}/registered-models/get", params={"name": name}, timeout=10)
        reply.raise_for_status()
        for entry in reply.json()["registered_model"].get("aliases") or []:
            if entry["alias"] == alias:
                return str(entry["version"])
        return None

    # ---- adapters --------------------------------------------------------------------------------
    def variant_folder(self, adapter: str, label: str, lora_alpha_factor: float) -> Path:
        """A copy of a demo adapter with lora_alpha scaled: new content, so a new version."""
        target = self.work_dir / f"{adapter}-{label}"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(self.adapter_dirs[adapter], target)
        config_path = target / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["lora_alpha"] = config["lora_alpha"] * lora_alpha_factor
        config_path.write_text(json.dumps(config, indent=2))
        return target

    def publish_variant(self, adapter: str, label: str, lora_alpha_factor: float = 2.0, name: str | None = None) -> str:
        """A variant of the demo adapter `adapter`, published as a new version of `name` (default: `adapter`)."""
        folder = self.variant_folder(adapter, label, lora_alpha_factor)
        return self.registry().publish(folder, name or adapter, self.base_dir).version

    def publish_corrupt_variant(self, adapter: str, label: str, name: str | None = None) -> str:
        """A new version whose stored weights are then damaged: bytes flipped inside the tensor
        data (the header stays valid), so only the sha256 check can tell."""
        version = self.publish_variant(adapter, label, lora_alpha_factor=3.0, name=name)
        path = self.artifact_file(self.registry().resolve(name or adapter, version).run_id, "adapter_model.safetensors")
        data = bytearray(path.read_bytes())
        for offset in range(len(data) - 64, len(data) - 32):
            data[offset] ^= 0x5A
        path.write_bytes(bytes(data))
        return version

    def artifact_file(self, run_id: str, filename: str) -> Path:
        """Where MLflow's artifact proxy keeps a run's file on this host."""
        found = sorted(self.stack.mlflow.artifacts_dir.glob(f"**/{run_id}/artifacts/**/{filename}"))
        assert found, f"no {filename} for run {run_id} under {self.stack.mlflow.artifacts_dir}"
        return found[0]

    # ---- shards ----------------------------------------------------------------------------------
    def shards_view(self) -> dict:
        reply = httpx.get(f"{self.gateway_admin_url}/admin/shards", headers=self.admin_headers(), timeout=10)
        reply.raise_for_status()
        return reply.json()

    def restart_shard(self, shard_id: str, timeout_s: float = 180.0) -> None:
        process = self.stack.shards[shard_id]
        if process.is_running():
            return
        process.start()
        process.wait_until(lambda: shard_is_serving(self.running.shard_addresses[shard_id]), timeout_s)

    def wait_in_ring(self, shard_id: str, present: bool, timeout_s: float) -> bool:
        return bool(wait_until(lambda: (shard_id in self.shards_view()["ring"]["members"]) == present, timeout_s))

    def reload_routing(self) -> dict:
        reply = httpx.post(f"{self.gateway_admin_url}/admin/routing/reload", headers=self.admin_headers(), timeout=30)
        reply.raise_for_status()
        return reply.json()


@pytest.fixture(scope="session")
def fault_stack(tmp_path_factory, demo_assets) -> FaultStack:
    state_dir = tmp_path_factory.mktemp("fault-stack")
    traces = OtlpReceiver().start()
    store = RedisServer(state_dir / "redis").start()
    # The standard OpenTelemetry variables, as a deployment sets them; spans leave every 0.2 s.
    tracing_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": traces.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    stack = LocalStack(
        LocalStackConfig(
            state_dir=state_dir,
            always_free_ports=True,
            gateway_env={**FAST_GATEWAY_ENV, **tracing_env, "LORAPLEX_GATEWAY_REDIS_URL": store.url},
            shard_env=dict(tracing_env),
        )
    )
    try:
        running = stack.start(log=lambda _: None)
        work_dir = state_dir / "test-work"
        work_dir.mkdir()
        yield FaultStack(stack, running, Path(demo_assets.base_dir), dict(demo_assets.adapters), work_dir, traces, store)
    finally:
        stack.stop()
        traces.stop()
        store.stop()
