"""Shadow aggregates of several gateway processes merge in the shared store (a real Valkey server):
every pair counts once, and each MLflow step is logged by exactly one process."""

from __future__ import annotations

import asyncio
import uuid

from gateway.shadow import ShadowLog, ShadowPair, ShadowRecorder, SharedShadowAggregates
from gateway.shared_store import connect
from loraplex.stack.ports import free_port


def pair(adapter: str, i: int) -> ShadowPair:
    exact = i % 2 == 0
    return ShadowPair(f"r{i}", "acme", adapter, "1", "2", "a", "a" if exact else "b", exact, 1.0 if exact else 0.0, 10.0, 30.0, 0.0)


def test_two_processes_merge_aggregates_and_never_log_the_same_step(redis_server):
    adapter = f"legal-{uuid.uuid4().hex[:8]}"

    async def scenario():
        clients = [connect(redis_server.url, 5.0) for _ in range(2)]
        logged: list[tuple[str, int, str]] = []
        recorders = [
            ShadowRecorder(
                None,
                on_aggregate=lambda a, v, m, who=who: logged.append((who, int(m["shadow_pairs"]), f"{a}@{v}")),
                aggregate_every=2,
                aggregates=SharedShadowAggregates(client),
            )
            for who, client in zip("xy", clients)
        ]
        try:
            await asyncio.gather(*(recorders[i % 2].record(pair(adapter, i)) for i in range(10)))
        finally:
            for client in clients:
                await client.aclose()
        return recorders, logged

    recorders, logged = asyncio.run(scenario())
    steps = sorted(step for _, step, _ in logged)
    assert steps == [2, 4, 6, 8, 10] and {key for *_, key in logged} == {f"{adapter}@2"}
    newest = max((r.aggregates(adapter)[f"{adapter}@2"] for r in recorders), key=lambda m: m["shadow_pairs"])
    assert newest == {
        "shadow_pairs": 10.0,
        "shadow_exact_match_rate": 0.5,
        "shadow_token_agreement": 0.5,
        "shadow_primary_latency_ms": 10.0,
        "shadow_latency_ms": 30.0,
    }


def test_pairs_are_still_recorded_while_the_store_is_down(tmp_path):
    async def scenario():
        client = connect(f"redis://127.0.0.1:{free_port()}/0")
        logged = []
        recorder = ShadowRecorder(ShadowLog(tmp_path / "pairs.jsonl", 1 << 20, 1), on_aggregate=lambda *a: logged.append(a), aggregate_every=1, aggregates=SharedShadowAggregates(client))
        try:
            await recorder.record(pair("legal", 0))
        finally:
            await client.aclose()
        return recorder, logged

    recorder, logged = asyncio.run(scenario())
    assert len(recorder.recent("legal")) == 1 and (tmp_path / "pairs.jsonl").read_text().count("\n") == 1
    assert logged == [] and recorder.aggregates() == {}
