"""Restarts during outages, over real processes with the real MLflow stopped (its process group).

- A shard restarted while MLflow is down serves every version it had cached on disk: its download
  cache and version index survive the restart, each folder checked against its content address.
- A gateway restarted while a champion is refused serves the last version that served: from its
  serving record with MLflow down (the routing table too comes from the record), and from the
  champion history tag with MLflow up and no record.

Each test puts MLflow, the processes and the aliases back as it found them.
"""

from __future__ import annotations

import httpx

from loraplex.stack.local_stack import gateway_is_ready
from tests.support.waiting import wait_until

RECORD_FILE = "gateway-serving-record.json"


def greedy(fs, client: httpx.Client, model: str, max_tokens: int = 8) -> httpx.Response:
    return fs.complete(client, model, max_tokens=max_tokens)


def restart_gateway(fs, timeout_s: float = 120.0) -> None:
    fs.stack.gateway.stop()
    fs.stack.gateway.start()
    fs.stack.gateway.wait_until(lambda: _ready(fs), timeout_s)


def _ready(fs) -> bool:
    try:
        return gateway_is_ready(fs.gateway_url)
    except httpx.HTTPError:
        return False


def wait_both_shards_in_ring(fs) -> None:
    for shard_id in fs.stack.shards:
        assert fs.wait_in_ring(shard_id, True, 60), f"{shard_id} did not join the ring"


def test_shards_restarted_while_mlflow_is_down_serve_every_version_they_had_cached(fault_stack):
    fs = fault_stack
    extra = fs.publish_variant("legal", "cached-offline", lora_alpha_factor=1.5)
    models = ["legal", "clinical", "sql", f"legal@{extra}"]
    with fs.http() as client:
        before = {}
        for model in models:
            response = greedy(fs, client, model)
            assert response.status_code == 200, response.text
            before[model] = (response.headers["x-loraplex-version"], response.json()["choices"][0]["text"])
    fs.stack.mlflow.stop()
    try:
        for shard_id, process in fs.stack.shards.items():  # one at a time, as a rolling restart would
            process.kill()
            fs.restart_shard(shard_id)
        wait_both_shards_in_ring(fs)
        with fs.http() as client:
            for model in models:
                response = greedy(fs, client, model)
                assert response.status_code == 200, f"{model}: {response.text}"
                after = (response.headers["x-loraplex-version"], response.json()["choices"][0]["text"])
                assert after == before[model], f"{model} answered differently from its disk cache"
        logs = [(fs.running.state_dir / "logs" / f"{shard_id}.log").read_text() for shard_id in fs.stack.shards]
        assert any("MLflow unreachable: serving" in log for log in logs)  # from the disk cache, not memory
    finally:
        if not fs.stack.mlflow.is_running():
            fs.stack.mlflow.start()


def test_gateway_restarted_while_the_champion_is_refused_serves_the_last_good_version(fault_stack):
    fs = fault_stack
    adapter = "clinical"
    good = fs.alias_version(adapter, "champion")
    bad = fs.publish_corrupt_variant(adapter, "restart-corrupt")
    record = fs.running.state_dir / RECORD_FILE
    with fs.http() as client:
        assert greedy(fs, client, adapter).headers["x-loraplex-version"] == good
    try:
        fs.set_alias(adapter, "champion", bad)  # as the MLflow UI moves it
        assert wait_until(lambda: fs.reload_routing()["adapters"][adapter]["champion"] == bad, 10)
        with fs.http() as client:
            assert greedy(fs, client, adapter).headers["x-loraplex-version"] == good  # refused: falls back

        # 1. MLflow down, the gateway restarted: its record gives the table and the last good version.
        fs.stack.mlflow.stop()
        try:
            restart_gateway(fs)
            assert httpx.get(f"{fs.gateway_url}/readyz", timeout=10).json()["routing_table_stale"] is True
            wait_both_shards_in_ring(fs)
            with fs.http() as client:
                for stream in (False, True):
                    response = fs.complete(client, adapter, max_tokens=4, stream=stream)
                    assert response.status_code == 200, response.text
                    assert (response.headers["x-loraplex-version"], response.headers["x-loraplex-route"]) == (good, "champion")
        finally:
            fs.stack.mlflow.start()

        # 2. MLflow up, no record (a fresh pod): the champion history tag names the version.
        record.unlink()
        restart_gateway(fs)
        wait_both_shards_in_ring(fs)
        with fs.http() as client:
            response = greedy(fs, client, adapter)
            assert response.status_code == 200, response.text
            assert (response.headers["x-loraplex-version"], response.headers["x-loraplex-route"]) == (good, "champion")
    finally:
        if not fs.stack.mlflow.is_running():
            fs.stack.mlflow.start()
        fs.set_alias(adapter, "champion", good)
        assert wait_until(lambda: fs.reload_routing()["adapters"][adapter]["champion"] == good, 10)
