"""The routing table follows MLflow: alias moves and tag edits made over MLflow's REST API (as the
UI makes them) reach the watcher; an unreachable MLflow leaves the last good table in force."""

from __future__ import annotations

import logging
import os

import httpx
import pytest

from registry import RegistryError, RegistryUnavailable, RoutingTableWatcher
from tests.support.waiting import wait_until


def api(mlflow_server) -> str:
    return f"{mlflow_server.url}/api/2.0/mlflow"


@pytest.fixture
def watcher(adapter_registry):
    changes = []
    watcher = RoutingTableWatcher(adapter_registry, interval_s=0.5, on_change=changes.append)
    watcher.changes = changes
    watcher.start()
    yield watcher
    watcher.stop()


def test_ui_promotion_reaches_watcher_within_5s(
    adapter_registry, make_adapter, tiny_base, adapter_name, mlflow_server, watcher
):
    adapter_registry.publish(make_adapter(), adapter_name, tiny_base, alias="champion")
    adapter_registry.publish(make_adapter(), adapter_name, tiny_base)
    assert wait_until(lambda: (r := watcher.current().route(adapter_name)) is not None and r.champion == "1", 5.0)

    moved = httpx.post(
        f"{api(mlflow_server)}/registered-models/alias",
        json={"name": adapter_name, "alias": "champion", "version": "2"},
    )
    assert moved.status_code == 200, moved.text
    assert wait_until(lambda: watcher.current().route(adapter_name).champion == "2", 5.0)
    assert watcher.changes[-1].route(adapter_name).champion == "2"
    assert not watcher.is_stale and watcher.last_error is None


def test_tag_edits_reach_watcher(adapter_registry, make_adapter, tiny_base, adapter_name, mlflow_server, watcher, caplog):
    adapter_registry.publish(make_adapter(), adapter_name, tiny_base, alias="champion")
    adapter_registry.publish(make_adapter(), adapter_name, tiny_base, alias="canary")

    def set_tag(key: str, value: str) -> None:
        reply = httpx.post(
            f"{api(mlflow_server)}/registered-models/set-tag", json={"name": adapter_name, "key": key, "value": value}
        )
        assert reply.status_code == 200, reply.text

    set_tag("loraplex.canary_percent", "40")
    set_tag("loraplex.tenants", "acme, beta ,")
    assert wait_until(
        lambda: (r := watcher.current().route(adapter_name)) is not None and r.canary_percent == 40.0
        and r.tenants is not None,
        5.0,
    )
    route = watcher.current().route(adapter_name)
    assert (route.champion, route.canary) == ("1", "2")
    assert route.tenants == frozenset({"acme", "beta"})

    with caplog.at_level(logging.WARNING, logger="registry.routing"):
        set_tag("loraplex.canary_percent", "lots")
        assert wait_until(lambda: watcher.current().route(adapter_name).canary_percent == 0.0, 5.0)
    assert any("lots" in record.getMessage() for record in caplog.records)
    assert not watcher.is_stale

    deleted = httpx.request(
        "DELETE", f"{api(mlflow_server)}/registered-models/delete-tag",
        json={"name": adapter_name, "key": "loraplex.tenants"},
    )
    assert deleted.status_code == 200, deleted.text
    assert wait_until(lambda: watcher.current().route(adapter_name).tenants is None, 5.0)


def test_fallback_tag_reaches_watcher(adapter_registry, make_adapter, tiny_base, adapter_name, mlflow_server, watcher, caplog):
    from mlflow.tracking import MlflowClient

    from registry import cli as registry_cli

    adapter_registry.publish(make_adapter(), adapter_name, tiny_base, alias="champion")
    assert wait_until(lambda: (r := watcher.current().route(adapter_name)) is not None and r.champion == "1", 5.0)
    assert watcher.current().route(adapter_name).fallback == "none"
    # As the MLflow UI or any MLflow client sets it, and as `loraplex adapters fallback` does.
    MlflowClient(mlflow_server.url).set_registered_model_tag(adapter_name, "loraplex.fallback", "Base")
    assert wait_until(lambda: watcher.current().route(adapter_name).fallback == "base", 5.0)
    with caplog.at_level(logging.WARNING, logger="registry.routing"):
        MlflowClient(mlflow_server.url).set_registered_model_tag(adapter_name, "loraplex.fallback", "maybe")
        assert wait_until(lambda: watcher.current().route(adapter_name).fallback == "none", 5.0)
    assert any("'maybe'" in record.getMessage() and "none or base" in record.getMessage() for record in caplog.records)
    assert registry_cli.main(["adapters", "fallback", "--tracking-uri", mlflow_server.url, adapter_name, "base"]) == 0
    assert wait_until(lambda: watcher.current().route(adapter_name).fallback == "base", 5.0)
    with pytest.raises(RegistryError, match="fallback must be one of none, base"):
        adapter_registry.set_fallback(adapter_name, "champion")
    assert adapter_registry.routing_table().route(adapter_name).fallback == "base"


def test_watcher_keeps_last_table_while_mlflow_is_down(
    adapter_registry, make_adapter, tiny_base, adapter_name, mlflow_server, watcher
):
    published = adapter_registry.publish(make_adapter(), adapter_name, tiny_base, alias="champion")
    cached = adapter_registry.fetch(adapter_name, "1")
    assert wait_until(lambda: (r := watcher.current().route(adapter_name)) is not None and r.champion == "1", 5.0)
    good = watcher.current()
    process_group = mlflow_server.process.pid
    mlflow_server.stop()
    try:
        # Stopping ends the whole process group: MLflow's uvicorn worker too.
        with pytest.raises(ProcessLookupError):
            os.killpg(process_group, 0)
        assert wait_until(lambda: watcher.last_error is not None, 30.0)
        assert watcher.is_stale
        assert watcher.status()["stale"] and "connection refused" in watcher.status()["last_error"]
        assert watcher.current() is good
        assert watcher.current().route(adapter_name).champion == "1"
        with pytest.raises(RegistryUnavailable):
            adapter_registry.resolve(adapter_name, "champion")
        # A numbered version fetched before is served from the cache; an alias needs the server.
        assert adapter_registry.fetch(adapter_name, "1") == cached
        assert cached.name == published.folder_sha256
        with pytest.raises(RegistryUnavailable):
            adapter_registry.fetch(adapter_name, "champion")
        with pytest.raises(RegistryUnavailable):
            adapter_registry.fetch(adapter_name, "2")
    finally:
        mlflow_server.restart()
    assert wait_until(lambda: not watcher.is_stale, 30.0)
    assert watcher.last_error is None
    assert watcher.current().route(adapter_name).champion == "1"
    assert watcher.last_success_unix > good.fetched_unix
