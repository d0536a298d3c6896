"""Static checks of Prometheus and Grafana in compose/: promtool accepts the config and the alert
rules, scrape targets are the services' declared metrics ports, and the dashboards use the
provisioned datasource. e2e_tests/test_e2e_prometheus_dashboards.py runs every query for real."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
PROMETHEUS_DIR = COMPOSE_DIR / "prometheus"
GRAFANA_DIR = COMPOSE_DIR / "grafana"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    return path


def test_promtool_accepts_the_config_and_the_alert_rules():
    result = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout + result.stderr  # the rules were checked too


def test_every_alert_has_a_summary_and_a_severity():
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    names = {rule["alert"] for rule in alerts}
    for required in ("LoraplexShardDown", "LoraplexRoutingTableStale", "LoraplexHighErrorRatio",
                     "LoraplexShardQueueSaturated", "LoraplexChampionRefused"):
        assert required in names
    for rule in alerts:
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_scrape_targets_are_the_services_metrics_ports():
    compose = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    services = compose["services"]
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]] for job in config["scrape_configs"]}
    shard_port = compose["x-shard-environment"]["LORAPLEX_SHARD_METRICS_PORT"]
    for target in jobs["loraplex-shards"]:
        host, port = target.split(":")
        assert host in services and port == shard_port
        assert port in [str(p) for p in services[host]["expose"]]
    (gateway_target,) = jobs["loraplex-gateway"]
    admin_port = services["gateway"]["environment"]["LORAPLEX_GATEWAY_ADMIN_PORT"]
    assert gateway_target == f"gateway:{admin_port}" and str(admin_port) in services["gateway"]["expose"]
    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_grafana_provisions_the_datasource_every_dashboard_uses():
    compose = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in volumes
    (datasource,) = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/loraplex.yaml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboards = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
    assert {d.stem for d in dashboards} == {"loraplex-gateway", "loraplex-shards"}
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] == path.stem
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert panels
        for panel in panels:
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
