"""The dashboards and alert rules in compose/, checked by a real Prometheus (Debian's package)
scraping a running stack under a bounded load: every Grafana panel's query and template variable
and every rule's expression must return data, every rule must evaluate without error, and the
refused-champion alert must fire when a corrupt version is promoted.

Alert expressions are `<signal> <comparison> <threshold>`; each is also run with the comparison
made `bool`, which returns the signal's series whether or not the threshold is crossed, so an
alert that is quiet because nothing is wrong still proves its metrics and labels exist."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from loraplex.stack.ports import free_port
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "compose" / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((REPO / "compose" / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus")
# What Grafana substitutes before a query reaches Prometheus; "All" of a variable is ".*".
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "30s", "$__range": "5m", "$__interval": "5s"}
COMPARISON = re.compile(r"^(?P<signal>.*\S)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>[-+]?[0-9.eE+]+)\s*$", re.S)

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package `prometheus`; .ci/run installs it)"
)


def grafana_to_promql(expr: str) -> str:
    for name, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\{?(adapter|tenant|instance)\}?", ".*", expr)


def bool_form(expr: str) -> str:
    match = COMPARISON.match(expr.strip())
    assert match, f"an alert expression must be `<signal> <comparison> <number>`: {expr}"
    return f"({match['signal']}) {match['op']} bool {match['threshold']}"


class PrometheusServer:
    """Our own Prometheus on a free loopback port with its own config and data folder."""

    def __init__(self, work_dir: Path, gateway_metrics_url: str, shard_metrics_urls: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work_dir.mkdir(parents=True, exist_ok=True)

        def static(urls: list[str]) -> dict:
            parsed = [urlparse(u) for u in urls]
            assert len({p.path for p in parsed}) == 1
            return {"metrics_path": parsed[0].path, "static_configs": [{"targets": [p.netloc for p in parsed]}]}

        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "loraplex-gateway", **static([gateway_metrics_url])},
                {"job_name": "loraplex-shards", **static(shard_metrics_urls)},
            ],
        }
        self.config_path = work_dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = work_dir / "prometheus.log"
        self.argv = [
            PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={work_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ]
        self.process: subprocess.Popen | None = None

    def start(self) -> "PrometheusServer":
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        ready = wait_until(lambda: self.process.poll() is None and self._ready(), 60, 0.25)
        assert ready, f"prometheus not ready:\n{self.log_path.read_text()[-3000:]}"
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def api(self, path: str, **params) -> dict:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]


def generate_load(fs) -> None:
    """A bounded mix: every adapter, base, a pinned version, a canary share, a shadow, a corrupt
    champion (served by the last good version; its pinned number answers 503), unknown models."""
    canary = fs.publish_variant("sql", "metrics-canary", lora_alpha_factor=2.0)
    shadow = fs.publish_variant("clinical", "metrics-shadow", lora_alpha_factor=2.0)
    corrupt = fs.publish_corrupt_variant("legal", "metrics-corrupt")
    good_legal = fs.alias_version("legal", "champion")
    fs.set_alias("sql", "canary", canary)
    fs.set_model_tag("sql", "loraplex.canary_percent", "50")
    fs.set_alias("clinical", "shadow", shadow)
    try:
        with fs.http() as client:
            for i in range(12):
                for model in ("legal", "clinical", "sql", "base", "legal@1"):
                    reply = fs.complete(client, model, max_tokens=4, user=f"user-{i}", prompt=f"{fs.running.demo_prompt} ({i})")
                    assert reply.status_code == 200, reply.text
                assert fs.complete(client, "no-such-adapter").status_code == 403
            fs.set_alias("legal", "champion", corrupt)
            assert wait_until(lambda: fs.reload_routing()["adapters"]["legal"]["champion"] == corrupt, 5)
            # Two rounds a few scrapes apart: increase() sees a counter grow, not only appear.
            for round_ in range(2):
                for _ in range(2):
                    reply = fs.complete(client, "legal")
                    assert reply.status_code == 200 and reply.headers["x-loraplex-version"] == good_legal, reply.text
                time.sleep(3 * (1 - round_))
            assert fs.complete(client, f"legal@{corrupt}").status_code == 503
    finally:
        fs.set_alias("legal", "champion", good_legal)
        fs.delete_alias("sql", "canary")
        fs.set_model_tag("sql", "loraplex.canary_percent", "0")
        fs.delete_alias("clinical", "shadow")


def test_every_panel_query_and_rule_returns_data_from_a_real_prometheus(fault_stack, tmp_path):
    fs = fault_stack
    prometheus = PrometheusServer(
        tmp_path / "prometheus", f"{fs.gateway_admin_url}/metrics", list(fs.running.shard_metrics_urls.values())
    )
    prometheus.start()
    try:
        def targets_up():
            targets = prometheus.api("targets")["activeTargets"]
            return len(targets) == 1 + len(fs.running.shard_metrics_urls) and all(t["health"] == "up" for t in targets)

        assert wait_until(targets_up, 30, 0.5), prometheus.api("targets")
        generate_load(fs)
        time.sleep(4)  # a few more scrapes, so every rate() window holds two samples after the load

        failures = []
        for path in DASHBOARDS:
            dashboard = json.loads(path.read_text())
            for variable in dashboard["templating"]["list"]:
                metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"]).groups()
                if not prometheus.api(f"label/{label}/values", **{"match[]": metric}):
                    failures.append(f"{path.name} variable ${variable['name']}: no values")
            for panel in dashboard["panels"]:
                for target in panel.get("targets", []):
                    if not prometheus.query(grafana_to_promql(target["expr"])):
                        failures.append(f"{path.name} panel {panel['title']!r}: no data for {target['expr']}")
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        defined = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
        assert len(rules) == len(defined), "Prometheus did not load every rule"
        for rule in rules:
            if rule["health"] != "ok":
                failures.append(f"rule {rule['name']}: {rule['health']} {rule.get('lastError')}")
            expr = bool_form(rule["query"]) if rule["type"] == "alerting" else rule["query"]
            if not prometheus.query(expr):
                failures.append(f"rule {rule['name']}: no data for {expr}")
        assert not failures, "\n".join(failures)

        # The corrupt champion was refused and served by the last good version: that alert fires.
        def refused_alert():
            alerts = prometheus.api("alerts")["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "LoraplexChampionRefused" and a["state"] == "firing"]

        firing = wait_until(refused_alert, 15, 0.5)
        assert firing and firing[0]["labels"]["adapter"] == "legal"
        assert not [a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] == "LoraplexShardDown"]
    finally:
        prometheus.stop()
