"""Which adapter version serves a request: `legal` (champion/canary split), `legal@3` (pinned), `base`."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gateway.errors import bad_request, model_forbidden, model_not_found
from gateway.tenants import Tenant

Route = Literal["champion", "canary", "pinned", "base"]


class RoutingSource(Protocol):
    """What the gateway needs of `registry.RoutingTableWatcher`."""

    is_stale: bool
    last_success_unix: float | None

    def current(self) -> Any: ...


@dataclass(frozen=True)
class RouteDecision:
    model: str  # the model id the client asked for (after defaulting)
    adapter: str  # "" = the base model
    version: str  # "" for the base model
    route: Route
    shadow_version: str | None = None

    @property
    def placement_key(self) -> str:
        return f"{self.adapter}@{self.version}" if self.adapter else ""


def split_model_id(model: str) -> tuple[str, str | None]:
    name, sep, version = model.partition("@")
    if sep and (not name or not version):
        raise bad_request(f"Malformed model id {model!r}: use 'name' or 'name@version'.", "model", "invalid_model")
    return name, (version if sep else None)


def canary_bucket(adapter: str, sticky_key: str) -> float:
    """A stable point in [0, 100) per (adapter, end user): same user, same side of the split."""
    digest = hashlib.blake2b(f"{adapter}\x00{sticky_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100.0


class Router:
    def __init__(self, source: RoutingSource, base_model_id: str = "base", rng: random.Random | None = None):
        self.source = source
        self.base_model_id = base_model_id
        self._rng = rng or random.Random()

    def known_adapters(self) -> dict[str, Any]:
        table = self.source.current()
        return dict(table.adapters) if table is not None else {}

    def resolve(self, model: str | None, tenant: Tenant, sticky_key: str | None = None) -> RouteDecision:
        if not model:
            if not tenant.default_adapter:
                raise bad_request("'model' is required (this key has no default adapter).", "model", "missing_model")
            model = tenant.default_adapter
        name, pinned_version = split_model_id(model)
        if name == self.base_model_id:
            if pinned_version is not None or not tenant.is_granted(self.base_model_id):
                raise model_forbidden(model)
            return RouteDecision(model, "", "", "base")
        if not tenant.is_granted(name):
            raise model_forbidden(model)
        route = self.known_adapters().get(name)
        if route is None:
            if name not in tenant.adapters:  # granted only through "*": unknown stays indistinguishable
                raise model_forbidden(model)
            raise model_not_found(model, "the registry has no adapter of that name")
        allowed = tuple(getattr(route, "tenants", ()) or ())
        if allowed and tenant.name not in allowed:
            raise model_forbidden(model)
        if pinned_version is not None:
            return RouteDecision(model, name, pinned_version, "pinned")
        return self._split(model, name, route, sticky_key)

    def _split(self, model: str, name: str, route: Any, sticky_key: str | None) -> RouteDecision:
        champion = route.champion
        canary = getattr(route, "canary", None)
        shadow = getattr(route, "shadow", None)
        percent = float(getattr(route, "canary_percent", 0.0) or 0.0)
        if canary and percent > 0:
            point = canary_bucket(name, sticky_key) if sticky_key else self._rng.random() * 100.0
            if point < percent or not champion:
                return RouteDecision(model, name, str(canary), "canary", _opt(shadow))
        if not champion:
            raise model_not_found(model, "no version holds the 'champion' alias")
        return RouteDecision(model, name, str(champion), "champion", _opt(shadow))


def _opt(version: Any) -> str | None:
    return None if version in (None, "") else str(version)

