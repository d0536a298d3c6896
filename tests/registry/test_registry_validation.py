"""Validation and fingerprints, with no server: only config.json and safetensors headers are read."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from registry import AdapterRejected, base_model_fingerprint, validate_adapter
from loraplex.adapter_format import ModuleShape, folder_sha256, llama_module_shapes


def test_good_adapter_facts(make_adapter, tiny_base):
    folder = make_adapter(rank=8, target_modules=["q_proj", "v_proj", "down_proj"])
    facts = validate_adapter(folder, tiny_base, max_rank=64)
    assert facts.rank == 8
    assert facts.target_modules == ("q_proj", "v_proj", "down_proj")
    assert facts.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert facts.folder_sha256 == folder_sha256(folder)


def test_gqa_shapes_from_config():
    shapes = llama_module_shapes(
        {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
         "num_hidden_layers": 2}
    )
    assert shapes["model.layers.1.self_attn.q_proj"] == ModuleShape(4096, 4096)
    assert shapes["model.layers.1.self_attn.k_proj"] == ModuleShape(4096, 1024)
    assert shapes["model.layers.1.self_attn.v_proj"] == ModuleShape(4096, 1024)
    assert shapes["model.layers.1.self_attn.o_proj"] == ModuleShape(4096, 4096)
    assert shapes["model.layers.1.mlp.down_proj"] == ModuleShape(14336, 4096)
    # An explicit head_dim wins over hidden/heads (as in Gemma-like configs).
    assert llama_module_shapes(
        {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "head_dim": 32, "num_hidden_layers": 1}
    )["model.layers.0.self_attn.q_proj"] == ModuleShape(64, 128)


def test_content_hash_is_deterministic_and_sensitive(make_adapter, tmp_path):
    folder = make_adapter()
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert folder_sha256(copy) == folder_sha256(folder)
    (copy / "README.md").write_text("changed")
    assert folder_sha256(copy) != folder_sha256(folder)


def test_pickle_checkpoint_refused(make_adapter, tiny_base):
    folder = make_adapter()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(AdapterRejected, match="pickle"):
        validate_adapter(folder, tiny_base, max_rank=64)


def test_pickle_only_adapter_refused(make_adapter, tiny_base):
    folder = make_adapter()
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterRejected, match="pickle"):
        validate_adapter(folder, tiny_base, max_rank=64)


def test_adapter_for_another_architecture_refused(make_adapter, make_base, tiny_base):
    wider_base = make_base(hidden=128)
    folder = make_adapter(base_dir=wider_base)
    with pytest.raises(AdapterRejected, match=r"expected .* on this base model"):
        validate_adapter(folder, tiny_base, max_rank=64)


def test_tampered_tensor_shape_refused(make_adapter, tiny_base):
    folder = make_adapter(target_modules=["k_proj"])
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if "k_proj.lora_B" in k)
    # GQA: k_proj's output is num_key_value_heads * head_dim = 32, not hidden_size = 64.
    weights[key] = weights[key].new_zeros((64, weights[key].shape[1]))
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterRejected, match=r"k_proj.*lora_B \(64, 8\), expected .* \(32, 8\)"):
        validate_adapter(folder, tiny_base, max_rank=64)


def test_rank_above_limit_refused(make_adapter, tiny_base):
    folder = make_adapter(rank=16)
    with pytest.raises(AdapterRejected, match="exceeds the max rank 8"):
        validate_adapter(folder, tiny_base, max_rank=8)


def test_unknown_target_module_refused(make_adapter, tiny_base):
    folder = make_adapter(target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterRejected, match=r"lm_head"):
        validate_adapter(folder, tiny_base, max_rank=64)


def test_unparseable_config_refused(make_adapter, tiny_base):
    folder = make_adapter()
    (folder / "adapter_config.json").write_text("{ not json")
    with pytest.raises(AdapterRejected, match="not valid JSON"):
        validate_adapter(folder, tiny_base, max_rank=64)


def test_damaged_safetensors_refused(make_adapter, tiny_base):
    folder = make_adapter()
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterRejected, match="not a readable safetensors"):
        validate_adapter(folder, tiny_base, max_rank=64)


def test_dora_refused(make_adapter, tiny_base):
    folder = make_adapter()
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterRejected, match="use_dora"):
        validate_adapter(folder, tiny_base, max_rank=64)


def test_fingerprint_stable_and_ignores_dtype(tiny_base, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    config = json.loads((copy / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"load_in_4bit": True}
    (copy / "config.json").write_text(json.dumps(config, indent=4))
    assert base_model_fingerprint(copy) == base_model_fingerprint(tiny_base)
    assert len(base_model_fingerprint(tiny_base)) == 64


def test_fingerprint_changes_with_vocabulary_and_shapes(tiny_base, make_base):
    other_vocab = make_base(vocab_words=[f"x{i}" for i in range(127)])
    other_shape = make_base(hidden=128)
    fingerprints = {base_model_fingerprint(p) for p in (tiny_base, other_vocab, other_shape)}
    assert len(fingerprints) == 3


def test_fingerprint_does_not_read_weights(tiny_base, tmp_path):
    copy = tmp_path / "with-weights"
    shutil.copytree(tiny_base, copy)
    # A weights file that is not even valid: the fingerprint must not open it.
    (copy / "model.safetensors").write_bytes(b"not weights")
    assert base_model_fingerprint(copy) == base_model_fingerprint(tiny_base)


def test_missing_base_config_refused(make_adapter, tmp_path):
    with pytest.raises(AdapterRejected, match="no config.json"):
        validate_adapter(make_adapter(), tmp_path / "empty", max_rank=64)
