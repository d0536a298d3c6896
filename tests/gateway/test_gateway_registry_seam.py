"""The router reads the registry's own RoutingTable / AdapterRoute (the seam in ARCHITECTURE.md)."""

from __future__ import annotations

import pytest

registry_routing = pytest.importorskip("registry.routing")

from gateway.errors import OpenAIError  # noqa: E402
from gateway.routing import Router  # noqa: E402
from gateway.tenants import Tenant, TenantLimits  # noqa: E402


class HeldTable:
    """A routing table source holding one fixed registry.RoutingTable."""

    is_stale = False

    def __init__(self, table):
        self._table = table
        self.last_success_unix = table.fetched_unix

    def current(self):
        return self._table


def test_router_over_registry_routing_table():
    Route, Table = registry_routing.AdapterRoute, registry_routing.RoutingTable
    table = Table(
        {
            "legal": Route("legal", "4", "5", "6", 100.0, None),
            "clinical": Route("clinical", "1", None, None, 0.0, frozenset({"other"})),
        },
        fetched_unix=1.0,
    )
    router = Router(HeldTable(table))
    acme = Tenant("acme", ("0" * 64,), frozenset({"legal", "clinical"}), None, TenantLimits())
    decision = router.resolve("legal", acme, "user-1")
    assert (decision.version, decision.route, decision.shadow_version) == ("5", "canary", "6")
    with pytest.raises(OpenAIError) as exc:
        router.resolve("clinical", acme)
    assert exc.value.status == 403
