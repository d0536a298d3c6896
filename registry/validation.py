"""Checks a PEFT LoRA adapter folder against a base model at publish, without loading the base
weights: the base model's `config.json` gives the shape of every projection, and the adapter is
checked by `loraplex.adapter_format` — the same rules the shard applies when it loads it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.adapter_format import AdapterFormatError, check_adapter, folder_sha256, llama_module_shapes
from registry.errors import AdapterRejected
from registry.fingerprint import read_model_config


@dataclass(frozen=True)
class AdapterFacts:
    """What validation learnt about an adapter folder; recorded as version tags."""

    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    folder_sha256: str


def folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_no_symlinks(folder: Path) -> None:
    """An upload follows links: a linked file could publish something outside the folder."""
    for path in Path(folder).rglob("*"):
        if path.is_symlink():
            raise AdapterRejected(f"{path.relative_to(folder)} is a symlink; publish real files only")


def validate_adapter(folder: Path, base_model_dir: Path, max_rank: int) -> AdapterFacts:
    """Raises AdapterRejected (saying why) unless the shard will serve `folder` on this base model
    with PEFT's answer."""
    folder = Path(folder)
    if folder.is_dir():
        check_no_symlinks(folder)
    base_config = read_model_config(Path(base_model_dir))
    try:
        checked = check_adapter(folder, llama_module_shapes(base_config), max_rank=max_rank)
    except AdapterFormatError as error:
        raise AdapterRejected(str(error)) from None
    return AdapterFacts(
        rank=checked.rank,
        target_modules=checked.target_modules,
        size_bytes=folder_size_bytes(folder),
        folder_sha256=folder_sha256(folder),
    )
