"""Micro-benchmark of the multi-adapter LoRA layers at decode.

A random ~100M-parameter Llama (hidden 768, 12 layers), rank-16 adapters on all seven projections,
batch 32 with 32 distinct adapters, one decode step over 128 tokens of context. Reports
base step time / LoRA step time, measured in one process with interleaved (paired) runs so that
machine load affects both sides alike. Writes JSON next to this file (or --out).

    .venv/bin/python bench/lora_layer_bench.py [--quick] [--pool-dtype fp32 bf16] [--kernel auto torch] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from shard.lora import AdapterKey, HostAdapter, LoraFactors, install_multi_lora
from bench.synthetic_models import random_llama, random_llama_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_host_adapter(runtime, name: str, rank: int, generator: torch.Generator) -> HostAdapter:
    modules = {}
    for module, shape in runtime.module_shapes.items():
        a = torch.randn(rank, shape.in_features, generator=generator) * 0.02
        b_t = torch.randn(rank, shape.out_features, generator=generator) * 0.02
        modules[module] = LoraFactors(a=a.to(runtime.pool.dtype), b_t=b_t.to(runtime.pool.dtype))
    return HostAdapter(key=AdapterKey(name, "bench"), modules=modules, weights_sha256="", size_bytes=0)


def decode_step(model, cache, input_ids, context: int):
    with torch.inference_mode():
        model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    cache.crop(-input_ids.shape[1])  # back to `context` tokens: every step sees the same length


def prefill_cache(model, batch: int, context: int, generator: torch.Generator):
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=generator)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_llama():
    """The random ~100M-parameter Llama the decode micro-benchmarks run (hidden 768, 12 layers)."""
    config = random_llama_config(
        hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=12, vocab_size=8192
    )
    return random_llama(config, seed=0)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    base_model = bench_llama()
    config = base_model.config
    params = sum(p.numel() for p in base_model.parameters())
    step_ids = torch.randint(3, config.vocab_size, (args.batch, 1), generator=generator)
    results = {
        "model_params": params,
        "batch": args.batch,
        "context": args.context,
        "rank": args.rank,
        "max_rank": args.max_rank,
        "threads": args.threads,
        "rounds": args.rounds,
        "variants": [],
    }
    base_cache = prefill_cache(base_model, args.batch, args.context, generator)
    for dtype_name, kernel in [(d, k) for d in args.pool_dtype for k in args.kernel]:
        model = copy.deepcopy(base_model)
        runtime = install_multi_lora(
            model,
            device_slots=max(args.distinct),
            max_rank=args.max_rank,
            pool_dtype=DTYPES[dtype_name],
            decode_kernel=kernel,
        )
        for slot in range(runtime.pool.num_slots):
            runtime.pool.write(slot, random_host_adapter(runtime, f"a{slot}", args.rank, generator))
        lora_cache = copy.deepcopy(base_cache)
        for distinct in args.distinct:
            # Rows in shuffled order over `distinct` adapters: no row->slot identity to exploit.
            slots = torch.arange(args.batch) % distinct
            slots = slots[torch.randperm(args.batch, generator=generator)].tolist()
            rows = [[(slot, 1.0)] for slot in slots]
            for _ in range(args.warmup):
                decode_step(base_model, base_cache, step_ids, args.context)
                runtime.set_batch_rows(rows)
                decode_step(model, lora_cache, step_ids, args.context)
            base_times, lora_times = [], []
            for _ in range(args.rounds):
                base_times.append(timed(lambda: decode_step(base_model, base_cache, step_ids, args.context)))
                runtime.set_batch_rows(rows)
                lora_times.append(timed(lambda: decode_step(model, lora_cache, step_ids, args.context)))
                runtime.clear_batch_slots()
            base_ms = statistics.median(base_times) * 1000
            lora_ms = statistics.median(lora_times) * 1000
            paired = statistics.median(b / l for b, l in zip(base_times, lora_times))
            variant = {
                "pool_dtype": dtype_name,
                "decode_kernel": "compiled" if runtime.uses_decode_kernel else "torch ops",
                "distinct_adapters": distinct,
                "base_step_ms": round(base_ms, 2),
                "lora_step_ms": round(lora_ms, 2),
                "ratio_base_over_lora": round(base_ms / lora_ms, 3),
                "paired_ratio_median": round(paired, 3),
            }
            results["variants"].append(variant)
            print(json.dumps(variant), flush=True)
        del model, runtime, lora_cache
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, only 32 distinct adapters")
    parser.add_argument("--pool-dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--kernel", nargs="+", choices=["auto", "torch"], default=["auto", "torch"])
    parser.add_argument("--distinct", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    # One thread by default: on a shared 2-core machine two threads stall on each other at every
    # parallel region and the timings become noise. Ratios are what this reports.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("lora_layer_bench.json"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.distinct = 8, 2, [32]
    results = run(args)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
