"""Which adapter version serves a request: `legal` (champion/canary split), `legal@3` (pinned), `base`.

The version a request gets and why is its `Assignment`; the routing table it is read from is
`loraplex.routing_table.RoutingTable`, kept current by a `RoutingSource`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from gateway.errors import bad_request, model_forbidden, model_not_found
from gateway.openai_schema import MixComponentIn
from gateway.routing_source import RoutingSource
from gateway.tenants import Tenant
from loraplex.adapter_format import adapter_ref
from loraplex.adapter_mix import DEFAULT_MAX_COMPONENTS, MixComponent, MixError, check_components
from loraplex.routing_table import FALLBACK_NONE, AdapterRoute

# "fallback": the base model answered because the adapter's routed version could not
# (the completion service decides it, from the route's `fallback` policy). "mix": an ad-hoc mix.
Assignment = Literal["champion", "canary", "pinned", "base", "fallback", "mix"]


@dataclass(frozen=True)
class VersionChoice:
    model: str  # the model id the client asked for (after defaulting)
    adapter: str  # "" = the base model
    version: str  # "" for the base model
    assignment: Assignment
    shadow_version: str | None = None
    fallback: str = FALLBACK_NONE  # the route's fallback policy; pinned and base requests have none
    mix: tuple[MixComponent, ...] = ()  # an ad-hoc mix's pinned components (adapter and version then "")


def split_model_id(model: str) -> tuple[str, str | None]:
    name, sep, version = model.partition("@")
    if sep and (not name or not version):
        raise bad_request(f"Malformed model id {model!r}: use 'name' or 'name@version'.", "model", "invalid_model")
    return name, (version if sep else None)


def canary_bucket(adapter: str, sticky_key: str) -> float:
    """A stable point in [0, 100) per (adapter, end user): same user, same side of the split."""
    digest = hashlib.blake2b(f"{adapter}\x00{sticky_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100.0


class VersionRouter:
    def __init__(
        self,
        source: RoutingSource,
        base_model_id: str = "base",
        rng: random.Random | None = None,
        max_mix_components: int = DEFAULT_MAX_COMPONENTS,
    ):
        self.source = source
        self.base_model_id = base_model_id
        self.max_mix_components = max_mix_components
        self._rng = rng or random.Random()

    def usable_models(self, tenant: Tenant) -> list[str]:
        """The model ids this tenant may ask for: adapters, their champion and canary versions, the base model."""
        names = set()
        for name, route in self.source.current().adapters.items():
            if tenant.may_use(name, route):
                names.add(name)
                names.update(adapter_ref(name, version) for version in (route.champion, route.canary) if version)
        if tenant.may_use(self.base_model_id):
            names.add(self.base_model_id)
        return sorted(names)

    def resolve(self, model: str | None, tenant: Tenant, sticky_key: str | None = None) -> VersionChoice:
        if not model:
            if not tenant.default_adapter:
                raise bad_request("'model' is required (this key has no default adapter).", "model", "missing_model")
            model = tenant.default_adapter
        name, pinned_version = split_model_id(model)
        if name == self.base_model_id:
            if pinned_version is not None or not tenant.may_use(name):
                raise model_forbidden(model)
            return VersionChoice(model, "", "", "base")
        route = self._granted_route(model, name, tenant)
        if pinned_version is not None:
            return VersionChoice(model, name, pinned_version, "pinned")
        return self._split(model, route, sticky_key)

    def resolve_mix(self, model: str | None, components: list[MixComponentIn], tenant: Tenant) -> VersionChoice:
        """An ad-hoc mix with every component pinned: `legal` takes its champion (no canary split),
        `legal@3` that version. A component the tenant may not use answers exactly as that model
        would (403, nothing revealed); a bad list answers 400 saying why."""
        pinned = []
        for component in components:
            name, version = split_model_id(component.adapter)
            if name == self.base_model_id:
                raise bad_request(
                    f"'{component.adapter}' is the base model, not an adapter; every mix already adds to it.",
                    "loraplex_mix", "invalid_mix",
                )
            route = self._granted_route(component.adapter, name, tenant)
            if version is None:
                if not route.champion:
                    raise model_not_found(component.adapter, "no version holds the 'champion' alias")
                version = route.champion
            pinned.append(MixComponent(name, version, component.weight))
        try:
            check_components(pinned, self.max_mix_components)
        except MixError as error:
            raise bad_request(f"Bad 'loraplex_mix': {error}.", "loraplex_mix", "invalid_mix") from None
        return VersionChoice(model or "mix", "", "", "mix", mix=tuple(pinned))

    def _granted_route(self, model: str, name: str, tenant: Tenant) -> AdapterRoute:
        route = self.source.current().route(name)
        if not tenant.may_use(name, route):
            raise model_forbidden(model)
        if route is None:
            if name not in tenant.adapters:  # granted only through "*": unknown stays indistinguishable
                raise model_forbidden(model)
            raise model_not_found(model, "the registry has no adapter of that name")
        return route

    def _split(self, model: str, route: AdapterRoute, sticky_key: str | None) -> VersionChoice:
        if route.canary and route.canary_percent > 0:
            point = canary_bucket(route.name, sticky_key) if sticky_key else self._rng.random() * 100.0
            if point < route.canary_percent or not route.champion:
                return VersionChoice(model, route.name, route.canary, "canary", route.shadow, route.fallback)
        if not route.champion:
            raise model_not_found(model, "no version holds the 'champion' alias")
        return VersionChoice(model, route.name, route.champion, "champion", route.shadow, route.fallback)
