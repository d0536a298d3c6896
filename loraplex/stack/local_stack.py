"""The whole product on one machine, on loopback: MLflow, N shards and the gateway.

`loraplex up` (and `make run`) drives this class; the end-to-end tests start it too, on free
ports, so what the tests exercise is what a user runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.stack.demo_tenants import DemoKeys, load_or_create_demo_keys, write_tenants_file
from loraplex.stack.ports import free_port, preferred_or_free_port
from loraplex.stack.processes import ManagedProcess
from loraplex.stack.redis_server import RedisServer

LOOPBACK = "127.0.0.1"


@dataclass
class LocalStackConfig:
    state_dir: Path
    num_shards: int = 2
    gateway_port: int = 8000
    gateway_admin_port: int = 8001
    mlflow_port: int = 5000
    shard_base_port: int = 50051
    shard_metrics_base_port: int = 9400
    quantization: str = "nf4"
    demo_dir: Path | None = None
    # Tests want every port fresh; a user wants the documented ports when they are free.
    always_free_ports: bool = False
    shard_env: dict[str, str] = field(default_factory=dict)
    gateway_env: dict[str, str] = field(default_factory=dict)
    # Gateway processes on its port; more than one (or 0 = one per core) shares tenant limits
    # through a Valkey server that the stack starts, unless LORAPLEX_GATEWAY_REDIS_URL names one.
    gateway_workers: int = 1
    redis_port: int = 6379
    start_timeout_s: float = 300.0


@dataclass
class RunningStack:
    gateway_url: str
    gateway_admin_url: str  # metrics and the admin API
    mlflow_url: str
    shard_addresses: dict[str, str]
    shard_metrics_urls: dict[str, str]
    redis_url: str | None
    keys: DemoKeys
    state_dir: Path
    tenants_file: Path
    demo_prompt: str
    style_markers: dict[str, list[str]]


class LocalStack:
    def __init__(self, config: LocalStackConfig) -> None:
        self.config = config
        self.mlflow = None
        self.shards: dict[str, ManagedProcess] = {}
        self.gateway: ManagedProcess | None = None
        self.redis: RedisServer | None = None
        self.running: RunningStack | None = None
        self.timings_s: dict[str, float] = {}

    def _port(self, preferred: int) -> int:
        return free_port() if self.config.always_free_ports else preferred_or_free_port(preferred)

    def start(self, log=print) -> RunningStack:
        from loraplex.demo import ensure_demo_assets
        from loraplex.stack.mlflow_server import MlflowServer
        from registry import AdapterRegistry
        from loraplex.demo.publish import publish_demo_adapters

        cfg = self.config
        state = cfg.state_dir.resolve()
        state.mkdir(parents=True, exist_ok=True)
        logs = state / "logs"
        t0 = time.monotonic()
        try:
            log("building or loading the demo model and adapters…")
            assets = ensure_demo_assets(cfg.demo_dir, progress=True)
            self.timings_s["demo_assets"] = time.monotonic() - t0

            log("starting MLflow…")
            t = time.monotonic()
            self.mlflow = MlflowServer(state / "mlflow", host=LOOPBACK, port=self._port(cfg.mlflow_port))
            self.mlflow.start()
            self.timings_s["mlflow"] = time.monotonic() - t

            t = time.monotonic()
            registry = AdapterRegistry(self.mlflow.url, cache_dir=state / "registry-cache")
            published = publish_demo_adapters(registry, assets.base_dir, assets.adapters)
            self.timings_s["publish"] = time.monotonic() - t
            log("adapters: " + ", ".join(f"{n} v{v.version} (champion)" for n, v in published.items()))

            keys = load_or_create_demo_keys(state / "demo-keys.json")
            tenants_file = state / "tenants.yaml"
            write_tenants_file(tenants_file, keys)

            t = time.monotonic()
            shard_addresses, shard_metrics_urls = self._start_shards(assets.base_dir, logs, state, log)
            self.timings_s["shards"] = time.monotonic() - t

            t = time.monotonic()
            gateway_url, gateway_admin_url = self._start_gateway(shard_addresses, tenants_file, logs, state, log)
            self.timings_s["gateway"] = time.monotonic() - t
            self.timings_s["total"] = time.monotonic() - t0
            self._write_process_groups(state)
        except BaseException:
            self.stop()
            raise
        self.running = RunningStack(
            gateway_url=gateway_url,
            gateway_admin_url=gateway_admin_url,
            mlflow_url=self.mlflow.url,
            shard_addresses=shard_addresses,
            shard_metrics_urls=shard_metrics_urls,
            redis_url=self.redis.url if self.redis else None,
            keys=keys,
            state_dir=state,
            tenants_file=tenants_file,
            demo_prompt=assets.demo_prompt,
            style_markers=assets.style_markers,
        )
        return self.running

    def _start_shards(self, base_dir: Path, logs: Path, state: Path, log) -> tuple[dict[str, str], dict[str, str]]:
        """Starts the shards; returns their gRPC addresses and Prometheus metrics URLs."""
        cfg = self.config
        addresses: dict[str, str] = {}
        metrics_urls: dict[str, str] = {}
        for index in range(cfg.num_shards):
            shard_id = f"shard-{index}"
            port = self._port(cfg.shard_base_port + index)
            metrics_port = self._port(cfg.shard_metrics_base_port + index)
            env = {
                **os.environ,
                "LORAPLEX_SHARD_SHARD_ID": shard_id,
                "LORAPLEX_SHARD_HOST": LOOPBACK,
                "LORAPLEX_SHARD_PORT": str(port),
                "LORAPLEX_SHARD_METRICS_PORT": str(metrics_port),
                "LORAPLEX_SHARD_MODEL_DIR": str(base_dir),
                "LORAPLEX_SHARD_QUANTIZATION": cfg.quantization,
                "LORAPLEX_SHARD_REGISTRY_TRACKING_URI": self.mlflow.url,
                "LORAPLEX_SHARD_ADAPTER_CACHE_DIR": str(state / f"{shard_id}-adapters"),
                # Two shards share two cores: one thread each keeps them from thrashing.
                "LORAPLEX_SHARD_TORCH_THREADS": "1",
                **cfg.shard_env,
            }
            process = ManagedProcess(
                shard_id, [sys.executable, "-m", "shard"], log_path=logs / f"{shard_id}.log", env=env
            )
            process.start()
            self.shards[shard_id] = process
            addresses[shard_id] = f"{LOOPBACK}:{port}"
            metrics_urls[shard_id] = f"http://{LOOPBACK}:{metrics_port}/metrics"
        log(f"starting {cfg.num_shards} shards…")
        for shard_id, process in self.shards.items():
            process.wait_until(lambda a=addresses[shard_id]: shard_is_serving(a), cfg.start_timeout_s)
        return addresses, metrics_urls

    def _start_gateway(
        self, shard_addresses: dict[str, str], tenants_file: Path, logs: Path, state: Path, log
    ) -> tuple[str, str]:
        port, admin_port = self._port(self.config.gateway_port), self._port(self.config.gateway_admin_port)
        shared: dict[str, str] = {}
        if self.config.gateway_workers != 1:
            shared["LORAPLEX_GATEWAY_WORKERS"] = str(self.config.gateway_workers)
            if not (self.config.gateway_env.get("LORAPLEX_GATEWAY_REDIS_URL") or os.environ.get("LORAPLEX_GATEWAY_REDIS_URL")):
                log("starting Valkey (tenant limits shared by the gateway's workers)…")
                self.redis = RedisServer(state / "redis", LOOPBACK, self._port(self.config.redis_port)).start()
                shared["LORAPLEX_GATEWAY_REDIS_URL"] = self.redis.url
        env = {
            **os.environ,
            **shared,
            "LORAPLEX_GATEWAY_HOST": LOOPBACK,
            "LORAPLEX_GATEWAY_PORT": str(port),
            "LORAPLEX_GATEWAY_ADMIN_PORT": str(admin_port),
            "LORAPLEX_GATEWAY_SHARD_ADDRESSES": ",".join(shard_addresses.values()),
            "LORAPLEX_GATEWAY_TENANTS_FILE": str(tenants_file),
            "LORAPLEX_GATEWAY_REGISTRY_TRACKING_URI": self.mlflow.url,
            "LORAPLEX_GATEWAY_REGISTRY_CACHE_DIR": str(state / "gateway-registry-cache"),
            "LORAPLEX_GATEWAY_SHADOW_LOG_PATH": str(state / "shadow.jsonl"),
            "LORAPLEX_GATEWAY_SERVING_RECORD_FILE": str(state / "gateway-serving-record.json"),
            **self.config.gateway_env,
        }
        self.gateway = ManagedProcess(
            "gateway", [sys.executable, "-m", "gateway"], log_path=logs / "gateway.log", env=env
        )
        self.gateway.start()
        url = f"http://{LOOPBACK}:{port}"
        log("starting the gateway…")
        self.gateway.wait_until(lambda: gateway_is_ready(url), self.config.start_timeout_s)
        return url, f"http://{LOOPBACK}:{admin_port}"

    def _write_process_groups(self, state: Path) -> None:
        """Records every child's process group, so a supervisor (or a test) can check they end."""
        groups = {name: p.pid for name, p in self.shards.items()}
        groups["gateway"] = self.gateway.pid
        groups["mlflow"] = self.mlflow.process.pid
        if self.redis is not None:
            groups["redis"] = self.redis.process.pid
        (state / "process-groups.json").write_text(json.dumps(groups, indent=2))

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for process in self.shards.values():
            process.stop()
        if self.mlflow is not None:
            self.mlflow.stop()
        if self.redis is not None:
            self.redis.stop()


def shard_is_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def gateway_is_ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
