"""How an adapter, and a mix of adapters, is named everywhere in the shard."""

from typing import NamedTuple

from loraplex.adapter_format import adapter_ref


class AdapterKey(NamedTuple):
    """An adapter version: registry name and version ("local" for a local folder)."""

    name: str
    version: str

    def __str__(self) -> str:
        return adapter_ref(self.name, self.version)


class AdapterMix(NamedTuple):
    """A weighted sum of adapter versions served as one row: an ad-hoc mix from a request, or what
    a registered mix version's manifest names. Hashable, so it keys the prefix cache like a version."""

    components: tuple[tuple[AdapterKey, float], ...]

    def __str__(self) -> str:
        return " ".join(f"{key}={weight:g}" for key, weight in self.components)
