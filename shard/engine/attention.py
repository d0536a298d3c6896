"""The engine's attention: a CPU kernel for decode steps over the per-slot KV cache
(decode_attention.cpp), stock SDPA for everything else.

A decode step has one query token per row; torch's SDPA on CPU runs a blocked flash kernel built
for many queries and, with one query per (row, head), measured 2-4x slower than reading each row's
keys and values once (slower in bf16 than in fp32). The kernel takes the same additive 4D mask
SDPA takes, so nothing else changes; prefill chunks, other devices and other dtypes go to SDPA,
which is correct on every device."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from shard.cpu_extension import load_cpu_extension

DECODE_ATTENTION = "loraplex_decode"
_SOURCE = Path(__file__).with_name("decode_attention.cpp")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def load_decode_kernel():
    """The compiled kernel, or None where it cannot be built (then SDPA serves every step)."""
    return load_cpu_extension(_SOURCE, "loraplex_decode_attention")


def decode_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function contract: returns ([B, q_len, H, D], None)."""
    if (
        query.shape[2] == 1
        and query.device.type == "cpu"
        and query.dtype in _KERNEL_DTYPES
        and key.dtype == query.dtype
        and (attention_mask is None or (attention_mask.dtype == query.dtype and attention_mask.shape[1] == 1))
        and not module.training
    ):
        kernel = load_decode_kernel()
        if kernel is not None:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return kernel.decode_attention(query, key, value, attention_mask, float(scale)), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)
# The model's own mask building (generate with transformers' caches) treats it as SDPA; the engine
# passes its own 4D mask, which transformers hands through unchanged.
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


def use_decode_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` (sdpa or eager attention, on CPU) to the decode kernel; False, leaving the
    model as it was, where the kernel does not apply or cannot be built."""
    device = model.get_input_embeddings().weight.device
    current = str(getattr(model.config, "_attn_implementation", "") or "")
    if device.type != "cpu" or current not in ("sdpa", "eager", DECODE_ATTENTION):
        return False
    if load_decode_kernel() is None:
        return False
    model.set_attn_implementation(DECODE_ATTENTION)
    return True
