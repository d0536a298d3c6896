"""An adapter mix: a weighted sum of adapter versions, served as one adapter.

Its output delta is Σ wᵢ·Bᵢ·Aᵢ·x over its components — the same result as PEFT's
`add_weighted_adapter(..., combination_type="cat")`. A registered mix is a model version whose
artifact folder holds only `loraplex_mix.json`:

    {"format": "loraplex.mix/1", "base_fingerprint": "…",
     "components": [{"name": "legal", "version": "3", "weight": 0.7}, …]}

Versions are pinned numbers (an alias is resolved when the mix is published), so a mix version
always means the same adapters. The rules here hold for registered mixes (publish and load) and for
ad-hoc mixes (a request's `loraplex_mix` field): 1 to `max_components` components, weights finite
and non-zero, no adapter twice, no mix inside a mix (checked by whoever resolves a component).

Light on dependencies (json only), like `loraplex.adapter_format`."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from loraplex.adapter_format import AdapterFormatError, adapter_ref

MANIFEST_FILE = "loraplex_mix.json"
FORMAT = "loraplex.mix/1"
DEFAULT_MAX_COMPONENTS = 4
_MANIFEST_MAX_BYTES = 64 * 1024


class MixError(AdapterFormatError):
    """A mix loraplex does not serve; the message says why."""


@dataclass(frozen=True)
class MixComponent:
    name: str
    version: str  # a pinned version number in a registered mix; an alias or number when asked for
    weight: float

    def __str__(self) -> str:
        return f"{adapter_ref(self.name, self.version)}={self.weight:g}"


def describe(components: Iterable[MixComponent]) -> str:
    """`legal@3=0.7 clinical@3=0.3`: how a mix is shown (version tag, response header, logs), in
    the command line's own syntax (ASCII, so it fits an HTTP header)."""
    return " ".join(str(c) for c in components)


def check_components(components: Sequence[MixComponent], max_components: int) -> tuple[MixComponent, ...]:
    """The components, unchanged, if they form a mix loraplex serves; else MixError saying why."""
    components = tuple(components)
    if not components:
        raise MixError("a mix needs at least one component")
    if len(components) > max_components:
        raise MixError(f"a mix has at most {max_components} components, this one has {len(components)}")
    seen: set[tuple[str, str]] = set()
    for component in components:
        if not isinstance(component.name, str) or not component.name:
            raise MixError(f"a mix component needs an adapter name, got {component.name!r}")
        if not isinstance(component.version, str) or not component.version:
            raise MixError(f"mix component {component.name!r} needs a version")
        weight = component.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise MixError(f"mix component {component.name!r}: weight {weight!r} is not a finite number")
        if weight == 0:
            raise MixError(f"mix component {component.name!r}: weight 0 adds nothing; leave the adapter out")
        if (component.name, component.version) in seen:
            raise MixError(f"{adapter_ref(component.name, component.version)} appears twice in the mix; add its weights")
        seen.add((component.name, component.version))
    return components


_ARGUMENT = re.compile(r"^(?P<name>[^=@\s]+)(?:@(?P<version>[^=@\s]+))?=(?P<weight>\S+)$")


def parse_component_argument(text: str, default_version: str) -> MixComponent:
    """`legal=0.7` or `clinical@3=0.3` (the command line's form); `default_version` when none is given."""
    match = _ARGUMENT.match(text.strip())
    if match is None:
        raise MixError(f"{text!r} is not NAME=WEIGHT or NAME@VERSION=WEIGHT")
    try:
        weight = float(match["weight"])
    except ValueError:
        raise MixError(f"{text!r}: weight {match['weight']!r} is not a number") from None
    return MixComponent(match["name"], match["version"] or default_version, weight)


def is_mix_folder(folder: Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def write_manifest(folder: Path, components: Sequence[MixComponent], base_fingerprint: str, max_components: int) -> Path:
    """Write a registered mix's artifact folder (the manifest alone)."""
    components = check_components(components, max_components)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "base_fingerprint": base_fingerprint,
        "components": [{"name": c.name, "version": c.version, "weight": float(c.weight)} for c in components],
    }
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


@dataclass(frozen=True)
class MixManifest:
    components: tuple[MixComponent, ...]
    base_fingerprint: str


def read_manifest(folder: Path, max_components: int) -> MixManifest:
    """A registered mix's manifest, checked; MixError saying why it is not one loraplex serves."""
    folder = Path(folder)
    others = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_FILE) if folder.is_dir() else []
    if others:
        raise MixError(f"a mix folder holds only {MANIFEST_FILE}; found {', '.join(others[:3])}")
    path = folder / MANIFEST_FILE
    try:
        if path.stat().st_size > _MANIFEST_MAX_BYTES:
            raise MixError(f"{MANIFEST_FILE} is larger than {_MANIFEST_MAX_BYTES} bytes")
        raw: Any = json.loads(path.read_text())
    except OSError as error:
        raise MixError(f"cannot read {MANIFEST_FILE}: {error}") from None
    except ValueError as error:
        raise MixError(f"{MANIFEST_FILE} is not JSON: {error}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise MixError(f"{MANIFEST_FILE} is not a {FORMAT} manifest")
    entries = raw.get("components")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise MixError(f"{MANIFEST_FILE}: components must be a list of objects")
    components = []
    for entry in entries:
        name, version, weight = entry.get("name"), entry.get("version"), entry.get("weight")
        if not isinstance(version, str) or not version.isdigit():
            raise MixError(f"{MANIFEST_FILE}: component {name!r} must name a pinned version number, not {version!r}")
        components.append(MixComponent(name, version, weight))
    fingerprint = raw.get("base_fingerprint")
    if not isinstance(fingerprint, str):
        raise MixError(f"{MANIFEST_FILE}: base_fingerprint must be a string")
    return MixManifest(check_components(components, max_components), fingerprint)
