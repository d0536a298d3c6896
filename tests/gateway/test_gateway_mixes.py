"""Ad-hoc mixes (`loraplex_mix` in the OpenAI body) through the gateway over scripted shards: the
shard receives the components pinned through the routing table, the headers say the mix served,
a component the key may not use answers exactly as that model would (403), a bad mix answers 400."""

from __future__ import annotations

import pytest
from gateway_fixtures import ACME_KEY, WILDCARD_KEY, auth

from protos import shard_pb2


def mix_request(*components, **extra) -> dict:
    return {
        "model": "blend",
        "prompt": "a b",
        "max_tokens": 2,
        "loraplex_mix": [{"adapter": name, "weight": weight} for name, weight in components],
        **extra,
    }


def received(shard_servers) -> shard_pb2.GenerateRequest:
    return next(request for server in shard_servers for request in server.servicer.requests)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt": None}),
])
def test_a_mix_is_pinned_sent_and_named_in_the_headers(client, shard_servers, path, body):
    request = {k: v for k, v in {**mix_request(("legal", 0.7), ("clinical@3", -0.3)), **body}.items() if v is not None}
    r = client.post(path, json=request, headers=auth(ACME_KEY))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "blend"  # `model` is only echoed back
    h = r.headers
    assert (h["x-loraplex-adapter"], h["x-loraplex-version"], h["x-loraplex-route"]) == ("mix", "", "mix")
    assert h["x-loraplex-mix"] == "legal@1=0.7 clinical@3=-0.3"  # legal's champion is v1 (its canary gets 0%)
    sent = received(shard_servers)
    assert not sent.adapter.name
    assert [(c.adapter.name, c.adapter.version, c.weight) for c in sent.mix] == [("legal", "1", 0.7), ("clinical", "3", -0.3)]


def test_a_streamed_mix_names_it_too(client):
    r = client.post("/v1/completions", json=mix_request(("legal@2", 1.5), stream=True), headers=auth(ACME_KEY))
    assert r.status_code == 200 and r.headers["x-loraplex-mix"] == "legal@2=1.5"
    assert r.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("component", ["sql", "nope", "sql@1", "nope@4"])
def test_a_component_the_key_may_not_use_answers_as_that_model_would(client, shard_servers, component):
    mixed = client.post("/v1/completions", json=mix_request(("legal", 0.5), (component, 0.5)), headers=auth(ACME_KEY))
    alone = client.post("/v1/completions", json={"model": component, "prompt": "a b"}, headers=auth(ACME_KEY))
    assert mixed.status_code == alone.status_code == 403
    assert mixed.json()["error"] == alone.json()["error"]
    assert "x-loraplex-mix" not in mixed.headers
    assert not any(server.servicer.requests for server in shard_servers)


def test_a_granted_component_without_a_champion_is_404_like_the_model(client):
    r = client.post("/v1/completions", json=mix_request(("legal", 0.5), ("draft", 0.5)), headers=auth(ACME_KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("components, reason", [
    ([("legal", 0.5)] * 2, "appears twice"),
    ([("legal", 0.5), ("legal@1", 0.5)], "appears twice"),  # the champion is v1: the same version
    ([("legal", 0.0)], "weight 0"),
    ([("legal", 1.0), ("clinical", 1.0), ("legal@2", 1.0), ("clinical@4", 1.0), ("shadowed", 1.0)], "at most 4"),
    ([], "at least one"),
    ([("base", 1.0)], "base model"),
])
def test_bad_mixes_answer_400_with_the_reason(client, shard_servers, components, reason):
    r = client.post("/v1/completions", json=mix_request(*components), headers=auth(ACME_KEY))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert reason in error["message"] and error["param"] == "loraplex_mix" and error["code"] == "invalid_mix"
    assert not any(server.servicer.requests for server in shard_servers)


def test_malformed_mix_fields_are_400(client):
    for bad in ([{"adapter": "legal"}], [{"adapter": "legal", "weight": "heavy"}], {"legal": 1}):
        r = client.post("/v1/completions", json={**mix_request(), "loraplex_mix": bad}, headers=auth(ACME_KEY))
        assert r.status_code == 400, r.text


def test_a_shard_refusing_a_mix_answers_503_without_version_fallback(client, shard_servers, parts):
    for server in shard_servers:
        server.servicer.mode = "precondition"
    r = client.post("/v1/completions", json=mix_request(("legal", 0.5), ("clinical", 0.5)), headers=auth(WILDCARD_KEY))
    assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable"
    assert r.headers["x-loraplex-route"] == "mix" and r.headers["x-loraplex-mix"] == "legal@1=0.5 clinical@3=0.5"
    assert parts.service.last_good.snapshot().refused == {}  # a mix is no version: nothing recorded as refused
