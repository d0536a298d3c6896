"""Read a PEFT LoRA adapter folder into host tensors ready for a slot, refusing what we cannot serve.

The folder is PEFT's `save_pretrained` layout: `adapter_config.json` + `adapter_model.safetensors`.
Each targeted module's factors are stored the way the slot pool wants them: A as [r, in] and
B transposed as [r, out] with the module's scaling already multiplied in, so serving never
multiplies by a scale."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from shard.lora.errors import AdapterNotFoundError, AdapterRejectedError
from shard.lora.keys import AdapterKey

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
_TENSOR_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")

# Options that change the forward math in ways a plain low-rank delta does not express.
_UNSUPPORTED_OPTIONS = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "use_qalora",
    "layer_replication",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
)


@dataclass(frozen=True)
class ModuleShape:
    in_features: int
    out_features: int


@dataclass
class LoraFactors:
    """One module's factors: `a` [r, in]; `b_t` = (scaling * B).T, [r, out]."""

    a: torch.Tensor
    b_t: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class HostAdapter:
    """A validated adapter held in host memory."""

    key: AdapterKey
    modules: dict[str, LoraFactors]
    sha256: str
    size_bytes: int
    target_modules: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return max(f.rank for f in self.modules.values())


def _pattern_value(patterns: Mapping[str, float], module: str, default):
    # Same rule as peft.utils.other.get_pattern_key: a pattern matches a suffix of the module path.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _read_config(folder: Path, key: AdapterKey) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterRejectedError(f"adapter {key}: {CONFIG_FILE} is missing in {folder}")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRejectedError(f"adapter {key}: {CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterRejectedError(f"adapter {key}: {CONFIG_FILE} is not a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterRejectedError(f"adapter {key}: peft_type {config.get('peft_type')!r} is not LORA")
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise AdapterRejectedError(f"adapter {key}: option {option}={config[option]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterRejectedError(f"adapter {key}: bias={config['bias']!r} is not supported (only 'none')")
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise AdapterRejectedError(f"adapter {key}: {name}={value!r} must be a positive number")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise AdapterRejectedError(f"adapter {key}: {name} must be a mapping")
    return config


def _read_tensors(folder: Path, key: AdapterKey) -> tuple[dict[str, torch.Tensor], str, int]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        if (folder / PICKLE_WEIGHTS_FILE).exists():
            raise AdapterRejectedError(
                f"adapter {key}: only {PICKLE_WEIGHTS_FILE} (pickle) is present; pickle weights are refused "
                f"because loading them can run code — save the adapter with safetensors"
            )
        raise AdapterRejectedError(f"adapter {key}: {WEIGHTS_FILE} is missing in {folder}")
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterRejectedError(f"adapter {key}: {WEIGHTS_FILE} is not a readable safetensors file ({exc})") from exc
    return tensors, sha256, len(data)


def read_peft_adapter(
    folder: Path,
    key: AdapterKey,
    module_shapes: Mapping[str, ModuleShape],
    *,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
) -> HostAdapter:
    """Parse and validate the adapter in `folder` against the served modules.

    `module_shapes` maps each module path the runtime serves (as in `model.named_modules()`)
    to its shape. Raises AdapterRejectedError with the reason when anything does not fit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterNotFoundError(f"adapter {key}: folder {folder} does not exist")
    config = _read_config(folder, key)
    tensors, sha256, size_bytes = _read_tensors(folder, key)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for tensor_key, tensor in tensors.items():
        match = _TENSOR_KEY.match(tensor_key)
        if match is None:
            raise AdapterRejectedError(
                f"adapter {key}: tensor {tensor_key!r} is not a LoRA A/B weight (embedding LoRA, DoRA magnitudes, "
                f"biases and saved modules are not supported)"
            )
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if not factors:
        raise AdapterRejectedError(f"adapter {key}: {WEIGHTS_FILE} holds no LoRA weights")

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraFactors] = {}
    for module, pair in sorted(factors.items()):
        shape = module_shapes.get(module)
        if shape is None:
            served = sorted({name.rsplit(".", 1)[-1] for name in module_shapes})
            raise AdapterRejectedError(
                f"adapter {key}: targets module {module!r}, which this model does not have or this shard does not "
                f"serve (served projections: {served})"
            )
        if set(pair) != {"A", "B"}:
            raise AdapterRejectedError(f"adapter {key}: module {module!r} has lora_{''.join(pair)} but not both A and B")
        a, b = pair["A"], pair["B"]
        rank = int(_pattern_value(rank_pattern, module, config["r"]))
        alpha = float(_pattern_value(alpha_pattern, module, config["lora_alpha"]))
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (rank, shape.in_features) or tuple(b.shape) != (
            shape.out_features,
            rank,
        ):
            raise AdapterRejectedError(
                f"adapter {key}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, expected "
                f"({rank}, {shape.in_features}) and ({shape.out_features}, {rank}) for rank {rank} on this base model"
            )
        if rank > max_rank:
            raise AdapterRejectedError(f"adapter {key}: rank {rank} on {module!r} exceeds this shard's max rank {max_rank}")
        if not a.is_floating_point() or not b.is_floating_point():
            raise AdapterRejectedError(f"adapter {key}: module {module!r} weights are not floating point")
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
            raise AdapterRejectedError(f"adapter {key}: module {module!r} holds NaN or infinite weights")
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[module] = LoraFactors(
            a=a32.to(dtype).contiguous(),
            b_t=(b32.t() * scaling).to(dtype).contiguous(),
        )
    return HostAdapter(
        key=key,
        modules=modules,
        sha256=sha256,
        size_bytes=size_bytes,
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in modules}),
    )
