"""How an adapter is named everywhere in the shard."""

from typing import NamedTuple

from loraplex.adapter_format import adapter_ref


class AdapterKey(NamedTuple):
    """An adapter version: registry name and version ("local" for a local folder)."""

    name: str
    version: str

    def __str__(self) -> str:
        return adapter_ref(self.name, self.version)
