"""Shadow aggregates become MLflow metrics on the shadow version's run (against a real MLflow server)."""

from __future__ import annotations

import threading

import httpx

from loraplex.stack.ports import free_port
from registry.shadow_metrics import ShadowMetricsLogger, mlflow_metrics

API = "/api/2.0/mlflow"


def _aggregate(pairs: int, exact: float = 0.5) -> dict[str, float]:
    return {
        "shadow_pairs": float(pairs),
        "shadow_exact_match_rate": exact,
        "shadow_token_agreement": 0.75,
        "shadow_primary_latency_ms": 20.0,
        "shadow_latency_ms": 30.0,
    }


def test_metrics_carry_the_pair_count_as_step_and_a_latency_ratio():
    metrics = {m["key"]: m for m in mlflow_metrics(_aggregate(12), 1000)}
    assert set(metrics) == {
        "shadow_pairs", "shadow_exact_match_rate", "shadow_token_agreement",
        "shadow_primary_latency_ms", "shadow_latency_ms", "shadow_latency_ratio",
    }
    assert metrics["shadow_latency_ratio"]["value"] == 1.5
    assert {m["step"] for m in metrics.values()} == {12}
    assert "shadow_latency_ratio" not in {m["key"] for m in mlflow_metrics({**_aggregate(1), "shadow_primary_latency_ms": 0.0}, 0)}


def _model_version_with_run(url: str, name: str) -> tuple[str, str]:
    experiment = httpx.post(f"{url}{API}/experiments/create", json={"name": f"exp-{name}"}, timeout=10).json()["experiment_id"]
    run = httpx.post(f"{url}{API}/runs/create", json={"experiment_id": experiment}, timeout=10).json()["run"]["info"]
    run_id = run["run_id"]
    httpx.post(f"{url}{API}/registered-models/create", json={"name": name}, timeout=10).raise_for_status()
    reply = httpx.post(f"{url}{API}/model-versions/create", json={"name": name, "source": f"{run['artifact_uri']}/adapter", "run_id": run_id}, timeout=10)
    reply.raise_for_status()
    return reply.json()["model_version"]["version"], run_id


def test_latest_aggregate_lands_on_the_versions_run(mlflow_server):
    version, run_id = _model_version_with_run(mlflow_server.url, "shadowed-adapter")
    sink = ShadowMetricsLogger(mlflow_server.url)
    sink.submit("shadowed-adapter", version, _aggregate(5, exact=0.2))
    sink.submit("shadowed-adapter", version, _aggregate(10, exact=0.4))  # supersedes the first
    assert sink.flush() == 1
    sink.submit("shadowed-adapter", version, _aggregate(15, exact=0.6))
    assert sink.flush() == 1
    metrics = {m["key"]: m for m in httpx.get(f"{mlflow_server.url}{API}/runs/get", params={"run_id": run_id}).json()["run"]["data"]["metrics"]}
    assert metrics["shadow_pairs"]["value"] == 15 and metrics["shadow_exact_match_rate"]["value"] == 0.6
    history = httpx.get(
        f"{mlflow_server.url}{API}/metrics/get-history", params={"run_id": run_id, "metric_key": "shadow_exact_match_rate"}
    ).json()["metrics"]
    assert sorted((m["step"], m["value"]) for m in history) == [(10, 0.4), (15, 0.6)]
    assert (sink.logged, sink.failed) == (2, 0)


def test_background_thread_sends_and_unknown_versions_are_counted_not_raised(mlflow_server):
    version, run_id = _model_version_with_run(mlflow_server.url, "threaded-adapter")
    sink = ShadowMetricsLogger(mlflow_server.url, flush_interval_s=0.05).start()
    try:
        sink.submit("no-such-adapter", "7", _aggregate(5))
        sink.submit("threaded-adapter", version, _aggregate(5))
    finally:
        sink.stop()
    assert sink.logged == 1 and sink.failed == 1
    metrics = httpx.get(f"{mlflow_server.url}{API}/runs/get", params={"run_id": run_id}).json()["run"]["data"]["metrics"]
    assert {m["key"] for m in metrics} >= {"shadow_pairs", "shadow_latency_ratio"}


def test_unreachable_mlflow_never_blocks_submit_and_pending_is_bounded():
    sink = ShadowMetricsLogger(f"http://127.0.0.1:{free_port()}", timeout_s=1.0, max_pending=2)
    done = threading.Event()

    def submit_many():
        for i in range(100):
            sink.submit("a", str(i), _aggregate(5))
        done.set()

    thread = threading.Thread(target=submit_many)
    thread.start()
    thread.join(timeout=5)
    assert done.is_set()
    assert sink.dropped == 98
    assert sink.flush() == 0
    assert sink.failed == 2
