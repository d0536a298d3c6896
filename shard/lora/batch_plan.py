"""How one forward pass's rows map onto the slot pool, computed once per step for all layers.

The plan is built from host state only (the slot ids the engine holds and the pool's per-slot
ranks), and every index it needs goes to the device in a single copy: planning a step never
waits for the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from shard.lora.slot_pool import AdapterSlotPool

BASE_SLOT = -1
_SMALLEST_BUCKET = 8


@dataclass(frozen=True)
class RowGroup:
    """Rows whose adapters fall in one rank bucket. `rows` is None when the group is every row
    of the batch in order (then no row gather or scatter is needed); `row_index` always lists them."""

    rows: torch.Tensor | None
    row_index: torch.Tensor
    slots: torch.Tensor
    rank: int
    modules: frozenset[str]


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int
    groups: tuple[RowGroup, ...]


def rank_bucket(rank: int) -> int:
    bucket = _SMALLEST_BUCKET
    while bucket < rank:
        bucket *= 2
    return bucket


def _checked_slots(pool: AdapterSlotPool, slot_ids: Sequence[int]) -> list[int]:
    slots = list(slot_ids)
    for row, slot in enumerate(slots):
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise ValueError(f"slot ids must be ints, one per batch row; row {row} has {slot!r}")
        if slot == BASE_SLOT:
            continue
        if not 0 <= slot < pool.num_slots:
            raise ValueError(f"row {row}: slot {slot} is outside -1..{pool.num_slots - 1}")
        if pool.slot_rank(slot) == 0:
            raise ValueError(f"row {row}: slot {slot} holds no adapter")
    return slots


def plan_batch(pool: AdapterSlotPool, slot_ids: Sequence[int]) -> BatchPlan:
    """Group rows by rank bucket (powers of two from 8). Each group computes at its largest real
    rank, so cost follows the ranks actually in the batch; rows with slot -1 join no group.

    `slot_ids` are host ints (row b uses slot slot_ids[b]); the groups' index tensors are views
    of one int64 tensor copied to the pool's device at once."""
    slots = _checked_slots(pool, slot_ids)
    by_bucket: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot != BASE_SLOT:
            by_bucket.setdefault(rank_bucket(pool.slot_rank(slot)), []).append(row)
    if not by_bucket:
        return BatchPlan(batch_size=len(slots), groups=())
    buckets = sorted(by_bucket)
    # Layout of the one host->device copy: for each group, its rows then its slots.
    flat: list[int] = []
    for bucket in buckets:
        rows = by_bucket[bucket]
        flat.extend(rows)
        flat.extend(slots[r] for r in rows)
    indices = torch.tensor(flat, dtype=torch.int64)
    if pool.device.type != "cpu":
        indices = indices.to(pool.device, non_blocking=True)
    groups = []
    offset = 0
    for bucket in buckets:
        rows = by_bucket[bucket]
        count = len(rows)
        group_slots = {slots[r] for r in rows}
        row_index = indices[offset : offset + count]
        groups.append(
            RowGroup(
                rows=None if count == len(slots) else row_index,
                row_index=row_index,
                slots=indices[offset + count : offset + 2 * count],
                rank=max(pool.slot_rank(s) for s in group_slots),
                modules=frozenset().union(*(pool.slot_modules(s) for s in group_slots)),
            )
        )
        offset += 2 * count
    return BatchPlan(batch_size=len(slots), groups=tuple(groups))
