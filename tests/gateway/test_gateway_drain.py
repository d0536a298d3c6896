"""Rollouts that do not cut answers: a SIGTERM'd gateway turns readiness off, refuses new requests
with 503 + Retry-After, lets every in-flight stream finish, then exits - in one process and with
several workers (`python -m gateway`, real processes, over scripted gRPC shards)."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
import yaml
from gateway_fixtures import ACME_KEY, ROUTES, auth, start_gateway_process, stop_process_group, wait_until
from gateway_scripted_shard import expected_words

from gateway.settings import GatewaySettings, SettingsError

STREAMS = 6
TOKENS = 48
TOKEN_S = 0.15  # each stream lasts ~7 s: longer than uvicorn's usual 5-second shutdown grace


def test_drain_grace_covers_the_request_timeout_by_default_and_a_shorter_one_is_refused():
    settings = GatewaySettings.from_mapping({"request_timeout_s": 120})
    assert settings.drain_grace() == 125 and settings.shutdown_budget() == 2 + 125 + 5
    assert GatewaySettings.from_mapping({"request_timeout_s": 60, "drain_grace_s": 90}).drain_grace() == 90
    with pytest.raises(SettingsError, match=r"drain_grace_s \(5\) is shorter than request_timeout_s \(120\)"):
        GatewaySettings.from_mapping({"drain_grace_s": 5})
    with pytest.raises(SettingsError, match="drain_delay_s"):
        GatewaySettings.from_mapping({"drain_delay_s": -1})
    with pytest.raises(SettingsError, match="stream_write_timeout_s"):
        GatewaySettings.from_mapping({"stream_write_timeout_s": 0})


def test_a_draining_gateway_is_not_ready_and_refuses_new_requests(client, admin_client, parts):
    assert client.get("/readyz").status_code == 200
    parts.drain.begin()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["draining"] is True and ready.json()["healthy_shards"]
    r = client.post("/v1/completions", json={"model": "legal", "prompt": "x"}, headers=auth(ACME_KEY))
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
    assert admin_client.get("/healthz").status_code == 200  # alive: the liveness probe must not restart it


def _stream(url: str, prompt: str, first_event: threading.Event, results: dict) -> None:
    body = {"model": "legal", "prompt": prompt, "max_tokens": TOKENS, "stream": True}
    events: list = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth(ACME_KEY), timeout=30) as r:
            results[prompt] = {"status": r.status_code, "events": events}
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_event.set()
    except httpx.HTTPError as exc:
        results[prompt] = {"status": None, "events": events, "error": repr(exc)}
    first_event.set()


@pytest.fixture
def slow_shards(shard_servers):
    for server in shard_servers:
        server.servicer.mode, server.servicer.slow_s = "slow", TOKEN_S
    return shard_servers


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_mid_stream_finishes_every_stream_and_refuses_new_requests(workers, tmp_path, tenants_file, slow_shards, request):
    settings = {
        "port": 0,
        "admin_port": 0,
        "tenants_file": str(tenants_file),
        "shard_addresses": [s.address for s in slow_shards],
        "static_routes": ROUTES,
        "health_interval_s": 0.2,
        "health_timeout_s": 2.0,  # a loaded CI machine must not flap the shards out of the ring
        "request_timeout_s": 20,
        "drain_delay_s": 3.0,
    }
    if workers > 1:
        redis = request.getfixturevalue("redis_server")
        settings.update(workers=workers, redis_url=redis.url)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"gateway": settings}))
    proc, urls = start_gateway_process(config)
    try:
        assert wait_until(lambda: httpx.get(f"{urls.api}/readyz", timeout=5).status_code == 200, timeout_s=20)
        results: dict = {}
        firsts = [threading.Event() for _ in range(STREAMS)]
        threads = [threading.Thread(target=_stream, args=(urls.api, f"p{i}", firsts[i], results)) for i in range(STREAMS)]
        for thread in threads:
            thread.start()
        assert all(first.wait(15) for first in firsts)
        # As Kubernetes and docker stop do: SIGTERM to the main process only.
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # With workers the supervisor passes the signal on at its next tick (every 0.5 s).
        draining = lambda: httpx.get(f"{urls.api}/readyz", timeout=5).json()["draining"]  # noqa: E731
        assert wait_until(lambda: all(draining() for _ in range(workers * 3)), timeout_s=3)
        refused = httpx.post(f"{urls.api}/v1/completions", json={"model": "legal", "prompt": "late"}, headers=auth(ACME_KEY), timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"] == "1"

        for thread in threads:
            thread.join(30)
        words = "".join(expected_words("legal", "1", TOKENS))
        for i in range(STREAMS):
            answer = results[f"p{i}"]
            assert answer["status"] == 200 and answer["events"][-1] == "[DONE]", answer
            chunks = [json.loads(e) for e in answer["events"][:-1]]
            assert "".join(c["choices"][0]["text"] for c in chunks) == words
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) is not None
        # It waited for the streams (~7 s each) and the delay, not the whole grace (25 s).
        assert time.monotonic() - signalled < 20
        assert sum(s.servicer.cancelled for s in slow_shards) == 0
    finally:
        stop_process_group(proc)
