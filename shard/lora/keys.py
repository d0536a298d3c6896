"""How an adapter is named everywhere in the shard."""

from typing import NamedTuple


class AdapterKey(NamedTuple):
    """An adapter version: registry name and version ("local" for a local folder)."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"
