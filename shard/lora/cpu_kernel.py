"""The compiled CPU decode kernel (lora_decode_kernel.cpp), built on first use with torch's
cpp_extension (needs a C++ compiler; the build is cached under TORCH_EXTENSIONS_DIR).

When it cannot be built the layers use stock torch ops, which are correct on every device but
pay for materialised gathers."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("lora_decode_kernel.cpp")


@functools.cache
def load_cpu_kernel():
    """The extension module, or None if it cannot be built here (reason logged once)."""
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="loraplex_lora_decode_kernel",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast", "-fno-strict-aliasing"],
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        log.warning("LoRA CPU decode kernel unavailable, using torch ops: %s", exc)
        return None
