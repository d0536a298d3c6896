"""Base-model projections whose CPU matmuls read a copy of the weight packed once at load.

A bf16 `F.linear` on CPU goes through oneDNN, which reorders the weight into its blocked layout on
every call; for a decode step's few rows that reorder costs as much as the product. Packing once at
load takes it out of every step: measured on a 2-core Xeon with AMX at batch 32, 1.7-2x faster per
projection (0.034 vs 0.060 ms at 768x768, 1.2 vs 2.1 ms for a 32,000-word LM head), with results
bit-identical to `F.linear` (the same oneDNN kernel runs). fp32 weights are packed too: the 12
layers of a 768-hidden model at batch 32 took 33.5 instead of 39 ms a step, and the results differ
from `F.linear`'s by float rounding (~5e-6 absolute on outputs of ~1), far inside the 1e-4 the fp32
answers are held to against PEFT.

Which kernel a bf16 projection gets depends on the CPU:
- with AMX (and the kernel built, shard/amx_linear.cpp): the weight is packed into AMX tiles, and
  calls of up to ``AMX_MAX_ROWS`` rows (every decode step, short prefills) run our kernel, which
  reads each weight tile once per 32 rows. Weights read from memory at batch 32, on the same Xeon:
  58 vs 86 us at 768x768, 142 vs 193 us at 2048x768, 2.07 vs 2.53 ms for the LM head against
  oneDNN's packed kernel (22-25 GB/s against 14-19), with the same results (bit-identical in our
  checks). Larger calls (long prefills, compute-bound) go to `F.linear`, where oneDNN's own
  blocking wins (2,048 rows: 1.1 vs 1.9 ms at 768x768) and its per-call reorder is a few percent;
- otherwise (no AMX, or shapes that are not multiples of 32): oneDNN's packed kernel, as above.

The cost is memory: the packed copy sits next to the weight, so a packed layer holds its weight
twice. The weight stays the source of truth: whatever edits it in place (a merged hot adapter,
shard.lora.merged_weights) calls `repack`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shard.cpu_extension import load_cpu_extension

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)
# Up to this many rows a call runs the AMX kernel; measured on a 2-core Xeon it led oneDNN's packed
# kernel up to 256 rows on every projection shape of the demo model, and lost from ~512 on some.
AMX_MAX_ROWS = 256
_AMX_SOURCE = Path(__file__).with_name("amx_linear.cpp")


def load_amx_kernel():
    """The AMX bf16 matmul (shard/amx_linear.cpp), or None where it cannot be built or this CPU
    (or kernel) does not let the process use AMX."""
    ops = load_cpu_extension(_AMX_SOURCE, "loraplex_amx_linear")
    return ops if ops is not None and ops.available() else None


def amx_fits(linear: nn.Linear) -> bool:
    """Whether ``linear``'s shape and dtype suit the AMX kernel (bf16, both sizes multiples of 32)."""
    return (
        linear.weight.dtype == torch.bfloat16
        and linear.weight.device.type == "cpu"
        and linear.out_features % 32 == 0
        and linear.in_features % 32 == 0
    )


def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed linear ops (CPU builds with mkldnn do)."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Linear):
    """An nn.Linear (same parameters, same module tree position) computing through a packed copy
    of its weight while its input is on the CPU in the weight's dtype; otherwise `F.linear`.
    ``amx``: the AMX kernel (load_amx_kernel()) to pack for where the shape fits, or None."""

    def __init__(self, linear: nn.Linear, amx=None) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._amx = amx if amx is not None and amx_fits(linear) else None
        self._packed: torch.Tensor | None = None
        self.repack()

    @property
    def kernel(self) -> str:
        """Which kernel computes this layer on the CPU: "amx" or "onednn"."""
        return "amx" if self._amx is not None else "onednn"

    @torch.no_grad()
    def repack(self) -> None:
        """Pack the current weight again (after anything changed it in place)."""
        weight = self.weight.detach()
        if self._amx is not None:
            self._packed = self._amx.pack(weight)
        else:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != self.weight.dtype or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if self._amx is None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        rows = x.numel() // self.in_features
        if rows > AMX_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        out = self._amx.linear(x.reshape(rows, self.in_features), self._packed, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def pack_linear_weights(model: nn.Module) -> int:
    """Replace every plain nn.Linear of `model` on the CPU with bf16 or fp32 weights by a
    PackedLinear (bf16 ones on the AMX kernel where it fits); returns how many. Quantized layers
    (bitsandbytes subclasses) and other dtypes stay."""
    if not packing_available():
        return 0
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype in PACKABLE_DTYPES
    ]
    amx = load_amx_kernel() if any(amx_fits(module) for _, module in targets) else None
    for name, module in targets:
        model.set_submodule(name, PackedLinear(module, amx))
    return len(targets)
