"""Admin merge/unmerge of an adapter into shards' base weights, and placement that prefers a shard
holding the adapter merged, over scripted shards (real gRPC on 127.0.0.1)."""

from __future__ import annotations

import json
import logging

from gateway_fixtures import ACME_KEY, ADMIN_KEY, auth, wait_until

from gateway.audit import AUDIT_LOGGER_NAME
from protos import shard_pb2


def served_by(client, model: str) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": "a b", "max_tokens": 2}, headers=auth(ACME_KEY))
    assert r.status_code == 200, r.text
    return r.headers["x-loraplex-shard"]


def shard_view(admin_client, shard_id: str) -> dict:
    view = admin_client.get("/admin/shards", headers=auth(ADMIN_KEY)).json()
    return next(s for s in view["shards"] if s["id"] == shard_id)


def test_merge_on_a_shard_draws_its_adapter_there_until_unmerged(client, admin_client, parts, shard_servers, caplog):
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER_NAME)
    h = auth(ADMIN_KEY)
    owner = parts.pool.ring.owners("legal@1")[0]
    other = next(s.shard_id for s in shard_servers if s.shard_id != owner)
    assert served_by(client, "legal") == owner

    r = admin_client.post("/admin/adapters/merge", json={"adapter": "legal", "shards": [other]}, headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "1" and body["shards"][other]["ok"] is True
    assert body["shards"][other]["merged"] == {"name": "legal", "version": "1"}
    assert shard_view(admin_client, other)["merged_adapter"] == "legal@1"
    assert {served_by(client, "legal") for _ in range(4)} == {other}  # the merged shard serves it now
    clinical_owner = parts.pool.ring.owners("clinical@3")[0]
    assert served_by(client, "clinical") == clinical_owner  # other adapters keep their owners

    r = admin_client.post("/admin/adapters/unmerge", json={"adapter": "legal", "version": "1"}, headers=h)
    assert r.status_code == 200 and list(r.json()["shards"]) == [other]  # only where it was merged
    assert r.json()["shards"][other]["unmerged"] == {"name": "legal", "version": "1"}
    assert shard_view(admin_client, other)["merged_adapter"] == ""
    assert served_by(client, "legal") == owner

    events = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == AUDIT_LOGGER_NAME]
    merge, unmerge = [e for e in events if e["event"] in ("admin.adapters.merge", "admin.adapters.unmerge")]
    assert merge["event"] == "admin.adapters.merge" and merge["adapter"] == "legal" and merge["shards"] == {other: "ok"}
    assert unmerge["event"] == "admin.adapters.unmerge" and unmerge["shards"] == {other: "ok"}


def test_a_merge_the_shard_made_on_its_own_is_learned_from_its_stats(client, admin_client, parts, shard_servers):
    owner = parts.pool.ring.owners("clinical@3")[0]
    other = next(s for s in shard_servers if s.shard_id != owner)
    other.servicer.merged = shard_pb2.AdapterRef(name="clinical", version="3")  # as its hot-adapter policy would
    assert wait_until(lambda: parts.pool.merged_on("clinical@3") == [other.shard_id], timeout_s=10.0)
    assert served_by(client, "clinical") == other.shard_id
    other.servicer.merged = None
    assert wait_until(lambda: parts.pool.merged_on("clinical@3") == [], timeout_s=10.0)
    assert served_by(client, "clinical") == owner


def test_a_quantized_shard_refuses_the_merge_and_placement_is_unchanged(client, admin_client, parts, shard_servers):
    for server in shard_servers:
        server.servicer.quantized = True
    owner = parts.pool.ring.owners("legal@1")[0]
    r = admin_client.post("/admin/adapters/merge", json={"adapter": "legal", "replicas": 2}, headers=auth(ADMIN_KEY))
    assert r.status_code == 200
    answers = r.json()["shards"]
    assert len(answers) == 2
    for answer in answers.values():
        assert answer["ok"] is False and answer["code"] == "FAILED_PRECONDITION" and "quantized" in answer["message"]
    assert parts.pool.merged_on("legal@1") == []
    assert served_by(client, "legal") == owner
    r = admin_client.post("/admin/adapters/merge", json={"adapter": "nope-no-route"}, headers=auth(ADMIN_KEY))
    assert r.status_code == 404  # no version given and no champion
