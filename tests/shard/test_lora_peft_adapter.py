"""PEFT adapter folders: what is read, and what is refused with a clear reason."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.adapter_format import PROJECTIONS
from shard.lora import AdapterKey, AdapterNotFoundError, AdapterRejectedError, LocalAdapterSource, read_peft_adapter
from shard.lora.peft_adapter import ModuleShape
from bench.synthetic_models import random_llama, random_llama_config, save_random_peft_adapter

KEY = AdapterKey("t", "local")


@pytest.fixture(scope="module")
def base():
    return random_llama(random_llama_config(num_layers=1), seed=0)


@pytest.fixture(scope="module")
def shapes(base):
    return {
        name: ModuleShape(m.in_features, m.out_features)
        for name, m in base.named_modules()
        if name.rsplit(".", 1)[-1] in PROJECTIONS
    }


@pytest.fixture(scope="module")
def good_dir(base, tmp_path_factory):
    return save_random_peft_adapter(
        base,
        tmp_path_factory.mktemp("good") / "a",
        rank=8,
        alpha=16,
        target_modules=("q_proj", "v_proj", "down_proj"),
        rank_pattern={"v_proj": 4},
        alpha_pattern={"down_proj": 3},
        seed=1,
    )


@pytest.fixture
def copy_of(good_dir, tmp_path):
    def make():
        target = tmp_path / "copy"
        shutil.copytree(good_dir, target)
        return target

    return make


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_reads_factors_with_scale_folded_into_b(good_dir, shapes):
    adapter = read_peft_adapter(good_dir, KEY, shapes, max_rank=64)
    raw = load_file(str(good_dir / "adapter_model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    down = "model.layers.0.mlp.down_proj"
    assert adapter.target_modules == ["down_proj", "q_proj", "v_proj"]
    assert adapter.modules["model.layers.0.self_attn.v_proj"].rank == 4 and adapter.rank == 8
    assert torch.equal(adapter.modules[q].a, raw[f"base_model.model.{q}.lora_A.weight"])
    assert torch.allclose(adapter.modules[q].b_t, raw[f"base_model.model.{q}.lora_B.weight"].t() * (16 / 8))
    assert torch.allclose(adapter.modules[down].b_t, raw[f"base_model.model.{down}.lora_B.weight"].t() * (3 / 8))
    assert len(adapter.weights_sha256) == 64 and adapter.size_bytes == (good_dir / "adapter_model.safetensors").stat().st_size


def test_rslora_scaling(copy_of, shapes):
    folder = copy_of()
    edit_config(folder, use_rslora=True, alpha_pattern={})
    adapter = read_peft_adapter(folder, KEY, shapes, max_rank=64)
    raw = load_file(str(folder / "adapter_model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    expected = raw[f"base_model.model.{q}.lora_B.weight"].t() * (16 / math.sqrt(8))
    assert torch.allclose(adapter.modules[q].b_t, expected)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"lora_bias": True}, "lora_bias"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "LORA"),
        ({"r": 0}, "positive"),
        ({"rank_pattern": {"v_proj": 8}}, "expected"),  # config no longer matches the tensors
    ],
)
def test_unsupported_or_inconsistent_configs_are_refused(copy_of, shapes, changes, reason):
    folder = copy_of()
    edit_config(folder, **changes)
    with pytest.raises(AdapterRejectedError, match=reason):
        read_peft_adapter(folder, KEY, shapes, max_rank=64)


def test_rank_above_pool_limit_is_refused(good_dir, shapes):
    with pytest.raises(AdapterRejectedError, match="exceeds the max rank 4"):
        read_peft_adapter(good_dir, KEY, shapes, max_rank=4)


def test_pickle_only_weights_are_refused(copy_of, shapes):
    folder = copy_of()
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    with pytest.raises(AdapterRejectedError, match="pickle"):
        read_peft_adapter(folder, KEY, shapes, max_rank=64)


def test_bad_tensors_are_refused(copy_of, shapes):
    folder = copy_of()
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    tensors[q_a][0, 0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(AdapterRejectedError, match="NaN"):
        read_peft_adapter(folder, KEY, shapes, max_rank=64)

    tensors[q_a] = torch.zeros(8, 64)
    save_file(tensors, str(weights))
    with pytest.raises(AdapterRejectedError, match=r"expected \(8, 128\)"):
        read_peft_adapter(folder, KEY, shapes, max_rank=64)

    del tensors[q_a]
    save_file(tensors, str(weights))
    with pytest.raises(AdapterRejectedError, match="not both A and B"):
        read_peft_adapter(folder, KEY, shapes, max_rank=64)


def test_modules_the_shard_does_not_serve_are_refused(good_dir, shapes):
    attention_only = {k: v for k, v in shapes.items() if "self_attn" in k}
    with pytest.raises(AdapterRejectedError, match="down_proj"):
        read_peft_adapter(good_dir, KEY, attention_only, max_rank=64)


def test_missing_or_garbage_config_is_refused(copy_of, shapes):
    folder = copy_of()
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterRejectedError, match="not valid JSON"):
        read_peft_adapter(folder, KEY, shapes, max_rank=64)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterRejectedError, match="missing"):
        read_peft_adapter(folder, KEY, shapes, max_rank=64)


def test_local_source_versions(good_dir, tmp_path):
    source = LocalAdapterSource({"good": good_dir, "gone": tmp_path / "nothing"})
    assert source.fetch(AdapterKey("good", "local")) == good_dir
    with pytest.raises(AdapterNotFoundError, match="only version"):
        source.fetch(AdapterKey("good", "7"))
    with pytest.raises(AdapterNotFoundError, match="not among"):
        source.fetch(AdapterKey("other", "local"))
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        source.fetch(AdapterKey("gone", "local"))
