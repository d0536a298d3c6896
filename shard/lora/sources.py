"""Where adapter folders come from: the tier below the local disk."""

from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

from shard.lora.errors import AdapterNotFoundError
from shard.lora.keys import AdapterKey

LOCAL_VERSION = "local"


@runtime_checkable
class AdapterSource(Protocol):
    def fetch(self, key: AdapterKey) -> Path:
        """Return a local PEFT adapter folder for `key`.

        Raises AdapterNotFoundError when it does not exist, AdapterRejectedError when it exists
        but is refused (e.g. checksum mismatch)."""
        ...


class LocalAdapterSource:
    """Adapters served straight from local folders: name -> folder, version "local".

    A caller may also give the folder's own name as version (a registry-style pin) and
    still be served, so tests and single-host setups can address either way."""

    def __init__(self, dirs: Mapping[str, Path]):
        self._dirs = {name: Path(path) for name, path in dirs.items()}

    def fetch(self, key: AdapterKey) -> Path:
        folder = self._dirs.get(key.name)
        if folder is None:
            raise AdapterNotFoundError(f"adapter {key.name!r} is not among the local adapters {sorted(self._dirs)}")
        if key.version not in (LOCAL_VERSION, folder.name):
            raise AdapterNotFoundError(
                f"adapter {key.name!r} has only version {LOCAL_VERSION!r} locally, not {key.version!r}"
            )
        if not folder.is_dir():
            raise AdapterNotFoundError(f"adapter {key.name!r}: folder {folder} does not exist")
        return folder
