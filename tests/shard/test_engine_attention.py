"""The decode-attention kernel (shard/engine/decode_attention.cpp) against torch's SDPA, and the
engine with it against the engine without it."""

import pytest
import torch
import torch.nn.functional as F

from shard.engine import Engine, GenerationRequest, SamplingOptions
from shard.engine.attention import DECODE_ATTENTION, decode_attention_forward, load_decode_kernel

torch.set_num_threads(1)

kernel = load_decode_kernel()
needs_kernel = pytest.mark.skipif(kernel is None, reason="the C++ decode-attention kernel could not be built here")


def uneven_mask(lengths, columns, dtype):
    visible = torch.arange(columns)[None, :] < torch.tensor(lengths)[:, None]
    return torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]


@needs_kernel
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dim", [64, 128, 40])  # 64/128: the vectorized loops (AVX-512 builds); 40: the general one
# Keys are scored 16 at a time, then one by one: 23 = one block and a tail, 48 = whole blocks only.
@pytest.mark.parametrize("used", [23, 48])
def test_kernel_matches_sdpa_on_strided_cache_views_with_uneven_rows(dtype, tolerance, heads, kv_heads, dim, used):
    g = torch.Generator().manual_seed(0)
    batch, columns = 5, 56
    cache_k = torch.randn(batch + 2, kv_heads, columns, dim, generator=g).to(dtype)  # more rows and columns than used
    cache_v = torch.randn(batch + 2, kv_heads, columns, dim, generator=g).to(dtype)
    k, v = cache_k[:batch, :, :used], cache_v[:batch, :, :used]
    q = torch.randn(batch, 1, heads, dim, generator=g).to(dtype).transpose(1, 2)  # as the model hands it over
    mask = uneven_mask([23, 1, 7, 16, 22], used, dtype)
    got = kernel.decode_attention(q, k, v, mask, 0.125)
    groups = heads // kv_heads
    want = F.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1),
        attn_mask=mask.float(), scale=0.125,
    ).transpose(1, 2)
    assert got.shape == (batch, 1, heads, dim) and got.dtype == dtype
    assert (got.float() - want).abs().max().item() <= tolerance


def test_attention_function_falls_back_to_sdpa_for_prefill_chunks():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 6, 16, generator=g) for _ in range(3))
    module = torch.nn.Module().eval()
    module.is_causal = True
    got, _ = decode_attention_forward(module, q, k, v, None, scaling=0.25)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25).transpose(1, 2)
    assert torch.allclose(got, want, atol=1e-6)


@needs_kernel
def test_engine_with_the_kernel_gives_the_tokens_and_logits_of_sdpa(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = [[5 + i, 17, 40 + 3 * i, 9, 11][: 2 + i] for i in range(4)]

    def run(decode_attention):
        model.set_attn_implementation("sdpa")
        engine = Engine(model, tokenizer, max_batch_size=4, max_context=64, record_logits=True,
                        decode_attention=decode_attention)
        engine.eos_ids = set()
        assert (model.config._attn_implementation == DECODE_ATTENTION) == decode_attention
        handles = [engine.submit(GenerationRequest(str(i), prompt_ids=p, sampling=SamplingOptions(max_tokens=12)))
                   for i, p in enumerate(prompts)]
        while engine.run_once():
            pass
        chunks = [list(h) for h in handles]
        return ([[t for c in cs for t in c.token_ids] for cs in chunks],
                [torch.cat([c.logits for c in cs if c.logits is not None]) for cs in chunks])

    try:
        tokens_sdpa, logits_sdpa = run(False)
        tokens_kernel, logits_kernel = run(True)
    finally:
        model.set_attn_implementation("sdpa")
    assert tokens_kernel == tokens_sdpa
    for a, b in zip(logits_kernel, logits_sdpa):
        assert (a - b).abs().max().item() <= 1e-4
