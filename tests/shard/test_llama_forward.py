"""The engine's own Llama forward (shard/engine/llama_forward.py) and its fused CPU kernels
(fused_ops.cpp): each kernel against the transformers module it replaces, the forward against the
model's own forward, and the engine on it against the engine on the model's forward."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from bench.synthetic_models import random_llama
from shard.engine import Engine, GenerationRequest, SamplingOptions
from shard.engine.llama_forward import LlamaForward, load_fused_ops, supports
from shard.packed_weights import pack_linear_weights
from tests.support.shard_models import tiny_llama_config

torch.set_num_threads(1)

ops = load_fused_ops()
needs_ops = pytest.mark.skipif(ops is None, reason="the fused kernels need a C++ compiler and an AVX-512 CPU")
# bf16: every intermediate the modules round is rounded at the same point; only the fp32 sum of
# squares in RMSNorm is reassociated, which can move a result by one bf16 ulp.
BF16_ULP = 2.0**-7


def close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        diff = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-2)
        assert diff.max().item() <= BF16_ULP
        assert (got != want).float().mean().item() < 1e-3


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [128, 100])  # 100: a row that ends off the vector width
def test_rms_norm_with_and_without_the_residual_add(dtype, width):
    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(width, eps=1e-6).to(dtype)
    norm.weight.data = torch.randn(width, generator=g).to(dtype)
    x = torch.randn(6, 3, width, generator=g).to(dtype)
    delta = torch.randn(6, 3, width, generator=g).to(dtype)
    close(ops.rms_norm(x.clone(), None, norm.weight, 1e-6), norm(x), dtype)
    residual = x.clone()
    normed = ops.rms_norm(residual, delta, norm.weight, 1e-6)
    assert torch.equal(residual, x + delta)  # the residual is updated in place, rounded like the add
    close(normed, norm(x + delta), dtype)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 40])
def test_rotary_in_place_matches_apply_rotary_pos_emb(dtype, dim):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 5, 4, dim, generator=g).to(dtype)  # [batch, tokens, heads, dim]
    cos, sin = (torch.randn(3, 5, dim, generator=g).to(dtype) for _ in range(2))
    want, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos, sin)
    got = q.clone()
    ops.rotary_(got, cos, sin)
    close(got.transpose(1, 2), want, dtype)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_the_mlp_activation(dtype):
    g = torch.Generator().manual_seed(2)
    gate = (torch.randn(7, 301, generator=g) * 6).to(dtype)  # wide range, and a length off the vector width
    up = torch.randn(7, 301, generator=g).to(dtype)
    close(ops.silu_mul(gate, up), F.silu(gate) * up, dtype)


@needs_ops
def test_kernels_refuse_what_they_cannot_compute():
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        ops.silu_mul(x.half(), x.half())
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.rms_norm(x.t(), None, torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(x, None, torch.ones(63), 1e-6)


def causal_inputs(batch: int, width: int, dtype):
    mask = torch.full((width, width), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None].expand(batch, 1, width, width), torch.arange(width)[None].expand(batch, width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused_kernels", [False, True])
def test_the_forward_gives_the_models_logits(dtype, fused_kernels):
    if fused_kernels and ops is None:
        pytest.skip("the fused kernels need a C++ compiler and an AVX-512 CPU")
    model = random_llama(tiny_llama_config(), seed=0).to(dtype)
    pack_linear_weights(model)
    ids = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(3))
    mask, positions = causal_inputs(3, 9, dtype)
    forward = LlamaForward(model, fused_kernels=fused_kernels)
    assert forward.uses_fused_kernels == fused_kernels
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                      past_key_values=DynamicCache(config=model.config), logits_to_keep=0).logits
        last = forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                       past_key_values=DynamicCache(config=model.config), logits_to_keep=1).logits
    if not fused_kernels:
        assert torch.equal(got, want)  # the stock-op path is the model's own math, op for op
    elif dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert (got.float() - want.float()).abs().max().item() <= 4 * BF16_ULP
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.equal(last, got[:, -1:])


def test_only_llama_models_with_silu_are_taken():
    assert supports(random_llama(tiny_llama_config(), seed=0))
    config = tiny_llama_config()
    config.hidden_act = "gelu"
    assert not supports(random_llama(config, seed=0))
    assert not supports(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a Llama model"):
        LlamaForward(random_llama(config, seed=0))


def test_the_engine_on_its_forward_gives_the_tokens_and_logits_of_the_models_forward(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = [[5 + i, 17, 40 + 3 * i, 9, 11, 60, 2 + i][: 2 + i] for i in range(5)]

    def run(fused_forward):
        engine = Engine(model, tokenizer, max_batch_size=3, max_context=64, record_logits=True,
                        prefill_chunk_tokens=6, fused_forward=fused_forward)
        engine.eos_ids = set()
        handles = [engine.submit(GenerationRequest(str(i), prompt_ids=p, sampling=SamplingOptions(max_tokens=10)))
                   for i, p in enumerate(prompts)]
        while engine.run_once():  # 5 requests over 3 rows, prompts in chunks: rows join and leave
            pass
        chunks = [list(h) for h in handles]
        return ([[t for c in cs for t in c.token_ids] for cs in chunks],
                [torch.cat([c.logits for c in cs if c.logits is not None]) for cs in chunks])

    tokens_model, logits_model = run(False)
    tokens_own, logits_own = run(True)
    assert tokens_own == tokens_model
    for a, b in zip(logits_own, logits_model):
        assert (a - b).abs().max().item() <= 1e-4
