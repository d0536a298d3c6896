"""The shard's one LoRA object: the engine talks to a LoraManager and to nothing else of LoRA.

It owns the multi-adapter layers and their slot pool (`LoraRuntime`), the residency of adapters
across device slots, host memory and disk (`TieredAdapterCache`), and the per-step plan that
tells every layer which (slot, weight) entries each batch row uses. A shard without adapters has no manager.

A request asks for an adapter version (`AdapterKey`) or an ad-hoc mix (`AdapterMix`); a version may
turn out to be a registered mix. Either way a mix row holds every component (refcounted like any
request's adapter, so none is evicted under it) and adds their weighted deltas.

It also holds at most one adapter merged into the base weights (`merge`/`unmerge`, engine thread
only, between forward passes): the merged adapter keeps its device slot (held like a running
request, so it is never evicted) because every other row subtracts its delta through that slot."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from shard.lora.batch_plan import RowEntries
from loraplex.adapter_mix import DEFAULT_MAX_COMPONENTS
from shard.lora.errors import AdapterNotFoundError, AdapterNotResidentError, AdapterRejectedError, MergeRefusedError
from shard.lora.keys import AdapterKey, AdapterMix
from shard.lora.merged_weights import MergedBaseWeights, merge_refusal, rows_over_merged_base
from shard.lora.runtime import DEFAULT_TARGET_MODULES, LoraRuntime, install_multi_lora
from shard.lora.slot_pool import AdapterSlotPool
from shard.lora.sources import AdapterSource
from shard.lora.tiered_cache import AdapterInfo, Listener, TieredAdapterCache, TierStats

AdapterSelection = AdapterKey | AdapterMix


@dataclass(frozen=True)
class LoraLease:
    """What one running request holds: the adapter versions it acquired (released together) and
    its batch row's (slot, weight) entries."""

    keys: tuple[AdapterKey, ...]
    entries: tuple[tuple[int, float], ...]


class LoraManager:
    def __init__(
        self,
        runtime: LoraRuntime,
        source: AdapterSource,
        *,
        host_capacity: int,
        host_bytes: int = 0,
        loader_threads: int = 1,
        load_observer: Callable[[str, float], None] | None = None,
        max_mix_components: int = DEFAULT_MAX_COMPONENTS,
    ) -> None:
        """`load_observer(tier, milliseconds)` is told of every load into a tier (metrics)."""
        self.runtime = runtime
        self._cache = TieredAdapterCache(
            runtime.pool,
            source,
            host_capacity=host_capacity,
            host_bytes=host_bytes,
            loader_threads=loader_threads,
            load_observer=load_observer,
            max_mix_components=max_mix_components,
        )
        self._merged: tuple[AdapterKey, MergedBaseWeights] | None = None

    @classmethod
    def install(
        cls,
        model: nn.Module,
        source: AdapterSource,
        *,
        device_slots: int,
        max_rank: int,
        host_capacity: int,
        host_bytes: int = 0,
        pool_dtype: torch.dtype | None = None,
        target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
        decode_kernel: str = "auto",
        load_observer: Callable[[str, float], None] | None = None,
        max_mix_components: int = DEFAULT_MAX_COMPONENTS,
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
        return cls(
            runtime,
            source,
            host_capacity=host_capacity,
            host_bytes=host_bytes,
            load_observer=load_observer,
            max_mix_components=max_mix_components,
        )

    @property
    def pool(self) -> AdapterSlotPool:
        return self.runtime.pool

    # ---- the engine's calls: never block on I/O ----

    def try_acquire(self, selection: AdapterSelection) -> LoraLease | None:
        """Every adapter version `selection` needs, held for one more request, with the row's
        entries; None while any of them loads, or after a load failed (see `take_load_error`)."""
        components = self._components(selection)
        if any(self._cache.mix_of(key) is not None for key, _ in components):
            return None
        keys = tuple(key for key, _ in components)
        slots = self._cache.try_acquire_all(keys)
        if slots is None:
            return None
        return LoraLease(keys, tuple((slot, weight) for slot, (_, weight) in zip(slots, components)))

    def release(self, lease: LoraLease) -> None:
        for key in lease.keys:
            self._cache.release(key)

    def take_load_error(self, selection: AdapterSelection) -> Exception | None:
        """Why `selection` cannot be served, or None. Taking a load error clears it, so the next
        request for it schedules a fresh load: each failure answers one request."""
        own = self._take_error(selection) if isinstance(selection, AdapterKey) else None
        if own is not None:
            return own
        for key, _ in self._components(selection):
            if key != selection and self._cache.mix_of(key) is not None:
                return AdapterRejectedError(f"mix {selection}: component {key} is itself a mix; mixes do not nest")
            error = self._take_error(key)
            if error is not None and key != selection and isinstance(error, (AdapterNotFoundError, AdapterRejectedError)):
                # A mix over a missing or refused version cannot be served: the mix is refused.
                return AdapterRejectedError(f"mix {selection}: component {error}")
            if error is not None:
                return error
        return None

    def _take_error(self, key: AdapterKey) -> Exception | None:
        error = self._cache.load_error(key)
        if error is not None:
            self._cache.clear_error(key)
        return error

    def _components(self, selection: AdapterSelection) -> tuple[tuple[AdapterKey, float], ...]:
        """(version, weight) pairs a selection adds: a version alone, or a mix's components (a
        registered mix's once its manifest has loaded)."""
        if isinstance(selection, AdapterMix):
            return selection.components
        mix = self._cache.mix_of(selection)
        return mix.components if mix is not None else ((selection, 1.0),)

    def add_listener(self, callback: Listener) -> None:
        """`callback(key, error)` runs on a loader thread when a load finishes (error None = ready)."""
        self._cache.add_listener(callback)

    @contextlib.contextmanager
    def batch(self, rows: Sequence[RowEntries]) -> Iterator[None]:
        """Inside the block, row b of a forward pass adds its (slot, weight) entries rows[b]
        (see `LoraRuntime.set_batch_rows`). The plan is built once here, on the host, for every layer.
        With an adapter merged, every row's weight on it drops by one (`rows_over_merged_base`)."""
        merged = self._merged
        if merged is not None:
            rows = rows_over_merged_base(rows, merged[1].slot)
        self.runtime.set_batch_rows(rows)
        try:
            yield
        finally:
            self.runtime.clear_batch_slots()

    # ---- the merged adapter (engine thread only, between forward passes) ----

    @property
    def merged(self) -> AdapterKey | None:
        """The adapter merged into the base weights, or None."""
        merged = self._merged
        return merged[0] if merged is not None else None

    def merge_refusal(self) -> str | None:
        """Why this model's base weights cannot hold a merged adapter (quantized), or None."""
        return merge_refusal(self._base_layers())

    def merge(self, key: AdapterKey) -> AdapterKey | None:
        """Merge `key` (already on a device slot) into the base weights, unmerging whatever was
        merged before; returns that. Raises MergeRefusedError with nothing changed when the base is
        quantized or `key` is not on a device slot."""
        if self.merged == key:
            return None
        reason = self.merge_refusal()
        if reason is not None:
            raise MergeRefusedError(f"cannot merge {key}: {reason}")
        if self._cache.mix_of(key) is not None:
            raise MergeRefusedError(f"cannot merge {key}: it is a mix; merge one of its components")
        slot = self._cache.try_acquire(key)
        if slot is None:
            raise AdapterNotResidentError(f"cannot merge {key}: it is not on a device slot yet (load it first)")
        replaced = self.unmerge()
        try:
            weights = MergedBaseWeights.merge(self.pool, self._base_layers(), slot)
        except BaseException:
            self._cache.release(key)
            raise
        self._merged = (key, weights)
        return replaced

    def unmerge(self) -> AdapterKey | None:
        """Restore the base weights bit for bit; returns the adapter that was merged (None: none)."""
        if self._merged is None:
            return None
        key, weights = self._merged
        weights.restore(self._base_layers())
        self._merged = None
        self._cache.release(key)
        return key

    def _base_layers(self) -> dict[str, nn.Module]:
        return {name: layer.base_layer for name, layer in self.runtime.layers.items()}

    # ---- the admin calls (may block) ----

    def load(self, key: AdapterKey, pin: bool = False, timeout: float | None = None) -> AdapterInfo:
        """Bring `key` onto the device (a registered mix: its manifest, then every component)."""
        info = self._cache.load(key, pin=pin, timeout=timeout)
        mix = self._cache.mix_of(key)
        for component, _ in mix.components if mix is not None else ():
            self._cache.load(component, pin=pin, timeout=timeout)
            if self._cache.mix_of(component) is not None:
                raise AdapterRejectedError(f"mix {key}: component {component} is itself a mix; mixes do not nest")
        return info

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
