"""How one forward pass's rows map onto the slot pool, computed once per step for all layers.

A row is a weighted sum of adapters: its delta is Σ wᵢ·Bᵢ·Aᵢ·x over its (slot, weight) entries.
A plain adapter row is `[(slot, 1.0)]`, a base-model row is `[]`, a mix of K adapters has K
entries (the same sum as PEFT's `add_weighted_adapter(..., combination_type="cat")`), and a
negative weight subtracts an adapter's delta.

The plan is built from host state only (the entries the engine holds and the pool's per-slot
ranks), and every index and weight it needs goes to the device in a single copy: planning a step
never waits for the device."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from shard.lora.slot_pool import AdapterSlotPool

RowEntries = Sequence[tuple[int, float]]
_SMALLEST_BUCKET = 8


@dataclass(frozen=True)
class RowGroup:
    """Entries (row, slot, weight) whose adapters fall in one rank bucket, sorted by row; a row
    appears once per entry it has in this bucket (a mix may put several here).

    `rows` is None when the entries are every row of the batch once, in order (then no row gather
    or scatter is needed); `row_index` always lists them. `weights` (fp32) is None when every
    weight is 1 (then no scaling). `slot` is the one slot every entry uses, where they share one
    (a burst on one adapter), read on the host: then its factors are used in place, not gathered
    once per row."""

    rows: torch.Tensor | None
    row_index: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor | None
    rank: int
    modules: frozenset[str]
    slot: int | None = None


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int
    groups: tuple[RowGroup, ...]


def rank_bucket(rank: int) -> int:
    bucket = _SMALLEST_BUCKET
    while bucket < rank:
        bucket *= 2
    return bucket


def _checked_entries(pool: AdapterSlotPool, rows: Sequence[RowEntries]) -> list[list[tuple[int, float]]]:
    """Each row's entries with zero weights dropped (they add nothing); refuses anything else odd."""
    checked = []
    for row, entries in enumerate(rows):
        if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
            raise ValueError(f"each batch row is a sequence of (slot, weight) pairs; row {row} has {entries!r}")
        kept = []
        for entry in entries:
            if not isinstance(entry, Sequence) or len(entry) != 2:
                raise ValueError(f"row {row}: entry {entry!r} is not a (slot, weight) pair")
            slot, weight = entry
            if isinstance(slot, bool) or not isinstance(slot, int):
                raise ValueError(f"row {row}: slot ids must be ints, got {slot!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"row {row}: slot {slot} has weight {weight!r}; weights are finite numbers")
            if not 0 <= slot < pool.num_slots:
                raise ValueError(f"row {row}: slot {slot} is outside 0..{pool.num_slots - 1}")
            if pool.slot_rank(slot) == 0:
                raise ValueError(f"row {row}: slot {slot} holds no adapter")
            if weight != 0:
                kept.append((slot, float(weight)))
        checked.append(kept)
    return checked


def plan_batch(pool: AdapterSlotPool, rows: Sequence[RowEntries]) -> BatchPlan:
    """Group entries by rank bucket (powers of two from 8). Each group computes at its largest
    real rank, so cost follows the ranks actually in the batch; a row of K entries costs K
    adapters' work; rows with no entries join no group.

    The groups' index tensors are views of one int64 tensor copied to the pool's device at once;
    their fp32 weights are bit-views into the same tensor."""
    batch = _checked_entries(pool, rows)
    by_bucket: dict[int, list[tuple[int, int, float]]] = {}
    for row, entries in enumerate(batch):
        for slot, weight in entries:
            by_bucket.setdefault(rank_bucket(pool.slot_rank(slot)), []).append((row, slot, weight))
    if not by_bucket:
        return BatchPlan(batch_size=len(batch), groups=())
    buckets = sorted(by_bucket)
    # Layout of the one host->device copy: for each group, its rows, its slots, then (only if
    # some weight is not 1) its weights as fp32 packed two to an int64.
    layout = []
    flat: list[int] = []
    for bucket in buckets:
        entries = by_bucket[bucket]
        weighted = any(w != 1.0 for _, _, w in entries)
        layout.append((len(flat), len(entries), weighted))
        flat.extend(row for row, _, _ in entries)
        flat.extend(slot for _, slot, _ in entries)
        if weighted:
            flat.extend([0] * ((len(entries) + 1) // 2))
    host = torch.tensor(flat, dtype=torch.int64)
    for bucket, (offset, count, weighted) in zip(buckets, layout):
        if weighted:
            packed = host[offset + 2 * count : offset + 2 * count + (count + 1) // 2].view(torch.float32)
            packed[:count] = torch.tensor([w for _, _, w in by_bucket[bucket]], dtype=torch.float32)
    indices = host.to(pool.device, non_blocking=True) if pool.device.type != "cpu" else host
    groups = []
    for bucket, (offset, count, weighted) in zip(buckets, layout):
        entries = by_bucket[bucket]
        group_slots = {slot for _, slot, _ in entries}
        row_index = indices[offset : offset + count]
        whole_batch = count == len(batch) and all(row == i for i, (row, _, _) in enumerate(entries))
        weights = None
        if weighted:
            weights = indices[offset + 2 * count : offset + 2 * count + (count + 1) // 2].view(torch.float32)[:count]
        groups.append(
            RowGroup(
                rows=None if whole_batch else row_index,
                row_index=row_index,
                slots=indices[offset + count : offset + 2 * count],
                weights=weights,
                rank=max(pool.slot_rank(s) for s in group_slots),
                modules=frozenset().union(*(pool.slot_modules(s) for s in group_slots)),
                slot=next(iter(group_slots)) if len(group_slots) == 1 else None,
            )
        )
    return BatchPlan(batch_size=len(batch), groups=tuple(groups))
