"""Which threads run torch's multi-threaded CPU kernels: the engine's alone.

torch's CPU kernels (GEMMs through oneDNN, elementwise ops, copies) split their work through
OpenMP. GNU OpenMP, the runtime torch's Linux wheels ship, keeps a pool of worker threads for
every thread that ever ran a parallel region, and counts the workers of every pool still alive.
Once they outnumber the CPUs it stops spinning at barriers and puts a waiting thread to sleep
after about a hundred spins, so every parallel region (a decode step runs ~170) then pays for
futex wake-ups. On a 2-core Xeon the same bf16 decode step at batch 32 took 40 ms with the
engine's pool the only one, and 55 ms (about 11,000 voluntary context switches per 64 steps,
against none) while the pool of the thread that had loaded the model was still alive.

So the shard loads its model in a thread that ends (a pool ends with its thread), and the other
threads that touch tensors (adapter loaders) run torch single-threaded: their tensors are small,
and they never create a pool. On a machine with more cores than the engine uses, or on a GPU,
none of this changes speed; it stays correct everywhere."""

from __future__ import annotations

import ctypes
import functools
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import torch


@functools.lru_cache(maxsize=1)
def _openmp_runtime() -> ctypes.CDLL | None:
    """The GNU OpenMP library torch loaded (bundled in its wheel), or None (another runtime)."""
    candidates = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    for path in candidates:
        try:
            runtime = ctypes.CDLL(str(path))  # already loaded by torch: the same instance
            runtime.omp_set_num_threads.argtypes = [ctypes.c_int]
            return runtime
        except (OSError, AttributeError):
            continue
    return None


def confine_to_one_thread() -> bool:
    """Make torch's CPU kernels run single-threaded in the calling thread only (OpenMP keeps its
    thread count per thread; torch.set_num_threads would change every thread). Returns False
    where torch's OpenMP runtime is not GNU OpenMP; then nothing changed."""
    runtime = _openmp_runtime()
    if runtime is None:
        return False
    # torch applies its global thread count to a thread the first time it asks for it; ask first,
    # so that this thread's count of 1 is not overwritten afterwards.
    torch.get_num_threads()
    runtime.omp_set_num_threads(1)
    return torch.get_num_threads() == 1


def run_in_ending_thread(name: str, function: Callable[..., Any], *args: Any) -> Future:
    """Run `function(*args)` in a new thread that ends when it returns, so any OpenMP pool it
    created ends with it (model loading: its parallel copies and casts). The future holds the
    result or the exception."""
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(*args))
        except BaseException as error:  # noqa: BLE001 - handed to whoever awaits the future
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
