"""Shard pool, DNS discovery, timeouts, client disconnects and shadow shedding against scripted shards."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from gateway_fixtures import ACME_KEY, ADMIN_KEY, ROUTES, auth, wait_until
from litestar.testing import TestClient

from gateway.app import create_apps
from gateway.dispatch import Dispatcher, GenerationJob
from gateway.placement import PlacementRing
from gateway.routing_source import StaticRoutingSource
from gateway.settings import GatewaySettings
from gateway.shadow import ShadowLog, ShadowMode, ShadowRecorder
from gateway.shards import DnsDiscovery, ShardPool, StaticDiscovery


def test_dns_discovery_finds_shards_behind_a_name(shard_servers):
    server = shard_servers[0]

    async def run():
        pool = ShardPool(DnsDiscovery("localhost", server.port, interval_s=0.2), PlacementRing(), 0.1, 0.5)
        await pool.start()
        try:
            # Joining takes two calls (health, then Stats for the shard's id); on a busy machine the
            # first round may time out, and the health loop tries again every 0.1 s.
            for _ in range(100):
                if server.shard_id in pool.healthy_shards():
                    break
                await asyncio.sleep(0.05)
            return pool.healthy_shards()
        finally:
            await pool.stop()

    assert server.shard_id in asyncio.run(run())


def test_shadow_is_shed_when_its_pool_is_full(shard_servers, tmp_path):
    async def run():
        pool = ShardPool(StaticDiscovery([s.address for s in shard_servers]), PlacementRing(), 0.1, 0.5)
        await pool.start()
        recorder = ShadowRecorder(ShadowLog(tmp_path / "pairs.jsonl", 1 << 20, 1))
        shadow = ShadowMode(Dispatcher(pool, 10.0), recorder, sample_share=1.0, max_concurrency=1)
        job = GenerationJob("r1", "legal", "1", prompt="x", max_tokens=2)
        primary = asyncio.get_running_loop().create_future()
        try:
            first = shadow.maybe_start(job, "2", "acme", primary)
            second = shadow.maybe_start(job, "2", "acme", primary)  # the first copy still waits for the primary
            not_sampled = ShadowMode(shadow.dispatcher, recorder, sample_share=0.0).maybe_start(job, "2", "acme", primary)
            primary.set_result(await Dispatcher(pool, 10.0).generate(job, "legal"))
            await shadow.drain()
            return first, second, not_sampled, shadow.dropped, recorder.recent("legal")
        finally:
            await pool.stop()

    first, second, not_sampled, dropped, pairs = asyncio.run(run())
    assert (first, second, not_sampled, dropped) == (True, False, False, 1)
    assert len(pairs) == 1 and pairs[0].shadow_output.startswith("legal@2:0") and pairs[0].token_agreement == 0.0


@pytest.fixture
def slow_client(tmp_path, tenants_file, shard_servers):
    settings = GatewaySettings.from_mapping(
        {
            "tenants_file": str(tenants_file),
            "shard_addresses": [s.address for s in shard_servers],
            "health_interval_s": 0.1,
            "request_timeout_s": 0.5,
        }
    )
    for s in shard_servers:
        s.servicer.mode, s.servicer.slow_s = "slow", 0.3
    with TestClient(create_apps(settings, routing_source=StaticRoutingSource.from_mapping(ROUTES)).by_port()) as client:
        assert wait_until(lambda: client.get("/readyz").status_code == 200, timeout_s=10.0)
        yield client


def test_slow_shard_times_out_with_504(slow_client):
    r = slow_client.post("/v1/completions", json={"model": "legal", "prompt": "x", "max_tokens": 8}, headers=auth(ACME_KEY))
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_client_going_away_cancels_the_shard_call(gateway_process, shard_servers):
    for s in shard_servers:
        s.servicer.mode, s.servicer.slow_s = "slow", 0.2
    body = {"model": "legal", "prompt": "x", "max_tokens": 40, "stream": True}
    with httpx.Client(base_url=gateway_process.api, timeout=10) as http:
        with http.stream("POST", "/v1/completions", json=body, headers=auth(ACME_KEY)) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("data: ")
    # 40 tokens take 8 s; the shard sees the cancellation long before.
    assert wait_until(lambda: sum(s.servicer.cancelled for s in shard_servers) == 1, timeout_s=6.0)
    with httpx.Client(base_url=gateway_process.admin, timeout=10) as http:
        shards = http.get("/admin/shards", headers=auth(ADMIN_KEY)).json()["shards"]
    assert all(s["in_flight"] == 0 for s in shards)
