"""Merged hot adapters over real processes: the demo stack's shards hold an NF4 base, so an admin
merge through the gateway is refused by every shard with the reason, audited per shard, and serving
goes on unchanged (the fp32 merge itself runs under load in tests/shard/test_shard_hot_merge.py)."""

from __future__ import annotations

ADAPTER = "legal"


def test_admin_merge_on_a_quantized_stack_is_refused_and_changes_nothing(fault_stack):
    fs = fault_stack
    with fs.http() as client, fs.admin_http() as admin:
        before = fs.complete(client, ADAPTER, max_tokens=8)
        assert before.status_code == 200
        reply = admin.post("/admin/adapters/merge", json={"adapter": ADAPTER, "replicas": 2}, headers=fs.admin_headers())
        assert reply.status_code == 200, reply.text
        answers = reply.json()["shards"]
        assert len(answers) == 2
        for shard, answer in answers.items():
            assert answer["ok"] is False and answer["code"] == "FAILED_PRECONDITION", (shard, answer)
            assert "quantized" in answer["message"]
        assert all(s["merged_adapter"] == "" for s in fs.shards_view()["shards"])
        after = fs.complete(client, ADAPTER, max_tokens=8)
        assert after.status_code == 200
        assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
        unmerged = admin.post("/admin/adapters/unmerge", json={"adapter": ADAPTER}, headers=fs.admin_headers())
        assert unmerged.status_code == 200 and unmerged.json()["shards"] == {}  # merged nowhere: nothing to do
