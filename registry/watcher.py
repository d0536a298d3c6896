"""Keeps a routing table in step with MLflow by polling it on a background thread.

A change made in the MLflow UI (an alias moved, a tag edited) is seen within one interval. When
MLflow cannot be reached the last good table stays in force and `is_stale` says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from registry.routing import RoutingTable

logger = logging.getLogger(__name__)


class RoutingTableWatcher:
    def __init__(
        self,
        registry,
        interval_s: float = 1.0,
        on_change: Callable[[RoutingTable], None] | None = None,
        *,
        stale_after_intervals: float = 3.0,
    ) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.on_change = on_change
        self.stale_after_s = stale_after_intervals * interval_s
        self._table = RoutingTable()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_poll_failed = False
        self._seeded = False
        self._failures_in_a_row = 0
        self.last_success_unix: float | None = None
        self.last_error: str | None = None
        self.polls = 0
        self.failures = 0

    def current(self) -> RoutingTable:
        """The last table read successfully (empty before the first success)."""
        with self._lock:
            return self._table

    @property
    def has_table(self) -> bool:
        return self.last_success_unix is not None or self._seeded

    def seed(self, table: RoutingTable) -> None:
        """Puts a table read before (a restart's record) in force until the first successful poll
        replaces it; it counts as stale meanwhile."""
        with self._lock:
            if self.last_success_unix is None:
                self._table = table
                self._seeded = True

    @property
    def is_stale(self) -> bool:
        if self.last_success_unix is None or self._last_poll_failed:
            return True
        return time.time() - self.last_success_unix > self.stale_after_s

    def status(self) -> dict:
        """For /readyz details and admin pages."""
        return {
            "stale": self.is_stale,
            "last_success_unix": self.last_success_unix,
            "last_error": self.last_error,
            "adapters": len(self.current().adapters),
            "polls": self.polls,
            "failed_polls": self.failures,
            "interval_s": self.interval_s,
        }

    def poll_now(self) -> bool:
        """Reads the table once; True when it succeeded. Never raises for an unreachable MLflow."""
        self.polls += 1
        try:
            # The next poll is the retry: an outage must not hold this thread in backoff.
            table = self.registry.routing_table(retry=False)
        except Exception as error:  # any failure keeps the last good table in force
            self.failures += 1
            first_failure = not self._last_poll_failed
            self._last_poll_failed = True
            self.last_error = f"{type(error).__name__}: {error}"
            # Once per outage, not once per second.
            log = logger.warning if first_failure else logger.debug
            log("routing table poll failed; keeping the last good table: %s", self.last_error)
            self._failures_in_a_row += 1
            return False
        with self._lock:
            changed = not table.same_routes(self._table) or self.last_success_unix is None
            self._table = table
        self.last_success_unix = table.fetched_unix or time.time()
        if self._last_poll_failed:
            logger.warning("routing table poll succeeded again after %d failed polls", self._failures_in_a_row)
        self._failures_in_a_row = 0
        self._last_poll_failed = False
        self.last_error = None
        if changed and self.on_change is not None:
            try:
                self.on_change(table)
            except Exception:
                logger.exception("routing table on_change callback failed")
        return True

    def start(self, poll_first: bool = True) -> "RoutingTableWatcher":
        """Starts polling; by default first reads once synchronously so `current()` is useful at once."""
        if self._thread is not None:
            return self
        if poll_first:
            self.poll_now()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="routing-table-watcher", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll_now()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
            self._thread = None

    def __enter__(self) -> "RoutingTableWatcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
