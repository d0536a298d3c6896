"""The real ``python -m shard`` process: a tiny model folder and PEFT adapter folders written by
the test, two adapters served concurrently over gRPC, health, and a clean SIGTERM stop."""

import concurrent.futures
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.stack.ports import free_port
from loraplex.stack.processes import ManagedProcess
from protos import shard_pb2, shard_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shard_process(tmp_path, tiny_model_dir, tiny_adapter_dirs):
    port = free_port()
    config = tmp_path / "shard.yaml"
    config.write_text(yaml.safe_dump({"shard": {
        "port": port, "shard_id": "proc-shard", "model_dir": str(tiny_model_dir), "quantization": "nf4",
        "max_batch_size": 4, "max_context": 128, "device_slots": 2, "max_rank": 16, "torch_threads": 1,
        "adapter_dirs": {name: str(path) for name, path in tiny_adapter_dirs.items()},
    }}))
    process = ManagedProcess(
        "shard", [sys.executable, "-m", "shard", "--config", str(config)], log_path=tmp_path / "shard.log", cwd=REPO
    )
    process.start()
    try:
        ready_line = f"shard proc-shard ready on 127.0.0.1:{port}"
        process.wait_until(lambda: ready_line in process.log_path.read_text(), timeout_s=180)
        yield process, f"127.0.0.1:{port}"
    finally:
        process.stop(grace_s=20)


def generate(address, adapter):
    with grpc.insecure_channel(address) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        request = shard_pb2.GenerateRequest(
            request_id=adapter, prompt="The contract says",
            adapter=shard_pb2.AdapterRef(name=adapter, version="local"),
            sampling=shard_pb2.SamplingParams(max_tokens=12),
        )
        return list(stub.Generate(request, timeout=120))


def test_shard_process_serves_two_adapters_and_stops_on_sigterm(shard_process):
    process, address = shard_process
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stats = shard_pb2_grpc.ShardStub(channel).Stats(shard_pb2.StatsRequest(), timeout=10)
        assert stats.quantization == "nf4" and stats.shard_id == "proc-shard"

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        alpha, beta = pool.map(lambda name: generate(address, name), ["alpha", "beta"])
    for name, chunks in (("alpha", alpha), ("beta", beta)):
        assert chunks[0].adapter.name == name
        assert chunks[-1].finish_reason in (shard_pb2.FINISH_REASON_LENGTH, shard_pb2.FINISH_REASON_STOP)
        assert chunks[-1].usage.prompt_tokens == len("The contract says")
        assert chunks[-1].usage.completion_tokens >= 1
    tokens = {name: [t for c in chunks for t in c.token_ids] for name, chunks in (("alpha", alpha), ("beta", beta))}
    assert tokens["alpha"] != tokens["beta"]

    process.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while process.is_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process.is_running()
    assert process.returncode == 0
    assert "shard proc-shard stopped" in process.log_path.read_text()
