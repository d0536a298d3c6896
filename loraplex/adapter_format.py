"""The PEFT LoRA adapter format as loraplex serves it, defined once for the registry (publish) and
the shard (load): an adapter one accepts is an adapter the other serves, with PEFT's answer.

An adapter is PEFT's `save_pretrained` folder: `adapter_config.json` and
`adapter_model.safetensors`. `check_adapter(folder, module_shapes, max_rank)` reads both (the
weights file once, as bytes) and refuses, with the reason, anything the shard would not serve
exactly as PEFT runs it:

- every `LoraConfig` field is either honoured (`HONOURED_OPTIONS`: r, lora_alpha, use_rslora,
  rank_pattern, alpha_pattern, and which modules get LoRA: target_modules, exclude_modules,
  layers_to_transform, layers_pattern), without effect on inference (`INERT_OPTIONS`), or refused
  when set (`REFUSED_OPTIONS`, each with its reason); an option this module does not know is
  refused when set;
- a weight for a module PEFT would not wrap (say a layer outside `layers_to_transform`) is refused,
  because PEFT would silently drop it and the shard would not;
- shapes must fit the base model's projections at the rank PEFT would give the module;
- weights must be floating point and finite (NaN or Inf are refused);
- pickle checkpoints are refused: loading one can run code.

Light on dependencies (json, numpy for the finite check), so the registry needs no torch."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Pickle-based checkpoints: loading one can execute arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# The projections of a Llama-like decoder layer that the shard serves LoRA on.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

_TENSOR_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")

HONOURED_OPTIONS = frozenset({
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "bias",  # "none" only; see _check_bias
    "init_lora_weights",  # True, False or "gaussian"; see _check_init
})
# Fields that do not change what a trained adapter computes at inference.
INERT_OPTIONS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "runtime_config",
    "megatron_config", "megatron_core",  # only for Megatron-parallel base layers, which the shard has not
    "qalora_group_size",  # only with use_qalora (refused)
    "ensure_weight_tying",  # only ties modules_to_save / trainable tokens (refused)
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",  # only with their init (refused)
})
REFUSED_OPTIONS = {
    "use_dora": "DoRA rescales each weight by a learnt magnitude; the shard serves plain low-rank deltas",
    "lora_bias": "a LoRA bias term is not a low-rank delta; the shard serves A/B factors only",
    "fan_in_fan_out": "it is meant for Conv1D (GPT-2 style) layers; the shard serves nn.Linear projections",
    "modules_to_save": "full-weight module copies cannot be shared across tenants; only LoRA factors are served",
    "trainable_token_indices": "trained embedding rows are not LoRA factors",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not served",
    "alora_invocation_tokens": "activated LoRA changes which tokens the adapter applies to",
    "use_qalora": "QA-LoRA pools the input before A; the shard serves plain low-rank deltas",
    "layer_replication": "it duplicates base layers, changing the model the adapter runs on",
    "use_bdlora": "block-diagonal LoRA is not served",
    "arrow_config": "Arrow routing mixes several adapters per token",
    "kasa_config": "KaSA changes the LoRA update",
    "velora_config": "VeLoRA changes the LoRA update",
    "monteclora_config": "MonteCLoRA samples the LoRA update",
}
_SAFE_INITS = (True, False, "gaussian")


class AdapterFormatError(ValueError):
    """The folder is not an adapter loraplex serves; the message says why."""


def adapter_ref(name: str, version: str) -> str:
    """How an adapter version is written everywhere: `name@version`."""
    return f"{name}@{version}"


@dataclass(frozen=True)
class ModuleShape:
    in_features: int
    out_features: int


def llama_module_shapes(base_config: Mapping[str, Any]) -> dict[str, ModuleShape]:
    """Every served projection of a Llama-like model, by its path in `model.named_modules()`,
    from the model's `config.json` alone."""
    try:
        hidden = int(base_config["hidden_size"])
        intermediate = int(base_config["intermediate_size"])
        heads = int(base_config["num_attention_heads"])
        layers = int(base_config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise AdapterFormatError(
            "base model config lacks hidden_size / intermediate_size / num_attention_heads / num_hidden_layers: "
            "only Llama-like decoder architectures are supported"
        ) from None
    kv_heads = int(base_config.get("num_key_value_heads") or heads)
    head_dim = int(base_config.get("head_dim") or hidden // heads)
    per_layer = {
        "self_attn.q_proj": ModuleShape(hidden, heads * head_dim),
        "self_attn.k_proj": ModuleShape(hidden, kv_heads * head_dim),
        "self_attn.v_proj": ModuleShape(hidden, kv_heads * head_dim),
        "self_attn.o_proj": ModuleShape(heads * head_dim, hidden),
        "mlp.gate_proj": ModuleShape(hidden, intermediate),
        "mlp.up_proj": ModuleShape(hidden, intermediate),
        "mlp.down_proj": ModuleShape(intermediate, hidden),
    }
    return {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in per_layer.items()}


def projection_name(module: str) -> str:
    return module.rsplit(".", 1)[-1]


# ---- adapter_config.json ---------------------------------------------------------------------


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    # PEFT's rule (peft.utils.other.get_pattern_key): a pattern matches a suffix of the module path.
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return None


@dataclass(frozen=True)
class LoraOptions:
    """The honoured fields of an adapter_config.json, checked."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    target_modules: tuple[str, ...] | str
    exclude_modules: tuple[str, ...] | str | None
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    init_lora_weights: bool | str

    def rank(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def scaling(self, module: str) -> float:
        """PEFT's scaling of the module's delta: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        key = _pattern_key(self.alpha_pattern, module)
        alpha = self.alpha_pattern[key] if key is not None else self.lora_alpha
        rank = self.rank(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str) -> bool:
        """Whether PEFT gives `module` (a path in `model.named_modules()`) a LoRA layer
        (peft.tuners.tuners_utils.check_target_module_exists, without modules_to_save: refused)."""
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, module):
                    return False
            elif module in self.exclude_modules or any(module.endswith(f".{m}") for m in self.exclude_modules):
                return False
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return True  # every linear layer but the output head; the served projections all are
            return re.fullmatch(self.target_modules, module) is not None
        if module in self.target_modules:
            return True
        if not any(module.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
                if match is not None:
                    break
        return match is not None and int(match["idx"]) in self.layers_to_transform


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _str_or_strs(config: dict, name: str, *, required: bool) -> tuple[str, ...] | str | None:
    value = config.get(name)
    if value is None or value == [] or value == "":
        if required:
            raise AdapterFormatError(f"adapter_config has no {name}")
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise AdapterFormatError(f"adapter_config {name}={value!r} must be a string or a list of strings")


def _mapping(config: dict, name: str, valid, what: str) -> dict:
    value = config.get(name) or {}
    if not isinstance(value, dict):
        raise AdapterFormatError(f"adapter_config {name} must be a mapping, got {value!r}")
    for pattern, item in value.items():
        if not valid(item):
            raise AdapterFormatError(f"adapter_config {name}[{pattern!r}]={item!r} must be {what}")
    return dict(value)


def lora_options(config: Mapping[str, Any]) -> LoraOptions:
    """Check a parsed adapter_config.json; refuse (AdapterFormatError) what the shard would not
    serve as PEFT does."""
    config = dict(config)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterFormatError(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are served")
    for option, reason in REFUSED_OPTIONS.items():
        if config.get(option):
            raise AdapterFormatError(f"adapter_config sets {option}={config[option]!r}, which is refused: {reason}")
    unknown = sorted(k for k, v in config.items() if v and k not in HONOURED_OPTIONS | INERT_OPTIONS)
    if unknown:
        raise AdapterFormatError(
            f"adapter_config sets {unknown[0]}={config[unknown[0]]!r}, an option loraplex does not know; "
            "refused rather than served differently from PEFT"
        )
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"adapter_config bias={config['bias']!r}: trained biases are not served (only 'none')")
    init = config.get("init_lora_weights", True)
    if not any(init is safe or (isinstance(safe, str) and init == safe) for safe in _SAFE_INITS):
        raise AdapterFormatError(
            f"adapter_config init_lora_weights={init!r}: this initialisation changes the base weights when PEFT "
            "loads the adapter; only True, False and 'gaussian' are served"
        )
    if not _positive_int(config.get("r")):
        raise AdapterFormatError(f"adapter_config r={config.get('r')!r} must be a positive integer")
    if not _positive_number(config.get("lora_alpha")):
        raise AdapterFormatError(f"adapter_config lora_alpha={config.get('lora_alpha')!r} must be a positive number")
    layers = config.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers == []:
        layers = None
    if layers is not None and not (
        isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
    ):
        raise AdapterFormatError(f"adapter_config layers_to_transform={layers!r} must be layer indices")
    layers_pattern = _str_or_strs(config, "layers_pattern", required=False)
    return LoraOptions(
        r=config["r"],
        lora_alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora", False)),
        rank_pattern=_mapping(config, "rank_pattern", _positive_int, "a positive integer"),
        alpha_pattern=_mapping(config, "alpha_pattern", _positive_number, "a positive number"),
        target_modules=_str_or_strs(config, "target_modules", required=True),
        exclude_modules=_str_or_strs(config, "exclude_modules", required=False),
        layers_to_transform=tuple(layers) if layers is not None else None,
        layers_pattern=(layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern,
        init_lora_weights=init,
    )


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{CONFIG_FILE} is missing in {folder}: not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} is not a JSON object")
    return config


# ---- adapter_model.safetensors ---------------------------------------------------------------

# dtype -> (bytes per element, mask of the exponent bits: a value is NaN or Inf when all are set)
_FLOAT_DTYPES = {
    "F64": (8, 0x7FF0000000000000),
    "F32": (4, 0x7F800000),
    "F16": (2, 0x7C00),
    "BF16": (2, 0x7F80),
}
_OTHER_DTYPE_BYTES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                      "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its dtype, shape and byte range in the data section."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def parse_tensor_key(key: str) -> tuple[str, str]:
    """(module path, "A" or "B") of a PEFT LoRA weight key
    (`base_model.model.<module>.lora_A.weight`); AdapterFormatError for any other tensor."""
    match = _TENSOR_KEY.match(key)
    if match is None:
        raise AdapterFormatError(
            f"tensor {key!r} is not a LoRA A/B weight (embedding LoRA, DoRA magnitudes, biases and saved "
            "modules are not served)"
        )
    return match["module"], match["factor"]


def safetensors_entries(data: bytes) -> tuple[dict[str, TensorEntry], int]:
    """The tensors of a safetensors file held in `data`, and where its data section starts.
    As strict as the safetensors library: a file this accepts, safetensors loads."""
    if len(data) < 8:
        raise AdapterFormatError(f"{WEIGHTS_FILE} is not a readable safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise AdapterFormatError(f"{WEIGHTS_FILE} is not a readable safetensors file (header past the end)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFormatError(f"{WEIGHTS_FILE} is not a readable safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{WEIGHTS_FILE} is not a readable safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    entries = {}
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
            element = _FLOAT_DTYPES[dtype][0] if dtype in _FLOAT_DTYPES else _OTHER_DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise AdapterFormatError(f"{WEIGHTS_FILE}: tensor {key!r} has a malformed header entry") from None
        if end - start != math.prod(shape) * element:
            raise AdapterFormatError(f"{WEIGHTS_FILE}: tensor {key!r} has {end - start} bytes for shape {shape}")
        entries[key] = TensorEntry(key, dtype, shape, int(start), int(end))
    position = 0
    for entry in sorted(entries.values(), key=lambda e: e.start):
        if entry.start != position:
            raise AdapterFormatError(f"{WEIGHTS_FILE}: tensor data is not contiguous at {entry.key!r}")
        position = entry.end
    data_start = 8 + header_len
    if position != len(data) - data_start:
        raise AdapterFormatError(f"{WEIGHTS_FILE}: the data section does not match the header (truncated file?)")
    return entries, data_start


def all_finite(data: bytes, data_start: int, entry: TensorEntry) -> bool:
    """Whether a float tensor holds no NaN or Inf, read from its bits (works for bf16 too)."""
    import numpy as np

    size, mask = _FLOAT_DTYPES[entry.dtype]
    bits = np.frombuffer(data, dtype=f"<u{size}", count=(entry.end - entry.start) // size, offset=data_start + entry.start)
    return not bool(np.any((bits & np.array(mask, dtype=bits.dtype)) == mask))


# ---- the whole folder ------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedAdapter:
    """An adapter folder that passed every check. `modules` maps each module path to its
    lora_A / lora_B tensor entries in `weights` (the safetensors file's bytes)."""

    options: LoraOptions
    modules: dict[str, dict[str, TensorEntry]]
    weights: bytes
    weights_sha256: str

    @property
    def rank(self) -> int:
        return max(self.options.rank(m) for m in self.modules)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The projection names the adapter has weights for, in PROJECTIONS order."""
        present = {projection_name(m) for m in self.modules}
        return tuple(p for p in PROJECTIONS if p in present) + tuple(sorted(present - set(PROJECTIONS)))


def check_no_pickles(folder: Path) -> None:
    for path in Path(folder).rglob("*"):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterFormatError(
                f"{path.relative_to(folder)} is a pickle checkpoint (loading it can run code); "
                "save the adapter with safetensors (PEFT's default, safe_serialization=True)"
            )


def check_adapter_files(folder: Path) -> LoraOptions:
    """The checks that need no base model: the folder's files and its adapter_config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFormatError(f"{folder} is not a folder")
    check_no_pickles(folder)
    options = lora_options(read_config(folder))
    if not (folder / WEIGHTS_FILE).is_file():
        raise AdapterFormatError(f"{WEIGHTS_FILE} is missing in {folder}")
    return options


def check_adapter(folder: Path, module_shapes: Mapping[str, ModuleShape], *, max_rank: int) -> CheckedAdapter:
    """Check the adapter in `folder` against the modules a model serves (path -> shape, as in
    `model.named_modules()`); AdapterFormatError says why it is refused."""
    options = check_adapter_files(folder)
    weights = (Path(folder) / WEIGHTS_FILE).read_bytes()
    entries, data_start = safetensors_entries(weights)
    if not entries:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no LoRA weights")

    modules: dict[str, dict[str, TensorEntry]] = {}
    for key, entry in entries.items():
        module, factor = parse_tensor_key(key)
        if module not in module_shapes:
            served = sorted({projection_name(name) for name in module_shapes})
            raise AdapterFormatError(
                f"tensor {key!r} targets module {module!r}, which this base model does not have or the shard "
                f"does not serve (served projections: {served})"
            )
        if not options.targets(module):
            raise AdapterFormatError(
                f"tensor {key!r} is for {module!r}, which adapter_config does not target (target_modules, "
                "exclude_modules, layers_to_transform, layers_pattern): PEFT would ignore these weights"
            )
        modules.setdefault(module, {})[factor] = entry

    for module, pair in sorted(modules.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(f"module {module!r} has lora_{''.join(pair)} but not both A and B")
        shape, rank = module_shapes[module], options.rank(module)
        a, b = pair["A"], pair["B"]
        if a.shape != (rank, shape.in_features) or b.shape != (shape.out_features, rank):
            raise AdapterFormatError(
                f"module {module!r} has lora_A {a.shape} and lora_B {b.shape}, expected ({rank}, {shape.in_features}) "
                f"and ({shape.out_features}, {rank}) for the rank adapter_config gives it ({rank}) on this base model"
            )
        if rank > max_rank:
            raise AdapterFormatError(f"rank {rank} on {module!r} exceeds the max rank {max_rank}")
        for entry in (a, b):
            if entry.dtype not in _FLOAT_DTYPES:
                raise AdapterFormatError(f"tensor {entry.key!r} is {entry.dtype}, not floating point")
            if not all_finite(weights, data_start, entry):
                raise AdapterFormatError(f"tensor {entry.key!r} holds NaN or infinite weights")

    if options.init_lora_weights is False:
        missing = sorted(m for m in module_shapes if options.targets(m) and m not in modules)
        if missing:
            raise AdapterFormatError(
                f"adapter_config targets {missing[0]!r} but the weights lack it, and init_lora_weights=False: "
                "PEFT would give it random factors"
            )
    return CheckedAdapter(options, modules, weights, hashlib.sha256(weights).hexdigest())


def folder_sha256(folder: Path) -> str:
    """Hash of a whole adapter folder: every file's relative path, size and bytes (independent of
    the order the OS lists them). The registry's content address of a version."""
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
