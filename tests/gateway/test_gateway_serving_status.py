"""Serving status: how a version's status is derived from what the gateway saw, which versions a
cycle looks at (bounded, taking turns), and the pieces processes share through a real Valkey - the
writer's lease and its handover, the refusals, the shadow totals."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.serving_status import LocalRefusals, RefusalsSeen, SharedRefusals, SharedWriterLease
from gateway.shadow import LocalShadowAggregates, ShadowPair, SharedShadowAggregates
from loraplex.routing_table import AdapterRoute, RoutingTable
from loraplex.serving_status import (
    MAX_REASON_CHARS,
    NOT_LOADED,
    SERVING,
    TAG_RESIDENT,
    TAG_SHADOW,
    TAG_STATUS,
    Refusal,
    Residency,
    VersionSelection,
    derive_status,
    shadow_summary,
    statuses_for,
)
from loraplex.stack.ports import free_port

REASON = "legal v4 artifacts are corrupt: folder sha256 3f2a… differs from the published 9b1c…"


# ---- deriving a status ----------------------------------------------------------------------

def test_a_version_a_healthy_shard_holds_is_serving_and_says_where_sorted():
    status = derive_status("legal", "3", [Residency("shard-1", "host"), Residency("shard-0", "device")], None)
    assert status.tags() == {TAG_STATUS: SERVING, TAG_RESIDENT: "shard-0:device, shard-1:host"}


def test_a_refused_version_no_shard_holds_shows_the_reason():
    status = derive_status("legal", "4", [], Refusal(REASON, 100.0))
    assert status.status == f"refused: {REASON}"
    assert status.resident == "none"


def test_a_version_that_loaded_since_its_refusal_is_serving():
    status = derive_status("legal", "4", [Residency("shard-0", "disk")], Refusal(REASON, 100.0))
    assert (status.status, status.resident) == (SERVING, "shard-0:disk")


def test_a_version_no_shard_holds_and_none_refused_is_not_loaded():
    assert derive_status("legal", "2", [], None).tags() == {TAG_STATUS: NOT_LOADED, TAG_RESIDENT: "none"}


def test_a_long_or_multiline_reason_becomes_one_bounded_line():
    status = derive_status("legal", "4", [], Refusal("first line\n" + "x" * 2000, 1.0)).status
    assert "\n" not in status
    assert len(status) == len("refused: ") + MAX_REASON_CHARS
    assert status.endswith("…")
    assert derive_status("legal", "4", [], Refusal("  ", 1.0)).status == "refused: no reason given"


def test_the_shadow_summary_is_a_tag_only_once_there_are_pairs():
    aggregate = {
        "shadow_pairs": 40.0, "shadow_exact_match_rate": 0.825, "shadow_token_agreement": 0.9125,
        "shadow_primary_latency_ms": 100.0, "shadow_latency_ms": 112.0,
    }
    assert shadow_summary(aggregate) == "40 pairs vs champion: 82% same text, token agreement 0.91, latency x1.12"
    assert derive_status("legal", "5", [], None, aggregate).tags()[TAG_SHADOW] == shadow_summary(aggregate)
    assert shadow_summary({"shadow_pairs": 0.0}) is None
    # No comparison: the tag is left alone (an earlier summary stays the evidence on the version).
    assert TAG_SHADOW not in derive_status("legal", "5", [], None, {"shadow_pairs": 0.0}).tags()


def test_statuses_for_a_batch_use_each_versions_own_observations():
    batch = [("legal", "3"), ("legal", "4"), ("sql", "1")]
    statuses = statuses_for(batch, {("legal", "3"): [Residency("s0", "device")]}, {("legal", "4"): Refusal(REASON, 1.0)}, {})
    assert [s.status for s in statuses] == [SERVING, f"refused: {REASON}", NOT_LOADED]


# ---- which versions a cycle looks at ------------------------------------------------------------

def _table(**routes: AdapterRoute) -> RoutingTable:
    return RoutingTable(adapters=routes, fetched_unix=1.0)


def test_a_cycle_looks_at_alias_targets_resident_refused_and_tagged_versions_only():
    table = _table(legal=AdapterRoute("legal", "3", canary="4", shadow="5"), sql=AdapterRoute("sql", None))
    batch = VersionSelection(100).next_batch(
        table, resident=[("clinical", "2"), ("clinical", "local")], refused=[("legal", "6")], tagged=[("legal", "1")]
    )
    # `local` is a shard serving a folder, not a registry version: it has no page to write on.
    assert batch == [("clinical", "2"), ("legal", "1"), ("legal", "3"), ("legal", "4"), ("legal", "5"), ("legal", "6")]


def test_past_the_limit_cycles_take_turns_so_every_version_is_visited_and_each_cycle_stays_bounded():
    table = _table(**{f"a{i:05d}": AdapterRoute(f"a{i:05d}", "1", canary="2") for i in range(10_000)})
    selection = VersionSelection(250)
    seen: set[tuple[str, str]] = set()
    for _ in range(80):  # 20,000 versions, 250 a cycle
        batch = selection.next_batch(table)
        assert len(batch) == 250
        seen.update(batch)
    assert len(seen) == 20_000
    assert selection.next_batch(table)[0] == ("a00000", "1")  # and round again


# ---- refusals seen by a process ------------------------------------------------------------------

def test_refusals_seen_are_handed_over_once():
    seen = RefusalsSeen()
    seen.record("legal", "4", "champion", REASON)
    seen.record("legal", "4", "canary", REASON)
    taken = seen.take()
    assert list(taken) == [("legal", "4")] and taken[("legal", "4")].reason == REASON
    assert seen.take() == {}


def test_local_refusals_forget_the_oldest_past_their_bound():
    async def scenario():
        refusals = LocalRefusals(max_entries=2)
        for version in ("1", "2", "3"):
            await refusals.add({("legal", version): Refusal(REASON, float(version))})
        assert sorted(await refusals.read()) == [("legal", "2"), ("legal", "3")]
        await refusals.forget([("legal", "2")])
        assert list(await refusals.read()) == [("legal", "3")]

    asyncio.run(scenario())


# ---- shared through a real Valkey ----------------------------------------------------------------

def _client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def test_one_writer_holds_the_lease_and_a_live_one_takes_over_when_it_stops_renewing(redis_server):
    async def scenario():
        key = f"test:writer:{uuid.uuid4().hex}"
        first_client, second_client = _client(redis_server.url), _client(redis_server.url)
        try:
            first = SharedWriterLease(first_client, lease_s=0.6, key=key, holder="gateway-a")
            second = SharedWriterLease(second_client, lease_s=0.6, key=key, holder="gateway-b")
            assert await first.hold()
            assert not await second.hold()
            # The holder renews each cycle: the lease never lapses while it lives.
            for _ in range(4):
                await asyncio.sleep(0.3)
                assert await first.hold()
                assert not await second.hold()
            # The holder dies (stops renewing): the other takes over once the lease expires, not before.
            died = time.monotonic()
            while not await second.hold():
                await asyncio.sleep(0.05)
            assert 0.3 <= time.monotonic() - died <= 2.0
            assert not await first.hold()  # the old writer, if it comes back, is not a second writer
            # A writer that stops cleanly hands over at once.
            await second.release()
            assert await first.hold()
            await second.release()  # not the holder: releases nothing
            assert not await second.hold()
        finally:
            await first_client.aclose()
            await second_client.aclose()

    asyncio.run(scenario())


def test_while_the_store_is_unreachable_no_process_writes():
    async def scenario():
        client = _client(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
        try:
            assert not await SharedWriterLease(client, lease_s=1.0).hold()
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_refusals_seen_by_one_process_are_read_by_another(redis_server):
    async def scenario():
        key = f"test:refused:{uuid.uuid4().hex}"
        one, other = _client(redis_server.url), _client(redis_server.url)
        try:
            await SharedRefusals(one, key=key, ttl_s=600).add({("legal", "4"): Refusal(REASON, 10.0), ("sql", "2"): Refusal("wrong base", 11.0)})
            assert 0 < await one.ttl(key) <= 600  # forgotten a while after the last refusal
            reader = SharedRefusals(other, key=key, max_entries=1)
            # Past its bound the oldest is forgotten.
            assert await reader.read() == {("sql", "2"): Refusal("wrong base", 11.0)}
            await reader.forget([("sql", "2")])
            assert await SharedRefusals(one, key=key).read() == {}
        finally:
            await one.delete(key)
            await one.aclose()
            await other.aclose()

    asyncio.run(scenario())


def _pair(adapter: str, version: str, exact: bool, agreement: float) -> ShadowPair:
    return ShadowPair("r", "acme", adapter, "1", version, "a", "b", exact, agreement, 100.0, 120.0, 0.0)


def test_shadow_totals_are_read_back_as_merged_by_every_process(redis_server):
    async def scenario():
        one, other = _client(redis_server.url), _client(redis_server.url)
        prefix = f"test:shadow:{uuid.uuid4().hex}"
        try:
            await SharedShadowAggregates(one, key_prefix=prefix).add(_pair("legal", "5", True, 1.0))
            await SharedShadowAggregates(other, key_prefix=prefix).add(_pair("legal", "5", False, 0.5))
            merged = await SharedShadowAggregates(one, key_prefix=prefix).get("legal", "5")
            assert merged.metrics() == {
                "shadow_pairs": 2.0, "shadow_exact_match_rate": 0.5, "shadow_token_agreement": 0.75,
                "shadow_primary_latency_ms": 100.0, "shadow_latency_ms": 120.0,
            }
            assert await SharedShadowAggregates(one, key_prefix=prefix).get("legal", "6") is None
        finally:
            await one.delete(f"{prefix}:{{legal}}:5")
            await one.aclose()
            await other.aclose()

    asyncio.run(scenario())


def test_local_shadow_totals_are_read_back():
    async def scenario():
        aggregates = LocalShadowAggregates()
        await aggregates.add(_pair("legal", "5", True, 1.0))
        assert (await aggregates.get("legal", "5")).pairs == 1
        assert await aggregates.get("legal", "6") is None

    asyncio.run(scenario())


@pytest.mark.parametrize("settings, message", [
    ({"serving_status_interval_s": -1}, "serving_status_interval_s"),
    ({"serving_status_batch": 0}, "serving_status_batch"),
    ({"serving_status_interval_s": 5, "serving_status_lease_s": 5}, "serving_status_lease_s"),
])
def test_serving_status_settings_are_checked(settings, message):
    from gateway.settings import GatewaySettings, SettingsError

    with pytest.raises(SettingsError, match=message):
        GatewaySettings.from_mapping(settings)


# ---- what the gateway gathers, from scripted shards over gRPC ----------------------------------

def test_refusals_reach_the_status_with_the_shards_reason_from_requests_and_shadow_copies(shard_servers):
    import grpc

    from gateway.dispatch import Dispatcher, GenerationJob
    from gateway.errors import VersionRefused
    from gateway.placement import PlacementRing
    from gateway.routing import VersionChoice
    from gateway.shadow import ShadowMode, ShadowRecorder
    from gateway.shards import ShardPool, StaticDiscovery
    from gateway.version_fallback import LastGoodVersions

    for server in shard_servers:
        server.servicer.faults[("legal", "4")] = grpc.StatusCode.FAILED_PRECONDITION
        server.servicer.faults[("legal", "5")] = grpc.StatusCode.FAILED_PRECONDITION

    async def run():
        pool = ShardPool(StaticDiscovery([s.address for s in shard_servers]), PlacementRing(), 0.1, 0.5)
        await pool.start()
        seen = RefusalsSeen()
        try:
            dispatcher = Dispatcher(pool, 10.0)
            # A request for a refused version: the completion service hands the refusal to LastGoodVersions.
            job = GenerationJob("r1", "legal", "4", prompt="p", max_tokens=2)
            with pytest.raises(VersionRefused) as refused:
                await dispatcher.generate(job, "legal@4")
            LastGoodVersions(on_refused=seen.record).after_refusal(VersionChoice("legal@4", "legal", "4", "pinned"), refused.value.details)
            # A shadow copy of a request sent to a refused shadow version.
            shadow = ShadowMode(dispatcher, ShadowRecorder(), sample_share=1.0, on_refused=seen.record)
            primary = asyncio.get_running_loop().create_future()
            primary.set_result(await dispatcher.generate(GenerationJob("r2", "legal", "3", prompt="p", max_tokens=2), "legal"))
            assert shadow.maybe_start(GenerationJob("r2", "legal", "3", prompt="p", max_tokens=2), "5", "acme", primary)
            await shadow.drain()
            return seen.take()
        finally:
            await pool.stop()

    taken = asyncio.run(run())
    assert set(taken) == {("legal", "4"), ("legal", "5")}
    assert all("scripted FAILED_PRECONDITION for legal" in refusal.reason for refusal in taken.values())


def test_residency_is_every_version_each_healthy_shard_lists(shard_servers):
    from gateway.placement import PlacementRing
    from gateway.serving_status import gather_residency
    from gateway.shards import ShardPool, StaticDiscovery

    shard_servers[0].servicer.loaded.update({("legal", "3"): False, ("sql", "1"): True})
    shard_servers[1].servicer.loaded.update({("legal", "3"): False})

    async def run():
        pool = ShardPool(StaticDiscovery([s.address for s in shard_servers]), PlacementRing(), 0.1, 0.5)
        await pool.start()
        try:
            return await gather_residency(pool, 2.0)
        finally:
            await pool.stop()

    residency = asyncio.run(run())
    first, second = (s.servicer.name for s in shard_servers)
    assert sorted(residency[("legal", "3")], key=lambda r: r.shard) == [Residency(first, "device"), Residency(second, "device")]
    assert residency[("sql", "1")] == [Residency(first, "device")]
