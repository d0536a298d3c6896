"""The engine's own forward pass for Llama-architecture models: the same modules, the same math,
fewer passes over the activations.

transformers' Llama forward runs RMSNorm as 5 elementwise ops, rotary embedding as 6, SiLU·up as
2 and the residual adds separately, each a full read and write of the activations with its own
OpenMP region. On a 2-core CPU those were ~15% of a bf16 decode step and ~20% of a bf16 prefill;
the Python around them only 1.5-2 ms of a 37 ms step. Here the projections are still the model's
modules (so packed weights, quantized layers and multi-adapter LoRA layers all apply unchanged),
attention is still the model's configured attention function over the engine's cache, and the
elementwise work goes through fused CPU kernels (fused_ops.cpp): residual add + RMSNorm in one
pass, rotary embedding in place, SiLU·up in one pass (the engine's cache writes keys/values with
the same kernels). On any other device, or where the kernels cannot be built, the same steps run
as stock torch ops (the math of transformers' modules), so the path is device-agnostic and adds
no host synchronisation.

Only models whose forward this reproduces exactly are taken (``supports``): LlamaForCausalLM
with SiLU MLPs and transformers' RMSNorm/rotary modules; everything else runs the model's own
forward."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from shard.cpu_extension import load_cpu_extension

_SOURCE = Path(__file__).with_name("fused_ops.cpp")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def load_fused_ops():
    """The compiled fused elementwise kernels, or None where they cannot be built or where this
    CPU lacks AVX-512 (their scalar loops lose to torch's vectorized ops there)."""
    ops = load_cpu_extension(_SOURCE, "loraplex_fused_ops")
    return ops if ops is not None and ops.vectorized else None


def supports(model: nn.Module) -> bool:
    """Whether ``model``'s forward is the Llama forward this module reproduces."""
    try:
        from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaRMSNorm, LlamaRotaryEmbedding
    except ImportError:  # pragma: no cover - transformers without Llama
        return False
    if type(model) is not LlamaForCausalLM:
        return False
    config = model.config
    decoder = model.model
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if not isinstance(decoder.rotary_emb, LlamaRotaryEmbedding) or not isinstance(decoder.norm, LlamaRMSNorm):
        return False
    return all(
        isinstance(layer.input_layernorm, LlamaRMSNorm) and isinstance(layer.post_attention_layernorm, LlamaRMSNorm)
        for layer in decoder.layers
    )


class LlamaForward:
    """Callable like the model for what the engine passes (ids, 4D mask, position ids, the
    engine's cache, ``logits_to_keep``); returns an object with ``.logits``."""

    def __init__(self, model: nn.Module, fused_kernels: bool = True) -> None:
        """``fused_kernels``: False runs every elementwise step as stock torch ops (the path any
        non-CPU device takes)."""
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a Llama model this forward reproduces")
        self.model = model
        device = model.get_input_embeddings().weight.device
        self._ops = load_fused_ops() if fused_kernels and device.type == "cpu" else None

    @property
    def uses_fused_kernels(self) -> bool:
        return self._ops is not None

    @property
    def fused_ops(self):
        """The fused kernels this forward uses (the engine's cache writes tokens with them), or None."""
        return self._ops

    # --- the elementwise steps: fused kernel on CPU, the modules' own math elsewhere ----------

    def _fits(self, *tensors: torch.Tensor) -> bool:
        first = tensors[0]
        return (
            self._ops is not None
            and first.device.type == "cpu"
            and first.dtype in _KERNEL_DTYPES
            and all(t.dtype == first.dtype and t.is_contiguous() for t in tensors)
        )

    def _norm(self, norm: nn.Module, hidden: torch.Tensor, delta: torch.Tensor | None = None):
        """(hidden + delta, RMSNorm of it); ``hidden`` is updated in place when the kernel runs."""
        if delta is None:
            if self._fits(hidden, norm.weight):
                return hidden, self._ops.rms_norm(hidden, None, norm.weight, norm.variance_epsilon)
            return hidden, norm(hidden)
        if self._fits(hidden, delta, norm.weight):
            return hidden, self._ops.rms_norm(hidden, delta, norm.weight, norm.variance_epsilon)
        hidden = hidden + delta
        return hidden, norm(hidden)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x [B, W, heads, dim] with cos/sin [B, W, dim]."""
        if self._fits(x, cos, sin):
            self._ops.rotary_(x, cos, sin)
            return x
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos) + (rotated * sin)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if self._fits(gate, up):
            return mlp.down_proj(self._ops.silu_mul(gate, up))
        return mlp.down_proj(mlp.act_fn(gate) * up)

    # --- the forward -------------------------------------------------------------------------

    def __call__(self, *, input_ids, attention_mask, position_ids, past_key_values, logits_to_keep=0, **_):
        model = self.model
        decoder = model.model
        config = model.config
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, None)
        if attention is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as attention
        batch, width = input_ids.shape
        hidden = decoder.embed_tokens(input_ids)
        cos, sin = decoder.rotary_emb(hidden, position_ids=position_ids)
        delta = None
        for layer in decoder.layers[: config.num_hidden_layers]:
            hidden, x = self._norm(layer.input_layernorm, hidden, delta)
            attn = layer.self_attn
            q = self._rotate(attn.q_proj(x).view(batch, width, -1, attn.head_dim), cos, sin)
            k = self._rotate(attn.k_proj(x).view(batch, width, -1, attn.head_dim), cos, sin)
            v = attn.v_proj(x).view(batch, width, -1, attn.head_dim)
            keys, values = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), attn.layer_idx)
            out, _ = attention(attn, q.transpose(1, 2), keys, values, attention_mask, dropout=0.0, scaling=attn.scaling)
            out = attn.o_proj(out.reshape(batch, width, -1).contiguous())
            hidden, x = self._norm(layer.post_attention_layernorm, hidden, out)
            delta = self._mlp(layer.mlp, x)
        hidden, x = self._norm(decoder.norm, hidden, delta)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return SimpleNamespace(logits=model.lm_head(x[:, keep, :]))
