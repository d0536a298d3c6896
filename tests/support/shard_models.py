"""Pytest fixtures: a tiny random Llama (fp32, sizes multiples of 64) with a byte tokenizer, its
saved model folder, and random PEFT adapters saved beside it - enough to run a real shard on
CPU in seconds. Weights are random; formats are the real ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.adapter_format import PROJECTIONS

# name -> (rank, alpha, target modules, seed): mixed ranks and module subsets on purpose.
TINY_ADAPTERS = {
    "alpha": (8, 16, PROJECTIONS, 11),
    "beta": (16, 8, ("q_proj", "v_proj"), 12),
    "gamma": (4, 8, ("o_proj", "down_proj", "up_proj"), 13),
}


def tiny_llama_config():
    from bench.synthetic_models import random_llama_config

    return random_llama_config(
        hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
        vocab_size=320, max_position_embeddings=256,
    )


@pytest.fixture(scope="session")
def tiny_llama():
    """(model, tokenizer): a fresh random fp32 Llama in eval mode. Do not install LoRA on it;
    build your own copy with ``random_llama(tiny_llama_config())`` for that."""
    from bench.synthetic_models import byte_tokenizer, random_llama

    return random_llama(tiny_llama_config(), seed=0), byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from bench.synthetic_models import save_random_llama

    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_llama_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> PEFT adapter folder (save_pretrained) for the tiny Llama (seed 0)."""
    from bench.synthetic_models import random_llama, save_random_peft_adapter

    base = random_llama(tiny_llama_config(), seed=0)
    root = tmp_path_factory.mktemp("tiny-adapters")
    return {
        name: save_random_peft_adapter(
            base, root / name, rank=rank, alpha=alpha, target_modules=targets, seed=seed, std=0.1
        )
        for name, (rank, alpha, targets, seed) in TINY_ADAPTERS.items()
    }
