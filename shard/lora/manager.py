"""The shard's one LoRA object: the engine talks to a LoraManager and to nothing else of LoRA.

It owns the multi-adapter layers and their slot pool (`LoraRuntime`), the residency of adapters
across device slots, host memory and disk (`TieredAdapterCache`), and the per-step plan that
tells every layer which (slot, weight) entries each batch row uses. A shard without adapters has no manager."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from shard.lora.batch_plan import RowEntries
from shard.lora.keys import AdapterKey
from shard.lora.runtime import DEFAULT_TARGET_MODULES, LoraRuntime, install_multi_lora
from shard.lora.slot_pool import AdapterSlotPool
from shard.lora.sources import AdapterSource
from shard.lora.tiered_cache import AdapterInfo, Listener, TieredAdapterCache, TierStats


class LoraManager:
    def __init__(
        self,
        runtime: LoraRuntime,
        source: AdapterSource,
        *,
        host_capacity: int,
        loader_threads: int = 1,
        load_observer: Callable[[str, float], None] | None = None,
    ) -> None:
        """`load_observer(tier, milliseconds)` is told of every load into a tier (metrics)."""
        self.runtime = runtime
        self._cache = TieredAdapterCache(
            runtime.pool,
            source,
            host_capacity=host_capacity,
            loader_threads=loader_threads,
            load_observer=load_observer,
        )

    @classmethod
    def install(
        cls,
        model: nn.Module,
        source: AdapterSource,
        *,
        device_slots: int,
        max_rank: int,
        host_capacity: int,
        pool_dtype: torch.dtype | None = None,
        target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
        decode_kernel: str = "auto",
        load_observer: Callable[[str, float], None] | None = None,
    ) -> "LoraManager":
        """Swap `model`'s targeted projections for multi-adapter layers (see `install_multi_lora`)
        and serve adapters from `source` into them."""
        runtime = install_multi_lora(
            model,
            device_slots=device_slots,
            max_rank=max_rank,
            target_modules=target_modules,
            pool_dtype=pool_dtype,
            decode_kernel=decode_kernel,
        )
        return cls(runtime, source, host_capacity=host_capacity, load_observer=load_observer)

    @property
    def pool(self) -> AdapterSlotPool:
        return self.runtime.pool

    # ---- the engine's calls: never block on I/O ----

    def try_acquire(self, key: AdapterKey) -> int | None:
        """The slot of `key`, held for one more request; None while it loads or after it failed
        (see `take_load_error`)."""
        return self._cache.try_acquire(key)

    def release(self, key: AdapterKey) -> None:
        self._cache.release(key)

    def take_load_error(self, key: AdapterKey) -> Exception | None:
        """Why the last load of `key` failed, or None. Taking the error clears it, so the next
        request for `key` schedules a fresh load: each failure answers one request."""
        error = self._cache.load_error(key)
        if error is not None:
            self._cache.clear_error(key)
        return error

    def add_listener(self, callback: Listener) -> None:
        """`callback(key, error)` runs on a loader thread when a load finishes (error None = ready)."""
        self._cache.add_listener(callback)

    @contextlib.contextmanager
    def batch(self, rows: Sequence[RowEntries]) -> Iterator[None]:
        """Inside the block, row b of a forward pass adds its (slot, weight) entries rows[b]
        (see `LoraRuntime.set_batch_rows`). The plan is built once here, on the host, for every layer."""
        self.runtime.set_batch_rows(rows)
        try:
            yield
        finally:
            self.runtime.clear_batch_slots()

    # ---- the admin calls (may block) ----

    def load(self, key: AdapterKey, pin: bool = False, timeout: float | None = None) -> AdapterInfo:
        return self._cache.load(key, pin=pin, timeout=timeout)

    def unload(self, key: AdapterKey) -> bool:
        return self._cache.unload(key)

    def unpin(self, key: AdapterKey) -> None:
        self._cache.unpin(key)

    def adapters(self) -> list[AdapterInfo]:
        return self._cache.adapters()

    def tier_stats(self) -> list[TierStats]:
        return self._cache.tier_stats()

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> "LoraManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
