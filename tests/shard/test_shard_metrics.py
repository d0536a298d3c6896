"""The shard's Prometheus endpoint, scraped over HTTP from a real shard: engine, cache and refusal
metrics move with real requests, and no metric carries a per-adapter or per-request label."""

import asyncio

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from loraplex.stack.ports import free_port
from tests.support.shard_server import generate_request, running_shard, shard_test_settings
from protos import shard_pb2_grpc
from shard.metrics import REFUSAL_REASONS, ShardMetrics
from shard.settings import SettingsError, ShardSettings


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert reply.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_follow_requests_refusals_and_adapter_loads(tiny_model_dir, tiny_adapter_dirs):
    port = free_port()
    settings = shard_test_settings(tiny_model_dir, tiny_adapter_dirs, metrics_port=port)

    async def body():
        async with running_shard(settings) as address:
            before = scrape(port)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = shard_pb2_grpc.ShardStub(channel)
                for adapter in ("alpha", "beta", ""):
                    chunks = [c async for c in stub.Generate(generate_request(adapter=adapter, max_tokens=4))]
                    assert chunks[-1].usage.completion_tokens == 4
                try:
                    async for _ in stub.Generate(generate_request(adapter="missing")):
                        pass
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.NOT_FOUND
            return before, scrape(port)

    before, after = asyncio.run(body())
    assert value(before, "loraplex_shard_ready") == 1
    assert value(after, "loraplex_shard_info", shard="test-shard", base_model=tiny_model_dir.name, quantization="fp32", device="cpu") == 1
    assert value(after, "loraplex_shard_generated_tokens_total") - value(before, "loraplex_shard_generated_tokens_total") == 12
    assert value(after, "loraplex_shard_step_seconds_count", phase="decode") >= 3
    assert value(after, "loraplex_shard_step_seconds_count", phase="prefill") >= 3
    assert value(after, "loraplex_shard_step_rows_sum", phase="decode") >= 9
    assert value(after, "loraplex_shard_time_to_first_token_seconds_count") == 3
    assert value(after, "loraplex_shard_refusals_total", reason="adapter_not_found") == 1
    assert value(after, "loraplex_shard_refusals_total", reason="queue_full") == 0
    assert value(after, "loraplex_shard_max_batch_size") == 2
    assert value(after, "loraplex_shard_queue_capacity") == 4
    assert value(after, "loraplex_shard_kv_cache_capacity_tokens") == 2 * 64
    # Two adapters were fetched (disk), read (host) and copied into the two slots (device).
    for tier in ("device", "host", "disk"):
        assert value(after, "loraplex_shard_adapter_load_seconds_count", tier=tier) >= 2
    assert value(after, "loraplex_shard_adapters_resident", tier="device") == 2
    assert value(after, "loraplex_shard_adapter_tier_capacity", tier="device") == 2
    assert value(after, "loraplex_shard_adapter_tier_misses_total", tier="device") >= 2
    assert value(after, "loraplex_shard_adapter_evictions_total", tier="device") == 0
    # The prefix cache's counters come from the engine: every prompt token was looked up.
    queried = value(after, "loraplex_shard_prefix_cache_query_tokens_total")
    assert queried > 0 and 0 <= value(after, "loraplex_shard_prefix_cache_hit_tokens_total") <= queried
    # Bounded labels: nothing names an adapter, a version or a request (the merged-adapter gauge has
    # no series while nothing is merged, and at most one when something is).
    label_names = {name for (_, labels) in after for name, _ in labels}
    assert label_names <= {"phase", "tier", "reason", "le", "shard", "base_model", "quantization", "device", "action", "trigger"}
    assert value(after, "loraplex_shard_adapter_merge_changes_total", action="merge", trigger="auto") == 0


def test_every_refusal_reason_is_exported_from_the_start():
    metrics = ShardMetrics("s")
    text = metrics.exposition().decode()
    for reason in REFUSAL_REASONS:
        assert f'loraplex_shard_refusals_total{{reason="{reason}"}} 0.0' in text
    metrics.observe_refusal("something new")  # an unknown reason cannot add a series
    assert 'loraplex_shard_refusals_total{reason="internal"} 1.0' in metrics.exposition().decode()


def test_metrics_port_is_checked():
    base = {"model_dir": "/m", "port": 5000}
    assert ShardSettings.from_mapping({**base, "metrics_port": 9400}).metrics_port == 9400
    for bad in (70000, -1, 5000):
        try:
            ShardSettings.from_mapping({**base, "metrics_port": bad})
        except SettingsError as error:
            assert "metrics_port" in str(error)
        else:
            raise AssertionError(f"metrics_port={bad} accepted")
