"""What a gateway needs to keep serving across a restart during an outage, kept in a file: the last
routing table it had and the last version of each adapter that answered as champion.

A gateway started while MLflow is down puts the recorded table in force (stale, as `/readyz`
says) instead of having none; one started while a champion is refused falls back to the recorded
last good version (`gateway/version_fallback.py`). The file is rewritten whole (a temporary file,
then an atomic rename) when either changes: rarely, and never half-written. Worker processes of
one gateway share it; each writes what it saw last.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import asdict
from pathlib import Path

from loraplex.routing_table import FALLBACK_NONE, AdapterRoute, RoutingTable

log = logging.getLogger(__name__)

FORMAT = 1


class ServingRecord:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._table, self._last_good = self._read()

    @property
    def table(self) -> RoutingTable | None:
        """The routing table recorded last, or None when there is none (first start, unreadable file)."""
        return self._table

    @property
    def last_good(self) -> dict[str, str]:
        return dict(self._last_good)

    def save_table(self, table: RoutingTable) -> None:
        with self._lock:
            self._table = table
            self._write()

    def save_last_good(self, last_good: dict[str, str]) -> None:
        with self._lock:
            self._last_good = dict(last_good)
            self._write()

    def _read(self) -> tuple[RoutingTable | None, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            table = None
            if data.get("routing_table") is not None:
                routes = {name: _route(name, spec) for name, spec in data["routing_table"]["adapters"].items()}
                table = RoutingTable(routes, data["routing_table"].get("fetched_unix"))
            last_good = {str(k): str(v) for k, v in (data.get("last_good") or {}).items()}
            return table, last_good
        except FileNotFoundError:
            return None, {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("serving record %s is unreadable (%s); starting without it", self.path, error)
            return None, {}

    def _write(self) -> None:
        table = None
        if self._table is not None:
            table = {
                "fetched_unix": self._table.fetched_unix,
                "adapters": {name: _route_json(route) for name, route in self._table.adapters.items()},
            }
        body = json.dumps({"format": FORMAT, "routing_table": table, "last_good": self._last_good}, sort_keys=True)
        temporary = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(body)
            os.replace(temporary, self.path)
        except OSError as error:  # a full or read-only disk must not fail requests
            log.warning("could not write the serving record %s: %s", self.path, error)
            temporary.unlink(missing_ok=True)


def _route_json(route: AdapterRoute) -> dict:
    spec = asdict(route)
    spec.pop("name")
    spec["tenants"] = None if route.tenants is None else sorted(route.tenants)
    spec["champion_history"] = list(route.champion_history)
    return spec


def _route(name: str, spec: dict) -> AdapterRoute:
    tenants = spec.get("tenants")
    return AdapterRoute(
        name=name,
        champion=spec.get("champion"),
        canary=spec.get("canary"),
        shadow=spec.get("shadow"),
        canary_percent=float(spec.get("canary_percent") or 0.0),
        tenants=None if tenants is None else frozenset(tenants),
        fallback=spec.get("fallback") or FALLBACK_NONE,
        champion_history=tuple(spec.get("champion_history") or ()),
    )
