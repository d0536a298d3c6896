"""Placement by stable shard identity: a shard that comes back on another address (a restarted
StatefulSet pod gets a new IP) keeps its arcs of the ring, so its adapters go back to its warm
cache; two live shards claiming one id do not share it; metrics name shards by id."""

from __future__ import annotations

import asyncio

from gateway_scripted_shard import ScriptedShardServer

from gateway.parts import build_shard_pool
from gateway.metrics import GatewayMetrics
from gateway.placement import PlacementRing
from gateway.settings import GatewaySettings
from gateway.shards import ShardPool, StaticDiscovery

KEYS = [f"adapter-{i}@1" for i in range(64)]


async def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_a_shard_restarted_on_a_new_address_gets_its_own_adapters_back():
    servers = [ScriptedShardServer(name).start() for name in ("loraplex-shard-0", "loraplex-shard-1", "loraplex-shard-2")]
    replacement = None
    try:

        async def run():
            nonlocal replacement
            discovery = StaticDiscovery([s.address for s in servers])
            discovery.interval_s = 0.05  # re-read the address list like a DNS refresh
            pool = ShardPool(discovery, PlacementRing(), 0.05, 0.5)
            await pool.start()
            try:
                assert await wait_for(lambda: pool.healthy_shards() == ["loraplex-shard-0", "loraplex-shard-1", "loraplex-shard-2"])
                before = {key: pool.ring.owners(key)[0] for key in KEYS}
                moved_shard = servers[1]
                assert "loraplex-shard-1" in before.values()

                # The pod dies; its replacement has the same name and volume but another address.
                moved_shard.stop()
                assert await wait_for(lambda: "loraplex-shard-1" not in pool.ring)
                replacement = ScriptedShardServer("loraplex-shard-1").start()
                assert replacement.address != moved_shard.address
                discovery.addresses = (servers[0].address, replacement.address, servers[2].address)
                assert await wait_for(lambda: "loraplex-shard-1" in pool.ring)

                after = {key: pool.ring.owners(key)[0] for key in KEYS}
                back = pool.get("loraplex-shard-1")
                views = {view.address: view for view in (s.describe() for s in pool.all())}
                return before, after, back.address, views
            finally:
                await pool.stop()

        before, after, address, views = asyncio.run(run())
        assert after == before
        assert address == replacement.address
        assert views[replacement.address].id == "loraplex-shard-1" and views[replacement.address].healthy
        assert set(views) == {servers[0].address, replacement.address, servers[2].address}
    finally:
        for server in [*servers, *([replacement] if replacement else [])]:
            server.close()


def test_a_second_live_shard_with_the_same_id_stays_out_of_the_ring():
    first, twin = ScriptedShardServer("shard-0").start(), ScriptedShardServer("shard-0").start()
    try:

        async def run():
            pool = ShardPool(StaticDiscovery([first.address, twin.address]), PlacementRing(), 0.05, 0.5)
            await pool.start()
            try:
                await wait_for(lambda: any("already served" in s.last_error for s in pool.all()))
                return pool.healthy_shards(), {s.address: s.describe() for s in pool.all()}
            finally:
                await pool.stop()

        healthy, views = asyncio.run(run())
        assert healthy == ["shard-0"]
        refused = [v for v in views.values() if not v.healthy]
        assert len(refused) == 1 and "'shard-0' is already served by" in refused[0].last_error
    finally:
        first.close()
        twin.close()


def test_shard_metrics_are_labelled_by_shard_id_not_address():
    server = ScriptedShardServer("loraplex-shard-7").start()
    try:
        metrics = GatewayMetrics()
        settings = GatewaySettings.from_mapping({"shard_addresses": [server.address], "health_interval_s": 0.05})

        async def run():
            pool = build_shard_pool(settings, metrics)
            await pool.start()
            try:
                await wait_for(lambda: pool.healthy_shards() == ["loraplex-shard-7"])
                return pool.healthy_shards(), metrics.exposition().decode()
            finally:
                await pool.stop()

        healthy, exposition = asyncio.run(run())
        assert healthy == ["loraplex-shard-7"]
        assert 'loraplex_gateway_shard_healthy{shard="loraplex-shard-7"} 1.0' in exposition
        assert server.address not in exposition
    finally:
        server.close()

