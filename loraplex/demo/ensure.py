"""`ensure_demo_assets`: the cached demo build, built on first use."""

from __future__ import annotations

import os
from pathlib import Path

from loraplex.demo.assets import MANIFEST_NAME, DemoAssets, read_manifest
from loraplex.demo.cache import build_once
from loraplex.demo.config import DemoBuildConfig, builder_fingerprint

CACHE_DIR_ENV = "LORAPLEX_DEMO_DIR"


def default_cache_root() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path("~/.cache/loraplex/demo").expanduser()


def demo_assets_dir(cache_dir: Path | None = None, config: DemoBuildConfig | None = None) -> Path:
    """Where the build for `config` lives: `<cache root>/<builder fingerprint>`."""
    config = config or DemoBuildConfig()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root.resolve() / builder_fingerprint(config)


def ensure_demo_assets(
    cache_dir: Path | None = None,
    progress: bool = True,
    *,
    force: bool = False,
    config: DemoBuildConfig | None = None,
) -> DemoAssets:
    """The demo base model and adapters, built the first time and read from the cache after.

    `cache_dir` is the cache root (default `$LORAPLEX_DEMO_DIR`, else ~/.cache/loraplex/demo);
    each builder version gets its own subfolder, so a changed builder never reuses stale files.
    """
    config = config or DemoBuildConfig()
    final_dir = demo_assets_dir(cache_dir, config)

    def build(tmp_dir: Path) -> None:
        from loraplex.demo.builder import build_demo_assets  # torch & co. only when building

        build_demo_assets(tmp_dir, config, progress=progress)

    build_once(final_dir, MANIFEST_NAME, build, force=force)
    return read_manifest(final_dir)
