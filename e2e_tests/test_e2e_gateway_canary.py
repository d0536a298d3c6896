"""Issue 5 over real processes: the canary split follows MLflow's alias and tag, and is sticky per user.

Works on `clinical` (its own second version, its own canary); puts the alias and tag back after.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from tests.support.waiting import wait_until


ADAPTER = "clinical"
CANARY_PERCENT = 30
REQUESTS = 500
SIGMAS = 4.5
STICKY_USERS = 24
REQUESTS_PER_USER = 3


@pytest.fixture(scope="module")
def canary_versions(fault_stack):
    fs = fault_stack
    champion = fs.alias_version(ADAPTER, "champion")
    canary = fs.publish_variant(ADAPTER, "canary", lora_alpha_factor=1.5)
    fs.set_alias(ADAPTER, "canary", canary)
    fs.set_model_tag(ADAPTER, "loraplex.canary_percent", str(CANARY_PERCENT))
    try:
        seen = wait_until(lambda: fs.reload_routing()["adapters"][ADAPTER]["canary_percent"] == CANARY_PERCENT, 10)
        assert seen, "the gateway's routing table did not pick up the canary"
        yield champion, canary
    finally:
        fs.delete_alias(ADAPTER, "canary")
        fs.set_model_tag(ADAPTER, "loraplex.canary_percent", "0")
        fs.reload_routing()


def _routes(fs, extra_per_request: list[dict], workers: int = 8) -> list[tuple[str, str, int]]:
    """(route, version, status) per request, sent by `workers` concurrent clients."""
    chunks = [extra_per_request[i::workers] for i in range(workers)]

    def run(chunk: list[dict]) -> list[tuple[str, str, int]]:
        out = []
        with fs.http() as client:
            for extra in chunk:
                body = {"model": ADAPTER, "prompt": fs.running.demo_prompt, "max_tokens": 1, "temperature": 0, **extra.get("body", {})}
                response = client.post("/v1/completions", json=body, headers={**fs.tenant_headers(), **extra.get("headers", {})})
                out.append((response.headers.get("x-loraplex-route", ""), response.headers.get("x-loraplex-version", ""), response.status_code))
        return out

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [r for part in pool.map(run, chunks) for r in part]


def test_canary_share_is_within_binomial_tolerance(fault_stack, canary_versions):
    champion, canary = canary_versions
    results = _routes(fault_stack, [{} for _ in range(REQUESTS)])
    assert [s for _, _, s in results if s != 200] == []
    routes = Counter(route for route, _, _ in results)
    assert set(routes) <= {"champion", "canary"}
    # The header names the version the route promises.
    assert {v for r, v, _ in results if r == "canary"} <= {canary}
    assert {v for r, v, _ in results if r == "champion"} <= {champion}
    p = CANARY_PERCENT / 100
    sigma = math.sqrt(REQUESTS * p * (1 - p))
    assert abs(routes["canary"] - REQUESTS * p) <= SIGMAS * sigma, f"{routes['canary']} of {REQUESTS} went to the canary"


def test_same_user_always_gets_the_same_version(fault_stack, canary_versions):
    champion, canary = canary_versions
    by_user = [{"body": {"user": f"user-{u}"}} for u in range(STICKY_USERS) for _ in range(REQUESTS_PER_USER)]
    by_session = [{"headers": {"x-loraplex-session": f"session-{u}"}} for u in range(STICKY_USERS) for _ in range(REQUESTS_PER_USER)]
    for requests in (by_user, by_session):
        results = _routes(fault_stack, requests, workers=4)
        assert [s for _, _, s in results if s != 200] == []
        seen: dict[str, set[str]] = {}
        for extra, (_, version, _) in zip(_interleaved(requests, 4), results):
            key = extra.get("body", {}).get("user") or extra.get("headers", {}).get("x-loraplex-session")
            seen.setdefault(key, set()).add(version)
        assert len(seen) == STICKY_USERS
        assert all(len(versions) == 1 for versions in seen.values()), seen
        # With 24 users at 30% both sides are all but certain to be used (0.7^24 < 2e-4).
        assert {v for versions in seen.values() for v in versions} == {champion, canary}


def _interleaved(items: list, workers: int) -> list:
    """The order `_routes` returns results in."""
    return [x for i in range(workers) for x in items[i::workers]]
