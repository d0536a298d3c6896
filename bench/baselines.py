"""The two designs the engine is measured against, built on PEFT as people publish them.

- NaiveLockServer: one PeftModel holding every adapter; each request takes an asyncio lock, calls
  `set_adapter`, then `model.generate` for itself alone (in a worker thread, so the event loop
  stays responsive). Tenants are served one at a time.
- PeftStaticBatcher: PEFT's best: whatever has arrived (up to the batch size) is run as one
  `model.generate(..., adapter_names=[...])` mixed-adapter batch; the next batch starts when the
  whole batch has finished (static batching: a batch runs as long as its longest answer)."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path

import torch

from bench.run_result import RunResult
from bench.workloads import BenchRequest


def build_peft_model(base_model: torch.nn.Module, adapter_dirs: dict[str, Path]):
    """A PeftModel over a private copy of `base_model` with every adapter in `adapter_dirs` loaded."""
    from peft import PeftModel

    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()
    model.requires_grad_(False)
    return model


def _generate(model, prompts: list[tuple[int, ...]], new_tokens: int, adapter_names: list[str] | None) -> torch.Tensor:
    """Greedy generation of exactly `new_tokens` per row, prompts left-padded."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    generated = out[:, width:]
    if generated.shape[1] != new_tokens:
        raise RuntimeError(f"generate returned {generated.shape[1]} new tokens, {new_tokens} were asked for")
    return generated


class NaiveLockServer:
    def __init__(self, peft_model) -> None:
        self.model = peft_model
        self.lock: asyncio.Lock | None = None

    async def handle(self, request: BenchRequest) -> int:
        async with self.lock:
            self.model.set_adapter(request.adapter)
            generated = await asyncio.to_thread(_generate, self.model, [request.prompt_ids], request.new_tokens, None)
        return int(generated.shape[1])

    def serve(self, requests: list[BenchRequest]) -> RunResult:
        async def run() -> RunResult:
            self.lock = asyncio.Lock()  # one server lifetime per run (an asyncio lock belongs to one loop)
            loop = asyncio.get_running_loop()
            start = loop.time()

            async def one(request: BenchRequest) -> tuple[int, float]:
                await asyncio.sleep(max(0.0, start + request.arrival_s - loop.time()))
                tokens = await self.handle(request)
                return tokens, loop.time() - start - request.arrival_s

            results = await asyncio.gather(*(one(r) for r in requests))
            seconds = loop.time() - start - min(r.arrival_s for r in requests)
            return RunResult("peft_lock_set_adapter_generate", sum(t for t, _ in results), seconds, [lat for _, lat in results])

        return asyncio.run(run())


class PeftStaticBatcher:
    def __init__(self, peft_model, max_batch: int) -> None:
        self.model = peft_model
        self.max_batch = max_batch

    def serve(self, requests: list[BenchRequest]) -> RunResult:
        pending = sorted(requests, key=lambda r: r.arrival_s)
        start = time.perf_counter()
        tokens, latencies, batches, padded_tokens = 0, [], 0, 0
        while pending:
            now = time.perf_counter() - start
            if pending[0].arrival_s > now:
                time.sleep(pending[0].arrival_s - now)
                now = time.perf_counter() - start
            batch = [r for r in pending if r.arrival_s <= now][: self.max_batch]
            pending = [r for r in pending if r not in batch]
            longest = max(r.new_tokens for r in batch)
            _generate(self.model, [r.prompt_ids for r in batch], longest, [r.adapter for r in batch])
            finished = time.perf_counter() - start
            batches += 1
            padded_tokens += longest * len(batch)
            for request in batch:
                tokens += request.new_tokens  # the rest of the row was generated and thrown away
                latencies.append(finished - request.arrival_s)
        seconds = time.perf_counter() - start - min(r.arrival_s for r in requests)
        return RunResult(
            "peft_static_batches_adapter_names", tokens, seconds, latencies,
            {"batches": batches, "generated_tokens_incl_discarded": padded_tokens},
        )
