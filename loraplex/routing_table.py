"""The routing table: which version of each adapter serves, and who may use it.

One type for every source of it (the registry's watcher over MLflow, the gateway's static table),
free of dependencies so that both the registry and the gateway import it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

CHAMPION, CANARY, SHADOW = "champion", "canary", "shadow"
ROUTING_ALIASES = (CHAMPION, CANARY, SHADOW)
# A tenant granted this in the tenants file may use every adapter (and the base model).
EVERY_ADAPTER = "*"
# What serves when an adapter's routed version cannot (refused, unloadable, its shards down): nothing
# (the error reaches the client) or the base model (answered with `x-loraplex-route: fallback`).
FALLBACK_NONE, FALLBACK_BASE = "none", "base"
FALLBACK_POLICIES = (FALLBACK_NONE, FALLBACK_BASE)


@dataclass(frozen=True)
class AdapterRoute:
    """An adapter's entry in the routing table: the versions its aliases name, and its canary share."""

    name: str
    champion: str | None
    canary: str | None = None
    shadow: str | None = None
    canary_percent: float = 0.0
    # None: the registry sets no tenant list and the tenants file alone decides; otherwise only these.
    tenants: frozenset[str] | None = None
    fallback: str = FALLBACK_NONE  # one of FALLBACK_POLICIES, chosen by the adapter's owner
    # Earlier champions, oldest first, as `loraplex adapters promote/rollback` recorded them (the
    # registered-model tag loraplex.champion_history): where a gateway that never saw a champion
    # serve looks for a version to fall back to.
    champion_history: tuple[str, ...] = ()

    def alias_versions(self) -> dict[str, str]:
        """alias -> version, for the aliases that name one."""
        versions = {CHAMPION: self.champion, CANARY: self.canary, SHADOW: self.shadow}
        return {alias: version for alias, version in versions.items() if version}


@dataclass(frozen=True)
class RoutingTable:
    adapters: Mapping[str, AdapterRoute] = field(default_factory=dict)
    # When the table was read from its source (unix seconds); None for the empty table before any read.
    fetched_unix: float | None = None

    def route(self, name: str) -> AdapterRoute | None:
        return self.adapters.get(name)

    def same_routes(self, other: RoutingTable) -> bool:
        return self.adapters == other.adapters


def may_use(tenant: str, grants: Collection[str], model_name: str, route: AdapterRoute | None = None) -> bool:
    """Whether a tenant may use an adapter (or the base model, which has no route): the tenants file
    grants it (by name or with "*"), and the registry's tenant list for it, when set, names the tenant."""
    if EVERY_ADAPTER not in grants and model_name not in grants:
        return False
    return route is None or route.tenants is None or tenant in route.tenants
