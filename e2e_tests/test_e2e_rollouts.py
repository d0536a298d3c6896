"""Rollouts that do not cut answers, over real processes: SIGTERM a shard mid-stream and every
answer still completes (on the draining shard: the gateway retries nothing that streamed), new
requests go to the other shard; SIGTERM the gateway mid-stream and every in-flight answer completes
while readiness is off and new requests get 503 + Retry-After."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from e2e_tests.process_stack import ADAPTER, headers, process_stack, random_model, sse_payloads

STREAMS = 6
TOKENS = 250  # ~5 s an answer at the batch sizes here


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Two shards for the module: the first test stops shard-a, the second runs on shard-b."""
    root = tmp_path_factory.mktemp("rollouts")
    with process_stack(root, random_model(root)) as running:
        for shard_id in ("shard-a", "shard-b"):
            running.start_shard(shard_id)
        yield running


class Streams:
    """`count` streamed completions on threads; each records its status, shard and SSE payloads."""

    def __init__(self, url: str, model_name: str, count: int, max_tokens: int = TOKENS):
        self.results: list[dict] = [{} for _ in range(count)]
        self.first = [threading.Event() for _ in range(count)]
        self.threads = [threading.Thread(target=self._run, args=(url, model_name, i, max_tokens)) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self, url: str, model_name: str, i: int, max_tokens: int) -> None:
        body = {
            "model": model_name, "prompt": f"stream {i} says", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
        }
        result, lines = self.results[i], []
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers(), timeout=120) as r:
                result.update(status=r.status_code, shard=r.headers.get("x-loraplex-shard"), lines=lines)
                for line in r.iter_lines():
                    lines.append(line)
                    if line.startswith("data: "):
                        self.first[i].set()
        except httpx.HTTPError as exc:
            result["error"] = repr(exc)
        finally:
            self.first[i].set()

    def wait_first(self, timeout_s: float) -> bool:
        return all(event.wait(timeout_s) for event in self.first)

    def join(self, timeout_s: float) -> list[dict]:
        for thread in self.threads:
            thread.join(timeout_s)
        return self.results


def assert_complete(result: dict, max_tokens: int = TOKENS) -> None:
    assert result.get("status") == 200 and "error" not in result, result
    payloads = sse_payloads(result["lines"])
    assert payloads[-1] == "[DONE]", payloads[-3:]
    assert not any("error" in p for p in payloads[:-1] if isinstance(p, dict)), "a stream was cut"
    assert payloads[-2]["usage"]["completion_tokens"] == max_tokens
    assert payloads[-3]["choices"][0]["finish_reason"] == "length"


def test_sigterm_to_a_shard_mid_stream_completes_every_answer_there(stack):
    try:
        url = stack.start_gateway()
        # The base model goes to the least loaded shard: the streams spread over both.
        streams = Streams(url, "base", STREAMS)
        assert streams.wait_first(60)
        on_a = sum(r.get("shard") == "shard-a" for r in streams.results)
        assert on_a >= 1, streams.results
        running_on_a = stack.shard_stats("shard-a").running
        assert running_on_a == on_a  # every stream on shard-a is still generating

        stack.shards["shard-a"].signal_group(signal.SIGTERM)
        # Health turns NOT_SERVING at once: the gateway takes shard-a out of the ring; new requests go to shard-b.
        ready = lambda: httpx.get(f"{url}/readyz", timeout=5).json()["healthy_shards"] == ["shard-b"]  # noqa: E731
        deadline = time.monotonic() + 5
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready()
        late = httpx.post(
            f"{url}/v1/completions", json={"model": ADAPTER, "prompt": "late", "max_tokens": 4}, headers=headers(), timeout=60
        )
        assert late.status_code == 200 and late.headers["x-loraplex-shard"] == "shard-b"

        for result in streams.join(90):
            assert_complete(result)
        deadline = time.monotonic() + 30
        while stack.shards["shard-a"].is_running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stack.shards["shard-a"].returncode == 0
        log = stack.shards["shard-a"].log_path.read_text()
        assert "shard shard-a draining" in log and "drain timed out" not in log
    finally:
        stack.gateway.stop()
        del stack.shard_addresses["shard-a"]


def test_sigterm_to_the_gateway_mid_stream_completes_every_answer(stack):
    url = stack.start_gateway(drain_delay_s=3.0)
    streams = Streams(url, ADAPTER, STREAMS)
    assert streams.wait_first(60)
    assert stack.shard_stats("shard-b").running == STREAMS

    stack.gateway.signal_group(signal.SIGTERM)
    signalled = time.monotonic()
    ready = httpx.get(f"{url}/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["draining"] is True
    refused = httpx.post(f"{url}/v1/completions", json={"model": ADAPTER, "prompt": "late"}, headers=headers(), timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "shutting_down"

    for result in streams.join(90):
        assert_complete(result)
    deadline = time.monotonic() + 30
    while stack.gateway.is_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stack.gateway.is_running()
    assert time.monotonic() - signalled < 30  # the answers' time, not the whole grace (65 s)
    assert stack.shard_stats("shard-b").running == 0
