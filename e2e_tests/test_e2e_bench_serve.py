"""`loraplex bench-serve` against a running stack, as a user runs it: a short Zipf workload over
granted adapters and one the key is not granted; the JSON report, the plot and the progress bar."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from loraplex.serving_bench.workload import AdapterDistribution, plan_requests

ADAPTERS = ["legal", "clinical", "sql", "not-granted"]


def test_bench_serve_reports_latency_throughput_and_errors_per_adapter(fault_stack, tmp_path):
    output = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "loraplex.cli", "bench-serve",
        "--url", fault_stack.gateway_url, "--key", fault_stack.tenant_key,
        "--adapters", ",".join(ADAPTERS), "--distribution", "zipf:1.1",
        "--rate", "4", "--duration", "6", "--max-tokens", "8", "--seed", "7",
        "--output", str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bench-serve: 100%" in result.stderr  # tqdm's bar reached the end

    report = json.loads(output.read_text())
    planned = plan_requests(AdapterDistribution.parse("zipf:1.1", ADAPTERS), 4, 6, list(report["settings"]["prompts"]), 7)
    expected = {a: sum(r.adapter == a for r in planned) for a in ADAPTERS}
    assert {a: s["requests"] for a, s in report["per_adapter"].items()} == expected
    assert expected["legal"] > expected["sql"]  # Zipf: the first adapter is the most popular

    overall = report["overall"]
    assert overall["requests"] == len(planned)
    # The key is not granted `not-granted`: 403, and nothing else failed.
    assert overall["errors_by_status"] == ({"403": expected["not-granted"]} if expected["not-granted"] else {})
    assert overall["completed"] == len(planned) - expected["not-granted"]
    for name in ("legal", "clinical", "sql"):
        stats = report["per_adapter"][name]
        if stats["requests"]:
            assert stats["failed"] == 0
            assert 0 < stats["ttft_ms"]["p50"] <= stats["ttft_ms"]["p99"] <= stats["e2e_latency_ms"]["max"]
            assert stats["output_tokens"] > 0
    assert overall["itl_ms"]["p50"] > 0 and overall["tpot_ms"]["mean"] > 0
    assert overall["request_throughput_per_s"] > 0 and overall["output_token_throughput_per_s"] > 0
    assert set(overall["served_versions"]) <= {"1", "2", "3", "4", "5"}  # registry version numbers
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT p50/p99 ms" in result.stdout and "errors by status" in result.stdout
