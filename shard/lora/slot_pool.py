"""Stacked adapter factors on the compute device, one slot per resident adapter.

For every served module the pool holds A as [slots, max_rank, in] and (scaled B).T as
[slots, max_rank, out]. Rank is the middle axis so that "the first r rows of each slot"
is a cheap view: a batch whose adapters are all rank 16 reads 16 rows per slot, not max_rank."""

from __future__ import annotations

from typing import Mapping

import torch

from shard.lora.errors import AdapterRejectedError
from shard.lora.peft_adapter import HostAdapter, ModuleShape


class AdapterSlotPool:
    def __init__(
        self,
        module_shapes: Mapping[str, ModuleShape],
        *,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        self.module_shapes = dict(module_shapes)
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = torch.device(device)
        self.a = {
            name: torch.zeros(num_slots, max_rank, shape.in_features, dtype=dtype, device=self.device)
            for name, shape in self.module_shapes.items()
        }
        self.b_t = {
            name: torch.zeros(num_slots, max_rank, shape.out_features, dtype=dtype, device=self.device)
            for name, shape in self.module_shapes.items()
        }
        self._ranks = [0] * num_slots
        self._modules: list[frozenset[str]] = [frozenset()] * num_slots

    def slot_rank(self, slot: int) -> int:
        """Rank of the adapter in `slot`; 0 when the slot is empty."""
        return self._ranks[slot]

    def slot_modules(self, slot: int) -> frozenset[str]:
        return self._modules[slot]

    def bytes_per_slot(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return sum(self.max_rank * (s.in_features + s.out_features) for s in self.module_shapes.values()) * element

    def write(self, slot: int, adapter: HostAdapter) -> None:
        """Copy `adapter` into `slot`. The caller guarantees no running batch uses `slot`;
        other slots' memory is not touched, so batches using them keep computing."""
        self._check_slot(slot)
        if adapter.rank > self.max_rank:
            raise AdapterRejectedError(f"adapter {adapter.key}: rank {adapter.rank} exceeds max rank {self.max_rank}")
        unknown = set(adapter.modules) - set(self.module_shapes)
        if unknown:
            raise AdapterRejectedError(f"adapter {adapter.key}: modules {sorted(unknown)[:3]} are not served")
        # No lock: writers own distinct slots (the cache guarantees it), and readers only use slots
        # whose rank is non-zero, which is set last.
        self._ranks[slot] = 0
        self._modules[slot] = frozenset()
        for name in self.module_shapes:
            factors = adapter.modules.get(name)
            a_slot, b_slot = self.a[name][slot], self.b_t[name][slot]
            if factors is None:
                a_slot.zero_()
                b_slot.zero_()
                continue
            rank = factors.rank
            a_slot[:rank].copy_(factors.a, non_blocking=True)
            b_slot[:rank].copy_(factors.b_t, non_blocking=True)
            # Rows past this adapter's rank must be zero: a batch mixing ranks in one group
            # reads up to the group's largest rank.
            a_slot[rank:].zero_()
            b_slot[rank:].zero_()
        if self.device.type == "cuda":
            # The copies above may be asynchronous; the slot must be complete before it is
            # announced as ready to another thread's stream.
            torch.cuda.current_stream(self.device).synchronize()
        self._modules[slot] = frozenset(adapter.modules)
        self._ranks[slot] = adapter.rank

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        self._ranks[slot] = 0
        self._modules[slot] = frozenset()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} is outside 0..{self.num_slots - 1}")
