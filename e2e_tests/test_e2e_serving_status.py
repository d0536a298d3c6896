"""Issue 11's serving status over real processes (MLflow, shards, gateways, Valkey): what the gateway
learns about a version appears on it in MLflow, read here through MLflow's REST API as the UI reads
it - a refused version's reason within seconds, a serving version's status and the shards that hold
it - and with two gateway processes sharing one Valkey, only one of them writes."""

from __future__ import annotations

import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from e2e_tests.fault_stack import MLFLOW_API
from loraplex.stack.local_stack import gateway_is_ready
from loraplex.stack.ports import free_port
from loraplex.stack.processes import ManagedProcess
from loraplex.serving_status import SERVING, TAG_RESIDENT, TAG_STATUS
from tests.support.waiting import wait_until

STATUS_DEADLINE_S = 10.0  # the stack writes every 0.5 s; MLflow and the shards share 2 busy cores


def version_tags(fs, name: str, version: str) -> dict[str, str]:
    reply = httpx.get(f"{fs.mlflow_url}{MLFLOW_API}/model-versions/get", params={"name": name, "version": version}, timeout=10)
    reply.raise_for_status()
    return {t["key"]: t.get("value", "") for t in reply.json()["model_version"].get("tags") or []}


def status_metrics(admin_url: str) -> dict[str, float]:
    text = httpx.get(f"{admin_url}/metrics", timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("loraplex_gateway_serving_status")
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_a_refused_versions_reason_is_on_the_version_in_mlflow_within_seconds(fault_stack):
    fs = fault_stack
    corrupt = fs.publish_corrupt_variant("legal", "status-refused")
    with fs.http() as client:
        refused = fs.complete(client, f"legal@{corrupt}")
        seen = time.monotonic()
    assert refused.status_code == 503, refused.text
    tags = wait_until(lambda: (t := version_tags(fs, "legal", corrupt)).get(TAG_STATUS, "").startswith("refused: ") and TAG_RESIDENT in t and t, STATUS_DEADLINE_S)
    elapsed = time.monotonic() - seen
    assert tags, f"no refused status on legal v{corrupt} {elapsed:.1f} s after the refusal: {version_tags(fs, 'legal', corrupt)}"
    assert "corrupt" in tags[TAG_STATUS], tags[TAG_STATUS]  # the shard's own reason
    assert tags[TAG_RESIDENT] == "none"


def test_a_serving_version_says_serving_and_which_shards_hold_it(fault_stack):
    fs = fault_stack
    champion = fs.alias_version("clinical", "champion")
    with fs.http() as client:
        served = fs.complete(client, "clinical")
    assert served.status_code == 200, served.text
    shard = served.headers["x-loraplex-shard"]

    def serving_on_that_shard():
        tags = version_tags(fs, "clinical", champion)
        return tags.get(TAG_STATUS) == SERVING and shard in tags.get(TAG_RESIDENT, "") and tags

    tags = wait_until(serving_on_that_shard, STATUS_DEADLINE_S)
    assert tags, version_tags(fs, "clinical", champion)
    assert any(part.startswith(f"{shard}:") and part.split(":")[1] in ("device", "host", "disk") for part in tags[TAG_RESIDENT].split(", "))


def test_two_gateway_processes_sharing_a_valkey_write_through_one_writer(fault_stack, tmp_path):
    fs = fault_stack
    port, admin_port = free_port(), free_port()
    env = {
        **fs.stack.gateway.env,  # the same cluster: shards, registry, tenants, the same Valkey
        "LORAPLEX_GATEWAY_PORT": str(port),
        "LORAPLEX_GATEWAY_ADMIN_PORT": str(admin_port),
        "LORAPLEX_GATEWAY_SHADOW_LOG_PATH": str(tmp_path / "shadow.jsonl"),
    }
    second = ManagedProcess("gateway-2", [sys.executable, "-m", "gateway"], log_path=tmp_path / "gateway-2.log", env=env)
    second.start()
    try:
        second.wait_until(lambda: gateway_is_ready(f"http://127.0.0.1:{port}"), 120)
        admins = {"first": fs.gateway_admin_url, "second": f"http://127.0.0.1:{admin_port}"}
        # Both run their cycle every 0.5 s; the lease lets one of them write.
        both = wait_until(lambda: (m := {n: status_metrics(u) for n, u in admins.items()}) and all(
            "loraplex_gateway_serving_status_writer" in v for v in m.values()) and m, 10)
        assert both, "both gateways should report their serving-status role"
        writers = [n for n, m in both.items() if m["loraplex_gateway_serving_status_writer"] == 1]
        assert len(writers) == 1, both
        writer, standby = writers[0], next(n for n in admins if n not in writers)
        before = {n: status_metrics(u) for n, u in admins.items()}

        # Someone removes a status tag in the MLflow UI: the cluster writes it back, once.
        champion = fs.alias_version("sql", "champion")
        reply = httpx.request(
            "DELETE", f"{fs.mlflow_url}{MLFLOW_API}/model-versions/delete-tag",
            json={"name": "sql", "version": champion, "key": TAG_RESIDENT}, timeout=10,
        )
        assert reply.status_code == 200, reply.text
        assert wait_until(lambda: TAG_RESIDENT in version_tags(fs, "sql", champion), STATUS_DEADLINE_S), "the tag was not written back"
        time.sleep(1.5)  # three more cycles of both: the standby must still not have touched MLflow
        after = {n: status_metrics(u) for n, u in admins.items()}

        written = {n: after[n]["loraplex_gateway_serving_status_tags_written_total"] - before[n]["loraplex_gateway_serving_status_tags_written_total"] for n in admins}
        checked = {n: after[n]["loraplex_gateway_serving_status_versions_checked_total"] - before[n]["loraplex_gateway_serving_status_versions_checked_total"] for n in admins}
        assert written[writer] >= 1 and checked[writer] > 0, (written, checked)
        assert written[standby] == 0 and checked[standby] == 0, (written, checked)
        assert after[standby]["loraplex_gateway_serving_status_writer"] == 0
    finally:
        second.stop()
