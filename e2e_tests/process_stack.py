"""Real `python -m shard` and `python -m gateway` processes on loopback, for the tests that signal,
starve or flood them: shards over a small random Llama (slow enough on a CPU that a 250-token
answer streams for seconds) and a gateway with static routes, no MLflow.

Every process runs in its own process group and is stopped by that group when the test ends.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import psutil
import yaml

from gateway.tenants import sha256_hex
from loraplex.stack.ports import free_port
from loraplex.stack.processes import ManagedProcess
from protos import shard_pb2, shard_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TENANT_KEY = "rollout-tenant-key"
ADMIN_KEY = "rollout-admin-key"
ADAPTER = "legal"


def random_model(root: Path, hidden: int = 256, layers: int = 4, positions: int = 512) -> tuple[Path, Path]:
    """A random Llama (by default hidden 256, 4 layers: ~20 ms a decode step at batch 6 on a busy
    CPU core, never an early end-of-sequence in greedy answers) and one random PEFT adapter for it."""
    from bench.synthetic_models import random_llama, random_llama_config, save_random_llama, save_random_peft_adapter
    from loraplex.adapter_format import PROJECTIONS

    config = random_llama_config(
        hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers, num_heads=8, num_kv_heads=4,
        max_position_embeddings=positions,
    )
    model_dir = save_random_llama(root / "model", config, seed=0)
    adapter = save_random_peft_adapter(
        random_llama(config, seed=0), root / ADAPTER, rank=8, alpha=16, target_modules=PROJECTIONS, seed=1, std=0.1
    )
    return model_dir, adapter


@dataclass
class ProcessStack:
    root: Path
    model_dir: Path
    adapter_dir: Path
    shards: dict[str, ManagedProcess] = field(default_factory=dict)
    shard_addresses: dict[str, str] = field(default_factory=dict)
    gateway: ManagedProcess | None = None
    gateway_url: str = ""
    admin_url: str = ""

    # ---- shards ----------------------------------------------------------------------------------
    def start_shard(self, shard_id: str, **settings) -> str:
        port = free_port()
        values = {
            "port": port, "shard_id": shard_id, "model_dir": str(self.model_dir), "quantization": "fp32",
            "max_batch_size": 8, "max_queue": 16, "max_context": 512, "device_slots": 2, "max_rank": 16,
            "torch_threads": 1, "adapter_dirs": {ADAPTER: str(self.adapter_dir)}, **settings,
        }
        config = self.root / f"{shard_id}.yaml"
        config.write_text(yaml.safe_dump({"shard": values}))
        process = ManagedProcess(
            shard_id, [sys.executable, "-m", "shard", "--config", str(config)], log_path=self.root / f"{shard_id}.log", cwd=REPO
        )
        process.start()
        self.shards[shard_id] = process
        self.shard_addresses[shard_id] = f"127.0.0.1:{port}"
        ready = f"shard {shard_id} ready on 127.0.0.1:{port}"
        process.wait_until(lambda: ready in process.log_path.read_text(), timeout_s=420)
        return self.shard_addresses[shard_id]

    def shard_stats(self, shard_id: str) -> shard_pb2.StatsResponse:
        with grpc.insecure_channel(self.shard_addresses[shard_id]) as channel:
            return shard_pb2_grpc.ShardStub(channel).Stats(shard_pb2.StatsRequest(), timeout=10)

    # ---- gateway ---------------------------------------------------------------------------------
    def start_gateway(self, **settings) -> str:
        tenants = self.root / "tenants.yaml"
        tenants.write_text(yaml.safe_dump({
            "admin_key_sha256": sha256_hex(ADMIN_KEY),
            "tenants": [{"name": "acme", "key_sha256": [sha256_hex(TENANT_KEY)], "adapters": [ADAPTER, "base"]}],
        }))
        values = {
            "port": 0, "admin_port": 0, "tenants_file": str(tenants),
            "shard_addresses": list(self.shard_addresses.values()),
            "static_routes": {ADAPTER: {"champion": "local"}},
            "health_interval_s": 0.2, "health_timeout_s": 2.0, "max_tokens_limit": 512, "request_timeout_s": 60, **settings,
        }
        config = self.root / "gateway.yaml"
        config.write_text(yaml.safe_dump({"gateway": values}))
        log_path = self.root / "gateway.log"
        log_path.write_text("")
        self.gateway = ManagedProcess(
            "gateway", [sys.executable, "-m", "gateway", "--config", str(config), "--log-level", "warning"], log_path=log_path, cwd=REPO
        )
        self.gateway.start()

        def ready() -> bool:
            lines = log_path.read_text().splitlines()
            urls = {line.split()[1]: line.split()[3] for line in lines if line.startswith(("gateway ready on", "gateway admin on"))}
            if "ready" not in urls or "admin" not in urls:
                return False
            self.gateway_url, self.admin_url = urls["ready"], urls["admin"]
            report = httpx.get(f"{self.gateway_url}/readyz", timeout=5).json()
            return sorted(report["healthy_shards"]) == sorted(self.shard_addresses)

        self.gateway.wait_until(ready, timeout_s=60)
        return self.gateway_url

    def gateway_rss_bytes(self) -> int:
        """Resident memory of the gateway and every process it started (its workers)."""
        parent = psutil.Process(self.gateway.pid)
        return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])

    def stop(self) -> None:
        for process in [self.gateway, *self.shards.values()]:
            if process is not None:
                process.stop(grace_s=30)


@contextmanager
def process_stack(root: Path, model: tuple[Path, Path]) -> Iterator[ProcessStack]:
    stack = ProcessStack(root, *model)
    try:
        yield stack
    finally:
        stack.stop()


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TENANT_KEY}"}


def sse_payloads(lines: list[str]) -> list[dict | str]:
    """The `data:` payloads of an SSE body: dicts, and the final "[DONE]"."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]
