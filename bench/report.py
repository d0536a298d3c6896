"""Turning a benchmark result into files: JSON, a PNG chart, and a Markdown table for README."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt_spread(entry: dict) -> str:
    s = entry["spread"]
    return f"{s['min']:.2f}–{s['max']:.2f} (n={s['n']})"


def markdown_table(result: dict) -> str:
    r = result["results"]
    settings = result["settings"]
    lines = [
        f"Shard benchmark `{result['name']}`: random Llama, {settings['parameters'] / 1e6:.0f}M parameters "
        f"({settings['model']['hidden_size']} hidden, {settings['model']['num_layers']} layers), {settings['dtype']} "
        f"(adapter slots {settings.get('adapter_pool_dtype', settings['dtype'])}), "
        f"rank-{settings['adapters']['rank']} adapters on all 7 projections, {settings['torch_threads']} torch threads, "
        f"{result['machine']['cpu']} (load {result['machine']['loadavg']} → {result['machine']['loadavg_end']}).",
        "",
        "| measurement | baseline | loraplex | ratio (spread) | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    o = r["lora_overhead"]
    lines.append(
        f"| 1. LoRA overhead, {settings['concurrency']} requests × {settings['concurrency']} adapters (decode tok/s) "
        f"| base model {o['base_tokens_per_s']:.1f} | {o['lora_tokens_per_s']:.1f} | {o['ratio']:.3f} "
        f"(step pairs p10–p90 {o['spread']['p10']:.2f}–{o['spread']['p90']:.2f}, n={o['spread']['n']}) "
        f"| ≥ 0.90 | {'yes' if o['goal_met'] else 'no'} |"
    )
    bound = o.get("bytes_bound")
    n = r["vs_naive"]
    lines.append(
        f"| 2. vs lock + `set_adapter` + `generate` (tok/s) | {n['baseline_tokens_per_s']:.1f} | "
        f"{n['loraplex_tokens_per_s']:.1f} | {n['ratio']:.1f}× ({_fmt_spread(n)}) | ≥ 10× | {'yes' if n['goal_met'] else 'no'} |"
    )
    p = r["vs_peft_static"]
    lines.append(
        f"| 3. vs PEFT static batches `adapter_names=`, Poisson arrivals (tok/s) | {p['baseline_tokens_per_s']:.1f} | "
        f"{p['loraplex_tokens_per_s']:.1f} | {p['ratio']:.2f}× ({_fmt_spread(p)}) | ≥ 2× | {'yes' if p['goal_met'] else 'no'} |"
    )
    if bound:
        lines += [
            "",
            f"Bytes bound on 1.: {settings['concurrency']} adapters' factors are {bound['factor_mb_per_step']:.0f} MB a decode "
            f"step, {bound['factor_read_ms']:.1f} ms at this machine's best streaming read ({bound['read_gb_per_s']:.1f} GB/s), "
            f"on a {bound['base_step_ms']:.1f} ms base step (whose {bound['base_weight_mb']:.0f} MB of weights alone take "
            f"{bound['base_weight_read_ms']:.1f} ms at that rate): no kernel passes a ratio of {bound['ratio_ceiling']:.3f}.",
        ]
    a = r["activation_latency"]
    lines += [
        "",
        "| adapter activation (`TieredAdapterCache.load`) | p50 ms | p95 ms | samples |",
        "|---|---|---|---|",
    ]
    for origin in ("host", "disk", "source"):
        entry = a[f"{origin}_to_slot_ms"]
        lines.append(f"| {origin} → device slot | {entry['p50']:.1f} | {entry['p95']:.1f} | {entry['n']} |")
    curve = r["distinct_adapters_curve"]["points"]
    lines += [
        "",
        "| distinct adapters per batch | " + " | ".join(p["label"] for p in curve) + " |",
        "|---" * (len(curve) + 1) + "|",
        "| tokens/s (end to end) | " + " | ".join(f"{p['tokens_per_s']:.1f}" for p in curve) + " |",
        "| ratio to base | " + " | ".join(f"{p['ratio']:.2f}" for p in curve) + " |",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))

    goals = [("LoRA / base\n(goal ≥ 0.90)", r["lora_overhead"]),
             ("vs naive lock\n(goal ≥ 10×)", r["vs_naive"]),
             ("vs PEFT static\n(goal ≥ 2×)", r["vs_peft_static"])]
    ax = axes[0]
    o = r["lora_overhead"]
    ax.bar(["base", "LoRA ×32"], [o["base_tokens_per_s"], o["lora_tokens_per_s"]], color=["#888", "#2a7"])
    ax.set_title(f"1. decode tok/s, ratio {o['ratio']:.3f} (goal ≥ 0.90)")
    ax.set_ylabel("tokens / s")
    bound = o.get("bytes_bound")
    if bound:
        ax.axhline(o["base_tokens_per_s"] * bound["ratio_ceiling"], color="black", linestyle=":",
                   label=f"LoRA at the bytes bound ({bound['ratio_ceiling']:.2f})")
        ax.legend(loc="lower right")

    ax = axes[1]
    labels = [label for label, _ in goals[1:]]
    values = [entry["ratio"] for _, entry in goals[1:]]
    targets = [entry["goal"] for _, entry in goals[1:]]
    errors = [[v - e["spread"]["min"] for v, (_, e) in zip(values, goals[1:])],
              [e["spread"]["max"] - v for v, (_, e) in zip(values, goals[1:])]]
    bars = ax.bar(labels, values, color="#2a7", yerr=errors, capsize=4)
    for bar, target in zip(bars, targets):
        ax.hlines(target, bar.get_x(), bar.get_x() + bar.get_width(), colors="red", linestyles="--")
    ax.set_yscale("log")
    ax.set_title("2-3. loraplex tokens/s ÷ baseline (red: goal)")
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.1f}×", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")

    ax = axes[2]
    curve = [p for p in r["distinct_adapters_curve"]["points"] if p["distinct_adapters"] > 0]
    xs = [p["distinct_adapters"] for p in curve]
    ys = [p["ratio"] for p in curve]
    ax.plot(xs, ys, marker="o", color="#2a7")
    ax.fill_between(xs, [p["spread"]["min"] for p in curve], [p["spread"]["max"] for p in curve], color="#2a7", alpha=0.2)
    ax.axvline(result["settings"]["device_slots"], color="#888", linestyle=":", label="device slots")
    ax.axhline(1.0, color="#888", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(0, max(1.1, max(ys) * 1.1))
    ax.set_xlabel("distinct adapters in the load")
    ax.set_ylabel("tokens/s ÷ base model")
    ax.set_title("4. throughput vs distinct adapters")
    ax.legend(loc="lower left")

    settings = result["settings"]
    fig.suptitle(f"loraplex shard benchmark — {settings['parameters'] / 1e6:.0f}M-param Llama, {settings['dtype']}, "
                 f"{settings['torch_threads']} threads, {result['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{result['name']}.json"
    png_path = out_dir / f"{result['name']}.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png_path)
    return json_path, png_path
