"""Several real gateway processes behind one real Valkey server enforce one set of tenant limits.

Gateway A runs 2 workers on one port and fails open; gateway B is a single process and fails
closed; both talk to the same two scripted gRPC shards and the same store. A third gateway, started
by one test, is killed with SIGKILL to show that its leases expire.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import yaml
from gateway_fixtures import ROUTES, start_gateway_process, stop_process_group
from gateway_scripted_shard import ScriptedShardServer

from gateway.metrics import GatewayMetrics
from gateway.shared_limits import SharedTenantLimiter
from gateway.tenants import Tenant, TenantLimits, sha256_hex
from loraplex.stack.redis_server import RedisServer
from tests.support.waiting import wait_until

# name -> (concurrent_requests, tokens_per_minute)
TENANTS = {"sixteen": (16, 0), "budget": (0, 100), "recover": (1, 0), "crash": (2, 0)}
LEASE_S = 2.0


def key(name: str) -> str:
    return f"{name}-key"


def tenant(name: str) -> Tenant:
    concurrent, tpm = TENANTS[name]
    return Tenant(name, (sha256_hex(key(name)),), frozenset({"legal"}), None, TenantLimits(concurrent, tpm))


def in_flight(redis_url: str, name: str) -> int:
    """What the store counts for a tenant, read through the limiter's own read-only script."""

    async def read() -> int:
        limiter = SharedTenantLimiter.from_url(redis_url, GatewayMetrics(), timeout_s=5.0)
        try:
            return (await limiter.usage(tenant(name))).in_flight
        finally:
            await limiter.stop()

    return asyncio.run(read())


class Cluster:
    def __init__(self, tmp_path, redis: RedisServer, shards: list[ScriptedShardServer]):
        self.tmp_path, self.redis, self.shards = tmp_path, redis, shards
        self.tenants_file = tmp_path / "tenants.yaml"
        self.tenants_file.write_text(
            yaml.safe_dump(
                {
                    "admin_key_sha256": sha256_hex("admin"),
                    "tenants": [
                        {
                            "name": name,
                            "key_sha256": [sha256_hex(key(name))],
                            "adapters": ["legal"],
                            "limits": {"concurrent_requests": c, "tokens_per_minute": t},
                        }
                        for name, (c, t) in TENANTS.items()
                    ],
                }
            )
        )
        self.processes = []
        self.a = self.b = ""  # gateway URLs
        self.admin_urls: dict[str, str] = {}  # gateway URL -> its admin port's URL (metrics)

    def start_gateway(self, label: str, **settings) -> str:
        config = self.tmp_path / f"gateway-{label}.yaml"
        values = {
            "port": 0,
            "admin_port": 0,
            "tenants_file": str(self.tenants_file),
            "shard_addresses": [s.address for s in self.shards],
            "static_routes": ROUTES,
            # A busy shared test machine must not look like dead shards or a dead store.
            "health_interval_s": 0.5,
            "health_timeout_s": 3.0,
            "redis_url": self.redis.url,
            "redis_retry_s": 0.3,
            "redis_timeout_s": 2.0,
            "limits_lease_s": LEASE_S,
            **settings,
        }
        config.write_text(yaml.safe_dump({"gateway": values}))
        proc, urls = start_gateway_process(config)
        self.processes.append(proc)
        self.admin_urls[urls.api] = urls.admin
        return urls.api

    def slow_shards(self, seconds_per_token: float) -> None:
        for shard in self.shards:
            shard.servicer.slow_s = seconds_per_token
            shard.servicer.mode = "slow" if seconds_per_token else "ok"

    def stop(self) -> None:
        for proc in self.processes:
            stop_process_group(proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("shared-limits")
    redis = RedisServer(tmp_path / "redis").start()
    shards = [ScriptedShardServer(f"s{i}").start() for i in range(2)]
    cluster = Cluster(tmp_path, redis, shards)
    try:
        cluster.a = cluster.start_gateway("a", workers=2, redis_failure_policy="open")
        cluster.b = cluster.start_gateway("b", workers=1, redis_failure_policy="closed")
        yield cluster
    finally:
        cluster.stop()
        for shard in shards:
            shard.close()
        redis.stop()


def complete(url: str, name: str, max_tokens: int = 3, timeout_s: float = 30.0) -> httpx.Response:
    body = {"model": "legal", "prompt": "x", "max_tokens": max_tokens}
    return httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key(name)}"}, timeout=timeout_s)


def test_gateway_a_runs_two_worker_processes_on_one_port(cluster):
    parent = psutil.Process(cluster.processes[0].pid)
    workers = [p for p in parent.children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2


def requests_counted(admin_url: str) -> float:
    """`loraplex_gateway_requests_total` of tenant-served completions, summed over label sets."""
    text = httpx.get(f"{admin_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("loraplex_gateway_requests_total{") and 'endpoint="/v1/completions"' in line
    )


def test_metrics_of_every_worker_add_up_whichever_worker_is_scraped(cluster):
    before = requests_counted(cluster.admin_urls[cluster.a])
    for _ in range(20):
        assert complete(cluster.a, "sixteen", max_tokens=1).status_code == 200
    # Each scrape reaches one of A's two workers; each reports both workers' requests.
    assert [requests_counted(cluster.admin_urls[cluster.a]) - before for _ in range(4)] == [20.0] * 4


def test_the_17th_concurrent_request_gets_429_whichever_process_it_reaches(cluster):
    cluster.slow_shards(1.5)  # 3 tokens: each request holds its lease ~4.5 s
    try:
        with ThreadPoolExecutor(16) as pool:
            held = [pool.submit(complete, url, "sixteen") for url in itertools.islice(itertools.cycle([cluster.a, cluster.b]), 16)]
            assert wait_until(lambda: in_flight(cluster.redis.url, "sixteen") == 16, 10), "16 requests never were in flight"
            for url in (cluster.a, cluster.a, cluster.b):  # A twice: its two workers share the port
                refused = complete(url, "sixteen")
                assert refused.status_code == 429, refused.text
                assert "16 requests in flight (limit 16)" in refused.json()["error"]["message"]
            assert [f.result().status_code for f in held] == [200] * 16, [f.result().text[:200] for f in held]
    finally:
        cluster.slow_shards(0)
    assert complete(cluster.b, "sixteen").status_code == 200


def test_the_tokens_per_minute_budget_holds_across_processes_within_one_request(cluster):
    # "x" reserves 1 prompt token + max_tokens 9 = 10; the scripted shard counts 1 + 9 = 10.
    request_tokens = 10
    limit = TENANTS["budget"][1]
    urls = itertools.islice(itertools.cycle([cluster.a, cluster.b]), 40)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda url: complete(url, "budget", max_tokens=9), urls))
    served = [a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(served) + len(refused) == 40, [(a.status_code, a.text[:200]) for a in answers if a.status_code not in (200, 429)]
    assert limit - request_tokens < sum(served) <= limit + request_tokens
    assert all(int(a.headers["retry-after"]) >= 1 for a in refused)


def test_store_killed_then_restarted_the_policies_hold_and_limits_recover(cluster):
    cluster.redis.kill()
    try:
        # A fails open: the tenant is served, limited by each process alone.
        assert complete(cluster.a, "recover").status_code == 200
        # B fails closed: 503 with Retry-After, in OpenAI's error shape.
        refused = complete(cluster.b, "recover")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "limits_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
    finally:
        cluster.redis.start()  # same port, empty
    assert wait_until(lambda: complete(cluster.b, "recover").status_code == 200, 10, step_s=0.2)
    cluster.slow_shards(0.5)
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(complete, cluster.a, "recover")
            assert wait_until(lambda: in_flight(cluster.redis.url, "recover") == 1, 10)
            assert complete(cluster.b, "recover").status_code == 429  # one limit again, across processes
            assert held.result().status_code == 200
    finally:
        cluster.slow_shards(0)


def test_a_gateway_killed_with_sigkill_releases_its_tenants_concurrency_within_the_lease(cluster):
    doomed_url = cluster.start_gateway("doomed", workers=1)
    doomed = cluster.processes[-1]
    cluster.slow_shards(2.0)  # 3 tokens: the requests outlive the gateway
    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in range(2):
                pool.submit(complete, doomed_url, "crash", 3, 10.0)
            assert wait_until(lambda: in_flight(cluster.redis.url, "crash") == 2, 10)
            assert complete(cluster.a, "crash").status_code == 429
            killed_at = time.monotonic()
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(5)
            assert in_flight(cluster.redis.url, "crash") >= 1  # nobody released them: only the lease ends them
            assert wait_until(lambda: in_flight(cluster.redis.url, "crash") == 0, LEASE_S + 1)
            released_after_s = time.monotonic() - killed_at
        assert released_after_s <= LEASE_S + 1
    finally:
        cluster.slow_shards(0)
    assert complete(cluster.a, "crash").status_code == 200
