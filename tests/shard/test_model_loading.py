"""Loading a Hugging Face causal-LM folder with each quantization, and multi-adapter serving over it."""

import copy

import pytest
import torch
from peft import PeftModel

from shard.lora import AdapterKey, install_multi_lora, read_peft_adapter
from bench.synthetic_models import random_llama, random_llama_config, save_random_llama, save_random_peft_adapter
from shard.model_loading import ModelLoadError, load_base_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(2)
    return save_random_llama(tmp_path_factory.mktemp("base") / "llama", random_llama_config(), seed=0)


@pytest.mark.parametrize("quantization", ["fp32", "bf16", "nf4", "int8"])
def test_each_quantization_loads_frozen_and_runs(model_dir, quantization):
    model, tokenizer = load_base_model(model_dir, quantization)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    q_proj = model.model.layers[0].self_attn.q_proj
    expected_class = {"fp32": "Linear", "bf16": "Linear", "nf4": "Linear4bit", "int8": "Linear8bitLt"}[quantization]
    assert type(q_proj).__name__ == expected_class
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "hello world"
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 320) and torch.isfinite(logits).all()


def test_bad_inputs_are_refused_clearly(model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="quantization"):
        load_base_model(model_dir, "fp8")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_base_model(tmp_path, "fp32")


def test_nf4_layers_with_odd_output_sizes_still_run(tmp_path):
    # 200 is not a multiple of 32 (gate/up_proj outputs) nor of the 64-block (down_proj input):
    # the packed CPU 4-bit kernel would fail on them.
    folder = save_random_llama(tmp_path / "odd", random_llama_config(intermediate_size=200), seed=0)
    model, _ = load_base_model(folder, "nf4")
    gate = model.model.layers[0].mlp.gate_proj
    down = model.model.layers[0].mlp.down_proj
    assert gate.out_features == 200 and gate.support_avx512bf16_for_cpu is False
    assert down.in_features == 200 and down.support_avx512bf16_for_cpu is False
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_mixed_batch_over_quantized_base_matches_peft_on_the_same_base(model_dir, tmp_path, quantization):
    fp32_model = random_llama(random_llama_config(), seed=0)
    adapters = {
        "r8_attn": save_random_peft_adapter(
            fp32_model, tmp_path / "r8", rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1
        ),
        "r32_mlp": save_random_peft_adapter(
            fp32_model, tmp_path / "r32", rank=32, alpha=32, target_modules=("gate_proj", "up_proj", "down_proj"), seed=2
        ),
    }
    row_adapters = ["r8_attn", None, "r32_mlp", "r8_attn"]
    input_ids = torch.randint(3, 320, (len(row_adapters), 10), generator=torch.Generator().manual_seed(3))

    # Reference: PEFT over its own copy of the same quantized base (quantization is deterministic).
    reference_base, _ = load_base_model(model_dir, quantization)
    peft_model = PeftModel.from_pretrained(reference_base, adapters["r8_attn"], adapter_name="r8_attn")
    peft_model.load_adapter(adapters["r32_mlp"], adapter_name="r32_mlp")
    peft_model.eval()
    expected = []
    with torch.no_grad():
        for row, adapter in enumerate(row_adapters):
            if adapter is None:
                with peft_model.disable_adapter():
                    expected.append(peft_model(input_ids=input_ids[row : row + 1]).logits)
            else:
                peft_model.set_adapter(adapter)
                expected.append(peft_model(input_ids=input_ids[row : row + 1]).logits)
    expected = torch.cat(expected)

    model, _ = load_base_model(model_dir, quantization)
    runtime = install_multi_lora(model, device_slots=2, max_rank=32)
    for slot, (name, folder) in enumerate(adapters.items()):
        runtime.pool.write(
            slot, read_peft_adapter(folder, AdapterKey(name, "local"), runtime.module_shapes, max_rank=32)
        )
    runtime.set_batch_rows([[(0, 1.0)], [], [(1, 1.0)], [(0, 1.0)]])
    with torch.no_grad():
        got = model(input_ids=input_ids).logits
    # Both sides run the identical quantized kernels on identical weights with fp32 activations;
    # only the summation order of the low-rank part differs (measured ~3e-7), so the fp32
    # tolerance holds.
    tolerance = 1e-4
    for row, adapter in enumerate(row_adapters):
        diff = (got[row] - expected[row]).abs().max().item()
        print(f"{quantization} row {row} ({adapter}): max abs logit diff {diff:.2e}")
        assert diff <= tolerance, f"{quantization} row {row} ({adapter}): max abs logit diff {diff}"


def test_bf16_base_serves_adapters_close_to_peft(model_dir, tmp_path):
    fp32_model = random_llama(random_llama_config(), seed=0)
    folder = save_random_peft_adapter(fp32_model, tmp_path / "r16", rank=16, alpha=128, target_modules=("q_proj", "down_proj"), seed=4)
    input_ids = torch.randint(3, 320, (1, 8), generator=torch.Generator().manual_seed(5)).repeat(2, 1)
    model, _ = load_base_model(model_dir, "bf16")
    runtime = install_multi_lora(model, device_slots=1, max_rank=16)
    assert runtime.pool.dtype == torch.bfloat16
    runtime.pool.write(0, read_peft_adapter(folder, AdapterKey("r16", "local"), runtime.module_shapes, max_rank=16, dtype=torch.bfloat16))
    runtime.set_batch_rows([[(0, 1.0)], []])
    with torch.no_grad():
        got = model(input_ids=input_ids).logits.float()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(fp32_model), folder)
    with torch.no_grad():
        expected_adapter = peft_model(input_ids=input_ids[:1]).logits
        with peft_model.disable_adapter():
            expected_base = peft_model(input_ids=input_ids[1:]).logits
    # bf16 activations and weights keep ~3 significant digits; logits here are O(1).
    adapter_effect = (expected_adapter[0] - expected_base[0]).abs().max().item()
    print(f"bf16: adapter effect {adapter_effect:.3f}, errors {(got[0] - expected_adapter[0]).abs().max().item():.3f} "
          f"{(got[1] - expected_base[0]).abs().max().item():.3f}")
    assert adapter_effect > 0.5
    assert (got[0] - expected_adapter[0]).abs().max().item() < 0.1
    assert (got[1] - expected_base[0]).abs().max().item() < 0.1
