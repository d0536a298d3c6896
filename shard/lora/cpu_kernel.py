"""The compiled CPU decode kernel (lora_decode_kernel.cpp), built on first use with torch's
cpp_extension (needs a C++ compiler; ~1 min once, then cached under TORCH_EXTENSIONS_DIR).

It is compiled for the host CPU (-march=native), so the build is named after the CPU's feature
flags and the source's hash: a cache directory shared with a different CPU, or with a checkout of
another version of the source, gets its own build instead of a binary that would die on an illegal
instruction or lack a newer entry point. When it cannot be built, the layers use stock torch ops,
which are correct on every device but pay for materialised gathers."""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("lora_decode_kernel.cpp")


def _cpu_fingerprint() -> str:
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features"))
        )
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


@functools.cache
def load_cpu_kernel():
    """The extension module, or None if it cannot be built here (reason logged once)."""
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"loraplex_lora_decode_{_cpu_fingerprint()}_{hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:8]}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast", "-fno-strict-aliasing"],
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        log.warning("LoRA CPU decode kernel unavailable, using torch ops: %s", exc)
        return None
