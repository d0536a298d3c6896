"""Publishes the demo adapters once: re-running the stack reuses the versions already there."""

from __future__ import annotations

from pathlib import Path

from loraplex.adapter_format import folder_sha256
from registry.adapter_registry import AdapterRegistry, AdapterVersion
from registry.errors import AdapterNotFound
from registry.fingerprint import base_model_fingerprint
from registry.routing import CHAMPION


def publish_demo_adapters(
    registry: AdapterRegistry, base_model_dir: Path, adapters: dict[str, Path], *, progress: bool = False
) -> dict[str, AdapterVersion]:
    """Each adapter's serving champion, publishing a folder only when no version holds its content.

    A champion someone moved in the MLflow UI is left where it is.
    """
    fingerprint = base_model_fingerprint(Path(base_model_dir))
    champions: dict[str, AdapterVersion] = {}
    for name, folder in adapters.items():
        content = folder_sha256(Path(folder))
        try:
            existing = registry.versions(name)
        except AdapterNotFound:
            existing = []
        same = [v for v in existing if v.folder_sha256 == content and v.base_fingerprint == fingerprint]
        if not same:
            champions[name] = registry.publish(
                Path(folder), name, Path(base_model_dir), alias=CHAMPION, progress=progress,
                description="demo adapter built by loraplex.demo",
            )
            continue
        try:
            champions[name] = registry.resolve(name, CHAMPION)
        except AdapterNotFound:
            champions[name] = registry.promote(name, same[0].version, CHAMPION)
    return champions
