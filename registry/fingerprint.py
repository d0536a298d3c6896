"""A stable identity for a base model, recorded on every adapter version.

Hashing a 14 GB checkpoint would take minutes, so the fingerprint covers what decides whether an
adapter fits: the architecture fields of `config.json` (shapes, attention layout, positional
encoding) and the tokenizer's vocabulary. The storage dtype and quantization are left out on
purpose: the same model served in NF4 or bf16 takes the same adapters.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from registry.errors import AdapterRejected

ARCHITECTURE_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
)

# Files that carry a tokenizer's vocabulary, in order of preference; the first present is hashed.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def read_model_config(model_dir: Path) -> dict:
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise AdapterRejected(f"base model folder {model_dir} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterRejected(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise AdapterRejected(f"{config_path} is not a JSON object")
    # Multimodal wrappers keep the language model's shapes in a nested text config.
    text_config = config.get("text_config")
    return text_config if isinstance(text_config, dict) else config


def _tokenizer_vocab_digest(model_dir: Path) -> str:
    for file_name in TOKENIZER_VOCAB_FILES:
        path = Path(model_dir) / file_name
        if not path.is_file():
            continue
        if file_name == "tokenizer.json":
            tokenizer = json.loads(path.read_text())
            # Only the vocabulary decides token ids; normalizer/decoder tweaks do not.
            model = tokenizer.get("model") or {}
            vocab_part = {
                "vocab": model.get("vocab"),
                "merges": model.get("merges"),
                "added_tokens": [
                    (token.get("id"), token.get("content")) for token in tokenizer.get("added_tokens") or []
                ],
            }
            payload = json.dumps(vocab_part, sort_keys=True, separators=(",", ":")).encode()
        else:
            payload = path.read_bytes()
        return f"{file_name}:{hashlib.sha256(payload).hexdigest()}"
    return "no-tokenizer"


def base_model_fingerprint(model_dir: Path) -> str:
    """sha256 hex digest over the architecture fields of config.json and the tokenizer vocabulary."""
    config = read_model_config(Path(model_dir))
    architecture = {field: config.get(field) for field in ARCHITECTURE_FIELDS}
    document = {
        "architecture": architecture,
        "tokenizer": _tokenizer_vocab_digest(Path(model_dir)),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
