"""Keeps the last good version serving when the shards refuse a newly promoted one.

A corrupt version (sha256 mismatch, shapes that do not fit the base model) promoted to
`champion` must not take over; the version that served before keeps answering. The shard refuses
such a version with FAILED_PRECONDITION (the dispatcher's `VersionRefused`); the gateway then
- answers the request with the adapter's last version that served as champion, and
- remembers the refusal for `retry_refused_s`, routing straight to that version meanwhile (no
  doomed download on every request), then tries the promoted version again (its artifacts may
  have been repaired).

A gateway started while the champion was already broken has seen nothing serve. It falls back to
the last good version its `ServingRecord` file kept from before the restart, else to the newest
earlier champion in the adapter's champion history (the registry's `loraplex.champion_history`
tag) that is not itself refused. With neither, the refusal reaches the client as 503
`adapter_unavailable`.
A refused canary falls back the same way: its share of traffic goes to the last good champion.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import msgspec

from gateway.routing import VersionChoice
from loraplex.adapter_format import adapter_ref

FALLBACK_ASSIGNMENTS = frozenset({"champion", "canary"})


class LastGoodVersions:
    def __init__(
        self,
        retry_refused_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str, str, str, str], None] | None = None,
        *,
        champion_history: Callable[[str], Sequence[str]] = lambda adapter: (),
        remembered: dict[str, str] | None = None,
        on_last_good_changed: Callable[[dict[str, str]], None] | None = None,
    ):
        """`champion_history(adapter)`: its earlier champions, oldest first; `remembered`: last good
        versions from before a restart; `on_last_good_changed(all)` is told of every change (to keep
        the record)."""
        self.retry_refused_s = retry_refused_s
        self.on_refused = on_refused  # (adapter, version, assignment, reason), once per refusal period
        self._clock = clock
        self._champion_history = champion_history
        self._on_last_good_changed = on_last_good_changed
        self._last_good: dict[str, str] = dict(remembered or {})
        self._refused_until: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self.fallbacks = 0

    def served(self, choice: VersionChoice, version: str) -> None:
        """A champion answer came back from `version`: it is the one to fall back to."""
        if choice.assignment == "champion" and choice.adapter and version:
            with self._lock:
                changed = self._last_good.get(choice.adapter) != version
                self._last_good[choice.adapter] = version
                self._refused_until.pop((choice.adapter, version), None)
                everything = dict(self._last_good)
            if changed and self._on_last_good_changed is not None:
                self._on_last_good_changed(everything)

    def last_good(self, adapter: str) -> str | None:
        with self._lock:
            return self._last_good.get(adapter)

    def refused(self, choice: VersionChoice, reason: str = "") -> None:
        key = (choice.adapter, choice.version)
        with self._lock:
            now = self._clock()
            newly = self._refused_until.get(key, now) <= now
            self._refused_until[key] = now + self.retry_refused_s
        if newly and self.on_refused is not None:
            self.on_refused(choice.adapter, choice.version, choice.assignment, reason)

    def is_refused(self, adapter: str, version: str) -> bool:
        with self._lock:
            until = self._refused_until.get((adapter, version))
            if until is None:
                return False
            if self._clock() >= until:
                del self._refused_until[(adapter, version)]
                return False
            return True

    def fallback_for(self, choice: VersionChoice) -> VersionChoice | None:
        """The choice to use instead of one whose version was refused, or None when there is none."""
        if choice.assignment not in FALLBACK_ASSIGNMENTS or not choice.adapter:
            return None
        candidates = [self.last_good(choice.adapter), *reversed(self._champion_history(choice.adapter))]
        for good in candidates:
            if good and good != choice.version and not self.is_refused(choice.adapter, good):
                return replace(choice, version=good, assignment="champion")
        return None

    def after_refusal(self, choice: VersionChoice, reason: str = "") -> VersionChoice | None:
        """Records that the shards refused `choice`'s version (saying `reason`); the choice to retry with, if any."""
        self.refused(choice, reason)
        fallback = self.fallback_for(choice)
        if fallback is not None:
            with self._lock:
                self.fallbacks += 1
        return fallback

    def substitute(self, choice: VersionChoice) -> VersionChoice:
        """Skips a recently refused version up front when a good one is known."""
        if choice.assignment in FALLBACK_ASSIGNMENTS and self.is_refused(choice.adapter, choice.version):
            fallback = self.fallback_for(choice)
            if fallback is not None:
                with self._lock:
                    self.fallbacks += 1
                return fallback
        return choice

    def snapshot(self) -> VersionFallbacks:
        now = self._clock()
        with self._lock:
            return VersionFallbacks(
                dict(self._last_good),
                {adapter_ref(a, v): round(until - now, 1) for (a, v), until in self._refused_until.items() if until > now},
                self.fallbacks,
            )


class VersionFallbacks(msgspec.Struct):
    """Versions the shards refused (seconds until they are tried again) and the last good ones serving instead."""

    last_good: dict[str, str]
    refused: dict[str, float]
    fallbacks: int
