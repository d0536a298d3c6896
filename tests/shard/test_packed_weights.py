"""Projections computing through packed weights (shard.packed_weights: oneDNN's layout, or AMX tiles
on CPUs with AMX) answer what F.linear answers (bf16 exactly, or within one bf16 rounding where the
two sum in another order; fp32 within float rounding), and a merged hot adapter edits what they
compute, not only the weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.synthetic_models import random_llama
from shard.lora import AdapterKey, LocalAdapterSource, LoraManager
from shard.packed_weights import AMX_MAX_ROWS, PackedLinear, load_amx_kernel, pack_linear_weights, packing_available
from tests.support.shard_models import tiny_llama_config

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN (mkldnn) ops")


def bf16_linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(96, 160, bias=bias).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(5, 96), (4, 1, 96), (3, 7, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_layer_answers_exactly_what_f_linear_answers(shape, bias):
    linear = bf16_linear(bias)
    packed = PackedLinear(linear)
    x = torch.randn(shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias))
    assert packed.weight is linear.weight and packed.bias is linear.bias  # the same parameters


def test_a_strided_input_and_autograd_still_work():
    packed = PackedLinear(bf16_linear())
    x = torch.randn(4, 6, 96, dtype=torch.bfloat16)[:, -1:, :]  # a non-contiguous view
    with torch.inference_mode():
        # F.linear itself adds the bias separately on a strided input (one bf16 rounding more).
        assert torch.equal(packed(x), F.linear(x.contiguous(), packed.weight, packed.bias))
    y = packed(torch.randn(2, 96, dtype=torch.bfloat16))  # grad enabled: plain F.linear
    assert y.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_fp32_and_bf16_cpu_linears_are_packed(dtype):
    model = random_llama(tiny_llama_config(), seed=0).to(dtype)
    plain = sum(type(m) is nn.Linear for m in model.modules())
    assert pack_linear_weights(model) == plain > 0
    assert not any(type(m) is nn.Linear for m in model.modules())


def test_fp16_linears_are_left_as_they_are():
    model = random_llama(tiny_llama_config(), seed=0).to(torch.float16)
    assert pack_linear_weights(model) == 0


@pytest.mark.parametrize("shape", [(5, 96), (3, 7, 96)])
def test_a_packed_fp32_layer_answers_what_f_linear_answers_within_rounding(shape):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160)
    packed = PackedLinear(linear)
    x = torch.randn(shape)
    with torch.inference_mode():
        # oneDNN's packed kernel sums in another order than F.linear's: float rounding apart.
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_the_packed_model_gives_the_same_logits():
    model = random_llama(tiny_llama_config(), seed=0).to(torch.bfloat16)
    ids = torch.randint(3, 300, (3, 9))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        pack_linear_weights(model)
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_a_merge_and_unmerge_change_what_packed_layers_compute(tiny_adapter_dirs):
    """Merging writes W + B'A into the weight; the packed copy must follow, and the unmerge must
    bring the packed copy back too."""
    plain = random_llama(tiny_llama_config(), seed=0).to(torch.bfloat16)
    packed = random_llama(tiny_llama_config(), seed=0).to(torch.bfloat16)
    pack_linear_weights(packed)
    managers = [
        LoraManager.install(m, LocalAdapterSource(tiny_adapter_dirs), device_slots=4, max_rank=16, host_capacity=4,
                            decode_kernel="torch")
        for m in (plain, packed)
    ]
    key = AdapterKey("alpha", "local")
    ids = torch.randint(3, 300, (2, 7))
    try:
        with torch.inference_mode():
            before = packed(input_ids=ids).logits
            for lora in managers:
                lora.load(key)
                lora.merge(key)
            merged_plain = plain(input_ids=ids).logits  # F.linear over the merged weights
            merged_packed = packed(input_ids=ids).logits
            assert torch.equal(merged_packed, merged_plain)
            assert not torch.equal(merged_packed, before)
            for lora in managers:
                lora.unmerge()
            assert torch.equal(packed(input_ids=ids).logits, before)
    finally:
        for lora in managers:
            lora.close()


amx = load_amx_kernel()
needs_amx = pytest.mark.skipif(amx is None, reason="this CPU has no AMX (or the AMX kernel could not be built here)")


@needs_amx
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 32, 33, 100, AMX_MAX_ROWS, AMX_MAX_ROWS + 1])
def test_the_amx_kernel_answers_what_f_linear_answers(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(768, 2048, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear, amx)
    assert packed.kernel == "amx"
    x = torch.randn(rows, 1, 768, dtype=torch.bfloat16)
    with torch.inference_mode():
        got, want = packed(x), F.linear(x, linear.weight, linear.bias)
    assert got.shape == want.shape == (rows, 1, 2048)
    if rows <= 32 or rows > AMX_MAX_ROWS:  # the same sums in the same order, or F.linear itself
        assert torch.equal(got, want)
    else:
        # Past 32 rows oneDNN splits its sums differently: a few outputs round the other way.
        assert (got != want).float().mean().item() < 1e-3
        torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-7, atol=1e-3)


@needs_amx
def test_pack_puts_fitting_bf16_layers_on_the_amx_kernel_and_others_on_onednn():
    model = nn.Sequential(nn.Linear(96, 160), nn.Linear(160, 100), nn.Linear(100, 64)).to(torch.bfloat16)
    assert pack_linear_weights(model) == 3
    assert [m.kernel for m in model] == ["amx", "onednn", "onednn"]  # sizes must be multiples of 32
    fp32 = nn.Sequential(nn.Linear(96, 160))
    pack_linear_weights(fp32)
    assert fp32[0].kernel == "onednn"


@needs_amx
def test_a_merge_repacks_amx_tiles():
    linear = nn.Linear(96, 160, bias=False).to(torch.bfloat16)
    packed = PackedLinear(linear, amx)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.mul_(2)
        packed.repack()
    with torch.inference_mode():
        assert torch.equal(packed(x), F.linear(x, linear.weight))
