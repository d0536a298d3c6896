"""The audit trail (one JSON line per admin action and routing change on `loraplex.audit`) and the
admin API's rate limit, over scripted shards (real gRPC on 127.0.0.1)."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime

import pytest
from gateway_fixtures import ADMIN_KEY, ROUTES, PortClient, auth
from litestar.testing import TestClient

from gateway.app import create_apps
from gateway.audit import AUDIT_LOGGER_NAME, AuditTrail, key_id
from gateway.routing import VersionChoice
from gateway.routing_source import StaticRoutingSource
from gateway.settings import GatewaySettings
from gateway.version_fallback import LastGoodVersions


@pytest.fixture
def audit_lines(caplog):
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER_NAME)

    def lines() -> list[dict]:
        return [json.loads(r.getMessage()) for r in caplog.records if r.name == AUDIT_LOGGER_NAME]

    return lines


def test_every_admin_action_is_one_audit_line_naming_the_key_by_id(admin_client, audit_lines, caplog):
    h = auth(ADMIN_KEY)
    before = time.time()
    assert admin_client.post("/admin/adapters/load", json={"adapter": "legal", "version": "1"}, headers=h).status_code == 200
    assert admin_client.post("/admin/adapters/pin", json={"adapter": "legal", "version": "1", "pin": False}, headers=h).status_code == 200
    assert admin_client.post("/admin/adapters/unload", json={"adapter": "legal", "version": "1"}, headers=h).status_code == 200
    assert admin_client.post("/admin/routing/reload", headers=h).status_code == 200
    assert admin_client.get("/admin/shards", headers=h).status_code == 200  # a read: not audited
    lines = audit_lines()
    assert [line["event"] for line in lines] == [
        "admin.adapters.load",
        "admin.adapters.pin",
        "admin.adapters.unload",
        "admin.routing.reload",
    ]
    for line in lines:
        assert line["who"] == f"admin:{key_id(ADMIN_KEY)}"
        assert before - 1 <= datetime.fromisoformat(line["time"]).timestamp() <= time.time() + 1
    load = lines[0]
    assert load["adapter"] == "legal" and load["version"] == "1" and set(load["shards"].values()) == {"ok"}
    assert lines[1]["pinned"] is False and lines[3]["polled"] is True
    assert ADMIN_KEY not in caplog.text  # the key itself never reaches a log


def test_routing_changes_the_source_reports_are_audited(parts, client, audit_lines):
    source = parts.routing_source
    moved = StaticRoutingSource.from_mapping(
        {**{k: v for k, v in ROUTES.items() if k != "sql"}, "legal": {"champion": "2", "canary": "3", "canary_percent": 25, "fallback": "base"}}
    ).current()
    source.replace(moved)
    source.replace(moved)  # the same table again: nothing changed, nothing logged
    lines = audit_lines()
    assert all(line["who"] == "registry" for line in lines)
    assert {(l["event"], l.get("adapter"), l.get("alias"), l.get("from_version"), l.get("to_version")) for l in lines} == {
        ("routing.alias_moved", "legal", "champion", "1", "2"),
        ("routing.alias_moved", "legal", "canary", "2", "3"),
        ("routing.canary_percent_changed", "legal", None, None, None),
        ("routing.fallback_changed", "legal", None, None, None),
        ("routing.adapter_removed", "sql", None, None, None),
    }
    percent = next(l for l in lines if l["event"] == "routing.canary_percent_changed")
    assert (percent["from_percent"], percent["to_percent"]) == (0.0, 25.0)
    fallback = next(l for l in lines if l["event"] == "routing.fallback_changed")
    assert (fallback["from_policy"], fallback["to_policy"]) == ("none", "base")


def test_a_refused_version_is_audited_once_per_refusal_period():
    records: list[logging.LogRecord] = []
    logger = logging.getLogger(f"{AUDIT_LOGGER_NAME}.test-refusals")
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    now = [0.0]
    last_good = LastGoodVersions(30.0, clock=lambda: now[0], on_refused=AuditTrail(logger).version_refused)
    choice = VersionChoice("legal", "legal", "4", "champion")
    last_good.refused(choice)
    last_good.refused(choice)  # still refused: the same refusal
    now[0] = 31.0
    last_good.refused(choice)  # tried again after the period and refused again: a new line
    lines = [json.loads(r.getMessage()) for r in records]
    assert [(l["who"], l["event"], l["adapter"], l["version"], l["assignment"]) for l in lines] == [
        ("shard", "routing.version_refused", "legal", "4", "champion")
    ] * 2


def test_admin_calls_past_the_rate_answer_429_with_retry_after(gateway_settings):
    settings = GatewaySettings.from_mapping({**gateway_settings.__dict__, "admin_rate_per_minute": 3})
    apps = create_apps(settings, routing_source=StaticRoutingSource.from_mapping(ROUTES))
    with TestClient(apps.by_port()) as client:
        admin = PortClient(client, settings.admin_port)
        h = auth(ADMIN_KEY)
        assert [admin.get("/admin/shards", headers=h).status_code for _ in range(3)] == [200] * 3
        refused = admin.post("/admin/routing/reload", headers=h)
        assert refused.status_code == 429, refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "3 per minute" in refused.json()["error"]["message"]
        # Metrics and health are not admin calls: scrapes and probes never hit the limit.
        assert admin.get("/metrics").status_code == 200
