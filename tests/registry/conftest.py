"""Tiny Llama base models and PEFT adapters made on the spot. The MLflow fixtures (`mlflow_server`,
`adapter_registry`) come from tests.support.mlflow_server via the root conftest."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from loraplex.adapter_format import PROJECTIONS



ALL_PROJECTIONS = list(PROJECTIONS)
_seeds = itertools.count(1)


def write_tiny_base(folder: Path, hidden: int = 64, vocab_words: list[str] | None = None) -> Path:
    """config.json and tokenizer.json of a tiny Llama (GQA: 4 query heads, 2 key/value heads)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
    ).save_pretrained(folder)
    words = vocab_words or [f"w{i}" for i in range(127)]
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(words[:127])}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def write_adapter(
    folder: Path, base_dir: Path, rank: int = 8, target_modules: list[str] | None = None, seed: int = 0
) -> Path:
    """A PEFT adapter exactly as save_pretrained writes it, with random (non-zero) factors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(base_dir))
    peft_model = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules or ALL_PROJECTIONS,
                   init_lora_weights=False),
    )
    peft_model.save_pretrained(folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_base(tmp_path_factory.mktemp("tiny-base") / "base")


@pytest.fixture
def make_adapter(tmp_path: Path, tiny_base: Path) -> Callable[..., Path]:
    def make(rank: int = 8, target_modules: list[str] | None = None, base_dir: Path | None = None) -> Path:
        return write_adapter(
            tmp_path / f"adapter-{uuid.uuid4().hex[:8]}", base_dir or tiny_base, rank, target_modules, next(_seeds)
        )

    return make


@pytest.fixture
def adapter_name() -> str:
    """A name no other test uses: all tests share one MLflow server."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_base(tmp_path: Path) -> Callable[..., Path]:
    """Another tiny base model: `make_base(hidden=128)` or `make_base(vocab_words=[...])`."""

    def make(hidden: int = 64, vocab_words: list[str] | None = None) -> Path:
        return write_tiny_base(tmp_path / f"base-{uuid.uuid4().hex[:8]}", hidden, vocab_words)

    return make
