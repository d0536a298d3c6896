"""Keeps the last good version serving when the shards refuse a newly promoted one.

Issue 4: a corrupt version (sha256 mismatch, shapes that do not fit the base model) promoted to
`champion` must not take over; the version that served before keeps answering. The shard refuses
such a version with FAILED_PRECONDITION; the gateway then
- answers the request with the adapter's last version that served on the champion route, and
- remembers the refusal for `retry_refused_s`, routing straight to that version meanwhile (no
  doomed download on every request), then tries the promoted version again (its artifacts may
  have been repaired).

With no version known to have served (a gateway started while the champion was already broken),
the refusal reaches the client as 503 `adapter_unavailable`, as before.
A refused canary falls back the same way: its share of traffic goes to the last good champion.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

from gateway.routing import RouteDecision

FALLBACK_ROUTES = frozenset({"champion", "canary"})


class LastGoodVersions:
    def __init__(self, retry_refused_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.retry_refused_s = retry_refused_s
        self._clock = clock
        self._last_good: dict[str, str] = {}
        self._refused_until: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self.fallbacks = 0

    def served(self, decision: RouteDecision, version: str) -> None:
        """A champion-route answer came back from `version`: it is the one to fall back to."""
        if decision.route == "champion" and decision.adapter and version:
            with self._lock:
                self._last_good[decision.adapter] = version
                self._refused_until.pop((decision.adapter, version), None)

    def last_good(self, adapter: str) -> str | None:
        with self._lock:
            return self._last_good.get(adapter)

    def refused(self, decision: RouteDecision) -> None:
        with self._lock:
            self._refused_until[(decision.adapter, decision.version)] = self._clock() + self.retry_refused_s

    def is_refused(self, adapter: str, version: str) -> bool:
        with self._lock:
            until = self._refused_until.get((adapter, version))
            if until is None:
                return False
            if self._clock() >= until:
                del self._refused_until[(adapter, version)]
                return False
            return True

    def fallback_for(self, decision: RouteDecision) -> RouteDecision | None:
        """The decision to use instead of one whose version was refused, or None when there is none."""
        if decision.route not in FALLBACK_ROUTES or not decision.adapter:
            return None
        good = self.last_good(decision.adapter)
        if good is None or good == decision.version:
            return None
        return replace(decision, version=good, route="champion")

    def after_refusal(self, decision: RouteDecision) -> RouteDecision | None:
        """Records that the shards refused `decision`'s version; the decision to retry with, if any."""
        self.refused(decision)
        fallback = self.fallback_for(decision)
        if fallback is not None:
            with self._lock:
                self.fallbacks += 1
        return fallback

    def substitute(self, decision: RouteDecision) -> RouteDecision:
        """Skips a recently refused version up front when a good one is known."""
        if decision.route in FALLBACK_ROUTES and self.is_refused(decision.adapter, decision.version):
            fallback = self.fallback_for(decision)
            if fallback is not None:
                with self._lock:
                    self.fallbacks += 1
                return fallback
        return decision

    def snapshot(self) -> dict:
        now = self._clock()
        with self._lock:
            return {
                "last_good": dict(self._last_good),
                "refused": {f"{a}@{v}": round(until - now, 1) for (a, v), until in self._refused_until.items() if until > now},
                "fallbacks": self.fallbacks,
            }
