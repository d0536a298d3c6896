"""The tenant-limiter contract, driven against both implementations: the in-process one and the
shared one on a real Valkey server (`redis_server` fixture). Shared-only behaviour - several
processes' limiters seeing one count, leases that expire, the store going away - follows."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from gateway.errors import OpenAIError
from gateway.metrics import GatewayMetrics
from gateway.shared_limits import FAIL_CLOSED, FAIL_OPEN, SharedTenantLimiter
from gateway.tenant_limits import LocalTenantLimiter, TenantLimiter
from gateway.tenants import Tenant, TenantLimits, sha256_hex
from loraplex.stack.ports import free_port
from loraplex.stack.redis_server import RedisServer

WINDOW_S = 2  # short, so the sliding window's expiry is seen within a test


def tenant(concurrent: int = 0, tpm: int = 0) -> Tenant:
    # A fresh name per test: the shared store outlives tests, their keys must not meet.
    name = f"t-{uuid.uuid4().hex[:10]}"
    return Tenant(name, (sha256_hex(name),), frozenset({"legal"}), None, TenantLimits(concurrent, tpm))


def shared_limiter(url: str, **kwargs) -> SharedTenantLimiter:
    return SharedTenantLimiter.from_url(url, GatewayMetrics(), window_s=WINDOW_S, **{"timeout_s": 5.0, **kwargs})


@pytest.fixture(params=["local", "shared"])
def make_limiter(request):
    """A factory (limiters must be built inside the event loop that uses them)."""
    if request.param == "local":
        return lambda: LocalTenantLimiter(window_s=WINDOW_S)
    url = request.getfixturevalue("redis_server").url
    return lambda: shared_limiter(url)


def run_with(make_limiter, scenario) -> None:
    async def main():
        limiter: TenantLimiter = make_limiter()
        await limiter.start()
        try:
            await scenario(limiter)
        finally:
            await limiter.stop()

    asyncio.run(main())


def store_up(limiter: SharedTenantLimiter) -> float:
    return limiter.metrics.registry.get_sample_value("loraplex_gateway_limits_store_up")


def degraded(limiter: SharedTenantLimiter, policy: str) -> float:
    return limiter.metrics.registry.get_sample_value("loraplex_gateway_limits_degraded_total", {"policy": policy})


async def refused(limiter: TenantLimiter, t: Tenant, reserve: int = 0) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        await limiter.admit(t, reserve)
    return caught.value


# ---- the contract both implementations keep ---------------------------------------------------


def test_concurrency_limit_holds_until_a_lease_is_released(make_limiter):
    async def scenario(limiter):
        t = tenant(concurrent=2)
        first = await limiter.admit(t, 0)
        await limiter.admit(t, 0)
        error = await refused(limiter, t)
        assert (error.status, error.type, error.headers["retry-after"]) == (429, "rate_limit_error", "1")
        assert "2 requests in flight (limit 2)" in error.message
        assert (await limiter.usage(t)).in_flight == 2
        await limiter.release(first, 0)
        await limiter.admit(t, 0)
        assert (await limiter.usage(t)).in_flight == 2

    run_with(make_limiter, scenario)


def test_tokens_are_reserved_at_admission_and_settled_at_release(make_limiter):
    async def scenario(limiter):
        t = tenant(tpm=100)
        big = await limiter.admit(t, 60)
        error = await refused(limiter, t, 50)  # 60 reserved in flight + 50 > 100
        assert error.status == 429 and "reserves 50" in error.message and int(error.headers["retry-after"]) >= 1
        small = await limiter.admit(t, 40)  # exactly the budget
        assert (await limiter.usage(t)).tokens_in_window == 100
        await limiter.release(big, 10)  # used far less than it reserved
        assert (await limiter.usage(t)).tokens_in_window == 50
        await limiter.admit(t, 50)
        await refused(limiter, t, 1)
        await limiter.release(small, 40)
        assert (await limiter.usage(t)).tokens_in_window == 100

    run_with(make_limiter, scenario)


def test_a_request_larger_than_the_budget_runs_alone_and_the_window_frees_up(make_limiter):
    async def scenario(limiter):
        t = tenant(tpm=100)
        lease = await limiter.admit(t, 500)  # nothing counted yet: it may run
        await refused(limiter, t, 1)
        await limiter.release(lease, 300)
        error = await refused(limiter, t, 1)
        assert 1 <= int(error.headers["retry-after"]) <= WINDOW_S
        await asyncio.sleep(WINDOW_S + 1.1)  # the settled tokens left the window
        assert (await limiter.usage(t)).tokens_in_window == 0
        await limiter.admit(t, 1)

    run_with(make_limiter, scenario)


def test_unlimited_tenants_hold_no_lease(make_limiter):
    async def scenario(limiter):
        t = tenant()
        leases = [await limiter.admit(t, 10_000) for _ in range(50)]
        assert all(lease.lease_id == "" for lease in leases)
        for lease in leases:
            await limiter.release(lease, 10_000)
        assert (await limiter.usage(t)).in_flight == 0

    run_with(make_limiter, scenario)


# ---- shared only -------------------------------------------------------------------------------


def test_limiters_of_different_processes_share_one_count(redis_server):
    async def scenario():
        a, b = shared_limiter(redis_server.url), shared_limiter(redis_server.url)
        t = tenant(concurrent=3, tpm=1000)
        try:
            leases = [await a.admit(t, 100), await b.admit(t, 100), await a.admit(t, 100)]
            for limiter in (a, b):
                assert (await refused(limiter, t)).status == 429
            await b.release(leases[0], 700)  # a lease taken by one process, released by another
            assert (await a.usage(t)).tokens_in_window == 900
            await refused(b, t, 200)  # room for one more request, not for its tokens
            await b.admit(t, 100)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_a_lease_not_renewed_stops_counting_after_lease_s(redis_server):
    async def scenario():
        crashed = shared_limiter(redis_server.url, lease_s=0.6)  # never started: never renews, like a dead process
        alive = shared_limiter(redis_server.url, lease_s=0.6)
        await alive.start()
        t = tenant(concurrent=2, tpm=1000)
        try:
            await crashed.admit(t, 300)
            kept = await alive.admit(t, 300)
            await refused(alive, t)
            await asyncio.sleep(1.5)  # > lease_s: the crashed one's lease expired, the renewed one did not
            usage = await alive.usage(t)
            assert (usage.in_flight, usage.tokens_in_window) == (1, 300)
            await alive.admit(t, 0)
            await alive.release(kept, 50)
        finally:
            await crashed.stop()
            await alive.stop()

    asyncio.run(scenario())


def test_store_down_fails_open_to_per_process_limits_and_recovers(tmp_path):
    server = RedisServer(tmp_path / "redis").start()

    async def scenario():
        limiter = shared_limiter(server.url, failure_policy=FAIL_OPEN, retry_s=0.2)
        t = tenant(concurrent=1)
        try:
            shared_lease = await limiter.admit(t, 0)
            server.kill()
            # The store is gone: this process limits on its own (the shared lease is not counted here).
            local_lease = await limiter.admit(t, 0)
            assert not local_lease.shared and (await refused(limiter, t)).status == 429
            assert store_up(limiter) == 0 and degraded(limiter, FAIL_OPEN) == 2
            await limiter.release(local_lease, 0)
            await limiter.release(shared_lease, 0)  # fails quietly: the lease would expire on its own
            server.start()  # back on the same port, empty
            await asyncio.sleep(0.3)
            lease = await limiter.admit(t, 0)
            assert lease.shared and store_up(limiter) == 1
            await refused(limiter, t)
        finally:
            await limiter.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_store_unreachable_fails_closed_with_503():
    async def scenario():
        limiter = shared_limiter(f"redis://127.0.0.1:{free_port()}/0", failure_policy=FAIL_CLOSED, retry_s=5)
        t = tenant(concurrent=4)
        try:
            started = time.monotonic()
            for _ in range(3):  # the first pays the connection error; the next skip the store
                error = await refused(limiter, t)
                assert (error.status, error.code, error.headers["retry-after"]) == (503, "limits_unavailable", "5")
            assert time.monotonic() - started < 2
            assert degraded(limiter, FAIL_CLOSED) == 3
            assert (await limiter.admit(tenant(), 0)).lease_id == ""  # unlimited tenants need no store
        finally:
            await limiter.stop()

    asyncio.run(scenario())
