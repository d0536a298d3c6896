"""The audit trail: who changed what and when, one JSON line per event on the `loraplex.audit` logger.

Events: every admin action (`admin.adapters.load`, `admin.adapters.unload`, `admin.adapters.pin`,
`admin.adapters.merge`, `admin.adapters.unmerge`, `admin.routing.reload`), every routing change the gateway's routing source reports
(`routing.table_loaded`, `routing.alias_moved`, `routing.canary_percent_changed`,
`routing.adapter_removed`), and every version the shards refuse (`routing.version_refused`).
`who` names the admin key by its id (the first 12 hex digits of its SHA-256, as the tenants file
stores it), never the key; changes made in the registry are `registry`, refusals `shard`.
Route the logger to its own sink with ordinary logging configuration.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from typing import Any

from loraplex.routing_table import FALLBACK_NONE, ROUTING_ALIASES, RoutingTable
from gateway.tenants import sha256_hex

AUDIT_LOGGER_NAME = "loraplex.audit"
KEY_ID_HEX_DIGITS = 12


def key_id(api_key: str) -> str:
    """A key's id for logs: enough of its SHA-256 to tell keys apart, nothing that reveals the key."""
    return sha256_hex(api_key)[:KEY_ID_HEX_DIGITS]


def _route_summary(table: RoutingTable) -> dict[str, dict[str, Any]]:
    return {
        name: {
            **{alias: getattr(route, alias) for alias in ROUTING_ALIASES},
            "canary_percent": route.canary_percent,
            "fallback": route.fallback,
        }
        for name, route in table.adapters.items()
    }


class AuditTrail:
    def __init__(self, logger: logging.Logger | None = None):
        self.logger = logger or logging.getLogger(AUDIT_LOGGER_NAME)
        self._lock = threading.Lock()
        self._last_table: RoutingTable | None = None

    def record(self, who: str, event: str, **what: Any) -> None:
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "who": who, "event": event, **what}
        self.logger.info(json.dumps(line, sort_keys=False, default=str))

    def admin_action(self, admin_key: str, event: str, client: str | None = None, **what: Any) -> None:
        self.record(f"admin:{key_id(admin_key)}", f"admin.{event}", client=client, **what)

    def version_refused(self, adapter: str, version: str, assignment: str, reason: str = "") -> None:
        self.record("shard", "routing.version_refused", adapter=adapter, version=version, assignment=assignment, reason=reason)

    def watch(self, table: RoutingTable) -> None:
        """The table in force now: later changes are reported against it."""
        with self._lock:
            self._last_table = table

    def routing_table_seen(self, table: RoutingTable) -> None:
        """A table the routing source put in force: one line per change from the one before."""
        with self._lock:
            before, self._last_table = self._last_table, table
        if before is None or before.fetched_unix is None:
            self.record("registry", "routing.table_loaded", adapters=_route_summary(table))
            return
        for name, route in table.adapters.items():
            old = before.adapters.get(name)
            for alias in ROUTING_ALIASES:
                was, now = (getattr(old, alias) if old else None), getattr(route, alias)
                if was != now:
                    self.record("registry", "routing.alias_moved", adapter=name, alias=alias, from_version=was, to_version=now)
            was_percent = old.canary_percent if old else 0.0
            if was_percent != route.canary_percent:
                self.record(
                    "registry", "routing.canary_percent_changed", adapter=name, from_percent=was_percent, to_percent=route.canary_percent
                )
            was_fallback = old.fallback if old else FALLBACK_NONE
            if was_fallback != route.fallback:
                self.record("registry", "routing.fallback_changed", adapter=name, from_policy=was_fallback, to_policy=route.fallback)
        for name in before.adapters.keys() - table.adapters.keys():
            self.record("registry", "routing.adapter_removed", adapter=name)
