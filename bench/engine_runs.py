"""Driving loraplex's engine for the benchmark: the real Engine and LoRA manager (layers, slot
pool, tiered adapter cache), fed through their public calls (submit / run_once / request handles /
LoraManager.load)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

from bench.run_result import RunResult
from bench.workloads import BenchRequest
from shard.engine import Engine, GenerationRequest, SamplingOptions
from shard.lora import LOCAL_VERSION, AdapterKey, LocalAdapterSource, LoraManager
from shard.intra_op_threads import run_in_ending_thread
from shard.packed_weights import pack_linear_weights


T = TypeVar("T")


def adapter_key(name: str) -> AdapterKey:
    return AdapterKey(name, LOCAL_VERSION)


def generation_request(request: BenchRequest, prefix: str) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"{prefix}-{request.index}",
        prompt_ids=list(request.prompt_ids),
        adapter=adapter_key(request.adapter) if request.adapter is not None else None,
        sampling=SamplingOptions(max_tokens=request.new_tokens),  # greedy
    )


@dataclass
class LoraplexShard:
    """The shard's compute core as `python -m shard` assembles it, minus gRPC."""

    model: torch.nn.Module
    tokenizer: object
    lora: LoraManager
    max_batch: int

    @classmethod
    def build(cls, model, tokenizer, adapter_dirs: dict[str, Path], *, device_slots: int, max_rank: int,
              host_capacity: int, max_batch: int,
              pool_dtype: torch.dtype | None = None) -> "LoraplexShard":
        # As `shard.server.build_core` does before installing LoRA: the base a shard serves.
        pack_linear_weights(model)
        lora = LoraManager.install(
            model, LocalAdapterSource(adapter_dirs), device_slots=device_slots, max_rank=max_rank,
            host_capacity=host_capacity, pool_dtype=pool_dtype,
        )
        return cls(model, tokenizer, lora, max_batch)

    def engine(self, *, context: int, max_queue: int = 256) -> Engine:
        return Engine(
            self.model,
            self.tokenizer,
            max_batch_size=self.max_batch,
            max_queue=max_queue,
            max_context=self.model.config.max_position_embeddings,
            # One prefill forward admits the whole load: every later step is a pure decode step.
            prefill_chunk_tokens=16384,
            lora=self.lora,
            initial_kv_columns=context,
        )

    def warm(self, names: list[str]) -> None:
        for name in names:
            self.lora.load(adapter_key(name))

    def close(self) -> None:
        self.lora.close()


def context_for(requests: list[BenchRequest]) -> int:
    return max(len(r.prompt_ids) + r.new_tokens for r in requests) + 1


def paired_decode_steps(base_engine: Engine, lora_engine: Engine, base: list[BenchRequest],
                        lora: list[BenchRequest]) -> dict[str, list[float]]:
    """Run the same load on two idle engines over the same model, one step of each in turn (the
    order flips every step), so each pair of decode steps sees the same machine load and the same
    context length. Returns every pure decode step's seconds per side."""
    engines = {"base": base_engine, "lora": lora_engine}
    loads = {"base": base, "lora": lora}
    for side, engine in engines.items():
        for request in loads[side]:
            engine.submit(generation_request(request, side))
    times: dict[str, list[float]] = {"base": [], "lora": []}
    for side, engine in engines.items():  # prefill + first decode step: not a decode-only step
        engine.run_once()
        if engine.stats().running != len(loads[side]):
            raise RuntimeError(f"{side}: not every request started in the first step (adapters not resident?)")
    order = ["base", "lora"]
    in_flight = {"base": True, "lora": True}
    while any(in_flight.values()):
        for side in order:
            if not in_flight[side]:
                continue
            engine = engines[side]
            running = engine.stats().running
            tokens_before = engine.stats().tokens_generated
            started = time.perf_counter()
            in_flight[side] = engine.run_once()
            elapsed = time.perf_counter() - started
            if engine.stats().tokens_generated - tokens_before != running:
                raise RuntimeError(f"{side}: a step produced tokens for other than every running row")
            times[side].append(elapsed)
        order.reverse()
    if len(times["base"]) != len(times["lora"]):
        raise RuntimeError("the two sides ran different numbers of decode steps")
    return times


async def _serve_arrivals(engine: Engine, requests: list[BenchRequest], prefix: str) -> RunResult:
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(request: BenchRequest) -> tuple[int, float]:
        await asyncio.sleep(max(0.0, start + request.arrival_s - loop.time()))
        handle = engine.submit(generation_request(request, prefix))
        tokens = 0
        async for chunk in handle:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens, loop.time() - start - request.arrival_s

    results = await asyncio.gather(*(one(r) for r in requests))
    seconds = loop.time() - start - min(r.arrival_s for r in requests)
    return RunResult("loraplex", sum(t for t, _ in results), seconds, [lat for _, lat in results])


def on_own_thread(function: Callable[..., T], *args) -> T:
    """`function(*args)` on a thread that ends when it returns. GNU OpenMP keeps a worker pool for
    every thread that ran a parallel region, and once the pools' threads outnumber the CPUs every
    barrier sleeps instead of spinning (shard/intra_op_threads.py): with the main thread's pool alive
    beside an engine's, a 2-core Xeon served the same bf16 load at 548 tok/s instead of 953 and
    switched threads ~240,000 times. So the benchmark's main thread runs no kernels itself, and
    whatever runs them (a baseline, a phase of steps) does it on a thread whose pool ends with it."""
    return run_in_ending_thread("bench-phase", function, *args).result()


def serve_on_new_engine(shard: LoraplexShard, requests: list[BenchRequest], prefix: str, *, context: int,
                        max_queue: int = 256) -> RunResult:
    """`serve` on an engine started for this run and stopped after it: its thread, and its pool,
    are the only ones computing while it serves, as in `python -m shard`. It is built on a thread of
    its own too: allocating its caches fills memory in parallel regions."""
    engine = on_own_thread(lambda: shard.engine(context=context, max_queue=max_queue)).start()
    try:
        return serve(engine, requests, prefix)
    finally:
        engine.stop(timeout=30)


def serve(engine: Engine, requests: list[BenchRequest], prefix: str = "run") -> RunResult:
    """Submit each request at its arrival time to a started engine, from an asyncio loop as the
    gRPC servicer does, and stream every answer to the end."""
    result = asyncio.run(_serve_arrivals(engine, requests, prefix))
    expected = sum(r.new_tokens for r in requests)
    if result.tokens != expected:
        raise RuntimeError(f"the engine produced {result.tokens} tokens, {expected} were asked for")
    return result
