"""No-network unit tests: tenants, limits, routing split, placement ring, shadow metrics, error mapping, settings."""

from __future__ import annotations

import asyncio
import math
import os
import random

import grpc
import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from gateway.errors import OpenAIError, ShardCallFailed, VersionRefused, from_grpc, shard_call_failed, to_openai
from gateway.placement import PlacementRing
from gateway.routing import VersionRouter, canary_bucket
from gateway.routing_source import StaticRoutingSource
from gateway.settings import GatewaySettings, SettingsError
from gateway.shadow import ShadowLog, ShadowPair, ShadowRecorder, compare_outputs
from gateway.tenant_limits import LocalTenantLimiter
from gateway.tenants import TenantDirectory, TenantLimits, Tenant, TenantsFileError, parse_tenants, sha256_hex
from gateway_fixtures import ACME_KEY, ADMIN_KEY, WILDCARD_KEY, tenants_yaml


# tenants ---------------------------------------------------------------------------------------
def test_keys_map_to_tenants_by_hash_and_admin_is_separate(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(tenants_yaml())
    directory = TenantDirectory.from_file(path)
    assert directory.authenticate(ACME_KEY).name == "acme"
    assert directory.authenticate(WILDCARD_KEY).name == "everything"
    assert directory.authenticate("nope") is None and directory.authenticate(None) is None
    assert directory.is_admin(ADMIN_KEY) and not directory.is_admin(ACME_KEY)
    assert ACME_KEY not in path.read_text()  # only hashes on disk


def test_plain_keys_and_bad_files_are_refused():
    with pytest.raises(TenantsFileError, match="sha256"):
        parse_tenants("tenants: [{name: a, key_sha256: [plain-key], adapters: [x]}]")
    with pytest.raises(TenantsFileError, match="default_adapter"):
        parse_tenants(f"tenants: [{{name: a, key_sha256: [{sha256_hex('k')}], adapters: [x], default_adapter: y}}]")
    with pytest.raises(TenantsFileError, match="twice"):
        h = sha256_hex("k")
        parse_tenants(f"tenants: [{{name: a, key_sha256: [{h}]}}, {{name: b, key_sha256: [{h}]}}]")
    with pytest.raises(TenantsFileError, match="YAML"):
        parse_tenants("tenants: [")


def test_reload_on_change_and_malformed_file_keeps_old_tenants(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(tenants_yaml())
    directory = TenantDirectory.from_file(path)
    path.write_text("tenants: [{name: broken, key_sha256: [not-a-hash]}]\n")
    assert directory.refresh() is False
    assert directory.authenticate(ACME_KEY).name == "acme" and "sha256" in directory.last_error
    path.write_text(f"tenants: [{{name: newcomer, key_sha256: [{sha256_hex('new-key')}], adapters: [sql]}}]\n")
    assert directory.refresh() is True
    assert directory.authenticate("new-key").name == "newcomer"
    assert directory.authenticate(ACME_KEY) is None and directory.last_error is None


# limits ----------------------------------------------------------------------------------------
def _tenant(concurrent=0, tpm=0, adapters=("legal",), name="t"):
    return Tenant(name, (sha256_hex("k"),), frozenset(adapters), None, TenantLimits(concurrent, tpm))


def test_local_limiter_sliding_minute_and_retry_after():
    # The shared contract runs in test_gateway_tenant_limits.py; this one steers the clock.
    now = [1000.0]
    limiter = LocalTenantLimiter(clock=lambda: now[0])
    tenant = _tenant(concurrent=2, tpm=100)
    first, second = limiter.admit_now(tenant, 5), limiter.admit_now(tenant, 5)
    with pytest.raises(OpenAIError) as exc:
        limiter.admit_now(tenant, 0)
    assert exc.value.status == 429 and exc.value.headers["retry-after"] == "1"
    limiter.release_now(first, 60)
    now[0] += 10
    limiter.release_now(second, 50)  # 110 tokens in the window: over
    with pytest.raises(OpenAIError) as exc:
        limiter.admit_now(tenant, 1)
    assert exc.value.status == 429 and int(exc.value.headers["retry-after"]) == 50  # when the 60 leave
    now[0] += 50  # the first charge left the window: 50 + 40 fit
    limiter.admit_now(tenant, 40)
    with pytest.raises(OpenAIError):
        limiter.admit_now(tenant, 20)


# routing ---------------------------------------------------------------------------------------
def _router(percent=25.0, seed=7, **extra):
    routes = {"legal": {"champion": "1", "canary": "2", "canary_percent": percent, **extra}, "nochamp": {"canary": None}}
    return VersionRouter(StaticRoutingSource.from_mapping(routes), "base", random.Random(seed))


ACME = Tenant("acme", (sha256_hex("a"),), frozenset({"legal", "nochamp", "base"}), "legal", TenantLimits())


def test_canary_share_within_binomial_tolerance():
    router, n, p = _router(25.0), 4000, 0.25
    canary = sum(router.resolve("legal", ACME).assignment == "canary" for _ in range(n))
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(canary - n * p) < 4 * sigma


def test_sticky_users_get_one_version_and_share_holds_across_users():
    router = _router(30.0)
    for user in ("alice", "bob", "carol"):
        versions = {router.resolve("legal", ACME, user).version for _ in range(50)}
        assert len(versions) == 1
    n = 4000
    canary = sum(canary_bucket("legal", f"user-{i}") < 30.0 for i in range(n))
    assert abs(canary - 0.3 * n) < 4 * math.sqrt(n * 0.3 * 0.7)


def test_pinned_base_and_errors():
    router = _router(100.0)
    pinned = router.resolve("legal@7", ACME)
    assert (pinned.adapter, pinned.version, pinned.assignment) == ("legal", "7", "pinned")
    base = router.resolve("base", ACME)
    assert (base.adapter, base.version, base.assignment) == ("", "", "base")
    assert router.resolve(None, ACME).adapter == "legal"  # default adapter
    forbidden = [pytest.raises(OpenAIError) for _ in range(2)]
    with forbidden[0] as unknown:
        router.resolve("secret", ACME)
    with forbidden[1] as not_granted:
        router.resolve("legal", _tenant(adapters=("sql",)))
    assert unknown.value.status == not_granted.value.status == 403
    assert unknown.value.body().error.code == not_granted.value.body().error.code
    with pytest.raises(OpenAIError) as no_champion:
        router.resolve("nochamp", ACME)
    assert no_champion.value.status == 404
    with pytest.raises(OpenAIError) as malformed:
        router.resolve("legal@", ACME)
    assert malformed.value.status == 400
    wildcard = _tenant(adapters=("*",))
    with pytest.raises(OpenAIError) as unknown_to_wildcard:
        router.resolve("secret", wildcard)
    assert unknown_to_wildcard.value.status == 403


def test_registry_tenant_list_restricts_too():
    router = VersionRouter(StaticRoutingSource.from_mapping({"legal": {"champion": "1", "tenants": ["other"]}}))
    with pytest.raises(OpenAIError) as exc:
        router.resolve("legal", ACME)
    assert exc.value.status == 403
    assert router.usable_models(ACME) == ["base"]
    assert router.usable_models(_tenant(name="other", adapters=("legal",))) == ["legal", "legal@1"]


def test_an_empty_registry_tenant_list_admits_nobody_and_an_absent_one_everybody():
    router = VersionRouter(StaticRoutingSource.from_mapping({"legal": {"champion": "1", "tenants": []}, "open": "2"}))
    with pytest.raises(OpenAIError):
        router.resolve("legal", ACME)
    assert router.resolve("open", _tenant(adapters=("*",))).version == "2"


# placement -------------------------------------------------------------------------------------
shard_sets = st.lists(st.text("abcdefghij", min_size=1, max_size=6), min_size=2, max_size=8, unique=True)


@settings(max_examples=40, deadline=None)
@given(shards=shard_sets, keys=st.integers(20, 300), eps=st.sampled_from([0.1, 0.25, 0.5]))
def test_bounded_load_never_exceeded(shards, keys, eps):
    ring = PlacementRing(shards, virtual_nodes=32, epsilon=eps, hot_inflight=10_000)
    loads = {s: 0 for s in shards}
    for i in range(keys):
        pick = ring.choose(f"adapter{i % 17}@{i % 3}", loads)[0]
        loads[pick] += 1
        assert loads[pick] <= math.ceil((1 + eps) * (i + 1) / len(shards))


@settings(max_examples=30, deadline=None)
@given(shards=shard_sets, newcomer=st.text("klmnop", min_size=1, max_size=6))
def test_adding_or_removing_a_shard_moves_about_one_nth(shards, newcomer):
    keys = [f"adapter{i}@1" for i in range(600)]
    ring = PlacementRing(shards, virtual_nodes=64)
    before = {k: ring.owners(k)[0] for k in keys}
    ring.add(newcomer)
    after = {k: ring.owners(k)[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == newcomer for k in moved)  # only keys the newcomer took moved
    assert len(moved) / len(keys) < 2.5 / (len(shards) + 1)
    ring.remove(shards[0])
    again = {k: ring.owners(k)[0] for k in keys}
    assert all(again[k] == after[k] for k in keys if after[k] != shards[0])


def test_hot_adapter_spreads_and_base_goes_to_least_loaded():
    ring = PlacementRing(["a", "b", "c", "d"], hot_inflight=2)
    order = ring.ring_order("legal@1")
    loads = {s: 1 for s in "abcd"}
    loads[order[1]] = 0
    assert ring.choose("legal@1", loads, key_inflight=0)[0] == order[0]  # owner is under its bound
    loads[order[0]] = 5
    assert ring.choose("legal@1", loads)[0] != order[0]  # over (1+eps) x mean: spills
    loads[order[0]] = 1
    assert ring.choose("legal@1", loads, key_inflight=3)[0] == order[1]  # 2 replicas: the idle one serves
    loads = {"a": 2, "b": 0, "c": 1, "d": 5}
    assert ring.choose("", loads)[0] == "b"
    assert sorted(ring.choose("legal@1", loads)) == ["a", "b", "c", "d"]  # full failover order


def test_a_shard_holding_the_adapter_merged_comes_first_within_the_load_bound():
    ring = PlacementRing(["a", "b", "c", "d"], hot_inflight=100)
    order = ring.ring_order("legal@1")
    merged = order[2]
    loads = {s: 1 for s in "abcd"}
    picks = ring.choose("legal@1", loads, merged_on=[merged])
    assert picks[0] == merged and sorted(picks) == ["a", "b", "c", "d"]
    assert ring.choose("sql@1", loads, merged_on=[])[0] == ring.ring_order("sql@1")[0]  # others keep their owner
    loads[merged] = 6  # over (1+eps) x mean: the bound still spills it
    assert ring.choose("legal@1", loads, merged_on=[merged])[0] == order[0]


# shadow ----------------------------------------------------------------------------------------
def test_compare_outputs():
    assert compare_outputs([1, 2, 3], [1, 2, 3], "abc", "abc") == (True, 1.0)
    assert compare_outputs([1, 2, 3, 4], [1, 9, 3], "x", "y") == (False, 0.5)
    assert compare_outputs([], [], "", "") == (True, 1.0)


def test_recorder_writes_jsonl_aggregates_and_calls_sink(tmp_path):
    calls = []
    recorder = ShadowRecorder(ShadowLog(tmp_path / "s.jsonl", 1 << 20, 1), recent_pairs=3, on_aggregate=lambda *a: calls.append(a), aggregate_every=2)
    for i in range(4):
        pair = ShadowPair(f"r{i}", "acme", "legal", "1", "2", "a", "a" if i % 2 else "b", bool(i % 2), 1.0 if i % 2 else 0.0, 10.0, 20.0, 0.0)
        asyncio.run(recorder.record(pair))
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert len(lines) == 4 and '"request_id": "r0"' in lines[0]
    agg = recorder.aggregates("legal")["legal@2"]
    assert agg["shadow_pairs"] == 4 and agg["shadow_exact_match_rate"] == 0.5 and agg["shadow_latency_ms"] == 20.0
    assert [c[:2] for c in calls] == [("legal", "2"), ("legal", "2")] and len(recorder.recent("legal")) == 3


def test_shadow_log_rotates_past_its_byte_bound_and_keeps_backup_count_files(tmp_path):
    max_bytes, backups = 4096, 2
    log = ShadowLog(tmp_path / "shadow" / "pairs.jsonl", max_bytes, backups)
    written = []
    for i in range(200):  # ~300 bytes a line: ~60 KB, many times the 3 files' bound
        pair = ShadowPair(f"r{i}", "acme", "legal", "1", "2", "x" * 80, "y" * 80, False, 0.5, 10.0, 20.0, float(i))
        log.write(pair)
        written.append(pair)
    log.close()
    files = sorted(p.name for p in (tmp_path / "shadow").iterdir())
    assert files == ["pairs.jsonl", "pairs.jsonl.1", "pairs.jsonl.2"]
    for name in files:
        assert 0 < (tmp_path / "shadow" / name).stat().st_size <= max_bytes
    # What is kept is the newest pairs, in order from `.2` (oldest) to the live file, each line whole JSON.
    kept = [
        msgspec.json.decode(line)["request_id"]
        for name in ("pairs.jsonl.2", "pairs.jsonl.1", "pairs.jsonl")
        for line in (tmp_path / "shadow" / name).read_text().splitlines()
    ]
    assert kept == [p.request_id for p in written[-len(kept):]] and kept[-1] == "r199"
    assert len(kept) < len(written)


def test_shadow_log_settings_refuse_an_unbounded_log():
    with pytest.raises(SettingsError, match="shadow_log_backup_count"):
        GatewaySettings.from_mapping({"shadow_log_backup_count": 0})
    with pytest.raises(SettingsError, match="shadow_log_max_bytes"):
        GatewaySettings.from_mapping({"shadow_log_max_bytes": 0})


# errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code,status",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.FAILED_PRECONDITION, 503),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 503),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ],
)
def test_grpc_code_mapping(code, status):
    error = from_grpc(code, "details", "legal")
    assert error.status == status
    assert set(msgspec.to_builtins(error.body())["error"]) == {"message", "type", "param", "code"}
    raised = shard_call_failed(code, "details", "legal", "legal", "3")
    assert isinstance(raised, ShardCallFailed) and isinstance(raised, VersionRefused) == (code == grpc.StatusCode.FAILED_PRECONDITION)
    assert to_openai(raised) == error
    if status == 503:
        assert error.headers["retry-after"]


# settings --------------------------------------------------------------------------------------
def test_settings_from_file_and_env(tmp_path):
    cfg = tmp_path / "g.yaml"
    cfg.write_text("gateway:\n  port: 9001\n  shard_addresses: [a:1, b:2]\n  static_routes: {legal: '3'}\n")
    s = GatewaySettings.load(cfg, {"LORAPLEX_GATEWAY_PORT": "9002", "LORAPLEX_GATEWAY_SHADOW_SAMPLE_SHARE": "0.5"})
    assert s.port == 9002 and s.shard_addresses == ("a:1", "b:2") and s.shadow_sample_share == 0.5
    toml = tmp_path / "g.toml"
    toml.write_text('shard_dns = "shards.svc"\nmax_tokens_limit = 5\n')
    assert GatewaySettings.load(toml, {}).shard_dns == "shards.svc"
    with pytest.raises(SettingsError, match="unknown"):
        GatewaySettings.from_mapping({"nope": 1})
    with pytest.raises(SettingsError):
        GatewaySettings.from_mapping({"port": "eighty"})


def test_tenants_file_text_writes_only_hashes():
    from gateway.tenants import tenants_file_text

    text = tenants_file_text("adm", [{"name": "demo", "keys": ["demo-key"], "adapters": ["*"], "limits": {"concurrent_requests": 4}}])
    assert "demo-key" not in text and "adm\n" not in text
    config = parse_tenants(text)
    assert config.admin_key_sha256 == sha256_hex("adm") and config.tenants[0].key_sha256 == (sha256_hex("demo-key"),)
    with pytest.raises(TenantsFileError):
        tenants_file_text(None, [{"name": "x", "keys": ["k"], "adapters": ["a"], "default_adapter": "b"}])


def test_prompt_token_limit_uses_the_configured_tokenizer(tmp_path):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    from gateway.completions import PromptMeasure

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}))
    measure = PromptMeasure(max_chars=1000, max_tokens=3, tokenizer_dir=str(tmp_path))
    measure.check("a b a", "prompt")
    with pytest.raises(OpenAIError) as exc:
        measure.check("a b a b", "prompt")
    assert exc.value.status == 400 and "4 tokens" in exc.value.message
    with pytest.raises(OpenAIError):
        PromptMeasure(max_chars=3).check("abcd", "prompt")


def test_several_workers_need_a_shared_limits_store():
    with pytest.raises(SettingsError, match="workers > 1 needs redis_url"):
        GatewaySettings.from_mapping({"workers": 2})
    with pytest.raises(SettingsError, match="redis_failure_policy"):
        GatewaySettings.from_mapping({"redis_url": "redis://127.0.0.1:6379/0", "redis_failure_policy": "maybe"})
    assert GatewaySettings.from_mapping({}).worker_count() == 1
    shared = GatewaySettings.load(environ={"LORAPLEX_GATEWAY_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert shared.worker_count() == len(os.sched_getaffinity(0))
    assert GatewaySettings.from_mapping({"redis_url": "redis://x:1/0", "workers": 3}).worker_count() == 3
