"""Where the gateway's routing table comes from: `registry.RoutingTableWatcher` (MLflow), or a
table fixed at start-up (settings `static_routes`) when running without MLflow."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from loraplex.routing_table import FALLBACK_NONE, FALLBACK_POLICIES, AdapterRoute, RoutingTable

_STATIC_ROUTE_KEYS = frozenset({"champion", "canary", "shadow", "canary_percent", "tenants", "fallback"})


class RoutingSource(Protocol):
    """What the gateway needs of a routing table's source; `start`, `stop` and `poll_now` may block."""

    @property
    def is_stale(self) -> bool: ...

    @property
    def has_table(self) -> bool: ...

    last_success_unix: float | None
    # Called with each new table put in force (the audit trail listens here).
    on_change: Callable[[RoutingTable], None] | None

    def current(self) -> RoutingTable: ...

    def poll_now(self) -> bool: ...

    def start(self) -> Any: ...

    def stop(self) -> None: ...


class StaticRoutingSource:
    is_stale = False
    has_table = True

    def __init__(self, table: RoutingTable, on_change: Callable[[RoutingTable], None] | None = None):
        self._table = table
        self.on_change = on_change
        self.last_success_unix = time.time()

    @classmethod
    def from_mapping(cls, routes: Mapping[str, Any]) -> StaticRoutingSource:
        """`{adapter: {champion, canary, shadow, canary_percent, tenants, fallback}}`; `{adapter: "3"}` = champion 3."""
        adapters = {}
        for name, spec in routes.items():
            if isinstance(spec, str):
                spec = {"champion": spec}
            if not isinstance(spec, Mapping) or set(spec) - _STATIC_ROUTE_KEYS:
                raise ValueError(f"static route {name!r}: takes {', '.join(sorted(_STATIC_ROUTE_KEYS))}")
            opt = lambda k: None if spec.get(k) in (None, "") else str(spec[k])  # noqa: E731
            percent = float(spec.get("canary_percent") or 0.0)
            if not 0.0 <= percent <= 100.0:
                raise ValueError(f"static route {name!r}: canary_percent must be within 0..100")
            fallback = opt("fallback") or FALLBACK_NONE
            if fallback not in FALLBACK_POLICIES:
                raise ValueError(f"static route {name!r}: fallback must be one of {', '.join(FALLBACK_POLICIES)}")
            tenants = spec.get("tenants")
            adapters[name] = AdapterRoute(
                name, opt("champion"), opt("canary"), opt("shadow"), percent, None if tenants is None else frozenset(tenants), fallback
            )
        return cls(RoutingTable(adapters, time.time()))

    def current(self) -> RoutingTable:
        return self._table

    def replace(self, table: RoutingTable) -> None:
        """A new table in force (a test's promotion; the registry's watcher does this by polling)."""
        changed = not table.same_routes(self._table)
        self._table = table
        self.last_success_unix = time.time()
        if changed and self.on_change is not None:
            self.on_change(table)

    def poll_now(self) -> bool:
        self.last_success_unix = time.time()
        return True

    def start(self) -> StaticRoutingSource:
        return self

    def stop(self) -> None:
        pass
