"""Build-once directories: a file lock so one process builds, a temp dir renamed into place so a
build that dies halfway leaves nothing that looks finished.

A directory counts as built when it holds `marker` — the builder writes that file last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def is_built(directory: Path, marker: str) -> bool:
    return (directory / marker).is_file()


def build_once(
    final_dir: Path,
    marker: str,
    build: Callable[[Path], None],
    force: bool = False,
    lock_timeout_s: float = -1,
) -> bool:
    """Make sure `final_dir` holds a finished build; returns True if this call built it.

    `build(tmp_dir)` fills an empty temporary sibling of `final_dir`; only a build that returns
    normally is renamed into place. Another process building the same directory is waited for
    (its result is used, unless `force`).
    """
    if not force and is_built(final_dir, marker):
        return False
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final_dir) + ".lock", timeout=lock_timeout_s):
        if not force and is_built(final_dir, marker):
            return False
        # Leftovers of a build (or a replacement) killed halfway; the lock says nobody uses them.
        for pattern in (f".{final_dir.name}.building-*", f".{final_dir.name}.old-*"):
            for stale in final_dir.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.building-", dir=final_dir.parent))
        try:
            build(tmp_dir)
            if not is_built(tmp_dir, marker):
                raise RuntimeError(f"build finished without writing {marker} in {tmp_dir}")
            _replace_dir(tmp_dir, final_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return True


def _replace_dir(new: Path, final: Path) -> None:
    if not final.exists():
        os.rename(new, final)
        return
    # A directory cannot be swapped in one rename; move the old one aside first. Readers holding
    # files open keep them (POSIX), and the window without `final` is two renames long.
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)
