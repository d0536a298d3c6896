"""What an adapter mix costs at decode: batches whose rows each mix K adapters (K = 2, 4) against
batches whose rows each use one adapter, and the base model alone.

The layer benchmark's model (a random ~100M-parameter Llama, hidden 768, 12 layers), rank-16
adapters on all seven projections, batch 32, 128 tokens of context, one decode step. Each row of a
K-mix batch combines K distinct adapters (32·K distinct in the batch, so every row reads its own
factors, the worst case for memory traffic). Runs alternate base / single / mix steps in one
process, one thread, and time each step by the thread's CPU time (other jobs on a shared machine
stretch wall time, not this), with wall time beside it; reports decode tok/s per CPU-second, and
the LoRA work per step (step time minus the base step time) of a K-mix relative to
single-adapter rows: the claim is ≈ K.

    .venv/bin/python -m bench.mix_bench [--quick] [--kernel auto torch]

Writes bench/results/mix_bench.json and .png (the CPU it ran on is named in both).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from bench.lora_layer_bench import bench_llama, decode_step, prefill_cache, random_host_adapter
from bench.machine import machine_info, software_versions
from shard.lora import install_multi_lora

RESULTS = Path(__file__).with_name("results")


def mix_rows(batch: int, k: int) -> list[list[tuple[int, float]]]:
    """Row b mixes slots b·k … b·k+k-1 (distinct per row), weights summing to 1."""
    return [[(row * k + j, 1.0 / k) for j in range(k)] for row in range(batch)]


def timed(fn) -> tuple[float, float]:
    """(CPU seconds of this thread, wall seconds) of one call."""
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - cpu, time.perf_counter() - wall


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    base_model = bench_llama()
    step_ids = torch.randint(3, base_model.config.vocab_size, (args.batch, 1), generator=generator)
    base_cache = prefill_cache(base_model, args.batch, args.context, generator)
    result = {
        "benchmark": "adapter mixes at decode",
        "machine": machine_info(),
        "software": software_versions(),
        "model_params": sum(p.numel() for p in base_model.parameters()),
        "batch": args.batch,
        "context": args.context,
        "rank": args.rank,
        "threads": args.threads,
        "rounds": args.rounds,
        "variants": [],
    }
    slots = args.batch * max(args.k)
    for kernel in args.kernel:
        model = copy.deepcopy(base_model)
        runtime = install_multi_lora(model, device_slots=slots, max_rank=args.rank, decode_kernel=kernel)
        for slot in range(slots):
            runtime.pool.write(slot, random_host_adapter(runtime, f"a{slot}", args.rank, generator))
        cache = copy.deepcopy(base_cache)
        layouts = {1: mix_rows(args.batch, 1), **{k: mix_rows(args.batch, k) for k in args.k}}
        times: dict[str, list[tuple[float, float]]] = {"base": [], **{str(k): [] for k in layouts}}

        def lora_step(rows):
            runtime.set_batch_rows(rows)
            try:
                decode_step(model, cache, step_ids, args.context)
            finally:
                runtime.clear_batch_slots()

        for round_ in range(args.warmup + args.rounds):
            measured = round_ >= args.warmup
            base_times = timed(lambda: decode_step(base_model, base_cache, step_ids, args.context))
            if measured:
                times["base"].append(base_times)
            for k, rows in layouts.items():
                elapsed = timed(lambda: lora_step(rows))
                if measured:
                    times[str(k)].append(elapsed)
        def median_ms(label: str, which: int) -> float:
            return statistics.median(t[which] for t in times[label]) * 1000

        base_ms, single_ms = median_ms("base", 0), median_ms("1", 0)
        for k in layouts:
            step_ms = median_ms(str(k), 0)
            variant = {
                "decode_kernel": "compiled" if runtime.uses_decode_kernel else "torch ops",
                "adapters_per_row": k,
                "step_cpu_ms": round(step_ms, 2),
                "base_step_cpu_ms": round(base_ms, 2),
                "step_wall_ms": round(median_ms(str(k), 1), 2),
                "decode_tokens_per_cpu_s": round(args.batch / step_ms * 1000, 1),
                "tokens_per_s_vs_single": round(single_ms / step_ms, 3),
                # LoRA work per step, relative to rows of one adapter: ≈ K when a mix costs K adapters.
                "lora_work_vs_single": round((step_ms - base_ms) / (single_ms - base_ms), 2) if single_ms > base_ms else None,
            }
            result["variants"].append(variant)
            print(json.dumps(variant), flush=True)
        del model, runtime, cache
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = sorted({v["decode_kernel"] for v in result["variants"]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kernel in kernels:
        rows = [v for v in result["variants"] if v["decode_kernel"] == kernel]
        ks = [v["adapters_per_row"] for v in rows]
        axes[0].plot(ks, [v["decode_tokens_per_cpu_s"] for v in rows], marker="o", label=kernel)
        axes[1].plot(ks, [v["lora_work_vs_single"] for v in rows], marker="o", label=kernel)
    ks = sorted({v["adapters_per_row"] for v in result["variants"]})
    axes[1].plot(ks, ks, linestyle="--", color="#888", label="= K (the claim)")
    axes[0].set(xlabel="adapters per row (K)", ylabel="decode tok per CPU-second", title=f"batch {result['batch']}, rank {result['rank']}")
    axes[1].set(xlabel="adapters per row (K)", ylabel="LoRA work per step vs 1 adapter", title="a K-mix costs ~K adapters")
    for ax in axes:
        ax.set_xticks(ks)
        ax.legend()
    fig.suptitle(f"adapter mixes at decode — {result['machine']['cpu']}, {result['threads']} thread(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--kernel", nargs="+", choices=["auto", "torch"], default=["auto", "torch"])
    parser.add_argument("--k", nargs="+", type=int, default=[2, 4], help="adapters per mix row")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    # One thread: on a shared 2-core machine two threads stall on each other; ratios are the point.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "mix_bench.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.batch = 4, 1, 8
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
