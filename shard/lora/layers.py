"""A projection that serves many adapters in one forward pass."""

from __future__ import annotations

import torch
from torch import nn

from shard.lora.batch_plan import BatchPlan
from shard.lora.slot_pool import AdapterSlotPool


class BatchSlots:
    """The current step's plan, shared by every MultiLoraLinear of one model. Set by the engine
    thread before a forward pass; there is no per-adapter global state."""

    def __init__(self) -> None:
        self.plan: BatchPlan | None = None


class MultiLoraLinear(nn.Module):
    """Runs the wrapped base layer (nn.Linear, bnb Linear4bit or Linear8bitLt) once for the whole
    batch, then adds each row's low-rank deltas from its entries (slot s, weight w):
    out[b] += w * (x[b] @ A[s].T) @ B'[s].T, with B' = scaling * B stored transposed in the pool."""

    def __init__(
        self,
        name: str,
        base_layer: nn.Module,
        pool: AdapterSlotPool,
        batch_slots: BatchSlots,
        decode_kernel=None,
    ):
        super().__init__()
        self.name = name
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self._pool = pool
        self._batch_slots = batch_slots
        # The compiled CPU kernel (shard.lora.cpu_kernel) or None; used for decode steps.
        self._decode_kernel = decode_kernel

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        plan = self._batch_slots.plan
        if plan is None or not plan.groups:
            return out
        batch = x.shape[0]
        if batch != plan.batch_size:
            raise RuntimeError(
                f"{self.name}: input batch {batch} does not match the {plan.batch_size} rows planned for this step"
            )
        x3 = x.reshape(batch, -1, self.in_features)
        out3 = out.view(batch, -1, self.out_features)
        if self._decode_kernel is not None and self._kernel_fits(x3, out3):
            self._add_deltas_compiled(plan, x3.contiguous(), out3)
        else:
            self._add_deltas_torch(plan, x3, out3)
        return out

    @staticmethod
    def _kernel_fits(x3: torch.Tensor, out3: torch.Tensor) -> bool:
        # Decode steps (one token per row) on CPU with fp32 or bf16 activations; prefill is
        # compute-bound and runs faster as batched GEMMs.
        return (
            x3.shape[1] == 1
            and x3.device.type == "cpu"
            and x3.dtype in (torch.float32, torch.bfloat16)
            and out3.dtype == x3.dtype
            and out3.is_contiguous()
        )

    def _add_deltas_compiled(self, plan: BatchPlan, x3: torch.Tensor, out3: torch.Tensor) -> None:
        pool_a, pool_b = self._pool.a[self.name], self._pool.b_t[self.name]
        for group in plan.groups:
            if self.name in group.modules:
                self._decode_kernel.lora_delta_add_(
                    out3, x3, pool_a, pool_b, group.row_index, group.slots, group.weights, group.rank
                )

    def _add_deltas_torch(self, plan: BatchPlan, x3: torch.Tensor, out3: torch.Tensor) -> None:
        """Device-agnostic path: each group's factors (only the first `rank` rows of each slot), two
        matmuls, added into the base output (index_add_ sums a row's entries). Where every entry
        uses one adapter its factors are used in place, one GEMM each over all its rows' tokens;
        otherwise they are gathered, a copy per entry, and multiplied as batches (a prefill of 32
        requests on one adapter would copy each projection's A and B 32 times and take about twice
        as long on CPU)."""
        pool_a, pool_b = self._pool.a[self.name], self._pool.b_t[self.name]
        compute_dtype = pool_a.dtype
        if x3.dtype != compute_dtype:
            x3 = x3.to(compute_dtype)
        for group in plan.groups:
            if self.name not in group.modules:
                continue
            xs = x3 if group.rows is None else x3.index_select(0, group.rows)
            if group.slot is not None:
                b_t = pool_b[group.slot, : group.rank]
                hidden = torch.matmul(xs, pool_a[group.slot, : group.rank].t())
            else:
                b_t = pool_b[:, : group.rank].index_select(0, group.slots)
                hidden = torch.bmm(xs, pool_a[:, : group.rank].index_select(0, group.slots).transpose(1, 2))
            if group.weights is not None:
                hidden.mul_(group.weights.view(-1, 1, 1))
            if group.rows is None and out3.dtype == compute_dtype and out3.is_contiguous():
                if b_t.dim() == 2:
                    out3.view(-1, out3.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), b_t)
                else:
                    out3.baddbmm_(hidden, b_t)
                continue
            delta = torch.matmul(hidden, b_t).to(out3.dtype)
            if group.rows is None:
                out3.add_(delta)
            else:
                out3.index_add_(0, group.rows, delta)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in={self.in_features}, out={self.out_features}, slots={self._pool.num_slots}"
