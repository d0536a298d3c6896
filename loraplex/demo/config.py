"""What the demo build makes: model shape, adapter recipes, training budget, seeds.

The cache key hashes this config together with the builder's source, so changing either builds
fresh assets instead of reusing stale ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class AdapterRecipe:
    name: str
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    steps: int
    learning_rate: float


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DemoBuildConfig:
    seed: int = 1234
    # Every size a multiple of 64: bitsandbytes' CPU 4-bit kernel needs output sizes divisible
    # by 32, and 64 keeps head dims and the vocab friendly to GPU kernels too.
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in current Llamas
    max_position_embeddings: int = 512
    base_examples: int = 6000
    base_steps: int = 240
    base_learning_rate: float = 3e-3
    batch_size: int = 32
    adapter_examples: int = 1500
    # Mixed ranks and targets on purpose: the shard must batch them together.
    adapters: tuple[AdapterRecipe, ...] = field(
        default_factory=lambda: (
            AdapterRecipe("legal", 8, 16, ALL_PROJECTIONS, 60, 1e-2),
            AdapterRecipe("clinical", 16, 32, ALL_PROJECTIONS, 50, 1e-2),
            AdapterRecipe("sql", 4, 8, ("q_proj", "v_proj"), 90, 1e-2),
        )
    )
    # Share of training sequences rendered through the chat template (the rest are bare prompts).
    chat_share: float = 0.4
    # One thread: on shared cores, OpenMP threads spin-wait for each other (measured: 2 threads
    # 15 s/step wall and 3.3 s CPU vs 1 thread 2.4 s wall, 0.4 s CPU under load).
    torch_threads: int = 1

    def __post_init__(self) -> None:
        sizes = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.hidden_size // self.num_attention_heads,
            "kv_size": self.hidden_size // self.num_attention_heads * self.num_key_value_heads,
        }
        bad = {k: v for k, v in sizes.items() if v % 64}
        if bad or self.hidden_size % self.num_attention_heads:
            raise ValueError(f"every layer size must be a multiple of 64: {bad}")

    def as_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# The modules whose code decides what the built files contain (not the cache or CLI plumbing).
_OUTPUT_SHAPING_SOURCES = ("config.py", "corpus.py", "tokenizer.py", "training.py", "builder.py")


def builder_fingerprint(config: DemoBuildConfig) -> str:
    """Hash of the config, this package's source and the libraries that write the files."""
    digest = hashlib.sha256(config.as_json().encode())
    for name in _OUTPUT_SHAPING_SOURCES:
        digest.update(name.encode())
        digest.update((Path(__file__).parent / name).read_bytes())
    # Versions from package metadata: importing torch & co. just to hash would make a cache hit slow.
    for package in ("torch", "transformers", "peft", "tokenizers", "safetensors"):
        digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    return digest.hexdigest()[:16]
