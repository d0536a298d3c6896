"""HTTP behaviour of the gateway app over scripted shards (real gRPC on 127.0.0.1)."""

from __future__ import annotations

import json

from gateway_fixtures import ACME_KEY, ADMIN_KEY, LIMITED_KEY, WILDCARD_KEY, auth, wait_until
from gateway_scripted_shard import expected_words

ERROR_KEYS = {"message", "type", "param", "code"}


def _owner(parts, key: str, shard_servers):
    shard_id = parts.pool.candidates(key)[0]
    return next(s for s in shard_servers if s.shard_id == shard_id), shard_id


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == ERROR_KEYS
    assert r.headers["x-request-id"]
    return body["error"]


def _events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completion_headers_and_body(client, shard_servers):
    r = client.post("/v1/completions", json={"model": "legal", "prompt": "a b", "max_tokens": 3}, headers=auth(ACME_KEY))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "legal"
    assert body["choices"][0]["text"] == "".join(expected_words("legal", "1", 3))
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    h = r.headers
    assert (h["x-loraplex-adapter"], h["x-loraplex-version"], h["x-loraplex-route"]) == ("legal", "1", "champion")
    assert h["x-loraplex-shard"] in {s.shard_id for s in shard_servers}
    assert body["id"].endswith(h["x-request-id"])


def test_pinned_and_base_routes(client):
    r = client.post("/v1/completions", json={"model": "legal@2", "prompt": "x", "max_tokens": 2}, headers=auth(ACME_KEY))
    assert r.headers["x-loraplex-route"] == "pinned" and r.json()["choices"][0]["text"].startswith("legal@2:0")
    r = client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2}, headers=auth(ACME_KEY))
    assert r.headers["x-loraplex-route"] == "base" and r.json()["choices"][0]["text"].startswith("base@base:0")


def test_streaming_matches_non_streaming_and_reports_usage(client, shard_servers):
    req = {"model": "clinical", "prompt": "q", "max_tokens": 4}
    plain = client.post("/v1/completions", json=req, headers=auth(ACME_KEY)).json()["choices"][0]["text"]
    # Nobody reads a non-streamed answer as it is generated: the shard is asked for the whole of it.
    assert [req for s in shard_servers for req in s.servicer.requests][-1].stream_interval == 4
    r = client.post("/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}}, headers=auth(ACME_KEY))
    assert [req for s in shard_servers for req in s.servicer.requests][-1].stream_interval == 1
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-loraplex-version"] == "3" and r.headers["x-loraplex-shard"]
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_chat_sends_messages_and_streams_chunks(client, shard_servers):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.post("/v1/chat/completions", json={"model": "legal", "messages": msgs, "max_tokens": 2}, headers=auth(ACME_KEY))
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    sent = [req for s in shard_servers for req in s.servicer.requests][-1]
    assert [(m.role, m.content) for m in sent.messages] == [("system", "be brief"), ("user", "hi there")] and not sent.prompt
    r = client.post("/v1/chat/completions", json={"model": "legal", "messages": msgs, "max_tokens": 2, "stream": True}, headers=auth(ACME_KEY))
    events = _events(r.text)
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == body["choices"][0]["message"]["content"] and events[-2]["choices"][0]["finish_reason"] == "length"


def test_models_lists_only_granted(client):
    ids = [m["id"] for m in client.get("/v1/models", headers=auth(ACME_KEY)).json()["data"]]
    assert {"legal", "legal@1", "legal@2", "clinical", "base"} <= set(ids) and "sql" not in ids
    assert [m["id"] for m in client.get("/v1/models", headers=auth(LIMITED_KEY)).json()["data"]] == ["legal", "legal@1", "legal@2"]


def test_auth_and_grant_errors(client):
    assert _error(client.post("/v1/completions", json={"model": "legal", "prompt": "x"}), 401)["code"] == "invalid_api_key"
    _error(client.post("/v1/completions", json={"model": "legal", "prompt": "x"}, headers=auth("wrong")), 401)
    _error(client.get("/v1/models", headers={"authorization": "Basic abc"}), 401)
    forbidden = _error(client.post("/v1/completions", json={"model": "sql", "prompt": "x"}, headers=auth(ACME_KEY)), 403)
    unknown = _error(client.post("/v1/completions", json={"model": "nonexistent", "prompt": "x"}, headers=auth(ACME_KEY)), 403)
    assert forbidden["message"].replace("sql", "M") == unknown["message"].replace("nonexistent", "M")
    _error(client.post("/v1/completions", json={"model": "nonexistent", "prompt": "x"}, headers=auth(WILDCARD_KEY)), 403)
    assert _error(client.post("/v1/completions", json={"model": "draft", "prompt": "x"}, headers=auth(ACME_KEY)), 404)["code"] == "model_not_found"


def test_bad_input_statuses(client):
    h = auth(ACME_KEY)
    assert _error(client.post("/v1/completions", json={"model": "legal"}, headers=h), 400)["type"] == "invalid_request_error"
    _error(client.post("/v1/completions", json={"model": "legal", "prompt": "x", "temperature": 9}, headers=h), 400)
    _error(client.post("/v1/completions", content=b"{not json", headers={**h, "content-type": "application/json"}), 400)
    assert _error(client.post("/v1/completions", json={"model": "legal", "prompt": "x", "max_tokens": 65}, headers=h), 400)["param"] == "max_tokens"
    _error(client.post("/v1/completions", json={"model": "legal", "prompt": "x" * 1001}, headers=h), 400)
    _error(client.post("/v1/completions", json={"model": "legal", "prompt": "x", "n": 2}, headers=h), 400)
    _error(client.post("/v1/completions", json={"model": "legal", "prompt": "x" * 5000}, headers=h), 413)
    _error(client.get("/v1/nothing-here", headers=h), 404)
    _error(client.get("/v1/completions", headers=h), 405)


def test_shard_error_codes_map_to_http(client, shard_servers, parts):
    owner, _ = _owner(parts, "legal@1", shard_servers)
    for mode, status in (("invalid", 400), ("not_found", 404), ("precondition", 503)):
        owner.servicer.mode = mode
        err = _error(client.post("/v1/completions", json={"model": "legal", "prompt": "x"}, headers=auth(ACME_KEY)), status)
        assert "scripted" in err["message"]
    assert client.post("/v1/completions", json={"model": "legal", "prompt": "x"}, headers=auth(ACME_KEY)).headers["retry-after"]


def test_tenant_limits_answer_429(client):
    h = auth(LIMITED_KEY)
    assert client.post("/v1/completions", json={"model": "legal", "prompt": "a b c", "max_tokens": 8}, headers=h).status_code == 200
    r = client.post("/v1/completions", json={"model": "legal", "prompt": "x", "max_tokens": 1}, headers=h)
    assert _error(r, 429)["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1


def test_failover_before_first_token(client, shard_servers, parts):
    owner, owner_id = _owner(parts, "legal@1", shard_servers)
    owner.servicer.mode = "fail_before_first"
    r = client.post("/v1/completions", json={"model": "legal", "prompt": "x", "max_tokens": 2}, headers=auth(ACME_KEY))
    assert r.status_code == 200 and r.headers["x-loraplex-shard"] != owner_id
    assert owner_id not in parts.pool.ring  # passive detection took it out
    owner.servicer.mode = "ok"
    assert wait_until(lambda: owner_id in parts.pool.ring)  # health says SERVING: back


def test_resource_exhausted_moves_on_then_503(client, shard_servers, parts):
    owner, owner_id = _owner(parts, "legal@1", shard_servers)
    owner.servicer.mode = "exhausted"
    r = client.post("/v1/completions", json={"model": "legal", "prompt": "x"}, headers=auth(ACME_KEY))
    assert r.status_code == 200 and r.headers["x-loraplex-shard"] != owner_id
    for s in shard_servers:
        s.servicer.mode = "exhausted"
    r = client.post("/v1/completions", json={"model": "legal", "prompt": "x", "stream": True}, headers=auth(ACME_KEY))
    _error(r, 503)
    assert r.headers["retry-after"]


def test_non_streamed_request_survives_a_mid_stream_cut(client, shard_servers, parts):
    owner, owner_id = _owner(parts, "legal@1", shard_servers)
    owner.servicer.mode = "cut_midway"
    r = client.post("/v1/completions", json={"model": "legal", "prompt": "x", "max_tokens": 4}, headers=auth(ACME_KEY))
    assert r.status_code == 200 and r.headers["x-loraplex-shard"] != owner_id
    assert r.json()["choices"][0]["text"] == "".join(expected_words("legal", "1", 4))


def test_stream_cut_midway_ends_with_error_event(client, shard_servers):
    for s in shard_servers:
        s.servicer.mode = "cut_midway"
    r = client.post("/v1/completions", json={"model": "legal", "prompt": "x", "max_tokens": 4, "stream": True}, headers=auth(ACME_KEY))
    assert r.status_code == 200
    events = _events(r.text)
    assert "[DONE]" not in events
    assert set(events[-1]["error"]) == ERROR_KEYS and events[-1]["error"]["code"] == "stream_cut"
    assert [e["choices"][0]["text"] for e in events[:-1]] == expected_words("legal", "1", 2)


def test_no_healthy_shard_503_and_readyz(client, shard_servers, parts):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and len(ready.json()["healthy_shards"]) == 2
    for s in shard_servers:
        s.set_serving(False)
    assert wait_until(lambda: not parts.pool.healthy_shards())
    r = client.post("/v1/completions", json={"model": "legal", "prompt": "x"}, headers=auth(ACME_KEY))
    assert _error(r, 503)["code"] == "no_healthy_shard" and r.headers["retry-after"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["healthy_shards"] == [] and ready.json()["routing_table_stale"] is False
    shard_servers[0].set_serving(True)
    assert wait_until(lambda: client.get("/readyz").status_code == 200)


def test_killed_shard_leaves_ring_and_rejoins(client, shard_servers, parts):
    victim = shard_servers[1]
    victim.stop()
    assert wait_until(lambda: victim.shard_id not in parts.pool.ring, timeout_s=2.0)
    for i in range(4):
        r = client.post("/v1/completions", json={"model": "legal", "prompt": str(i)}, headers=auth(ACME_KEY))
        assert r.status_code == 200 and r.headers["x-loraplex-shard"] == shard_servers[0].shard_id
    victim.restart()
    assert wait_until(lambda: victim.shard_id in parts.pool.ring, timeout_s=10.0)


def test_shadow_pairs_are_logged_and_aggregated(client, gateway_settings, parts, admin_client):
    for i in range(3):
        r = client.post("/v1/completions", json={"model": "shadowed", "prompt": f"p{i}", "max_tokens": 3}, headers=auth(ACME_KEY))
        assert r.status_code == 200 and r.headers["x-loraplex-version"] == "1"
        assert r.json()["choices"][0]["text"] == "".join(expected_words("shadowed", "1", 3))
    assert wait_until(lambda: len(parts.shadow_recorder.recent("shadowed")) == 3)
    view = admin_client.get("/admin/shadow", params={"adapter": "shadowed"}, headers=auth(ADMIN_KEY)).json()
    agg = view["aggregates"]["shadowed@2"]
    assert agg["shadow_pairs"] == 3 and agg["shadow_exact_match_rate"] == 0.0
    pair = view["pairs"][0]
    assert (pair["primary_version"], pair["shadow_version"], pair["tenant"]) == ("1", "2", "acme")
    lines = open(gateway_settings.shadow_log_path).read().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["shadow_output"].startswith("shadowed@2:0")


def test_admin_api(client, shard_servers, admin_client):
    _error(admin_client.get("/admin/shards"), 401)
    _error(admin_client.get("/admin/shards", headers=auth(ACME_KEY)), 403)
    h = auth(ADMIN_KEY)
    view = admin_client.get("/admin/shards", headers=h).json()
    assert len(view["shards"]) == 2 and sorted(view["ring"]["members"]) == sorted(s.shard_id for s in shard_servers)
    assert len(view["placement"]["legal@1"]) == 2
    r = admin_client.post("/admin/adapters/load", json={"adapter": "legal"}, headers=h)
    assert r.status_code == 200 and r.json()["version"] == "1"
    (owner_id, result), = r.json()["shards"].items()
    assert result["ok"] and result["adapter"]["pinned"] is True
    listed = admin_client.get(f"/admin/shards/{owner_id}/adapters", headers=h).json()
    assert listed["adapters"][0]["adapter"] == {"name": "legal", "version": "1"}
    r = admin_client.post("/admin/adapters/pin", json={"adapter": "legal", "version": "1", "pin": False}, headers=h)
    assert r.json()["shards"][owner_id]["unloaded"] is True
    r = admin_client.post("/admin/adapters/unload", json={"adapter": "legal", "version": "1"}, headers=h)
    assert r.json()["shards"][owner_id]["unloaded"] is True
    _error(admin_client.post("/admin/adapters/unload", json={"adapter": "legal"}, headers=h), 400)
    _error(admin_client.get("/admin/shards/nope:1/adapters", headers=h), 404)
    assert admin_client.post("/admin/adapters/load", json={"adapter": "missing", "version": "1"}, headers=h).json()["shards"]
    reload = admin_client.post("/admin/routing/reload", headers=h).json()
    assert reload["adapters"]["legal"]["champion"] == "1" and reload["stale"] is False


def test_tenants_file_reload_takes_effect(client, tenants_file):
    from gateway.tenants import sha256_hex

    tenants_file.write_text(f"tenants: [{{name: fresh, key_sha256: [{sha256_hex('fresh-key')}], adapters: [sql]}}]\n")
    assert wait_until(lambda: client.get("/v1/models", headers=auth("fresh-key")).status_code == 200)
    assert client.get("/v1/models", headers=auth(ACME_KEY)).status_code == 401


def test_metrics_and_openapi(client, admin_client):
    client.post("/v1/completions", json={"model": "legal", "prompt": "x"}, headers=auth(ACME_KEY))
    client.post("/v1/completions", json={"model": "legal", "prompt": "x"})
    text = admin_client.get("/metrics").text
    assert 'loraplex_gateway_requests_total{adapter="legal",assignment="champion",endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'status="401"' in text and "loraplex_gateway_shard_healthy" in text and "loraplex_gateway_routing_table_stale 0.0" in text
    schema = client.get("/schema/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        documented = set(schema["paths"][path]["post"]["responses"])
        assert {"200", "400", "401", "403", "404", "413", "429", "503"} <= documented


def test_public_port_serves_only_the_api_and_health(client, admin_client):
    _error(client.get("/metrics"), 404)
    _error(client.get("/admin/shards", headers=auth(ADMIN_KEY)), 404)
    assert not {"/metrics", "/admin/shards"} & set(client.get("/schema/openapi.json").json()["paths"])
    _error(admin_client.post("/v1/completions", json={"model": "legal", "prompt": "x"}, headers=auth(ACME_KEY)), 404)
    assert admin_client.get("/healthz").status_code == 200 and admin_client.get("/readyz").status_code == 200
    assert {"/metrics", "/admin/shards"} <= set(admin_client.get("/schema/openapi.json").json()["paths"])


def test_an_error_after_the_version_was_chosen_says_which_and_is_counted(client, admin_client, shard_servers):
    for s in shard_servers:
        s.servicer.mode = "precondition"
    r = client.post("/v1/completions", json={"model": "legal", "prompt": "x"}, headers=auth(ACME_KEY))
    assert _error(r, 503)["code"] == "adapter_unavailable"
    assert (r.headers["x-loraplex-adapter"], r.headers["x-loraplex-version"], r.headers["x-loraplex-route"]) == ("legal", "1", "champion")
    text = admin_client.get("/metrics").text
    assert 'loraplex_gateway_requests_total{adapter="legal",assignment="champion",endpoint="/v1/completions",status="503"} 1.0' in text
