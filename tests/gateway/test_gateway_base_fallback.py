"""The fallback policy (`loraplex.fallback`): when an adapter's routed version cannot be served, the
base model answers if the adapter's owner chose `base` - never silently: `x-loraplex-route: fallback`,
a counter and a log line say so. With `none` (the default) the error reaches the client as before."""

from __future__ import annotations

import logging

import grpc
import pytest
from gateway_fixtures import ACME_KEY, LIMITED_KEY, PortClient, auth
from gateway_scripted_shard import ScriptedShardServer, expected_words
from litestar.testing import TestClient

from gateway.app import create_apps
from gateway.routing_source import StaticRoutingSource
from gateway.settings import GatewaySettings

ADMIN_PORT = 8001


@pytest.fixture
def shards(request):
    servers = [ScriptedShardServer(f"f{i}").start() for i in range(getattr(request, "param", 1))]
    yield servers
    for server in servers:
        server.close()


def _gateway(tenants_file, shards, routes):
    settings = GatewaySettings.from_mapping(
        {
            "tenants_file": str(tenants_file),
            "shard_addresses": [s.address for s in shards],
            # Long: a shard marked down by a failed call stays down for the test (no probe re-adds it).
            "health_interval_s": 30,
            "request_timeout_s": 10,
            "admin_port": ADMIN_PORT,
        }
    )
    return create_apps(settings, routing_source=StaticRoutingSource.from_mapping(routes))


def _client(tenants_file, shards, routes) -> TestClient:
    return TestClient(_gateway(tenants_file, shards, routes).by_port())


def _complete(client, model="legal", key=ACME_KEY, **extra):
    return client.post("/v1/completions", json={"model": model, "prompt": "p", "max_tokens": 2, **extra}, headers=auth(key))


def _metrics(client) -> str:
    return PortClient(client, ADMIN_PORT).get("/metrics").text


def _refuse(server: ScriptedShardServer, adapter: str, version: str, code=grpc.StatusCode.FAILED_PRECONDITION) -> None:
    server.servicer.faults[(adapter, version)] = code


class _Warnings(logging.Handler):
    """The messages logged on one logger (on it directly: the app's logging setup replaces the root's handlers)."""

    def __init__(self, logger: str):
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger(logger), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _Warnings:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


def test_refused_champion_with_fallback_base_is_answered_by_the_base_model(tenants_file, shards):
    _refuse(shards[0], "legal", "2")
    with _client(tenants_file, shards, {"legal": {"champion": "2", "fallback": "base"}}) as client:
        with _Warnings("gateway.completions") as warnings:
            response = _complete(client)
        assert response.status_code == 200, response.text
        assert response.headers["x-loraplex-route"] == "fallback"
        assert (response.headers["x-loraplex-adapter"], response.headers["x-loraplex-version"]) == ("base", "")
        assert response.json()["choices"][0]["text"] == "".join(expected_words("", "", 2))
        assert response.json()["model"] == "legal"  # what was asked for; the headers say what answered
        assert any("legal@2 cannot be served (refused" in message for message in warnings.messages)
        # A tenant granted the adapter but not the base model gets the fallback too: the owner's choice.
        limited = _complete(client, key=LIMITED_KEY)
        assert limited.status_code == 200 and limited.headers["x-loraplex-route"] == "fallback"
        assert _complete(client, model="base", key=LIMITED_KEY).status_code == 403
        # A pinned version is what the client asked for by name: its refusal is not papered over.
        pinned = _complete(client, model="legal@2")
        assert pinned.status_code == 503 and pinned.json()["error"]["code"] == "adapter_unavailable"
        metrics = _metrics(client)
        assert 'loraplex_gateway_base_fallbacks_total{adapter="legal",reason="refused"} 2.0' in metrics
        assert 'loraplex_gateway_requests_total{adapter="base",assignment="fallback",endpoint="/v1/completions",status="200"} 2.0' in metrics


def test_fallback_none_keeps_the_error(tenants_file, shards):
    _refuse(shards[0], "legal", "2")
    _refuse(shards[0], "clinical", "3")
    routes = {"legal": {"champion": "2", "fallback": "none"}, "clinical": "3"}  # explicit, and the default
    with _client(tenants_file, shards, routes) as client:
        for model in ("legal", "clinical"):
            response = _complete(client, model=model)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "adapter_unavailable"
        assert "loraplex_gateway_base_fallbacks_total{" not in _metrics(client)
        assert [r.adapter.name for r in shards[0].servicer.requests] == ["legal", "clinical"]  # no base call


def test_the_last_good_version_comes_before_the_base_model(tenants_file, shards):
    apps = _gateway(tenants_file, shards, {"legal": {"champion": "1", "fallback": "base"}})
    source = apps.parts.routing_source
    _refuse(shards[0], "legal", "2")
    with TestClient(apps.by_port()) as client:
        assert _complete(client).headers["x-loraplex-version"] == "1"
        source.replace(StaticRoutingSource.from_mapping({"legal": {"champion": "2", "fallback": "base"}}).current())
        response = _complete(client)
        assert (response.headers["x-loraplex-route"], response.headers["x-loraplex-version"]) == ("champion", "1")
        _refuse(shards[0], "legal", "1")  # now every version is unloadable
        source.replace(StaticRoutingSource.from_mapping({"legal": {"champion": "1", "fallback": "base"}}).current())
        response = _complete(client)
        assert response.status_code == 200 and response.headers["x-loraplex-route"] == "fallback"


@pytest.mark.parametrize("shards", [3], indirect=True)
def test_shards_down_fall_back_to_the_base_model_on_a_shard_that_is_up(tenants_file, shards):
    routes = {"legal": {"champion": "1", "fallback": "base"}}
    apps = _gateway(tenants_file, shards, routes)
    with TestClient(apps.by_port()) as client:
        by_id = {s.shard_id: s for s in shards}
        ring_order = apps.parts.pool.candidates("legal@1")
        for shard_id in ring_order[:2]:  # the two shards the adapter's request tries die
            by_id[shard_id].servicer.mode = "fail_before_first"
        response = _complete(client, stream=True)
        assert response.status_code == 200, response.text
        assert response.headers["x-loraplex-route"] == "fallback"
        assert response.headers["x-loraplex-shard"] == ring_order[2]
        assert "base@base:0" in response.text and response.text.rstrip().endswith("data: [DONE]")
        assert 'loraplex_gateway_base_fallbacks_total{adapter="legal",reason="shards_down"} 1.0' in _metrics(client)


def test_streamed_refusal_falls_back_before_any_byte_is_sent(tenants_file, shards):
    _refuse(shards[0], "legal", "2")
    with _client(tenants_file, shards, {"legal": {"champion": "2", "fallback": "base"}}) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "legal", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True},
            headers=auth(ACME_KEY),
        )
        assert response.status_code == 200, response.text
        assert (response.headers["x-loraplex-route"], response.headers["x-loraplex-adapter"]) == ("fallback", "base")
        assert "base@base:0" in response.text and response.text.rstrip().endswith("data: [DONE]")
        assert 'loraplex_gateway_base_fallbacks_total{adapter="legal",reason="refused"} 1.0' in _metrics(client)


def test_static_route_fallback_is_validated():
    with pytest.raises(ValueError, match="fallback must be one of none, base"):
        StaticRoutingSource.from_mapping({"legal": {"champion": "1", "fallback": "yes"}})
    assert StaticRoutingSource.from_mapping({"legal": "1"}).current().route("legal").fallback == "none"

