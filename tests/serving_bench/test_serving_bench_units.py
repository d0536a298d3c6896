"""The serving benchmark's workload and statistics, without a server."""

import random

import pytest

from loraplex.serving_bench.client import RequestOutcome
from loraplex.serving_bench.report import build_report, percentile
from loraplex.serving_bench.workload import AdapterDistribution, DistributionError, plan_requests


def test_zipf_weights_follow_rank_and_sampling_matches_them():
    dist = AdapterDistribution.parse("zipf:1.1", ["a", "b", "c", "d"])
    raw = [1 / k**1.1 for k in range(1, 5)]
    assert dist.weights == pytest.approx([w / sum(raw) for w in raw])
    rng = random.Random(1)
    counts = {a: 0 for a in dist.adapters}
    for _ in range(20000):
        counts[dist.sample(rng)] += 1
    for adapter, weight in zip(dist.adapters, dist.weights):
        assert counts[adapter] / 20000 == pytest.approx(weight, abs=0.015)


def test_bad_distributions_are_refused_with_the_reason():
    for spec, adapters in (("zipf", ["a"]), ("zipf:0", ["a"]), ("zipf:x", ["a"]), ("normal", ["a"]), ("uniform", []), ("uniform", ["a", ""])):
        with pytest.raises(DistributionError):
            AdapterDistribution.parse(spec, adapters)


def test_poisson_arrivals_have_the_requested_rate_and_are_reproducible():
    dist = AdapterDistribution.parse("uniform", ["a", "b"])
    planned = plan_requests(dist, rate=20, duration_s=200, prompts=["p"], seed=3)
    assert len(planned) == pytest.approx(4000, rel=0.05)
    assert all(0 < r.at_s < 200 for r in planned)
    assert [r.at_s for r in planned] == sorted(r.at_s for r in planned)
    assert planned == plan_requests(dist, rate=20, duration_s=200, prompts=["p"], seed=3)


def test_percentiles_interpolate_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 90) == 90


def test_report_counts_errors_by_status_and_per_adapter():
    outcomes = [
        RequestOutcome("a", 0.0, 200, ttft_s=0.1, e2e_s=0.5, chunk_gaps_s=[0.1, 0.1], output_tokens=5, served_version="2"),
        RequestOutcome("a", 0.1, 200, ttft_s=0.3, e2e_s=0.7, chunk_gaps_s=[0.2], output_tokens=3, served_version="2"),
        RequestOutcome("b", 0.2, 403, error="not granted"),
        RequestOutcome("b", 0.3, 0, error="ConnectError"),
    ]
    report = build_report(outcomes, 2.0, {"adapters": ["a", "b"]})
    overall = report["overall"]
    assert overall["requests"] == 4 and overall["completed"] == 2 and overall["failed"] == 2
    assert overall["errors_by_status"] == {"0": 1, "403": 1}
    assert overall["output_tokens"] == 8 and overall["output_token_throughput_per_s"] == 4.0
    assert overall["ttft_ms"]["p50"] == pytest.approx(200)
    assert overall["tpot_ms"]["mean"] == pytest.approx(((0.5 - 0.1) / 4 + (0.7 - 0.3) / 2) / 2 * 1000)
    assert overall["served_versions"] == {"2": 2}
    assert report["per_adapter"]["b"]["completed"] == 0 and report["per_adapter"]["b"]["ttft_ms"] is None
