"""`python -m bench.activation_registry`: adapter activation latency on the path production runs.

A shard in production gets adapters through the registry: `RegistryAdapterSource` downloads a
version from MLflow into the registry's content-addressed cache (verifying its folder sha256),
and that cache *is* the shard's disk tier. This benchmark starts a real MLflow server, publishes
the benchmark's adapters with `AdapterRegistry.publish`, and times `LoraManager.load` per origin:
registry (download + verify + read + slot write), disk (the registry cache, read in place) and
host memory. Writes `bench/results/activation_registry.json` and `.png`."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.activation import measure_activation
from bench.assets import adapter_names, build_model, default_cache_dir, ensure_adapters, word_tokenizer
from bench.engine_runs import LoraplexShard
from bench.machine import machine_info, software_versions
from bench.profiles import FULL
from loraplex.stack.mlflow_server import MlflowServer
from shard.adapter_sources import RegistryAdapterSource, base_model_fingerprint
from shard.lora import LoraManager


def run(device_slots: int, threads: int, cache_dir: Path, log) -> dict:
    torch.set_num_threads(threads)
    profile = FULL
    model = build_model(profile.model, profile.dtype)
    tokenizer = word_tokenizer(profile.model.vocab_size)
    names = adapter_names(profile.adapters)[: 2 * device_slots]
    adapter_dirs = ensure_adapters(model, profile.model, profile.adapters, cache_dir)
    with tempfile.TemporaryDirectory(prefix="loraplex-activation-") as work:
        work = Path(work)
        base_dir = work / "base"
        model.config.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        server = MlflowServer(work / "mlflow")
        server.start()
        try:
            from registry import AdapterRegistry

            registry = AdapterRegistry(server.url, work / "publisher-cache", max_rank=profile.adapters.rank)
            log(f"publishing {len(names)} adapters to MLflow")
            versions = {registry.publish(adapter_dirs[name], name, base_dir).version for name in names}
            if versions != {"1"}:
                raise RuntimeError(f"a fresh registry gave versions {versions}, expected 1 for each adapter")
            source = RegistryAdapterSource(server.url, work / "shard-adapter-cache", base_model_fingerprint(base_dir),
                                           profile.adapters.rank)
            lora = LoraManager.install(model, source, device_slots=device_slots,
                                       max_rank=profile.adapters.rank, host_capacity=2 * device_slots)
            shard = LoraplexShard(model, tokenizer, lora, max_batch=device_slots)
            try:
                log("timing loads")
                results = measure_activation(shard, names, device_slots, version="1")
            finally:
                shard.close()
        finally:
            server.stop()
    return {
        "name": "activation_registry",
        "created_unix": round(time.time(), 1),
        "machine": machine_info(),
        "software": software_versions(),
        "settings": {"model": profile.model.__dict__, "adapter_rank": profile.adapters.rank,
                     "target_modules": list(profile.adapters.target_modules), "device_slots": device_slots,
                     "torch_threads": threads, "source": "RegistryAdapterSource (MLflow on loopback)"},
        "results": results,
    }


def plot(result: dict, path: Path) -> None:
    """Bars of p50 and p95 per origin, on a log scale (they span three orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origins = [("host", "host memory"), ("disk", "disk (registry cache)"), ("source", "MLflow")]
    entries = [result["results"][f"{origin}_to_slot_ms"] for origin, _ in origins]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    positions = range(len(origins))
    ax.bar([p - 0.2 for p in positions], [e["p50"] for e in entries], width=0.4, label="p50")
    ax.bar([p + 0.2 for p in positions], [e["p95"] for e in entries], width=0.4, label="p95")
    ax.set_xticks(list(positions), [label for _, label in origins])
    ax.set_yscale("log")
    ax.set_ylabel("ms to a usable device slot")
    ax.set_title(f"Adapter activation via the registry ({result['machine']['cpu']}, "
                 f"load {result['machine']['loadavg'][0]})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.activation_registry", description=__doc__)
    parser.add_argument("--slots", type=int, default=8, help="device slots (the benchmark cycles over 2x as many adapters)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    result = run(args.slots, args.threads, default_cache_dir(), lambda m: print(m, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "activation_registry.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, path.with_suffix(".png"))
    for origin in ("host", "disk", "source"):
        entry = result["results"][f"{origin}_to_slot_ms"]
        print(f"{origin:>6} -> slot: p50 {entry['p50']} ms, p95 {entry['p95']} ms (n={entry['n']})")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
