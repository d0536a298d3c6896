"""A promoted version the shards refuse (FAILED_PRECONDITION) does not take over: the last version
that served keeps answering, for plain and streamed requests; a pinned request still sees the 503."""

from __future__ import annotations

import grpc
import pytest
from gateway_fixtures import ACME_KEY, ADMIN_KEY, PortClient, auth
from gateway_scripted_shard import ScriptedShardServer
from litestar.testing import TestClient

from gateway.app import create_apps
from gateway.routing import VersionChoice
from gateway.routing_source import StaticRoutingSource
from gateway.settings import GatewaySettings
from gateway.serving_record import ServingRecord
from gateway.version_fallback import LastGoodVersions
from loraplex.routing_table import AdapterRoute, RoutingTable


ADMIN_PORT = 8001


@pytest.fixture
def refusing_shard():
    server = ScriptedShardServer("r0").start()
    yield server
    server.close()


def refuse(server: ScriptedShardServer, adapter: str, version: str) -> None:
    """The shard refuses that version, as a shard refuses corrupt artifacts."""
    server.servicer.faults[(adapter, version)] = grpc.StatusCode.FAILED_PRECONDITION


def _client(tmp_path, tenants_file, shard, source, retry_s=30.0, **more):
    settings = GatewaySettings.from_mapping(
        {
            "tenants_file": str(tenants_file),
            "shard_addresses": [shard.address],
            "health_interval_s": 0.1,
            "request_timeout_s": 10,
            "refused_version_retry_s": retry_s,
            "admin_port": ADMIN_PORT,
            **more,
        }
    )
    return TestClient(create_apps(settings, routing_source=source).by_port())


def _complete(client, model="legal", **extra):
    return client.post("/v1/completions", json={"model": model, "prompt": "p", "max_tokens": 2, **extra}, headers=auth(ACME_KEY))


def test_refused_champion_falls_back_to_the_last_good_version(tmp_path, tenants_file, refusing_shard):
    source = StaticRoutingSource.from_mapping({"legal": {"champion": "1"}})
    refuse(refusing_shard, "legal", "2")
    with _client(tmp_path, tenants_file, refusing_shard, source) as client:
        assert _complete(client).headers["x-loraplex-version"] == "1"
        source.replace(StaticRoutingSource.from_mapping({"legal": {"champion": "2"}}).current())  # promoted
        plain = _complete(client)
        assert plain.status_code == 200, plain.text
        assert (plain.headers["x-loraplex-version"], plain.headers["x-loraplex-route"]) == ("1", "champion")
        assert plain.json()["choices"][0]["text"].startswith("legal@1:0")
        streamed = _complete(client, stream=True)
        assert streamed.status_code == 200 and streamed.headers["x-loraplex-version"] == "1"
        assert streamed.text.rstrip().endswith("data: [DONE]")
        # Remembered: the refused version is not asked for again while the retry window runs.
        asked_for_2 = sum(r.adapter.version == "2" for r in refusing_shard.servicer.requests)
        assert asked_for_2 == 1
        pinned = _complete(client, model="legal@2")
        assert pinned.status_code == 503 and pinned.json()["error"]["code"] == "adapter_unavailable"
        assert 'loraplex_gateway_version_fallbacks_total{adapter="legal"} 2.0' in PortClient(client, ADMIN_PORT).get("/metrics").text
        fallback = PortClient(client, ADMIN_PORT).get("/admin/shards", headers=auth(ADMIN_KEY)).json()["version_fallback"]
        assert fallback["last_good"] == {"legal": "1"} and set(fallback["refused"]) == {"legal@2"}


def test_without_a_last_good_version_the_refusal_is_a_503(tmp_path, tenants_file, refusing_shard):
    source = StaticRoutingSource.from_mapping({"legal": {"champion": "2"}})
    refuse(refusing_shard, "legal", "2")
    with _client(tmp_path, tenants_file, refusing_shard, source) as client:
        response = _complete(client)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "adapter_unavailable"
        assert response.headers["retry-after"]


def test_repaired_version_is_tried_again_after_the_retry_window():
    now = [0.0]
    last_good = LastGoodVersions(retry_refused_s=10.0, clock=lambda: now[0])
    served = VersionChoice("legal", "legal", "1", "champion")
    promoted = VersionChoice("legal", "legal", "2", "champion")
    last_good.served(served, "1")
    fallback = last_good.after_refusal(promoted)
    assert fallback == VersionChoice("legal", "legal", "1", "champion")
    assert last_good.substitute(promoted).version == "1"
    now[0] = 10.5
    assert last_good.substitute(promoted).version == "2"  # retried once the window is over
    last_good.served(promoted, "2")
    assert last_good.last_good("legal") == "2" and not last_good.is_refused("legal", "2")


def test_canary_refused_goes_to_the_champion_and_pinned_or_base_never_fall_back():
    last_good = LastGoodVersions()
    last_good.served(VersionChoice("legal", "legal", "1", "champion"), "1")
    canary = VersionChoice("legal", "legal", "3", "canary", "4")
    assert last_good.fallback_for(canary) == VersionChoice("legal", "legal", "1", "champion", "4")
    assert last_good.fallback_for(VersionChoice("legal@3", "legal", "3", "pinned")) is None
    assert last_good.fallback_for(VersionChoice("base", "", "", "base")) is None
    # A canary answer does not become the champion's fallback.
    last_good.served(VersionChoice("legal", "legal", "3", "canary"), "3")
    assert last_good.last_good("legal") == "1"


def test_a_restarted_gateway_falls_back_to_the_version_its_record_kept(tmp_path, tenants_file, refusing_shard):
    record = tmp_path / "serving-record.json"
    refuse(refusing_shard, "legal", "2")
    before = StaticRoutingSource.from_mapping({"legal": {"champion": "1"}})
    with _client(tmp_path, tenants_file, refusing_shard, before, serving_record_file=str(record)) as client:
        assert _complete(client).headers["x-loraplex-version"] == "1"
    assert ServingRecord(record).last_good == {"legal": "1"}
    # A new gateway process, the champion already refused: without the record this is a 503
    # (test_without_a_last_good_version_the_refusal_is_a_503).
    broken = StaticRoutingSource.from_mapping({"legal": {"champion": "2"}})
    with _client(tmp_path, tenants_file, refusing_shard, broken, serving_record_file=str(record)) as client:
        for stream in (False, True):
            response = _complete(client, stream=stream)
            assert response.status_code == 200, response.text
            assert (response.headers["x-loraplex-version"], response.headers["x-loraplex-route"]) == ("1", "champion")


def test_without_a_record_the_champion_history_names_the_version_to_fall_back_to(tmp_path, tenants_file, refusing_shard):
    refuse(refusing_shard, "legal", "3")
    refuse(refusing_shard, "legal", "2")
    # As `loraplex adapters promote` recorded it: 1, then 2 (itself broken since), then 3.
    table = RoutingTable({"legal": AdapterRoute("legal", "3", champion_history=("1", "2", "3"))}, 1.0)
    with _client(tmp_path, tenants_file, refusing_shard, StaticRoutingSource(table)) as client:
        response = _complete(client)
        assert response.status_code == 200, response.text
        assert response.headers["x-loraplex-version"] == "1"  # 2 was refused too: the one before it


def test_a_gateway_started_while_mlflow_is_down_serves_the_recorded_table(tmp_path, tenants_file, refusing_shard):
    from loraplex.stack.ports import free_port

    record_path = tmp_path / "serving-record.json"
    record = ServingRecord(record_path)
    record.save_table(RoutingTable({"legal": AdapterRoute("legal", "2", champion_history=("1", "2"))}, 1.0))
    record.save_last_good({"legal": "2"})
    dead_mlflow = f"http://127.0.0.1:{free_port()}"  # nothing listens: MLflow is down
    settings = GatewaySettings.from_mapping(
        {
            "tenants_file": str(tenants_file), "shard_addresses": [refusing_shard.address], "health_interval_s": 0.1,
            "request_timeout_s": 10, "admin_port": ADMIN_PORT, "registry_tracking_uri": dead_mlflow,
            "registry_cache_dir": str(tmp_path / "registry-cache"), "serving_record_file": str(record_path),
            "serving_status_interval_s": 0,
        }
    )
    with TestClient(create_apps(settings).by_port()) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["routing_table_stale"] is True
        response = _complete(client)
        assert response.status_code == 200, response.text
        assert response.headers["x-loraplex-version"] == "2"


def test_an_unreadable_record_is_ignored(tmp_path):
    path = tmp_path / "serving-record.json"
    path.write_text("{not json")
    record = ServingRecord(path)
    assert record.table is None and record.last_good == {}
    record.save_last_good({"legal": "4"})
    assert ServingRecord(path).last_good == {"legal": "4"}
