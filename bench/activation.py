"""Adapter activation latency: how long `TieredAdapterCache.load` takes to make an adapter usable
on a device slot, by the tier it starts from (source, local disk, host memory), timed as a caller
sees it (hand-off to the loader thread included)."""

from __future__ import annotations

import time
from dataclasses import asdict

from bench.run_result import percentile
from bench.engine_runs import LoraplexShard
from shard.lora import LOCAL_VERSION, AdapterKey

ORIGINS = ("source", "disk", "host")


def _origin(shard: LoraplexShard, key: AdapterKey) -> str:
    for info in shard.lora.adapters():
        if info.adapter == key:
            return info.tier
    return "source"


def measure_activation(shard: LoraplexShard, names: list[str], disk_samples: int, version: str = LOCAL_VERSION) -> dict:
    """Cycle twice over 2 x slots adapters (host holds them all, the device half: every second
    visit is host -> slot), then unload some (drops device and host copies, keeps the disk copy)
    and load them again (disk -> slot)."""
    slots = shard.lora.pool.num_slots
    cycle = names[: 2 * slots]
    samples: dict[str, list[float]] = {origin: [] for origin in ORIGINS}

    def timed_load(name: str) -> None:
        key = AdapterKey(name, version)
        origin = _origin(shard, key)
        started = time.perf_counter()
        shard.lora.load(key)
        if origin in samples:
            samples[origin].append((time.perf_counter() - started) * 1000)

    for _ in range(2):
        for name in cycle:
            timed_load(name)
    for name in cycle[:disk_samples]:
        if shard.lora.unload(AdapterKey(name, version)):
            timed_load(name)
    return {
        f"{origin}_to_slot_ms": {
            "p50": round(percentile(values, 0.5), 3),
            "p95": round(percentile(values, 0.95), 3),
            "n": len(values),
            "raw": [round(v, 3) for v in values],
        }
        for origin, values in samples.items()
    } | {
        "adapter_bytes_per_slot": shard.lora.pool.bytes_per_slot(),
        "cache_tier_stats": [asdict(s) for s in shard.lora.tier_stats()],
    }
