"""Runs every benchmark code path at toy size (tiny model, 4 adapters over 2 slots, a few tokens)
so they cannot rot. Checks the shape and sanity of the results, never their speed."""

from __future__ import annotations

import json

import pytest

from bench.profiles import FULL, QUICK, toy_profile
from bench.report import markdown_table, write_outputs
from bench.runner import GOALS, run_benchmark


@pytest.fixture(scope="module")
def toy_result(tmp_path_factory):
    profile = toy_profile("toy_bench")
    return profile, run_benchmark(profile, tmp_path_factory.mktemp("bench-cache"), log=lambda _: None)


def test_every_goal_is_reported_with_a_positive_ratio(toy_result):
    _, result = toy_result
    assert set(result["goals"]) == set(GOALS)
    for key, goal in result["goals"].items():
        assert goal["measured"] > 0
        assert goal["met"] == (goal["measured"] >= GOALS[key])
        assert goal["spread"]["min"] <= goal["measured"] <= goal["spread"]["max"] or key == "lora_overhead"


def test_runs_served_exactly_the_tokens_asked_for(toy_result):
    profile, result = toy_result
    r = result["results"]
    naive_tokens = profile.concurrency * profile.naive_new_tokens
    for run in r["vs_naive"]["runs"]["loraplex"] + r["vs_naive"]["runs"]["baseline"]:
        assert run["tokens"] == naive_tokens and run["seconds"] > 0
    engine_runs = r["vs_peft_static"]["runs"]["loraplex"]
    peft_runs = r["vs_peft_static"]["runs"]["baseline"]
    assert [x["tokens"] for x in engine_runs] == [x["tokens"] for x in peft_runs]
    assert all(x["generated_tokens_incl_discarded"] >= x["tokens"] for x in peft_runs)
    overhead = r["lora_overhead"]
    # The first step (prefill gives token 1, its decode token 2) is excluded: one step per further token.
    assert all(len(x["base_step_s"]) == len(x["lora_step_s"]) == profile.overhead_new_tokens - 2 for x in overhead["rounds"])


def test_curve_covers_base_and_every_point_and_the_cache_worked_past_the_slots(toy_result):
    profile, result = toy_result
    points = result["results"]["distinct_adapters_curve"]["points"]
    assert [p["distinct_adapters"] for p in points] == [0, *profile.curve_points]
    assert points[0]["ratio"] == pytest.approx(1.0)
    assert all(p["tokens_per_s"] > 0 for p in points)
    beyond = [p for p in points if p["distinct_adapters"] > profile.device_slots]
    assert beyond and all(sum(a["device"]["misses"] for a in p["cache_activity"]) > 0 for p in beyond)


def test_activation_latency_has_every_tier_of_origin(toy_result):
    profile, result = toy_result
    activation = result["results"]["activation_latency"]
    assert activation["host_to_slot_ms"]["n"] == 2 * profile.device_slots
    assert activation["disk_to_slot_ms"]["n"] == profile.activation_samples
    assert activation["source_to_slot_ms"]["n"] == 2 * profile.device_slots
    for origin in ("host", "disk", "source"):
        entry = activation[f"{origin}_to_slot_ms"]
        assert 0 < entry["p50"] <= entry["p95"]


def test_outputs_are_written_and_the_table_names_every_goal(toy_result, tmp_path):
    _, result = toy_result
    json_path, png_path = write_outputs(result, tmp_path)
    assert json.loads(json_path.read_text())["goals"].keys() == result["goals"].keys()
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(result)
    assert "≥ 0.90" in table and "≥ 10×" in table and "≥ 2×" in table and "host → device slot" in table
    for key in ("machine", "software", "settings"):
        assert result[key]
    assert result["settings"]["torch_threads"] == 2


def test_shipped_profiles_are_consistent():
    FULL.validate()
    QUICK.validate()
    with pytest.raises(ValueError):
        toy_profile().__class__(name="bad", concurrency=64).validate()


def test_lora_overhead_reports_the_bytes_bound_of_its_own_run(toy_result):
    profile, result = toy_result
    overhead = result["results"]["lora_overhead"]
    bound = overhead["bytes_bound"]
    assert bound["read_gb_per_s"] > 0 and bound["base_weight_mb"] > 0
    assert bound["base_step_ms"] == pytest.approx(1e3 * profile.concurrency / overhead["base_tokens_per_s"], rel=1e-3)
    assert 0 < bound["ratio_ceiling"] < 1
    assert "Bytes bound on 1." in markdown_table(result)
