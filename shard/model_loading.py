"""Load the shard's base model once, frozen and (optionally) quantized through bitsandbytes.

Takes any Hugging Face causal-LM folder; nothing here knows the architecture. Quantization
choices: "nf4" and "int8" (bitsandbytes; on CPU as well as CUDA), "bf16", "fp32".
The compute dtype defaults to fp32 on CPU (bf16 activations differ from fp32 references by
~1e-2 in logits, enough to flip greedy tokens) and bf16 on CUDA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

QUANTIZATIONS = ("nf4", "int8", "bf16", "fp32")
# bitsandbytes' packed CPU 4-bit kernel (AVX512-BF16) needs output sizes in multiples of 32 and
# input sizes in whole quantization blocks; other layers must use the generic kernel.
_CPU_4BIT_OUTPUT_MULTIPLE = 32


class ModelLoadError(Exception):
    """The model folder cannot be served with the requested settings; the message says why."""


def default_compute_dtype(quantization: str, device: str) -> torch.dtype:
    if quantization == "bf16":
        return torch.bfloat16
    if quantization == "fp32":
        return torch.float32
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _fix_cpu_4bit_layers(model: nn.Module) -> list[str]:
    """Route layers whose shape the packed CPU kernel cannot take to the generic kernel."""
    from bitsandbytes.nn import Linear4bit

    rerouted = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        quant_state = getattr(module.weight, "quant_state", None)
        blocksize = getattr(quant_state, "blocksize", 64) or 64
        if module.out_features % _CPU_4BIT_OUTPUT_MULTIPLE or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False
            rerouted.append(name)
    return rerouted


def load_base_model(
    model_dir: Path,
    quantization: str = "nf4",
    device: str = "cpu",
    *,
    compute_dtype: torch.dtype | None = None,
):
    """Return (model, tokenizer): the model in eval mode with every parameter frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model_dir = Path(model_dir)
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"quantization {quantization!r} is not one of {QUANTIZATIONS}")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    dtype = compute_dtype or default_compute_dtype(quantization, device)

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{model_dir}: config.json cannot be read ({exc})") from exc
    kwargs: dict = {"dtype": dtype, "device_map": {"": str(torch_device)}}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
        )
    elif quantization == "int8":
        # Without this, bitsandbytes logs a warning on every int8 matmul on CPU.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"{model_dir}: cannot load as a causal LM with {quantization} ({exc})") from exc
    if quantization == "nf4" and torch_device.type == "cpu":
        _fix_cpu_4bit_layers(model)
    model.eval()
    model.requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{model_dir}: tokenizer cannot be loaded ({exc})") from exc
    return model, tokenizer
