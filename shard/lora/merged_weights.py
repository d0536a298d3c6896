"""One adapter's delta merged into the base weights of the projections it targets, and undone.

For each projection the adapter targets, W <- W + B'·A (B' = scaling·B, exactly the factors its
device slot holds, so rows computed through the slot and rows computed through the merged weight
agree). The product is formed in fp32 and rounded once into the weight's dtype.

Undoing restores a copy of the touched weights taken before the merge, not W - B'·A: in bf16 the
rounding of W + B'·A loses low bits of W that no subtraction gets back (and even in fp32 the
subtraction is not exact), and the base answer of every other adapter depends on W being the
original bit for bit. The copy lives in host memory and costs the bytes of the touched
projections, for the one adapter a shard can hold merged.

Only plain floating-point weights (fp32, bf16, fp16 `nn.Linear`) can hold a merge: an NF4 or INT8
weight would have to be dequantized, merged and requantized, and the requantization error would
change the base answer of every other row on the shard."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shard.lora.errors import MergeRefusedError
from shard.lora.slot_pool import AdapterSlotPool
from shard.packed_weights import PackedLinear

MERGEABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def merge_refusal(base_layers: dict[str, nn.Module]) -> str | None:
    """Why these base projections cannot hold a merged adapter, or None when they can."""
    for name, layer in base_layers.items():
        weight = getattr(layer, "weight", None)
        if type(layer) not in (nn.Linear, PackedLinear) or weight is None or weight.dtype not in MERGEABLE_DTYPES:
            kind = type(layer).__name__
            dtype = getattr(weight, "dtype", None)
            return (
                f"the base weights are quantized ({name} is a {kind} with {dtype} weights): merging needs "
                "fp32, bf16 or fp16 base weights (quantization fp32 or bf16)"
            )
    return None


class MergedBaseWeights:
    """The touched projections' original weights, while one slot's adapter is merged into them."""

    def __init__(self, slot: int, originals: dict[str, torch.Tensor]) -> None:
        self.slot = slot
        self._originals = originals

    @property
    def modules(self) -> frozenset[str]:
        return frozenset(self._originals)

    @property
    def copy_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._originals.values())

    @classmethod
    @torch.no_grad()
    def merge(cls, pool: AdapterSlotPool, base_layers: dict[str, nn.Module], slot: int) -> "MergedBaseWeights":
        """Add the adapter in `slot` into the weights of `base_layers` (module name -> nn.Linear)
        it targets. Raises MergeRefusedError (nothing changed) for quantized weights."""
        reason = merge_refusal(base_layers)
        if reason is not None:
            raise MergeRefusedError(reason)
        rank = pool.slot_rank(slot)
        if rank == 0:
            raise MergeRefusedError(f"slot {slot} holds no adapter")
        originals: dict[str, torch.Tensor] = {}
        for name in sorted(pool.slot_modules(slot)):
            weight = base_layers[name].weight
            originals[name] = weight.detach().to("cpu", copy=True)
            a = pool.a[name][slot, :rank].to(torch.float32)
            b_t = pool.b_t[name][slot, :rank].to(torch.float32)
            weight.copy_(torch.addmm(weight.to(torch.float32), b_t.t(), a))
            _refresh_packed(base_layers[name])
        return cls(slot, originals)

    @torch.no_grad()
    def restore(self, base_layers: dict[str, nn.Module]) -> None:
        """Put every touched weight back to its bits before the merge."""
        for name, original in self._originals.items():
            base_layers[name].weight.copy_(original, non_blocking=False)
            _refresh_packed(base_layers[name])
        self._originals = {}


def _refresh_packed(layer: nn.Module) -> None:
    """A packed layer computes from its packed copy: pack the edited weight again."""
    if isinstance(layer, PackedLinear):
        layer.repack()


def rows_over_merged_base(rows: Sequence[Sequence[tuple[int, float]]], merged_slot: int) -> list[list[tuple[int, float]]]:
    """Each row's (slot, weight) entries once the adapter in `merged_slot` is part of the base
    weights: every row's weight on it drops by one. A row of that adapter alone has nothing left
    to compute; a base row subtracts its delta; another adapter's row adds its own and subtracts
    the merged one; a mix holding it at weight w keeps w - 1 of it."""
    planned = []
    for entries in rows:
        weights: dict[int, float] = {}
        for slot, weight in entries:
            weights[slot] = weights.get(slot, 0.0) + weight
        weights[merged_slot] = weights.get(merged_slot, 0.0) - 1.0
        planned.append([(slot, weight) for slot, weight in weights.items() if weight != 0.0])
    return planned
