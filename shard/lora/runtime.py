"""Install multi-adapter layers into a loaded model and drive them per step."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from shard.lora.batch_plan import RowEntries, plan_batch
from shard.lora.cpu_kernel import load_cpu_kernel
from shard.lora.layers import BatchSlots, MultiLoraLinear
from loraplex.adapter_format import PROJECTIONS, ModuleShape
from shard.lora.slot_pool import AdapterSlotPool

DEFAULT_TARGET_MODULES = PROJECTIONS


class LoraRuntime:
    """The slot pool plus the per-step row -> (slot, weight) entries of one model."""

    def __init__(
        self,
        pool: AdapterSlotPool,
        layers: dict[str, MultiLoraLinear],
        batch_slots: BatchSlots,
        uses_decode_kernel: bool = False,
    ):
        self.pool = pool
        self.uses_decode_kernel = uses_decode_kernel
        self.layers = layers
        self._batch_slots = batch_slots

    @property
    def module_shapes(self) -> dict[str, ModuleShape]:
        return self.pool.module_shapes

    def set_batch_rows(self, rows: Sequence[RowEntries]) -> None:
        """Row b of the next forward adds Σ w·delta(slot) over its (slot, weight) entries rows[b]
        for all its tokens: `[(slot, 1.0)]` is one adapter, `[]` the base model, several entries a
        mix. Host values: the plan is built on the host and copied to the device once."""
        self._batch_slots.plan = plan_batch(self.pool, rows)

    def clear_batch_slots(self) -> None:
        self._batch_slots.plan = None


def _reference_dtype(model: nn.Module) -> torch.dtype:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    return torch.float32


def _layer_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


def install_multi_lora(
    model: nn.Module,
    *,
    device_slots: int,
    max_rank: int,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    pool_dtype: torch.dtype | None = None,
    decode_kernel: str = "auto",
) -> LoraRuntime:
    """Replace every linear whose last name component is in `target_modules` with a MultiLoraLinear.

    Works for any architecture whose projections are nn.Linear subclasses (bnb Linear4bit and
    Linear8bitLt are). `pool_dtype` defaults to the model's activation dtype (its embeddings').
    `decode_kernel`: "auto" uses the compiled CPU kernel for fp32 decode steps when the model is on
    CPU and the kernel builds, "torch" uses stock ops only (any device)."""
    if decode_kernel not in ("auto", "torch"):
        raise ValueError(f"decode_kernel must be 'auto' or 'torch', got {decode_kernel!r}")
    targets = set(target_modules)
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, MultiLoraLinear):
            raise ValueError("multi-adapter layers are already installed in this model")
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
            found[name] = module
    if not found:
        raise ValueError(f"no linear module named any of {sorted(targets)} in {type(model).__name__}")
    devices = {_layer_device(layer) for layer in found.values()}
    if len(devices) != 1:
        raise ValueError(f"targeted layers sit on several devices {sorted(map(str, devices))}; one device per shard")
    pool = AdapterSlotPool(
        {name: ModuleShape(layer.in_features, layer.out_features) for name, layer in found.items()},
        num_slots=device_slots,
        max_rank=max_rank,
        dtype=pool_dtype or _reference_dtype(model),
        device=devices.pop(),
    )
    kernel = load_cpu_kernel() if decode_kernel == "auto" and pool.device.type == "cpu" else None
    batch_slots = BatchSlots()
    layers: dict[str, MultiLoraLinear] = {}
    for name, base_layer in found.items():
        layer = MultiLoraLinear(name, base_layer, pool, batch_slots, decode_kernel=kernel)
        model.set_submodule(name, layer)
        layers[name] = layer
    return LoraRuntime(pool, layers, batch_slots, uses_decode_kernel=kernel is not None)
