"""Helpers to run a real shard in-process on a free loopback port (gRPC over 127.0.0.1):
``shard_test_settings(model_dir, adapter_dirs, **overrides)`` and
``async with running_shard(settings) as address: ...`` (stops and drains on exit)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from loraplex.stack.ports import free_port
from protos import shard_pb2


def shard_test_settings(model_dir: Path, adapter_dirs: dict[str, Path], **overrides):
    from shard.settings import ShardSettings

    values = dict(
        port=free_port(), shard_id="test-shard", model_dir=str(model_dir), quantization="fp32",
        max_batch_size=2, max_queue=4, max_context=64, default_max_tokens=8, device_slots=2,
        max_rank=16, host_capacity=3, torch_threads=1, drain_step_s=0.02,
        adapter_dirs={name: str(path) for name, path in adapter_dirs.items()},
    )
    values.update(overrides)
    return ShardSettings.from_mapping(values)


@contextlib.asynccontextmanager
async def running_shard(settings, load_timeout_s: float = 120, **serve_options):
    from shard.server import serve

    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(settings, stop=stop, on_ready=lambda port: ready.set(), **serve_options))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=load_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        stop.set()
        if task in done:
            task.result()  # raises what made the shard fail
        raise TimeoutError(f"shard not ready after {load_timeout_s} s")
    try:
        yield settings.address
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def generate_request(prompt="hello", adapter="", version=None, max_tokens=6, **sampling) -> shard_pb2.GenerateRequest:
    return shard_pb2.GenerateRequest(
        request_id=f"r-{adapter or 'base'}", prompt=prompt,
        adapter=shard_pb2.AdapterRef(name=adapter, version=version or ("local" if adapter else "")),
        sampling=shard_pb2.SamplingParams(max_tokens=max_tokens, **sampling),
    )
