"""A routing table fixed at start-up, for running without MLflow (settings `static_routes`).

Duck-type compatible with `registry.RoutingTableWatcher` (`current()`, `is_stale`,
`last_success_unix`) and its `RoutingTable` / `AdapterRoute`, which the gateway reads only by
attribute: `table.adapters[name].champion|canary|shadow|canary_percent|tenants`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StaticAdapterRoute:
    name: str
    champion: str | None
    canary: str | None = None
    shadow: str | None = None
    canary_percent: float = 0.0
    tenants: tuple[str, ...] = ()


@dataclass(frozen=True)
class StaticRoutingTable:
    adapters: Mapping[str, StaticAdapterRoute] = field(default_factory=dict)


class StaticRoutingSource:
    is_stale = False

    def __init__(self, table: StaticRoutingTable):
        self._table = table
        self.last_success_unix = time.time()

    @classmethod
    def from_mapping(cls, routes: Mapping[str, Any]) -> StaticRoutingSource:
        adapters = {}
        for name, spec in routes.items():
            if isinstance(spec, str):  # shorthand: {legal: "3"} = champion 3
                spec = {"champion": spec}
            if not isinstance(spec, Mapping) or set(spec) - {"champion", "canary", "shadow", "canary_percent", "tenants"}:
                raise ValueError(f"static route {name!r}: takes champion, canary, shadow, canary_percent, tenants")
            opt = lambda k: None if spec.get(k) in (None, "") else str(spec[k])  # noqa: E731
            percent = float(spec.get("canary_percent") or 0.0)
            if not 0.0 <= percent <= 100.0:
                raise ValueError(f"static route {name!r}: canary_percent must be within 0..100")
            adapters[name] = StaticAdapterRoute(
                name, opt("champion"), opt("canary"), opt("shadow"), percent, tuple(spec.get("tenants") or ())
            )
        return cls(StaticRoutingTable(adapters))

    def current(self) -> StaticRoutingTable:
        return self._table

    def reload(self) -> None:
        self.last_success_unix = time.time()
