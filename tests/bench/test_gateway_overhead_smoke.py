"""The gateway-overhead benchmark at toy size (4 clients, a few requests) over a real shard and
gateway, so its code paths cannot rot. Checks the shape of its results, never their speed."""

from __future__ import annotations

import json

from bench.gateway_overhead import TOY, percentile, run, run_workers_sweep


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_toy_run_measures_both_paths_interleaved_and_writes_json_and_png(tmp_path, demo_assets):
    out = tmp_path / "results"
    result = run(TOY, out, work_dir=tmp_path / "work", log=lambda _: None)
    measurement = result["measurement"]
    expected = TOY.rounds * TOY.requests_per_batch
    assert {name: len(v) for name, v in measurement["latencies_ms"].items()} == {"direct": expected, "gateway": expected}
    assert all(x > 0 for values in measurement["latencies_ms"].values() for x in values)
    orders = [tuple(r["order"]) for r in measurement["rounds"]]
    assert orders[:2] == [("direct", "gateway"), ("gateway", "direct")]
    for r in measurement["rounds"]:
        assert r["added_p50_ms"] == r["gateway"]["p50"] - r["direct"]["p50"]
    assert set(measurement["added_ms"]) >= {"p50", "p99", "pooled_p50", "pooled_p99"}
    assert result["goal"]["met"] == (measurement["added_ms"]["p50"] <= result["goal"]["added_p50_ms_at_most"])
    profile = result["gateway_profile"]
    assert profile["requests"] == TOY.requests_per_batch and profile["profiled_cpu_ms_per_request"] > 0
    assert abs(sum(profile["share_by_package"].values()) - 1.0) < 0.01
    assert {"gateway", "litestar", "grpc"} <= set(profile["share_by_package"])
    assert profile["top_functions_by_own_time"][0]["own_ms_per_request"] > 0
    assert result["machine"]["cpu"] and "met_cpu" in result["goal"]
    saved = json.loads((out / "gateway_overhead.json").read_text())
    assert saved["profile"]["concurrency"] == TOY.concurrency
    assert (out / "gateway_overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_toy_workers_sweep_covers_every_worker_count_and_client_count(tmp_path, demo_assets):
    out = tmp_path / "results"
    result = run_workers_sweep(out, workers=(1, 2), clients=(1, 4), toy=True, work_dir=tmp_path / "work", log=lambda _: None)
    assert [(r["workers"], r["clients"]) for r in result["rows"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for row in result["rows"]:
        assert row["gateway_requests_per_s"] > 0 and row["gateway_cpu_ms_per_request"] > 0 and row["store_cpu_ms_per_request"] is not None
    assert set(result["goals"]) == {"requests_per_s_ratio_2_over_1_workers_1_clients", "requests_per_s_ratio_2_over_1_workers_4_clients"}
    assert json.loads((out / "gateway_workers.json").read_text())["rows"] == result["rows"]
    assert (out / "gateway_workers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
