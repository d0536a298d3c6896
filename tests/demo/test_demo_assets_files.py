"""The built demo assets: layout, sizes, tokenizer, cache reuse."""

import json

import pytest
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from loraplex.demo import DemoBuildConfig, demo_assets_dir, ensure_demo_assets
from loraplex.demo.assets import MANIFEST_NAME


def test_second_call_reuses_the_cache(demo_assets):
    manifest = demo_assets.root / MANIFEST_NAME
    written = manifest.stat().st_mtime_ns
    again = ensure_demo_assets(progress=False)
    assert again.base_dir == demo_assets.base_dir
    assert again.adapters == demo_assets.adapters
    assert manifest.stat().st_mtime_ns == written
    assert demo_assets.root == demo_assets_dir()


def test_folders_are_plain_hugging_face_and_peft_folders(demo_assets):
    base = demo_assets.base_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (base / name).is_file(), name
    assert set(demo_assets.adapters) == {"legal", "clinical", "sql"}
    for folder in demo_assets.adapters.values():
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
        assert not list(folder.glob("*.bin"))
    assert demo_assets.demo_prompt and len(demo_assets.sample_prompts) >= 2
    assert set(demo_assets.style_markers) == set(demo_assets.adapters)


def test_every_layer_size_is_a_multiple_of_64(demo_assets):
    config = AutoConfig.from_pretrained(demo_assets.base_dir)
    assert config.model_type == "llama"
    for size in (config.vocab_size, config.hidden_size, config.intermediate_size, config.head_dim,
                 config.head_dim * config.num_key_value_heads):
        assert size % 64 == 0, size
    with safe_open(demo_assets.base_dir / "model.safetensors", "pt") as weights:
        matrices = {k: weights.get_slice(k).get_shape() for k in weights.keys()}
    linear = {k: s for k, s in matrices.items() if len(s) == 2}
    assert len(linear) == 2 + 7 * config.num_hidden_layers
    assert all(dim % 64 == 0 for shape in linear.values() for dim in shape), linear
    parameters = sum(int(a) * int(b) for a, b in linear.values())
    assert 1_000_000 < parameters < 20_000_000


def test_adapters_mix_ranks_and_target_modules(demo_assets):
    configs = {
        name: json.loads((folder / "adapter_config.json").read_text())
        for name, folder in demo_assets.adapters.items()
    }
    assert len({c["r"] for c in configs.values()}) == 3
    assert len({frozenset(c["target_modules"]) for c in configs.values()}) >= 2
    for name, config in configs.items():
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        with safe_open(demo_assets.adapters[name] / "adapter_model.safetensors", "pt") as weights:
            keys = list(weights.keys())
        targets = {key.split(".")[-3] for key in keys}
        assert targets == set(config["target_modules"]), name


def test_tokenizer_has_special_tokens_and_a_chat_template(demo_assets):
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.base_dir)
    assert len(tokenizer) % 64 == 0
    assert len(tokenizer) == AutoConfig.from_pretrained(demo_assets.base_dir).vocab_size
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Describe a walk in the park."},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<s><|system|>\nBe brief.\n<|user|>\nHello there.\n<|assistant|>\nHi.</s>\n"
        "<|user|>\nDescribe a walk in the park.\n<|assistant|>\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    plain = tokenizer("Describe a walk in the park.")["input_ids"]
    assert plain[0] == tokenizer.bos_token_id
    assert tokenizer.decode(plain, skip_special_tokens=True) == "Describe a walk in the park."


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_DEMO_DIR", str(tmp_path / "demo-cache"))
    assert demo_assets_dir().parent == (tmp_path / "demo-cache").resolve()
    assert demo_assets_dir(tmp_path / "explicit").parent == (tmp_path / "explicit").resolve()


def test_builder_version_is_part_of_the_cache_key():
    default = demo_assets_dir()
    assert demo_assets_dir(config=DemoBuildConfig(base_steps=1)) != default
    assert demo_assets_dir(config=DemoBuildConfig()) == default


def test_layer_sizes_off_the_64_grid_are_refused():
    with pytest.raises(ValueError, match="multiple of 64"):
        DemoBuildConfig(hidden_size=200)
    with pytest.raises(ValueError, match="multiple of 64"):
        DemoBuildConfig(vocab_size=1000)
