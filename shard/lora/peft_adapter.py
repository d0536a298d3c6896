"""Read a PEFT LoRA adapter folder into host tensors ready for a slot.

What is accepted and refused is `loraplex.adapter_format` (the registry applies the same rules at
publish). Each module's factors are stored the way the slot pool wants them: A as [r, in] and
B transposed as [r, out] with PEFT's scaling for the module already multiplied in, so serving
never multiplies by a scale."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loraplex.adapter_format import AdapterFormatError, ModuleShape, check_adapter
from shard.lora.errors import AdapterNotFoundError, AdapterRejectedError
from shard.lora.keys import AdapterKey

__all__ = ["HostAdapter", "LoraFactors", "ModuleShape", "read_peft_adapter"]


@dataclass
class LoraFactors:
    """One module's factors: `a` [r, in]; `b_t` = (scaling * B).T, [r, out]."""

    a: torch.Tensor
    b_t: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class HostAdapter:
    """A validated adapter held in host memory. `weights_sha256` hashes its safetensors file."""

    key: AdapterKey
    modules: dict[str, LoraFactors]
    weights_sha256: str
    size_bytes: int
    target_modules: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return max(f.rank for f in self.modules.values())


def read_peft_adapter(
    folder: Path,
    key: AdapterKey,
    module_shapes: Mapping[str, ModuleShape],
    *,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
) -> HostAdapter:
    """Parse and check the adapter in `folder` against the served modules.

    `module_shapes` maps each module path the runtime serves (as in `model.named_modules()`)
    to its shape. Raises AdapterRejectedError with the reason when anything does not fit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterNotFoundError(f"adapter {key}: folder {folder} does not exist")
    try:
        checked = check_adapter(folder, module_shapes, max_rank=max_rank)
    except AdapterFormatError as error:
        raise AdapterRejectedError(f"adapter {key}: {error}") from None
    try:
        tensors = load_safetensors(checked.weights)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise AdapterRejectedError(f"adapter {key}: the weights file is not a readable safetensors file ({error})") from None
    modules: dict[str, LoraFactors] = {}
    for module, pair in sorted(checked.modules.items()):
        a = tensors[pair["A"].key].to(torch.float32)
        b = tensors[pair["B"].key].to(torch.float32)
        modules[module] = LoraFactors(
            a=a.to(dtype).contiguous(),
            b_t=(b.t() * checked.options.scaling(module)).to(dtype).contiguous(),
        )
    return HostAdapter(
        key=key,
        modules=modules,
        weights_sha256=checked.weights_sha256,
        size_bytes=len(checked.weights),
        target_modules=sorted(checked.target_modules),
    )
