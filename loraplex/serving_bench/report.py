"""Percentiles over the outcomes, overall and per adapter; the JSON report and its plot."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from loraplex.serving_bench.client import RequestOutcome

PERCENTILES = (50, 90, 95, 99)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(values_s: list[float]) -> dict[str, float] | None:
    if not values_s:
        return None
    ms = [v * 1000 for v in values_s]
    out = {"mean": statistics.fmean(ms)}
    out.update({f"p{q}": percentile(ms, q) for q in PERCENTILES})
    out["max"] = max(ms)
    return out


def summarize(outcomes: list[RequestOutcome], duration_s: float) -> dict:
    ok = [o for o in outcomes if o.ok]
    tpot = [
        (o.e2e_s - o.ttft_s) / (o.output_tokens - 1)
        for o in ok
        if o.ttft_s is not None and o.e2e_s is not None and o.output_tokens > 1
    ]
    output_tokens = sum(o.output_tokens for o in ok)
    return {
        "requests": len(outcomes),
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "errors_by_status": dict(sorted(Counter(str(o.status) for o in outcomes if not o.ok).items())),
        "request_throughput_per_s": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_tokens": output_tokens,
        "output_token_throughput_per_s": output_tokens / duration_s if duration_s > 0 else 0.0,
        "prompt_tokens": sum(o.prompt_tokens for o in ok),
        "ttft_ms": summary_ms([o.ttft_s for o in ok if o.ttft_s is not None]),
        "itl_ms": summary_ms([gap for o in ok for gap in o.chunk_gaps_s]),
        "tpot_ms": summary_ms(tpot),
        "e2e_latency_ms": summary_ms([o.e2e_s for o in ok if o.e2e_s is not None]),
        "served_versions": dict(sorted(Counter(o.served_version for o in ok if o.served_version).items())),
    }


def build_report(outcomes: list[RequestOutcome], duration_s: float, settings: dict) -> dict:
    adapters = list(dict.fromkeys(settings["adapters"]))
    return {
        "settings": settings,
        "duration_s": duration_s,
        "overall": summarize(outcomes, duration_s),
        "per_adapter": {a: summarize([o for o in outcomes if o.adapter == a], duration_s) for a in adapters},
        "first_errors": sorted({f"{o.adapter}: {o.status} {o.error}" for o in outcomes if not o.ok})[:10],
    }


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_plot(report: dict, outcomes: list[RequestOutcome], path: Path) -> None:
    """Four panels: TTFT and end-to-end latency per adapter (box plots), latency over the run
    (errors marked), and requests per adapter by outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapters = list(report["per_adapter"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, attribute, title in ((axes[0][0], "ttft_s", "time to first token"), (axes[0][1], "e2e_s", "end-to-end latency")):
        data = [[getattr(o, attribute) * 1000 for o in outcomes if o.adapter == a and o.ok and getattr(o, attribute) is not None] for a in adapters]
        ax.boxplot([d or [float("nan")] for d in data], tick_labels=adapters, showfliers=True)
        ax.set_title(title)
        ax.set_ylabel("ms")
    ax = axes[1][0]
    good = [o for o in outcomes if o.ok and o.e2e_s is not None]
    bad = [o for o in outcomes if not o.ok]
    ax.scatter([o.started_s for o in good], [o.e2e_s * 1000 for o in good], s=8, label="ok")
    ax.scatter([o.started_s for o in bad], [(o.e2e_s or 0) * 1000 for o in bad], s=12, marker="x", color="red", label="error")
    ax.set_title("end-to-end latency over the run")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("ms")
    ax.legend()
    ax = axes[1][1]
    completed = [report["per_adapter"][a]["completed"] for a in adapters]
    failed = [report["per_adapter"][a]["failed"] for a in adapters]
    ax.bar(adapters, completed, label="completed")
    ax.bar(adapters, failed, bottom=completed, color="red", label="failed")
    ax.set_title("requests per adapter")
    ax.legend()
    s = report["settings"]
    overall = report["overall"]
    fig.suptitle(
        f"loraplex bench-serve: {s['url']}  {s['distribution']}  {s['rate']} req/s x {s['duration_s']} s  —  "
        f"{overall['request_throughput_per_s']:.2f} req/s, {overall['output_token_throughput_per_s']:.1f} tok/s, "
        f"{overall['failed']} failed"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(report: dict) -> str:
    rows = [("", "requests", "failed", "req/s", "tok/s", "TTFT p50/p99 ms", "ITL p50/p99 ms", "E2E p50/p99 ms")]

    def pair(summary: dict | None) -> str:
        return f"{summary['p50']:.0f} / {summary['p99']:.0f}" if summary else "-"

    for name, s in [("all", report["overall"]), *report["per_adapter"].items()]:
        rows.append((
            name, str(s["requests"]), str(s["failed"]), f"{s['request_throughput_per_s']:.2f}",
            f"{s['output_token_throughput_per_s']:.1f}", pair(s["ttft_ms"]), pair(s["itl_ms"]), pair(s["e2e_latency_ms"]),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    errors = report["overall"]["errors_by_status"]
    if errors:
        lines.append("errors by status: " + ", ".join(f"{k or 'no answer'}: {v}" for k, v in errors.items()))
    return "\n".join(lines)
