"""The ceiling memory bandwidth puts on LoRA ÷ base.

A decode step in which every row has its own adapter reads each distinct adapter's A and B on top
of the base weights. Those reads cannot go faster than the machine streams memory, so
base step ÷ (base step + factor bytes ÷ streaming rate) bounds LoRA ÷ base for any kernel that
reads them beside the base's matmuls rather than hidden under its compute, on any CPU, measured in
the same run as the ratio it bounds."""

from __future__ import annotations

import time

import torch

DEFAULT_READ_BYTES = 1 << 30  # past any last-level cache this project has met (480 MiB the largest)


def streaming_read_bytes_per_s(size_bytes: int = DEFAULT_READ_BYTES, repeats: int = 5) -> float:
    """The best rate at which this process's torch threads read `size_bytes` of fp32 that is in no
    cache: a sum, which reads each element once and writes nothing."""
    buffer = torch.ones(max(size_bytes // 4, 1), dtype=torch.float32)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every `nn.Linear` weight: what a decode step of the base model reads at least."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def lora_ratio_ceiling(base_step_s: float, factor_bytes_per_step: int, read_bytes_per_s: float,
                       base_weight_bytes: int) -> dict:
    """`base_weight_read_ms` says how near the base step itself is to its own floor."""
    factor_read_s = factor_bytes_per_step / read_bytes_per_s
    return {
        "read_gb_per_s": round(read_bytes_per_s / 1e9, 2),
        "base_weight_mb": round(base_weight_bytes / 1e6, 1),
        "base_weight_read_ms": round(base_weight_bytes / read_bytes_per_s * 1e3, 3),
        "factor_mb_per_step": round(factor_bytes_per_step / 1e6, 1),
        "factor_read_ms": round(factor_read_s * 1e3, 3),
        "base_step_ms": round(base_step_s * 1e3, 3),
        "ratio_ceiling": round(base_step_s / (base_step_s + factor_read_s), 4),
    }
