"""The benchmark's model and adapters, built locally (no model hub): a random Llama-architecture
model held in memory, a word-level tokenizer covering its whole vocabulary, and random rank-r PEFT
adapters written with PEFT's own `save_pretrained` into a cache folder keyed by their spec (so a
second run reuses them). The engine reads them through its real path (LocalAdapterSource ->
TieredAdapterCache -> slot pool); the PEFT baselines load the same folders with `load_adapter`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from bench.profiles import AdapterSpec, ModelSpec
from bench.synthetic_models import random_llama_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_BENCH_CACHE", Path.home() / ".cache" / "loraplex" / "bench"))


def llama_config(spec: ModelSpec):
    config = random_llama_config(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
    )
    # No end-of-sequence token: every system generates exactly the tokens asked for, so
    # throughputs compare equal amounts of work.
    config.bos_token_id = config.eos_token_id = None
    return config


def build_model(spec: ModelSpec, dtype: str = "fp32") -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(llama_config(spec)).to(DTYPES[dtype]).eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def word_tokenizer(vocab_size: int):
    """Token i is the word `w<i>` (0 is padding): every id the model can emit decodes to text,
    so the engine's detokenizer does its real per-token work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>")


def adapter_names(spec: AdapterSpec) -> list[str]:
    return [f"bench{i:03d}" for i in range(spec.count)]


def _adapter_cache_key(model_spec: ModelSpec, adapter_spec: AdapterSpec) -> str:
    import peft

    text = json.dumps({"model": asdict(model_spec), "adapters": asdict(adapter_spec), "peft": peft.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_adapters(model: nn.Module, model_spec: ModelSpec, adapter_spec: AdapterSpec, cache_dir: Path) -> dict[str, Path]:
    """name -> PEFT adapter folder; built once per spec (random A and B: a fresh PEFT adapter has B = 0)."""
    from peft import LoraConfig, get_peft_model

    root = Path(cache_dir) / f"adapters-{_adapter_cache_key(model_spec, adapter_spec)}"
    names = adapter_names(adapter_spec)
    folders = {name: root / name for name in names}
    if (root / "COMPLETE").is_file():
        return folders
    shutil.rmtree(root, ignore_errors=True)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = LoraConfig(
        r=adapter_spec.rank,
        lora_alpha=adapter_spec.alpha,
        target_modules=list(adapter_spec.target_modules),
        lora_dropout=0.0,
        bias="none",
    )
    # One PEFT wrapper on one copy of the base; each adapter refills its factors and saves.
    import copy

    peft_model = get_peft_model(copy.deepcopy(model).float(), config)
    factors = [p for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n]
    for index, name in enumerate(names):
        generator = torch.Generator().manual_seed(adapter_spec.seed + index)
        with torch.no_grad():
            for param in factors:
                param.copy_(torch.randn(param.shape, generator=generator) * adapter_spec.std)
        peft_model.save_pretrained(partial / name)
    del peft_model
    partial.rename(root)
    (root / "COMPLETE").write_text("\n".join(names) + "\n")
    return folders
