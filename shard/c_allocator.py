"""The shard process's policy for freed memory in the C allocator (glibc's malloc).

A prefill allocates activations of megabytes per layer (2,048 tokens × 2,048 features is 8 MiB in
bf16). With glibc's defaults, freed blocks that large go back to the kernel (unmapped, or trimmed
off the top of an arena) and the next prefill faults them in again page by page, each page
zeroed: ~40k page faults and ~45 ms of a 0.39 s bf16 prefill here. Kept in the process, they are
reused as they are; the cost is a resident size that stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# glibc's largest mmap threshold on 64-bit systems: only blocks above it get mappings of their own.
MMAP_THRESHOLD_BYTES = 32 * 2**20
# Free memory at the top of an arena is given back only beyond this.
TRIM_THRESHOLD_BYTES = 2**30
# An arena grows by this much more than asked, so growth is not a system call per allocation.
TOP_PAD_BYTES = 64 * 2**20


def retain_freed_memory() -> bool:
    """Apply the policy to this process (every thread's arena). False where the C library has no
    ``mallopt`` or refused a value; values set before a refused one stay set."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(
        mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (_M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
