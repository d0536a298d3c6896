"""Issue 5 over real processes: shadow copies are compared, logged as JSON lines, served by the
admin API and logged as MLflow metrics on the shadow version's run; the client only ever sees the
champion's answer.

Works on `sql` (its own second version as `shadow`); removes the alias after.
"""

from __future__ import annotations

import json

import httpx

from e2e_tests.fault_stack import MLFLOW_API
from tests.support.waiting import wait_until

ADAPTER = "sql"
REQUESTS = 15
PAIR_FIELDS = {
    "request_id", "tenant", "adapter", "primary_version", "shadow_version", "primary_output", "shadow_output",
    "exact_match", "token_agreement", "primary_latency_ms", "shadow_latency_ms",
}
RUN_METRICS = {"shadow_pairs", "shadow_exact_match_rate", "shadow_token_agreement", "shadow_latency_ratio"}


def test_shadow_pairs_are_logged_served_and_aggregated_in_mlflow(fault_stack):
    fs = fault_stack
    champion = fs.alias_version(ADAPTER, "champion")
    shadow = fs.publish_variant(ADAPTER, "shadow", lora_alpha_factor=2.0)
    shadow_run = fs.registry().resolve(ADAPTER, shadow).run_id
    fs.set_alias(ADAPTER, "shadow", shadow)
    try:
        assert wait_until(lambda: fs.reload_routing()["adapters"][ADAPTER]["shadow"] == shadow, 10)
        with fs.http() as client:
            for i in range(REQUESTS):
                response = fs.complete(client, ADAPTER, max_tokens=6, prompt=f"{fs.running.demo_prompt} ({i})")
                assert response.status_code == 200, response.text
                # The shadow never answers the client.
                assert response.headers["x-loraplex-version"] == champion
                assert response.headers["x-loraplex-route"] == "champion"

        with fs.admin_http() as admin:

            def admin_view():
                view = admin.get("/admin/shadow", params={"adapter": ADAPTER}, headers=fs.admin_headers()).json()
                return view if len(view["pairs"]) >= 10 else None

            view = wait_until(admin_view, 60, step_s=0.25)
        assert view, "fewer than 10 shadow pairs recorded"
        pair = view["pairs"][-1]
        assert PAIR_FIELDS <= set(pair)
        assert (pair["adapter"], pair["primary_version"], pair["shadow_version"], pair["tenant"]) == (ADAPTER, champion, shadow, "acme")
        assert 0.0 <= pair["token_agreement"] <= 1.0
        aggregate = view["aggregates"][f"{ADAPTER}@{shadow}"]
        assert aggregate["shadow_pairs"] >= 10
        assert 0.0 <= aggregate["shadow_exact_match_rate"] <= 1.0

        log_path = fs.running.state_dir / "shadow.jsonl"
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        ours = [p for p in lines if p["adapter"] == ADAPTER and p["shadow_version"] == shadow]
        assert len(ours) >= 10 and all(PAIR_FIELDS <= set(p) for p in ours)
        # The stack is shared: earlier tests may have shadowed this adapter with other versions.
        served = {p["request_id"] for p in view["pairs"] if p["shadow_version"] == shadow}
        assert served and served <= {p["request_id"] for p in ours}

        def run_metrics():
            reply = httpx.get(f"{fs.mlflow_url}{MLFLOW_API}/runs/get", params={"run_id": shadow_run}, timeout=10)
            metrics = {m["key"]: m for m in reply.json()["run"]["data"].get("metrics", [])}
            return metrics if RUN_METRICS <= set(metrics) and metrics["shadow_pairs"]["value"] >= 10 else None

        metrics = wait_until(run_metrics, 30, step_s=0.5)
        assert metrics, "the shadow aggregates did not reach the shadow version's MLflow run"
        assert metrics["shadow_pairs"]["step"] == int(metrics["shadow_pairs"]["value"])
        assert 0.0 <= metrics["shadow_token_agreement"]["value"] <= 1.0
        assert metrics["shadow_latency_ratio"]["value"] > 0
    finally:
        fs.delete_alias(ADAPTER, "shadow")
        fs.reload_routing()
