"""Building the shard's small C++ CPU kernels with torch's cpp_extension (needs a C++ compiler;
~1 min once per kernel, then cached under TORCH_EXTENSIONS_DIR).

Each kernel is compiled for the host CPU (-march=native), so its build is named after the CPU's
feature flags and the hash of its source and headers: a cache directory shared with a different CPU, or with a
checkout of another version of the source, gets its own build instead of a binary that would die on
an illegal instruction or lack a newer entry point. When a kernel cannot be built, its caller uses
stock torch ops, which are correct on every device."""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

log = logging.getLogger(__name__)
# Headers the kernels include (``#include "cpu_vector_ops.h"``); part of every build's name.
_INCLUDE_DIR = Path(__file__).parent
_HEADERS = (_INCLUDE_DIR / "cpu_vector_ops.h",)
# -fopenmp: at::parallel_for is a header template whose OpenMP pragma only splits work when the
# kernel itself is compiled with OpenMP; without it every kernel ran on one thread. The library it
# links (libgomp.so.1) resolves to the copy torch already loaded, so there is one OpenMP runtime
# and one pool of worker threads.
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-strict-aliasing")
_LDFLAGS = ("-fopenmp",)


def _cpu_fingerprint() -> str:
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features"))
        )
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


@functools.cache
def load_cpu_extension(source: Path, stem: str):
    """The extension module built from ``source``, or None if it cannot be built here (reason
    logged once per source)."""
    try:
        from torch.utils.cpp_extension import load

        digest = hashlib.sha256(
            b"".join(p.read_bytes() for p in (source, *_HEADERS)) + " ".join(_CFLAGS + _LDFLAGS).encode()
        ).hexdigest()[:8]
        return load(
            name=f"{stem}_{_cpu_fingerprint()}_{digest}",
            sources=[str(source)],
            extra_include_paths=[str(_INCLUDE_DIR)],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        log.warning("CPU kernel %s unavailable, using torch ops: %s", source.name, exc)
        return None
