"""The compiled CPU decode kernel (lora_decode_kernel.cpp), built on first use for the host CPU
(shard.cpu_extension). When it cannot be built, the layers use stock torch ops, which are correct
on every device but pay for materialised gathers."""

from __future__ import annotations

from pathlib import Path

from shard.cpu_extension import load_cpu_extension

_SOURCE = Path(__file__).with_name("lora_decode_kernel.cpp")


def load_cpu_kernel():
    """The extension module, or None if it cannot be built here (reason logged once)."""
    return load_cpu_extension(_SOURCE, "loraplex_lora_decode")
