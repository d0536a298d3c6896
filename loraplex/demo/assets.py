"""`DemoAssets`: where a finished build lives and what to expect of it, read from its manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "demo_assets.json"


@dataclass
class DemoAssets:
    base_dir: Path
    adapters: dict[str, Path]
    # Words that identify each adapter's answers (match case-insensitively).
    style_markers: dict[str, list[str]]
    demo_prompt: str
    sample_prompts: list[str]
    # Measured at build time: wall/CPU seconds, parameter count, greedy answers per model.
    build_report: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.base_dir.parent

    def markers_in(self, text: str) -> dict[str, list[str]]:
        """Which adapters' markers appear in `text`, by adapter name (only adapters with hits)."""
        lowered = text.lower()
        found = {
            name: [m for m in markers if m.lower() in lowered]
            for name, markers in self.style_markers.items()
        }
        return {name: hits for name, hits in found.items() if hits}


def write_manifest(root: Path, assets: DemoAssets) -> None:
    manifest = {
        "base_dir": assets.base_dir.relative_to(root).as_posix(),
        "adapters": {n: p.relative_to(root).as_posix() for n, p in assets.adapters.items()},
        "style_markers": assets.style_markers,
        "demo_prompt": assets.demo_prompt,
        "sample_prompts": assets.sample_prompts,
        "build_report": assets.build_report,
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(root: Path) -> DemoAssets:
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    return DemoAssets(
        base_dir=root / manifest["base_dir"],
        adapters={n: root / p for n, p in manifest["adapters"].items()},
        style_markers=manifest["style_markers"],
        demo_prompt=manifest["demo_prompt"],
        sample_prompts=manifest["sample_prompts"],
        build_report=manifest.get("build_report", {}),
    )
