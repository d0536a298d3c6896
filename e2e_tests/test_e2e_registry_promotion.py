"""Issue 4 over real processes: MLflow is the source of truth and live traffic follows it.

Promotions are made the way MLflow's UI makes them (its REST API), never through loraplex code,
so what is tested is what a person clicking in the UI gets. Every test puts `legal`'s champion
back where it found it; the MLflow restart runs last.
"""

from __future__ import annotations

import threading
import time

import httpx
from tests.support.waiting import wait_until


ADAPTER = "legal"
PROMOTION_DEADLINE_S = 5.0  # issue 4: "reaches live traffic within 5 seconds"


def served_version(fs, client: httpx.Client, model: str = ADAPTER, **extra) -> str:
    response = fs.complete(client, model, **extra)
    assert response.status_code == 200, response.text
    return response.headers["x-loraplex-version"]


def test_promotion_through_mlflow_rest_reaches_traffic_within_5s_and_rollback_restores(fault_stack):
    fs = fault_stack
    before = fs.alias_version(ADAPTER, "champion")
    new = fs.publish_variant(ADAPTER, "promoted", lora_alpha_factor=2.0)
    with fs.http() as client:
        assert served_version(fs, client) == before
        try:
            fs.set_alias(ADAPTER, "champion", new)
            promoted_at = time.monotonic()
            seen = wait_until(lambda: served_version(fs, client) == new, PROMOTION_DEADLINE_S, step_s=0.05)
            followed_s = time.monotonic() - promoted_at
            assert seen, f"champion moved to v{new} but answers still came from another version after {followed_s:.1f}s"
            assert followed_s <= PROMOTION_DEADLINE_S
            response = fs.complete(client, ADAPTER)
            assert response.headers["x-loraplex-route"] == "champion"
            assert response.headers["x-loraplex-adapter"] == ADAPTER
        finally:
            # `loraplex adapters rollback` code path: back to the version the UI promotion replaced.
            rolled_back = fs.registry().rollback(ADAPTER)
        assert rolled_back.version == before
        rolled_back_at = time.monotonic()
        assert wait_until(lambda: served_version(fs, client) == before, PROMOTION_DEADLINE_S, step_s=0.05)
        assert time.monotonic() - rolled_back_at <= PROMOTION_DEADLINE_S


def test_corrupt_version_promoted_to_champion_does_not_take_over(fault_stack):
    fs = fault_stack
    good = fs.alias_version(ADAPTER, "champion")
    bad = fs.publish_corrupt_variant(ADAPTER, "corrupt")
    with fs.http() as client:
        assert served_version(fs, client) == good  # the gateway has seen the good version serve
        try:
            fs.set_alias(ADAPTER, "champion", bad)
            assert wait_until(lambda: fs.reload_routing()["adapters"][ADAPTER]["champion"] == bad, PROMOTION_DEADLINE_S)
            for _ in range(6):
                response = fs.complete(client, ADAPTER)
                assert response.status_code == 200, response.text
                assert response.headers["x-loraplex-version"] == good
                assert response.headers["x-loraplex-route"] == "champion"
            with client.stream(
                "POST",
                "/v1/completions",
                json={"model": ADAPTER, "prompt": fs.running.demo_prompt, "max_tokens": 4, "temperature": 0, "stream": True},
                headers=fs.tenant_headers(),
            ) as streamed:
                body = streamed.read().decode()
                assert streamed.status_code == 200, body
                assert streamed.headers["x-loraplex-version"] == good
                assert body.rstrip().endswith("data: [DONE]")
            # Asked for by number, the corrupt version is refused in OpenAI's error shape.
            pinned = fs.complete(client, f"{ADAPTER}@{bad}")
            assert pinned.status_code == 503, pinned.text
            assert pinned.json()["error"]["code"] == "adapter_unavailable"
            assert "corrupt" in pinned.json()["error"]["message"]
            with fs.admin_http() as admin:
                metrics = admin.get("/metrics").text
            assert client.get("/metrics").status_code == 404  # not on the public port
            assert f'loraplex_gateway_version_fallbacks_total{{adapter="{ADAPTER}"}}' in metrics
            fallback = fs.shards_view()["version_fallback"]
            assert fallback["last_good"][ADAPTER] == good and f"{ADAPTER}@{bad}" in fallback["refused"]
        finally:
            fs.set_alias(ADAPTER, "champion", good)
        assert wait_until(lambda: fs.reload_routing()["adapters"][ADAPTER]["champion"] == good, PROMOTION_DEADLINE_S)
        assert served_version(fs, client) == good


def test_mlflow_restarted_while_requests_flow_fails_no_request_for_a_known_adapter(fault_stack):
    fs = fault_stack
    models = ["legal", "clinical", "sql"]
    with fs.http() as client:
        for model in models:  # known = served before the outage (in the shards' caches)
            served_version(fs, client, model)

    outcomes: list[tuple[str, int | str]] = []
    stop = threading.Event()

    def send_requests() -> None:
        with fs.http(timeout_s=60) as client:
            for i in range(2000):  # bounded; the test stops it far sooner
                if stop.is_set():
                    return
                model = models[i % len(models)]
                try:
                    outcomes.append((model, fs.complete(client, model).status_code))
                except httpx.HTTPError as error:
                    outcomes.append((model, repr(error)))

    sender = threading.Thread(target=send_requests, name="requests-during-mlflow-restart")
    sender.start()
    try:
        assert wait_until(lambda: len(outcomes) >= 3, 60)
        fs.stack.mlflow.stop()
        during_outage_from = len(outcomes)
        stale = wait_until(lambda: httpx.get(f"{fs.gateway_url}/readyz", timeout=10).json()["routing_table_stale"], 10)
        assert stale, "the gateway did not report its routing table stale while MLflow was down"
        assert wait_until(lambda: len(outcomes) >= during_outage_from + 3, 60)
        served_during_outage = len(outcomes) - during_outage_from
        fs.stack.mlflow.start()
        restarted_at = len(outcomes)
        assert wait_until(lambda: len(outcomes) >= restarted_at + 3, 60)
    finally:
        stop.set()
        sender.join(timeout=120)
        if not fs.stack.mlflow.is_running():
            fs.stack.mlflow.start()
    assert not sender.is_alive()
    failed = [o for o in outcomes if o[1] != 200]
    assert failed == [], f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    assert served_during_outage >= 3
    assert wait_until(lambda: not httpx.get(f"{fs.gateway_url}/readyz", timeout=10).json()["routing_table_stale"], 15)
