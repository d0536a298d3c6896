"""How one forward pass's rows map onto the slot pool, computed once per step for all layers."""

from __future__ import annotations

from dataclasses import dataclass

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


def plan_batch(pool: AdapterSlotPool, slot_ids: torch.Tensor) -> BatchPlan:
    """Group rows by rank bucket (powers of two from 8). Each group computes at its largest real
    rank, so cost follows the ranks actually in the batch; rows with slot -1 join no group."""
    if slot_ids.dim() != 1:
        raise ValueError(f"slot_ids must be 1-D (one slot per batch row), got shape {tuple(slot_ids.shape)}")
    if slot_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_ids must be an integer tensor, got {slot_ids.dtype}")
    slots = slot_ids.tolist()
    by_bucket: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot == BASE_SLOT:
            continue
        if not 0 <= slot < pool.num_slots:
            raise ValueError(f"row {row}: slot {slot} is outside -1..{pool.num_slots - 1}")
        rank = pool.slot_rank(slot)
        if rank == 0:
            raise ValueError(f"row {row}: slot {slot} holds no adapter")
        by_bucket.setdefault(rank_bucket(rank), []).append(row)
    groups = []
    for bucket in sorted(by_bucket):
        rows = by_bucket[bucket]
        group_slots = [slots[r] for r in rows]
        modules = frozenset().union(*(pool.slot_modules(s) for s in set(group_slots)))
        all_rows = len(rows) == len(slots)
        row_index = torch.tensor(rows, dtype=torch.int64, device=pool.device)
        groups.append(
            RowGroup(
                rows=None if all_rows else row_index,
                row_index=row_index,
                slots=torch.tensor(group_slots, dtype=torch.int64, device=pool.device),
                rank=max(pool.slot_rank(s) for s in group_slots),
                modules=modules,
            )
        )
    return BatchPlan(batch_size=len(slots), groups=tuple(groups))
