"""The registry (publish) and the shard (load) agree on the adapter format, and what both accept
serves PEFT's answer: every LoraConfig field is honoured, inert or refused with its reason."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loraplex.adapter_format import (
    HONOURED_OPTIONS,
    INERT_OPTIONS,
    PROJECTIONS,
    REFUSED_OPTIONS,
    AdapterFormatError,
    ModuleShape,
    lora_options,
)
from registry import AdapterRejected, validate_adapter
from shard.lora import AdapterKey, AdapterRejectedError, read_peft_adapter

from conftest import write_adapter

MAX_RANK = 16


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from conftest import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("format-base") / "base")


@pytest.fixture(scope="module")
def shard_shapes(base_dir) -> dict[str, ModuleShape]:
    """The shapes the shard serves, read from a real model's modules (not from config.json)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_pretrained(base_dir))
    return {
        name: ModuleShape(m.in_features, m.out_features)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in PROJECTIONS
    }


@pytest.fixture(scope="module")
def template(base_dir, tmp_path_factory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("format-template") / "a", base_dir, rank=8,
                         target_modules=["q_proj", "v_proj", "down_proj"], seed=3)


def publish_accepts(folder: Path, base_dir: Path) -> str | None:
    try:
        validate_adapter(folder, base_dir, MAX_RANK)
    except AdapterRejected as error:
        return str(error)
    return None


def shard_accepts(folder: Path, shapes) -> str | None:
    try:
        read_peft_adapter(folder, AdapterKey("t", "1"), shapes, max_rank=MAX_RANK)
    except AdapterRejectedError as error:
        return str(error)
    return None


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_every_lora_config_field_is_honoured_inert_or_refused(tmp_path):
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    classified = HONOURED_OPTIONS | INERT_OPTIONS | set(REFUSED_OPTIONS)
    assert fields - classified == set(), "a LoraConfig field loraplex has not decided on"
    assert not (HONOURED_OPTIONS & INERT_OPTIONS) and not (set(REFUSED_OPTIONS) & (HONOURED_OPTIONS | INERT_OPTIONS))
    # PEFT's own defaults, as save_pretrained writes them, are served.
    LoraConfig(r=8, target_modules=["q_proj"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert lora_options(config).r == 8
    with pytest.raises(AdapterFormatError, match="does not know"):
        lora_options({**config, "some_future_option": True})


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"use_dora": True}, "DoRA"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "bias"),
        ({"r": 8.0}, "positive integer"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"layers_to_transform": [0]}, "does not target"),  # layer 1's weights: PEFT would drop them
        ({"layers_to_transform": [1], "layers_pattern": "blocks"}, "does not target"),
        ({"exclude_modules": ["v_proj"]}, "does not target"),
        ({"target_modules": ["q_proj", "down_proj"]}, "does not target"),
        ({"rank_pattern": {"v_proj": 4}}, "expected"),
    ],
)
def test_refused_alike_at_publish_and_at_load(template, base_dir, shard_shapes, tmp_path, changes, reason):
    folder = tmp_path / "a"
    shutil.copytree(template, folder)
    edit_config(folder, **changes)
    published, loaded = publish_accepts(folder, base_dir), shard_accepts(folder, shard_shapes)
    assert published is not None and reason in published
    assert loaded is not None and reason in loaded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_refused_at_publish_and_at_load(template, base_dir, shard_shapes, tmp_path, dtype, bad):
    folder = tmp_path / "a"
    shutil.copytree(template, folder)
    weights = {k: v.to(dtype) for k, v in load_file(folder / "adapter_model.safetensors").items()}
    key = sorted(weights)[3]
    weights[key][1, 2] = bad
    save_file(weights, folder / "adapter_model.safetensors")
    assert "NaN or infinite" in publish_accepts(folder, base_dir)
    assert "NaN or infinite" in shard_accepts(folder, shard_shapes)


def test_layers_to_transform_serves_pefts_answer(base_dir, tmp_path):
    """A PEFT adapter trained on layer 1 only: the shard applies exactly layer 1's delta, as PEFT."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from shard.lora import install_multi_lora

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig.from_pretrained(base_dir)).eval()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
        layers_pattern="layers", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "a")
    assert publish_accepts(tmp_path / "a", base_dir) is None
    ids = torch.randint(1, 120, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()(input_ids=ids).logits
        model = copy.deepcopy(base)
        runtime = install_multi_lora(model, device_slots=1, max_rank=MAX_RANK, decode_kernel="torch")
        runtime.pool.write(0, read_peft_adapter(tmp_path / "a", AdapterKey("a", "1"), runtime.module_shapes,
                                                max_rank=MAX_RANK))
        runtime.set_batch_rows([[(0, 1.0)]])
        got = model(input_ids=ids).logits
        changed = (got - base(input_ids=ids).logits).abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-4 and changed > 1e-4


# ---- publish accepts exactly what the shard loads --------------------------------------------

config_changes = st.fixed_dictionaries({}, optional={
    "r": st.sampled_from([8, 8.0, 0, 4, 32]),
    "lora_alpha": st.sampled_from([16, 0.5, 0, -1, "x"]),
    "use_rslora": st.booleans(),
    "use_dora": st.booleans(),
    "bias": st.sampled_from(["none", "all"]),
    "fan_in_fan_out": st.booleans(),
    "layers_to_transform": st.sampled_from([None, [0], [1], [0, 1], 1]),
    "layers_pattern": st.sampled_from([None, "layers", "blocks"]),
    "rank_pattern": st.sampled_from([{}, {"v_proj": 4}, {"q_proj": 8}, {"down_proj": 64}]),
    "alpha_pattern": st.sampled_from([{}, {"q_proj": 2}, {"v_proj": 0}]),
    "target_modules": st.sampled_from([["q_proj", "v_proj", "down_proj"], ["q_proj"], ".*proj", "all-linear"]),
    "exclude_modules": st.sampled_from([None, ["k_proj"], ["down_proj"]]),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "olora"]),
    "modules_to_save": st.sampled_from([None, [], ["lm_head"]]),
    "peft_type": st.sampled_from(["LORA", "IA3"]),
})
weight_changes = st.fixed_dictionaries({
    "drop": st.sampled_from([None, "lora_A", "layers.1."]),
    "poison": st.sampled_from([None, float("nan"), float("-inf")]),
    "dtype": st.sampled_from([torch.float32, torch.bfloat16]),
    "pickle": st.booleans(),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=config_changes, weights=weight_changes)
def test_publish_accepts_exactly_what_the_shard_loads(template, base_dir, shard_shapes, tmp_path_factory,
                                                      config, weights):
    folder = tmp_path_factory.mktemp("generated") / "a"
    shutil.copytree(template, folder)
    edit_config(folder, **config)
    tensors = {k: v.to(weights["dtype"]) for k, v in load_file(folder / "adapter_model.safetensors").items()}
    if weights["drop"] is not None:
        tensors = {k: v for k, v in tensors.items() if weights["drop"] not in k or "q_proj" not in k}
    if weights["poison"] is not None:
        tensors[sorted(tensors)[0]][0, 0] = weights["poison"]
    save_file(tensors, folder / "adapter_model.safetensors")
    if weights["pickle"]:
        (folder / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    published, loaded = publish_accepts(folder, base_dir), shard_accepts(folder, shard_shapes)
    assert (published is None) == (loaded is None), f"publish: {published!r}; shard: {loaded!r}"
