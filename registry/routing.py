"""The routing table: which version of each adapter serves, as MLflow's aliases and tags say.

Built from one `registered-models/search` response (it carries every model's aliases and tags),
so a poll of the whole registry is one REST call per 1,000 adapters.
"""

from __future__ import annotations

import logging

from loraplex.routing_table import (
    CANARY,
    CHAMPION,
    FALLBACK_NONE,
    FALLBACK_POLICIES,
    ROUTING_ALIASES,
    SHADOW,
    AdapterRoute,
    RoutingTable,
)

__all__ = [
    "CANARY",
    "CHAMPION",
    "FALLBACK_POLICIES",
    "ROUTING_ALIASES",
    "SHADOW",
    "AdapterRoute",
    "RoutingTable",
    "route_from_registered_model",
]

logger = logging.getLogger(__name__)

TAG_ADAPTER = "loraplex.adapter"
TAG_CANARY_PERCENT = "loraplex.canary_percent"
TAG_TENANTS = "loraplex.tenants"
TAG_CHAMPION_HISTORY = "loraplex.champion_history"
TAG_FALLBACK = "loraplex.fallback"


def parse_canary_percent(raw: str | None) -> float | None:
    """The percentage in 0..100, or None when the tag holds something else."""
    if raw is None or raw.strip() == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0.0 <= value <= 100.0 else None  # the comparison also rejects nan


def parse_fallback(raw: str | None) -> str | None:
    """The fallback policy (`none` when the tag is absent or empty), or None when the tag holds something else."""
    if raw is None or raw.strip() == "":
        return FALLBACK_NONE
    value = raw.strip().lower()
    return value if value in FALLBACK_POLICIES else None


def parse_champion_history(raw: str | None) -> tuple[str, ...]:
    """The version numbers in the tag, oldest first; anything else in it is ignored."""
    return tuple(part.strip() for part in (raw or "").split(",") if part.strip().isdigit())


def parse_tenants(raw: str | None) -> frozenset[str] | None:
    if raw is None:
        return None
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


class MalformedTagWarnings:
    """Warns once per adapter and bad value: a watcher re-reads the same tag every second."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, str]] = set()

    def __call__(self, name: str, key: str, raw: str, expected: str = "a number in 0..100", applied: str = "its canary gets 0%") -> None:
        if (name, key, raw) not in self._seen:
            self._seen.add((name, key, raw))
            logger.warning("adapter %s: tag %s=%r is not %s; %s", name, key, raw, expected, applied)


def route_from_registered_model(model: dict, warn: MalformedTagWarnings | None = None) -> AdapterRoute:
    """`model` is one entry of MLflow's REST `registered_models` list."""
    name = model["name"]
    aliases = {entry["alias"]: str(entry["version"]) for entry in model.get("aliases") or []}
    tags = {entry["key"]: entry.get("value", "") for entry in model.get("tags") or []}
    canary_percent = parse_canary_percent(tags.get(TAG_CANARY_PERCENT))
    if canary_percent is None:
        (warn or MalformedTagWarnings())(name, TAG_CANARY_PERCENT, tags[TAG_CANARY_PERCENT])
        canary_percent = 0.0
    fallback = parse_fallback(tags.get(TAG_FALLBACK))
    if fallback is None:
        (warn or MalformedTagWarnings())(name, TAG_FALLBACK, tags[TAG_FALLBACK], " or ".join(FALLBACK_POLICIES), "it gets no fallback")
        fallback = FALLBACK_NONE
    return AdapterRoute(
        name=name,
        champion=aliases.get(CHAMPION),
        canary=aliases.get(CANARY),
        shadow=aliases.get(SHADOW),
        canary_percent=canary_percent,
        tenants=parse_tenants(tags.get(TAG_TENANTS)),
        fallback=fallback,
        champion_history=parse_champion_history(tags.get(TAG_CHAMPION_HISTORY)),
    )
