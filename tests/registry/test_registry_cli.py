"""`python -m registry adapters …` end to end, as a user runs it: real processes, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*argv: str, tracking_uri: str | None, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LORAPLEX_REGISTRY_TRACKING_URI")}
    if tracking_uri:
        env["LORAPLEX_REGISTRY_TRACKING_URI"] = tracking_uri
    env["LORAPLEX_REGISTRY_CACHE_DIR"] = str(cache_dir)
    return subprocess.run(
        [sys.executable, "-m", "registry", "adapters", *argv],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180,
    )


def test_cli_publish_promote_canary_rollback(mlflow_server, make_adapter, tiny_base, adapter_name, tmp_path):
    url = mlflow_server.url

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return run_cli(*argv, tracking_uri=url, cache_dir=tmp_path / "cache")

    first = cli("publish", str(make_adapter()), "--name", adapter_name, "--base-model", str(tiny_base), "--alias", "champion")
    assert first.returncode == 0, first.stderr
    assert f"published {adapter_name} v1" in first.stdout and "[champion]" in first.stdout
    second = cli("publish", str(make_adapter(rank=4)), "--name", adapter_name, "--base-model", str(tiny_base))
    assert second.returncode == 0, second.stderr

    promoted = cli("promote", adapter_name, "2", "--alias", "champion")
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.strip() == f"champion of {adapter_name} is now v2"
    assert cli("promote", adapter_name, "1", "--alias", "canary").returncode == 0
    assert cli("canary", adapter_name, "--percent", "15").returncode == 0

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(adapter_name + " "))
    assert row.split()[:5] == [adapter_name, "2", "1", "15", "-"]

    versions = cli("versions", adapter_name)
    assert versions.returncode == 0, versions.stderr
    lines = versions.stdout.strip().splitlines()
    assert lines[0].startswith(f"{adapter_name} v1  r=8") and lines[0].endswith("[canary]")
    assert lines[1].startswith(f"{adapter_name} v2  r=4") and lines[1].endswith("[champion]")

    rolled = cli("rollback", adapter_name)
    assert rolled.returncode == 0, rolled.stderr
    assert rolled.stdout.strip() == f"champion of {adapter_name} rolled back to v1"

    # Errors: one line on stderr, exit code 1, nothing changed.
    nothing_earlier = cli("rollback", adapter_name)
    assert nothing_earlier.returncode == 1
    assert nothing_earlier.stderr.strip().count("\n") == 0 and "no earlier champion" in nothing_earlier.stderr
    bad_percent = cli("canary", adapter_name, "--percent", "150")
    assert bad_percent.returncode == 1 and "0 to 100" in bad_percent.stderr
    unknown = cli("promote", adapter_name, "9")
    assert unknown.returncode == 1 and "has no version" in unknown.stderr

    pickled = make_adapter()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    refused = cli("publish", str(pickled), "--name", adapter_name, "--base-model", str(tiny_base))
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("error: adapter_model.bin is a pickle checkpoint")
    assert refused.stderr.strip().count("\n") == 0

    after = cli("versions", adapter_name)
    assert len(after.stdout.strip().splitlines()) == 2
    assert after.stdout.splitlines()[0].endswith("[canary, champion]")


def test_cli_without_server(tmp_path):
    missing = run_cli("list", tracking_uri=None, cache_dir=tmp_path)
    assert missing.returncode == 1
    assert "no MLflow server given" in missing.stderr

    # A port nothing listens on: a clear error within seconds, not MLflow's 4-minute retry loop.
    from loraplex.stack.ports import free_port

    down = run_cli("list", tracking_uri=f"http://127.0.0.1:{free_port()}", cache_dir=tmp_path)
    assert down.returncode == 1
    assert "did not answer: connection refused" in down.stderr.splitlines()[-1]

    usage = run_cli("promote", "x", "1", "--alias", "production", tracking_uri=None, cache_dir=tmp_path)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
