"""Checks a PEFT LoRA adapter folder against a base model without loading the base weights.

Only `config.json` of the base and the adapter's safetensors header are read, so validating an
adapter for a 14 GB model costs milliseconds. Every tensor must be a LoRA factor of a projection
the engine serves, with the shape that projection has in the base architecture:
lora_A is [r, in_features], lora_B is [out_features, r].
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from registry.errors import AdapterRejected
from registry.fingerprint import read_model_config

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Pickle-based checkpoints: loading one can execute arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LORA_KEY = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>[A-Za-z_]+)\.lora_(?P<factor>[AB])\.weight$"
)


@dataclass(frozen=True)
class AdapterFacts:
    """What validation learnt about an adapter folder; recorded as version tags."""

    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    sha256: str


def projection_shapes(base_config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of a Llama-like decoder layer."""
    try:
        hidden = int(base_config["hidden_size"])
        intermediate = int(base_config["intermediate_size"])
        heads = int(base_config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise AdapterRejected(
            "base model config lacks hidden_size / intermediate_size / num_attention_heads: "
            "only Llama-like decoder architectures are supported"
        ) from None
    kv_heads = int(base_config.get("num_key_value_heads") or heads)
    head_dim = int(base_config.get("head_dim") or hidden // heads)
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def content_sha256(folder: Path) -> str:
    """Deterministic hash over every file's relative path and bytes (order-independent of the OS)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        file_digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(chunk)
        digest.update(f"{relative}\0{path.stat().st_size}\0{file_digest.hexdigest()}\n".encode())
    return digest.hexdigest()


def folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def read_adapter_config(folder: Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise AdapterRejected(f"{folder} has no {ADAPTER_CONFIG_FILE}: not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterRejected(f"{ADAPTER_CONFIG_FILE} does not parse: {error}") from None
    if not isinstance(config, dict):
        raise AdapterRejected(f"{ADAPTER_CONFIG_FILE} is not a JSON object")
    return config


def check_adapter_files(folder: Path) -> dict:
    """Checks that need no base model: the folder's files and adapter_config.json. Returns the config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterRejected(f"{folder} is not a folder")
    for path in folder.rglob("*"):
        if path.is_symlink():
            raise AdapterRejected(f"{path.relative_to(folder)} is a symlink; publish real files only")
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterRejected(
                f"{path.relative_to(folder)} is a pickle checkpoint (loading it can run code); "
                "save the adapter with safetensors (PEFT's default, safe_serialization=True)"
            )
    config = read_adapter_config(folder)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterRejected(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are served")
    for unsupported in (
        "use_dora", "lora_bias", "fan_in_fan_out", "use_bdlora",
        "target_parameters", "trainable_token_indices", "layer_replication",
    ):
        if config.get(unsupported):
            raise AdapterRejected(f"adapter_config sets {unsupported}={config[unsupported]!r}, which the engine does not serve")
    if config.get("modules_to_save"):
        raise AdapterRejected(
            f"adapter_config has modules_to_save={config['modules_to_save']!r}: full-weight copies "
            "cannot be shared across tenants; only LoRA factors are served"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterRejected(f"adapter_config r={rank!r} is not a positive integer")
    if not (folder / ADAPTER_WEIGHTS_FILE).is_file():
        raise AdapterRejected(f"{folder} has no {ADAPTER_WEIGHTS_FILE}")
    return config


def _read_tensor_shapes(weights_path: Path) -> dict[str, list[int]]:
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            return {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except Exception as error:  # safetensors raises several types for a damaged header
        raise AdapterRejected(f"{weights_path.name} is not a readable safetensors file: {error}") from None


def validate_adapter(folder: Path, base_model_dir: Path, max_rank: int) -> AdapterFacts:
    """Raises AdapterRejected (saying why) unless `folder` is a LoRA adapter that fits the base model."""
    folder = Path(folder)
    config = check_adapter_files(folder)
    base_config = read_model_config(Path(base_model_dir))
    shapes = projection_shapes(base_config)
    num_layers = int(base_config.get("num_hidden_layers") or 0)

    declared = config.get("target_modules")
    if isinstance(declared, list):
        unknown = sorted(set(declared) - set(shapes))
        if unknown:
            raise AdapterRejected(
                f"target_modules {unknown} do not exist in the base model "
                f"(a {base_config.get('model_type', '?')} layer has {', '.join(PROJECTIONS)})"
            )
    allowed_ranks = {config["r"], *(config.get("rank_pattern") or {}).values()}
    too_high = sorted(r for r in allowed_ranks if isinstance(r, int) and r > max_rank)
    if too_high:
        raise AdapterRejected(f"rank {too_high[-1]} exceeds the registry's max_rank {max_rank}")

    tensor_shapes = _read_tensor_shapes(folder / ADAPTER_WEIGHTS_FILE)
    if not tensor_shapes:
        raise AdapterRejected(f"{ADAPTER_WEIGHTS_FILE} holds no tensors")
    factors: dict[tuple[int, str], dict[str, list[int]]] = {}
    for key, shape in tensor_shapes.items():
        match = _LORA_KEY.search(key)
        if match is None:
            raise AdapterRejected(f"tensor {key!r} is not a LoRA factor of a decoder-layer projection")
        layer, module = int(match["layer"]), match["module"]
        if module not in shapes:
            raise AdapterRejected(f"tensor {key!r} targets {module!r}, which the base model does not have")
        if layer >= num_layers:
            raise AdapterRejected(f"tensor {key!r} addresses layer {layer}; the base model has {num_layers}")
        if len(shape) != 2:
            raise AdapterRejected(f"tensor {key!r} has shape {shape}; LoRA factors are 2-D")
        factors.setdefault((layer, module), {})[match["factor"]] = shape

    ranks: set[int] = set()
    for (layer, module), pair in sorted(factors.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise AdapterRejected(f"{where} has lora_{next(iter(pair))} without its partner factor")
        in_features, out_features = shapes[module]
        (rank_a, in_a), (out_b, rank_b) = pair["A"], pair["B"]
        if in_a != in_features or out_b != out_features:
            raise AdapterRejected(
                f"{where}: lora_A {pair['A']} / lora_B {pair['B']} do not fit the base model, which "
                f"needs lora_A [r, {in_features}] and lora_B [{out_features}, r]"
            )
        if rank_a != rank_b:
            raise AdapterRejected(f"{where}: lora_A rank {rank_a} differs from lora_B rank {rank_b}")
        if rank_a > max_rank:
            raise AdapterRejected(f"{where}: rank {rank_a} exceeds the registry's max_rank {max_rank}")
        if rank_a not in allowed_ranks:
            raise AdapterRejected(f"{where}: rank {rank_a} is neither r nor in rank_pattern of adapter_config")
        ranks.add(rank_a)

    return AdapterFacts(
        rank=max(ranks),
        target_modules=tuple(m for m in PROJECTIONS if any(mod == m for _, mod in factors)),
        size_bytes=folder_size_bytes(folder),
        sha256=content_sha256(folder),
    )
