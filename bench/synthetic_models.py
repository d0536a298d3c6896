"""Random Llama models and random PEFT adapters, built locally for tests and benchmarks
(no model hub is reachable). Real weights are random; formats are the real ones."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn


def random_llama_config(
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 320,
    max_position_embeddings: int = 512,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def random_llama(config, *, seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.requires_grad_(False)
    return model


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <pad>, <s>, </s>), enough for any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for symbol in sorted(byte_alphabet):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_random_llama(out_dir: Path, config=None, *, seed: int = 0) -> Path:
    """Write a random Llama (fp32 safetensors) and a byte tokenizer to `out_dir`."""
    out_dir = Path(out_dir)
    config = config or random_llama_config()
    random_llama(config, seed=seed).save_pretrained(out_dir)
    byte_tokenizer().save_pretrained(out_dir)
    return out_dir


def save_random_peft_adapter(
    base_model: nn.Module,
    out_dir: Path,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    seed: int,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    layers_to_transform: Sequence[int] | None = None,
    std: float = 0.05,
) -> Path:
    """Create a LoRA adapter with PEFT on a copy of `base_model` (unquantized), fill A and B
    with random values (a fresh PEFT adapter has B = 0) and save it with `save_pretrained`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        layers_to_transform=list(layers_to_transform) if layers_to_transform is not None else None,
        lora_dropout=0.0,
        bias="none",
    )
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)
