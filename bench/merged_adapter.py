"""`python -m bench.merged_adapter`: what merging a hot adapter into the base weights buys at decode.

A random ~100M-parameter Llama (hidden 768, 12 layers), rank-16 adapters on all seven projections,
one decode step of batch 32 over 128 tokens of context, the shard's multi-adapter layers (the
compiled CPU kernel where it builds). Three copies of the model live in one process and every
round times each workload once on each, alternating, so machine load hits all sides alike:

- merged-adapter rows: every row is the merged adapter (no LoRA work left) against the plain base
  model with no LoRA layers at all: the goal is >= 0.97 of base decode throughput;
- the same rows unmerged (every row computes the adapter's delta through its slot), for scale;
- mixed batches at a hot share h: round(h·32) rows of the hot adapter, the rest spread over four
  other adapters and the base model, on a shard with the hot adapter merged (the other rows
  subtract it) against a shard without (ratio > 1: the merged shard is faster).

It also reports, for a bf16 base, how far base-model rows on a merged shard drift from the same
rows unmerged (the merged weight is rounded to bf16 once; fp32 drift is ~1e-6).
Writes `bench/results/merged_adapter.json` and `.png`."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.lora_layer_bench import decode_step, prefill_cache, random_host_adapter, timed
from bench.machine import machine_info, software_versions
from bench.synthetic_models import random_llama, random_llama_config
from shard.lora import install_multi_lora
from shard.lora.merged_weights import MergedBaseWeights, rows_over_merged_base

HOT_SLOT = 0
OTHER_SLOTS = (1, 2, 3, 4)


def mixed_rows(batch: int, hot_share: float) -> list[list[tuple[int, float]]]:
    """round(h·batch) hot rows; the rest cycle over the other adapters and the base model."""
    hot = round(hot_share * batch)
    others = [[(slot, 1.0)] for slot in OTHER_SLOTS] + [[]]
    rows = [[(HOT_SLOT, 1.0)]] * hot + [others[i % len(others)] for i in range(batch - hot)]
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(1)).tolist()
    return [rows[i] for i in order]


def lora_model(base_model, rank: int, generator: torch.Generator):
    model = copy.deepcopy(base_model)
    runtime = install_multi_lora(model, device_slots=1 + len(OTHER_SLOTS), max_rank=rank)
    for slot in range(runtime.pool.num_slots):
        runtime.pool.write(slot, random_host_adapter(runtime, f"a{slot}", rank, generator))
    return model, runtime


def base_layers(runtime) -> dict:
    return {name: layer.base_layer for name, layer in runtime.layers.items()}


def bf16_base_row_drift(rank: int) -> dict:
    """Max |logit| difference of base-model rows: bf16 shard with an adapter merged vs unmerged."""
    config = random_llama_config(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=4, vocab_size=2048)
    generator = torch.Generator().manual_seed(3)
    model, runtime = lora_model(random_llama(config, seed=0).to(torch.bfloat16), rank, generator)
    ids = torch.randint(3, config.vocab_size, (4, 32), generator=generator)
    rows = [[] for _ in range(4)]
    with torch.inference_mode():
        runtime.set_batch_rows(rows)
        unmerged = model(input_ids=ids).logits.float()
        merged = MergedBaseWeights.merge(runtime.pool, base_layers(runtime), HOT_SLOT)
        runtime.set_batch_rows(rows_over_merged_base(rows, HOT_SLOT))
        on_merged = model(input_ids=ids).logits.float()
        merged.restore(base_layers(runtime))
        runtime.clear_batch_slots()
    diff = (on_merged - unmerged).abs()
    return {
        "max_abs_logit_diff": round(diff.max().item(), 4),
        "mean_abs_logit_diff": round(diff.mean().item(), 5),
        "logit_scale_mean_abs": round(unmerged.abs().mean().item(), 4),
        "greedy_agreement": round((on_merged.argmax(-1) == unmerged.argmax(-1)).float().mean().item(), 4),
    }


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    config = random_llama_config(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=12, vocab_size=8192)
    base_model = random_llama(config, seed=0)
    # Two shards with the same adapters in the same slots; one holds the hot adapter merged.
    unmerged_model, unmerged_runtime = lora_model(base_model, args.rank, torch.Generator().manual_seed(1))
    merged_model, merged_runtime = lora_model(base_model, args.rank, torch.Generator().manual_seed(1))
    MergedBaseWeights.merge(merged_runtime.pool, base_layers(merged_runtime), HOT_SLOT)

    step_ids = torch.randint(3, config.vocab_size, (args.batch, 1), generator=generator)
    caches = {name: prefill_cache(model, args.batch, args.context, torch.Generator().manual_seed(2))
              for name, model in (("base", base_model), ("unmerged", unmerged_model), ("merged", merged_model))}
    def step(model_name, rows=None):
        model = {"base": base_model, "unmerged": unmerged_model, "merged": merged_model}[model_name]
        if model_name == "unmerged":
            unmerged_runtime.set_batch_rows(rows)
        elif model_name == "merged":
            merged_runtime.set_batch_rows(rows_over_merged_base(rows, HOT_SLOT))
        return timed(lambda: decode_step(model, caches[model_name], step_ids, args.context))

    hot_rows = [[(HOT_SLOT, 1.0)]] * args.batch
    workloads = {"base": ("base", None), "merged_hot": ("merged", hot_rows), "unmerged_hot": ("unmerged", hot_rows)}
    for share in args.hot_shares:
        rows = mixed_rows(args.batch, share)
        workloads[f"merged_mixed_{share}"] = ("merged", rows)
        workloads[f"unmerged_mixed_{share}"] = ("unmerged", rows)
    times = {name: [] for name in workloads}
    names = list(workloads)
    for round_index in range(args.warmup + args.rounds):
        # The order rotates each round, so no workload always runs after the same one.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            model_name, rows = workloads[name]
            elapsed = step(model_name, rows)
            if round_index >= args.warmup:
                times[name].append(elapsed)
    median_ms = {name: round(statistics.median(t) * 1000, 2) for name, t in times.items()}
    min_ms = {name: round(min(t) * 1000, 2) for name, t in times.items()}

    def paired(numerator: str, denominator: str) -> dict:
        """throughput(denominator) / throughput(numerator): the median over rounds of the paired
        time ratio, and the ratio of the fastest steps (on a loaded machine the fastest step of
        each is the one least disturbed by other jobs)."""
        return {
            "paired_median": round(statistics.median(a / b for a, b in zip(times[numerator], times[denominator])), 3),
            "fastest_steps": round(min(times[numerator]) / min(times[denominator]), 3),
        }

    return {
        "name": "merged_adapter",
        "created_unix": round(time.time(), 1),
        "machine": machine_info(),
        "software": software_versions(),
        "settings": {"model_params": sum(p.numel() for p in base_model.parameters()), "batch": args.batch,
                     "context": args.context, "rank": args.rank, "target_modules": "all 7 projections",
                     "dtype": "fp32", "threads": args.threads, "rounds": args.rounds,
                     "decode_kernel": "compiled" if unmerged_runtime.uses_decode_kernel else "torch ops",
                     "mixed_rows": f"round(h*{args.batch}) hot rows, the rest over {len(OTHER_SLOTS)} other adapters and base"},
        "step_ms_median": median_ms,
        "step_ms_fastest": min_ms,
        "merged_rows_over_base_throughput": paired("base", "merged_hot"),
        "unmerged_rows_over_base_throughput": paired("base", "unmerged_hot"),
        "mixed_merged_over_unmerged_throughput": {str(share): paired(f"unmerged_mixed_{share}", f"merged_mixed_{share}") for share in args.hot_shares},
        "bf16_base_rows_on_a_merged_shard": bf16_base_row_drift(args.rank),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    labels = ["merged rows", "unmerged rows"]
    values = [result["merged_rows_over_base_throughput"], result["unmerged_rows_over_base_throughput"]]
    positions = range(len(labels))
    left.bar([p - 0.2 for p in positions], [v["paired_median"] for v in values], width=0.4, label="paired median")
    left.bar([p + 0.2 for p in positions], [v["fastest_steps"] for v in values], width=0.4, label="fastest steps")
    left.set_xticks(list(positions), labels)
    left.axhline(0.97, color="tab:red", linestyle="--", linewidth=1, label="goal 0.97")
    left.axhline(1.0, color="black", linewidth=0.5)
    left.set_ylabel("decode throughput / base model")
    left.set_title("All rows one adapter", fontsize=9)
    left.legend(fontsize=8)
    mixed = result["mixed_merged_over_unmerged_throughput"]
    shares = list(mixed)
    positions = range(len(shares))
    right.bar([p - 0.2 for p in positions], [mixed[s]["paired_median"] for s in shares], width=0.4, label="paired median")
    right.bar([p + 0.2 for p in positions], [mixed[s]["fastest_steps"] for s in shares], width=0.4, label="fastest steps")
    right.set_xticks(list(positions), [f"hot {float(s):.0%}" for s in shares])
    right.legend(fontsize=8)
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_ylabel("throughput merged shard / unmerged shard")
    right.set_title("Mixed batches (hot adapter + 4 others + base)", fontsize=9)
    machine = result["machine"]
    fig.suptitle(f"Merged hot adapter, decode batch {result['settings']['batch']} ({machine['cpu']}, "
                 f"{result['settings']['threads']} thread, load {machine['loadavg'][0] if machine['loadavg'] else '?'})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.merged_adapter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hot-shares", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    # One thread: on a shared 2-core machine two threads stall on each other and the timings become noise.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 5, 1
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "merged_adapter.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, path.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("step_ms_median", "step_ms_fastest", "merged_rows_over_base_throughput",
                                              "unmerged_rows_over_base_throughput", "mixed_merged_over_unmerged_throughput",
                                              "bf16_base_rows_on_a_merged_shard")}, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
