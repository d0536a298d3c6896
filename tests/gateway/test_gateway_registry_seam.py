"""The gateway routes over the registry's routing table: one type (`loraplex.routing_table`), built
from MLflow's registered-model entries (the seam in ARCHITECTURE.md)."""

from __future__ import annotations

import pytest

registry_routing = pytest.importorskip("registry.routing")

from gateway.errors import OpenAIError  # noqa: E402
from gateway.routing import VersionRouter  # noqa: E402
from gateway.routing_source import StaticRoutingSource  # noqa: E402
from gateway.tenants import Tenant, TenantLimits  # noqa: E402
from loraplex import routing_table  # noqa: E402


def _registered_model(name: str, aliases: dict[str, str], tags: dict[str, str]) -> dict:
    """One entry of MLflow's REST `registered-models/search` answer."""
    return {
        "name": name,
        "aliases": [{"alias": a, "version": v} for a, v in aliases.items()],
        "tags": [{"key": k, "value": v} for k, v in tags.items()],
    }


def test_router_over_the_registry_routing_table():
    assert registry_routing.RoutingTable is routing_table.RoutingTable
    assert registry_routing.AdapterRoute is routing_table.AdapterRoute
    entries = [
        _registered_model("legal", {"champion": "4", "canary": "5", "shadow": "6"}, {"loraplex.canary_percent": "100"}),
        _registered_model("clinical", {"champion": "1"}, {"loraplex.tenants": "other"}),
        _registered_model("closed", {"champion": "1"}, {"loraplex.tenants": ""}),
        _registered_model("sql", {"champion": "2"}, {"loraplex.fallback": " base "}),
    ]
    table = routing_table.RoutingTable({e["name"]: registry_routing.route_from_registered_model(e) for e in entries}, 1.0)
    router = VersionRouter(StaticRoutingSource(table))
    acme = Tenant("acme", ("0" * 64,), frozenset({"legal", "clinical", "closed", "sql"}), None, TenantLimits())
    choice = router.resolve("legal", acme, "user-1")
    assert (choice.version, choice.assignment, choice.shadow_version, choice.fallback) == ("5", "canary", "6", "none")
    # The adapter's fallback policy travels with its routed choices, never with a pinned one.
    assert router.resolve("sql", acme).fallback == "base"
    assert router.resolve("sql@2", acme).fallback == "none"
    for name in ("clinical", "closed"):  # another tenant's, and nobody's
        with pytest.raises(OpenAIError) as exc:
            router.resolve(name, acme)
        assert exc.value.status == 403
    assert router.usable_models(acme) == ["legal", "legal@4", "legal@5", "sql", "sql@2"]
