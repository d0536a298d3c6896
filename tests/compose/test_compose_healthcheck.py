"""compose/container_healthcheck.py against real servers on 127.0.0.1: a grpc.health.v1 server
(what the shard serves) and an HTTP server answering like /readyz."""

from __future__ import annotations

import http.server
import importlib.util
import socket
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SCRIPT = Path(__file__).resolve().parents[2] / "compose" / "container_healthcheck.py"
SHARD_SERVICE = "loraplex.shard.v1.Shard"


def load_script():
    spec = importlib.util.spec_from_file_location("compose_container_healthcheck", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = load_script()


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(5)


@pytest.fixture
def http_server():
    statuses = {"/readyz": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(statuses.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield statuses, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpc_check_follows_the_serving_status(health_server):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer.set(SHARD_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["grpc", address]) == healthcheck.UNHEALTHY  # model still loading
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SHARD_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["grpc", address]) == healthcheck.HEALTHY
    assert healthcheck.main(["grpc", address, "--service", SHARD_SERVICE]) == healthcheck.HEALTHY
    assert healthcheck.main(["grpc", address, "--service", "no.such.Service"]) == healthcheck.UNHEALTHY
    servicer.enter_graceful_shutdown()  # draining
    assert healthcheck.main(["grpc", address]) == healthcheck.UNHEALTHY


def test_grpc_check_reports_an_unreachable_server():
    assert healthcheck.main(["--timeout", "1", "grpc", f"127.0.0.1:{free_port()}"]) == healthcheck.UNREACHABLE


def test_http_check_is_healthy_only_on_2xx(http_server):
    statuses, base = http_server
    assert healthcheck.main(["http", f"{base}/readyz"]) == healthcheck.HEALTHY
    statuses["/readyz"] = 503  # no healthy shard yet
    assert healthcheck.main(["http", f"{base}/readyz"]) == healthcheck.UNHEALTHY
    assert healthcheck.main(["--timeout", "1", "http", f"http://127.0.0.1:{free_port()}/readyz"]) == healthcheck.UNREACHABLE


def test_script_runs_as_a_command_the_way_docker_runs_it(health_server):
    # The images install it as /usr/local/bin/loraplex-healthcheck and exec it directly.
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    done = subprocess.run([sys.executable, str(SCRIPT), "grpc", address], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    done = subprocess.run([sys.executable, str(SCRIPT), "grpc", address], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "NOT_SERVING" in done.stderr
