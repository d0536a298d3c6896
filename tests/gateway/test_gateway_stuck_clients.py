"""Clients that stop reading a stream, against a real `python -m gateway` process over a scripted
gRPC shard whose answers are far larger than every buffer between gateway and client: each stream
stalls, is cut after `stream_write_timeout_s`, its shard call is cancelled (the shard's batch row
freed), the gateway counts nothing in flight any more, and its memory stays flat over rounds."""

from __future__ import annotations

import socket
import time

import httpx
import psutil
import yaml
from tests.support.raw_http import open_raw_stream
from gateway_fixtures import ACME_KEY, ADMIN_KEY, ROUTES, auth, start_gateway_process, stop_process_group, wait_until

TOKENS = 20_000  # ~3 MB of events a stream
WRITE_TIMEOUT_S = 1.0
CLIENTS = 8
ROUNDS = 4


def stuck_client(api_url: str) -> socket.socket:
    """Sends a streaming request, reads the first KiB of the answer, then never reads again."""
    return open_raw_stream(api_url, ACME_KEY, {"model": "legal", "prompt": "x", "max_tokens": TOKENS, "stream": True})


def gateway_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def test_clients_that_stop_reading_are_cut_their_shard_calls_cancelled_and_memory_stays_flat(tmp_path, tenants_file, shard_servers):
    shard = shard_servers[0]
    shard.servicer.mode, shard.servicer.slow_s = "slow", 0.0005
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"gateway": {
        "port": 0, "admin_port": 0, "tenants_file": str(tenants_file), "shard_addresses": [shard.address],
        "static_routes": ROUTES, "health_interval_s": 0.2, "health_timeout_s": 2.0, "max_tokens_limit": TOKENS,
        "stream_write_timeout_s": WRITE_TIMEOUT_S,
        # The kernel's share of a stalled connection, pinned small so the stall shows within a
        # second here (the default lets the kernel grow it to a few MiB).
        "socket_send_buffer_bytes": 16384,
    }}))
    proc, urls = start_gateway_process(config)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    in_flight = lambda: sum(s["in_flight"] for s in httpx.get(f"{urls.admin}/admin/shards", headers=admin, timeout=5).json()["shards"])  # noqa: E731
    try:
        rss = []
        for round_ in range(ROUNDS + 1):  # round 0 warms up (first allocations, imports)
            cancelled_before = shard.servicer.cancelled
            started = time.monotonic()
            clients = [stuck_client(urls.api) for _ in range(CLIENTS)]
            assert wait_until(lambda: shard.servicer.cancelled - cancelled_before == CLIENTS, timeout_s=30), (
                f"round {round_}: {shard.servicer.cancelled - cancelled_before} of {CLIENTS} shard calls cancelled; "
                f"{len(shard.servicer.requests)} requests; in flight {in_flight()}"
            )
            cut_after = time.monotonic() - started
            # Each was cut long before its ~10 s answer could have been written, and nothing of
            # it is left in flight at the gateway.
            assert cut_after < 8.0
            assert wait_until(lambda: in_flight() == 0, timeout_s=5)
            for sock in clients:
                sock.close()
            rss.append(gateway_rss(proc.pid))
        # The gateway still answers normally.
        shard.servicer.mode = "ok"
        ok = httpx.post(f"{urls.api}/v1/completions", json={"model": "legal", "prompt": "x"}, headers=auth(ACME_KEY), timeout=10)
        assert ok.status_code == 200
        growth = max(rss[1:]) - rss[1]
        print(f"gateway RSS per round (MiB): {[round(r / 2**20, 1) for r in rss]}; growth after warm-up {growth / 2**20:.1f} MiB")
        assert growth < 8 * 2**20, [r / 2**20 for r in rss]
    finally:
        stop_process_group(proc)
