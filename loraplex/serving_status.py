"""What a version's serving status is, as the tags on its MLflow model version say it.

Whoever is about to move an alias in the MLflow UI sees, on the version's page:
- `loraplex.status`: `serving` (a healthy shard holds it loaded), `refused: <reason>` (a shard
  refused to load it and none holds it since) or `not loaded` (no shard holds it now);
- `loraplex.status.resident`: where it is loaded, `shard-0:device, shard-1:host` (tiers as the shards
  report them), or `none`;
- `loraplex.status.shadow`: a short summary of its shadow comparison with the champion, once it has one
  (the full numbers are metrics on the version's run).

This module derives those values from what the gateway observed; it does no I/O. The gateway
gathers the observations (`gateway/serving_status.py`) and the registry writes the tags
(`registry/serving_status.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from loraplex.routing_table import RoutingTable

# One prefix: MLflow's version page lists tags sorted by name in a table a few rows high, so the
# three stay side by side where a promoter looks.
TAG_STATUS = "loraplex.status"
TAG_RESIDENT = "loraplex.status.resident"
TAG_SHADOW = "loraplex.status.shadow"
STATUS_TAGS = (TAG_STATUS, TAG_RESIDENT, TAG_SHADOW)

SERVING = "serving"
NOT_LOADED = "not loaded"
REFUSED_PREFIX = "refused: "
NOT_RESIDENT = "none"
# MLflow keeps up to 5,000 characters in a tag value; a reason is a sentence, and the UI shows it in a table cell.
MAX_REASON_CHARS = 300

VersionKey = tuple[str, str]  # (adapter, version)


@dataclass(frozen=True)
class Residency:
    """One shard holds the version in one tier."""

    shard: str
    tier: str


@dataclass(frozen=True)
class Refusal:
    reason: str
    unix: float


@dataclass(frozen=True)
class VersionStatus:
    adapter: str
    version: str
    status: str
    resident: str
    shadow: str | None = None  # None: no comparison yet, and the tag is left as it is

    def tags(self) -> dict[str, str]:
        tags = {TAG_STATUS: self.status, TAG_RESIDENT: self.resident}
        if self.shadow is not None:
            tags[TAG_SHADOW] = self.shadow
        return tags


def refused_status(reason: str) -> str:
    reason = " ".join(reason.split()) or "no reason given"
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 1] + "…"
    return REFUSED_PREFIX + reason


def shadow_summary(aggregate: Mapping[str, float]) -> str | None:
    """`aggregate` as `ShadowAggregate.metrics()` gives it; None before the first pair."""
    pairs = int(aggregate.get("shadow_pairs", 0))
    if pairs <= 0:
        return None
    summary = (
        f"{pairs} pairs vs champion: {aggregate.get('shadow_exact_match_rate', 0.0):.0%} same text, "
        f"token agreement {aggregate.get('shadow_token_agreement', 0.0):.2f}"
    )
    primary = aggregate.get("shadow_primary_latency_ms") or 0.0
    if primary > 0 and "shadow_latency_ms" in aggregate:
        summary += f", latency x{aggregate['shadow_latency_ms'] / primary:.2f}"
    return summary


def derive_status(
    adapter: str,
    version: str,
    residency: Iterable[Residency],
    refusal: Refusal | None,
    shadow: Mapping[str, float] | None = None,
) -> VersionStatus:
    """A version loaded on a healthy shard serves, whatever was refused before (it loaded since);
    one that no shard holds is refused if a shard refused it, else not loaded."""
    held = sorted(set(residency), key=lambda r: (r.shard, r.tier))
    if held:
        status = SERVING
    elif refusal is not None:
        status = refused_status(refusal.reason)
    else:
        status = NOT_LOADED
    resident = ", ".join(f"{r.shard}:{r.tier}" for r in held) or NOT_RESIDENT
    return VersionStatus(adapter, version, status, resident, shadow_summary(shadow) if shadow else None)


class VersionSelection:
    """Which versions one cycle looks at, at most `limit`: the versions aliases name, those a shard
    holds, those refused, and those whose tags still say something other than `not loaded` (so a
    version that stops serving is told so). Past `limit`, successive cycles take turns through the
    sorted list, so at 10,000 adapters every version is revisited and each cycle stays bounded."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = limit
        self._cursor = 0

    def next_batch(
        self,
        table: RoutingTable,
        resident: Iterable[VersionKey] = (),
        refused: Iterable[VersionKey] = (),
        tagged: Iterable[VersionKey] = (),
    ) -> list[VersionKey]:
        wanted = {(name, version) for name, route in table.adapters.items() for version in route.alias_versions().values()}
        wanted.update(resident)
        wanted.update(refused)
        wanted.update(tagged)
        # Only registry versions have a page to write on: shards serving local folders report `local`.
        ordered = sorted((key for key in wanted if key[1].isdigit()), key=lambda key: (key[0], int(key[1])))
        if len(ordered) <= self.limit:
            self._cursor = 0
            return ordered
        start = self._cursor % len(ordered)
        batch = (ordered[start:] + ordered[:start])[: self.limit]
        self._cursor = start + self.limit
        return batch


def statuses_for(
    batch: Sequence[VersionKey],
    residency: Mapping[VersionKey, Sequence[Residency]],
    refusals: Mapping[VersionKey, Refusal],
    shadows: Mapping[VersionKey, Mapping[str, float]],
) -> list[VersionStatus]:
    return [derive_status(a, v, residency.get((a, v), ()), refusals.get((a, v)), shadows.get((a, v))) for a, v in batch]
