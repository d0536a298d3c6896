"""Vanishing clients, over real processes (a shard on a small random Llama, the gateway): a client
that disconnects mid-stream frees its batch row on the shard at once - the same cancel path a
stuck client's write timeout takes (tests/gateway/test_gateway_stuck_clients.py)."""

from __future__ import annotations

import socket
import time

import pytest

from e2e_tests.process_stack import ADAPTER, TENANT_KEY, process_stack, random_model
from tests.support.raw_http import open_raw_stream
from tests.support.waiting import wait_until

MAX_TOKENS = 3000


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stuck-clients")
    # Tiny and fast per step; a long context so an uncut answer would run for many seconds.
    with process_stack(root, random_model(root, hidden=128, layers=2, positions=4096)) as running:
        running.start_shard("shard-a", max_context=4096, max_batch_size=8)
        running.start_gateway(max_tokens_limit=MAX_TOKENS)
        yield running


def open_stream(url: str) -> socket.socket:
    body = {"model": ADAPTER, "prompt": "never read", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    return open_raw_stream(url, TENANT_KEY, body, receive_buffer=1 << 20)


def test_a_client_that_disconnects_frees_its_row_at_once(stack):
    sock = open_stream(stack.gateway_url)
    assert wait_until(lambda: stack.shard_stats("shard-a").running == 1, 10)
    time.sleep(0.3)  # a few decode steps, so the step rate is known
    stats = stack.shard_stats("shard-a")
    step_s = 1.0 / stats.decode_tokens_per_s  # one running request: one token a step
    before, closed = stats.tokens_generated, time.monotonic()
    sock.close()
    assert wait_until(lambda: stack.shard_stats("shard-a").running == 0, 5, 0.002)
    freed_s = time.monotonic() - closed
    steps_after = stack.shard_stats("shard-a").tokens_generated - before
    print(f"row freed {freed_s * 1000:.0f} ms after the disconnect; {steps_after} decode steps ran meanwhile (a step: {step_s * 1000:.1f} ms)")
    # The cancel travels client -> gateway -> gRPC -> engine in milliseconds; the engine drops the
    # row at its next step. On a loaded 2-core machine allow some steps for the travel.
    assert freed_s < 1.0 and steps_after < MAX_TOKENS // 10
