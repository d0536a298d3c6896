"""Fixtures for the gateway tests: a tenants file, scripted shards on loopback, a gateway app over them."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import yaml

import pytest
from gateway_scripted_shard import ScriptedShardServer
from litestar.testing import TestClient

from gateway.app import create_apps
from gateway.routing_source import StaticRoutingSource
from gateway.settings import GatewaySettings
from gateway.tenants import sha256_hex
from tests.support.waiting import wait_until  # noqa: F401  (the gateway tests import it from here)

ADMIN_KEY = "admin-secret"
ACME_KEY = "acme-secret"
LIMITED_KEY = "limited-secret"
WILDCARD_KEY = "wildcard-secret"

ROUTES = {
    "legal": {"champion": "1", "canary": "2", "canary_percent": 0},
    "clinical": {"champion": "3"},
    "sql": {"champion": "1"},
    "draft": {"canary": None},  # granted to acme but nothing is champion
    "shadowed": {"champion": "1", "shadow": "2"},
}


def tenants_yaml() -> str:
    return f"""
admin_key_sha256: {sha256_hex(ADMIN_KEY)}
tenants:
  - name: acme
    key_sha256: [{sha256_hex(ACME_KEY)}]
    adapters: [legal, clinical, draft, shadowed, base]
    default_adapter: legal
  - name: limited
    key_sha256: [{sha256_hex(LIMITED_KEY)}]
    adapters: [legal]
    limits: {{concurrent_requests: 1, tokens_per_minute: 10}}
  - name: everything
    key_sha256: [{sha256_hex(WILDCARD_KEY)}]
    adapters: ["*"]
"""


@pytest.fixture
def tenants_file(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(tenants_yaml())
    return path


@pytest.fixture
def shard_servers():
    servers = [ScriptedShardServer(f"s{i}").start() for i in range(2)]
    yield servers
    for server in servers:
        server.close()


@pytest.fixture
def gateway_settings(tmp_path, tenants_file, shard_servers):
    return GatewaySettings.from_mapping(
        {
            "tenants_file": str(tenants_file),
            "shard_addresses": [s.address for s in shard_servers],
            "health_interval_s": 0.1,
            "health_timeout_s": 0.5,
            "tenants_reload_interval_s": 0.1,
            "shadow_log_path": str(tmp_path / "shadow.jsonl"),
            "max_body_bytes": 4096,
            "max_tokens_limit": 64,
            "max_prompt_chars": 1000,
            "request_timeout_s": 10,
            "static_routes": ROUTES,
        }
    )


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def gateway_apps(gateway_settings):
    return create_apps(gateway_settings, routing_source=StaticRoutingSource.from_mapping(ROUTES))


class PortClient:
    """Requests to another port of the server a TestClient talks to, through that client (one event loop)."""

    def __init__(self, client: TestClient, port: int):
        self.client, self.base = client, f"http://testserver.local:{port}"

    def get(self, path: str, **kwargs):
        return self.client.get(self.base + path, **kwargs)

    def post(self, path: str, **kwargs):
        return self.client.post(self.base + path, **kwargs)


@pytest.fixture
def client(gateway_apps):
    """The public port, as `python -m gateway` serves it; its lifespan runs the gateway's parts."""
    with TestClient(gateway_apps.by_port()) as test_client:
        # Shards join the ring on the first health round, after startup: a test's first request
        # must not race it (an admin action before then rightly answers 503).
        expected = len(gateway_apps.parts.settings.shard_addresses)
        assert wait_until(lambda: len(gateway_apps.parts.pool.healthy_shards()) == expected, timeout_s=10.0)
        yield test_client


@pytest.fixture
def admin_client(gateway_apps, client):
    """The admin port of the same server."""
    return PortClient(client, gateway_apps.parts.settings.admin_port)


@pytest.fixture
def parts(gateway_apps):
    return gateway_apps.parts


REPO = Path(__file__).resolve().parents[2]


class GatewayUrls(NamedTuple):
    api: str
    admin: str


def start_gateway_process(config: Path, timeout_s: float = 60.0) -> tuple[subprocess.Popen, GatewayUrls]:
    """`python -m gateway --config FILE` in its own process group; returns it and its URLs once ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_GATEWAY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", str(config), "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    url, admin_url, seen, deadline = None, None, [], time.monotonic() + timeout_s
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith("gateway admin on "):
            admin_url = line.split()[3]
        if line.startswith("gateway ready on "):
            url = line.split()[3]
    if not (url and url.startswith("http://127.0.0.1:") and admin_url and admin_url != url):
        stop_process_group(proc)
        raise AssertionError("gateway did not start:\n" + "".join(seen))
    return proc, GatewayUrls(url, admin_url)


def stop_process_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.fixture
def gateway_process(tmp_path, tenants_file, shard_servers):
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {
                    "port": 0,
                    "admin_port": 0,
                    "tenants_file": str(tenants_file),
                    "shard_addresses": [s.address for s in shard_servers],
                    "static_routes": ROUTES,
                    "health_interval_s": 0.2,
                }
            }
        )
    )
    proc, urls = start_gateway_process(config)
    try:
        yield urls
    finally:
        stop_process_group(proc)
