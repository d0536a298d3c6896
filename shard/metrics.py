"""The shard's Prometheus metrics, in a registry of its own, served over HTTP on
``ShardSettings.metrics_port`` (0 = not served).

Two kinds of metric live here:
- events the engine, the adapter cache and the gRPC servicer report as they happen (step time,
  batch rows, time to first token, adapter load time per tier, refusals),
  through the ``observe_*`` methods;
- state read when Prometheus scrapes (queue depth, running rows, tokens generated, KV-cache use,
  prefix-cache tokens looked up and hit, adapters resident per tier, hits/misses/evictions), from
  ``Engine.stats()`` and
  ``TieredAdapterCache.tier_stats()``, so the engine keeps no second set of counters.

Labels are bounded by construction: no metric has a per-request label, and the only per-adapter
one is ``loraplex_shard_merged_adapter``, which has at most one series (a shard merges at most one
adapter). ``tier`` is one of device/host/disk, ``phase`` prefill/decode, ``reason`` one of
``REFUSAL_REASONS``, ``action`` merge/unmerge and ``trigger`` admin/auto; which adapter is hot is
the gateway's per-adapter view (and ``ListAdapters`` for one shard). A shard serving 10,000
adapters exports the same few dozen series as one serving three.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode")
MERGE_ACTIONS = ("merge", "unmerge")
MERGE_TRIGGERS = ("admin", "auto")
TIERS = ("device", "host", "disk")
# Why a Generate call was refused before or while it ran; one label value each.
REFUSAL_REASONS = (
    "queue_full",
    "invalid_request",
    "shutting_down",
    "model_loading",
    "adapter_not_found",
    "adapter_rejected",
    "adapter_in_use",
    "adapter_load_timeout",
    "registry_unavailable",
    "internal",
)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ShardMetrics:
    def __init__(self, shard_id: str) -> None:
        self.shard_id = shard_id
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Gauge(
            "loraplex_shard_info", "Always 1; labels say what this shard serves",
            ["shard", "base_model", "quantization", "device"], registry=r,
        )
        self.ready = Gauge("loraplex_shard_ready", "1 once the model is loaded and the shard serves", registry=r)
        self.step_seconds = Histogram(
            "loraplex_shard_step_seconds", "Time of one forward pass of the engine", ["phase"], buckets=STEP_BUCKETS, registry=r
        )
        self.step_rows = Histogram(
            "loraplex_shard_step_rows", "Requests in one forward pass (batch occupancy)", ["phase"], buckets=ROW_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "loraplex_shard_time_to_first_token_seconds", "From Generate received to its first text, queueing included",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.adapter_load = Histogram(
            "loraplex_shard_adapter_load_seconds",
            "Time to bring an adapter into a tier: disk = fetch from the registry, host = read and "
            "validate from disk, device = copy into a slot",
            ["tier"], buckets=LOAD_BUCKETS, registry=r,
        )
        self.refusals = Counter(
            "loraplex_shard_refusals", "Generate calls refused or failed, by reason", ["reason"], registry=r
        )
        self.merge_changes = Counter(
            "loraplex_shard_adapter_merge_changes",
            "Adapters merged into or unmerged from the base weights, by action and what asked for it",
            ["action", "trigger"], registry=r,
        )
        # Every label value exists from the start, so dashboards and alerts see zeros, not gaps.
        for action in MERGE_ACTIONS:
            for trigger in MERGE_TRIGGERS:
                self.merge_changes.labels(action, trigger)
        for phase in PHASES:
            self.step_seconds.labels(phase)
            self.step_rows.labels(phase)
        for tier in TIERS:
            self.adapter_load.labels(tier)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        self._state = _ServingState()
        r.register(self._state)
        self._server: Any = None

    # ---- events -------------------------------------------------------------------------------

    def observe_step(self, phase: str, seconds: float, rows: int) -> None:
        self.step_seconds.labels(phase).observe(seconds)
        self.step_rows.labels(phase).observe(rows)

    def observe_first_token(self, seconds: float) -> None:
        self.first_token.observe(seconds)

    def observe_adapter_load(self, tier: str, milliseconds: float) -> None:
        self.adapter_load.labels(tier).observe(milliseconds / 1000)

    def observe_merge_change(self, action: str, trigger: str) -> None:
        self.merge_changes.labels(action, trigger).inc()

    def observe_refusal(self, reason: str) -> None:
        self.refusals.labels(reason if reason in REFUSAL_REASONS else "internal").inc()

    # ---- state read at scrape time ------------------------------------------------------------

    def serving(self, engine, adapter_cache, *, base_model: str, quantization: str, device: str) -> None:
        """The model is loaded: export its state from now on."""
        self.info.labels(self.shard_id, base_model, quantization, device).set(1)
        self._state.engine_stats = engine.stats
        self._state.tier_stats = adapter_cache.tier_stats if adapter_cache is not None else None
        self.ready.set(1)

    def not_serving(self) -> None:
        self.ready.set(0)

    # ---- HTTP ---------------------------------------------------------------------------------

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on a thread; returns the bound port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_address[1]

    def stop_http(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ServingState(Collector):
    """Engine and adapter-cache state, read on each scrape."""

    def __init__(self) -> None:
        self.engine_stats: Callable[[], Any] | None = None
        self.tier_stats: Callable[[], list] | None = None

    def describe(self):
        return []  # the families depend on what the shard runs; nothing to check at register time

    def collect(self) -> Iterator:
        if self.engine_stats is not None:
            yield from _engine_families(self.engine_stats())
        if self.tier_stats is not None:
            yield from _tier_families(self.tier_stats())


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _engine_families(stats) -> Iterator:
    yield _gauge("loraplex_shard_running_requests", "Requests in the running batch", stats.running)
    yield _gauge("loraplex_shard_max_batch_size", "Rows the running batch can hold", stats.max_batch_size)
    yield _gauge("loraplex_shard_queued_requests", "Requests waiting to join the batch", stats.queued)
    yield _gauge("loraplex_shard_queue_capacity", "Waiting requests before RESOURCE_EXHAUSTED", stats.queue_capacity)
    yield _gauge("loraplex_shard_decode_tokens_per_second", "Decode throughput over the last seconds", stats.decode_tokens_per_s)
    yield CounterMetricFamily("loraplex_shard_generated_tokens", "Tokens generated", value=stats.tokens_generated)
    yield CounterMetricFamily("loraplex_shard_finished_requests", "Requests finished (any reason)", value=stats.requests_completed)
    yield _gauge("loraplex_shard_kv_cache_used_tokens", "Token positions held in the KV cache", stats.kv_used_tokens)
    yield CounterMetricFamily(
        "loraplex_shard_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache", value=stats.prefix_cache_hit_tokens
    )
    yield CounterMetricFamily(
        "loraplex_shard_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache", value=stats.prefix_cache_queried_tokens
    )
    yield _gauge("loraplex_shard_kv_cache_capacity_tokens", "Token positions the KV cache can hold (rows x context)", stats.kv_capacity_tokens)
    merged = GaugeMetricFamily(
        "loraplex_shard_merged_adapter", "1 for the adapter version merged into the base weights (no series: none)", labels=["adapter"]
    )
    if stats.merged_adapter is not None:
        merged.add_metric([str(stats.merged_adapter)], 1)
    yield merged


def _tier_families(tiers) -> Iterator:
    families = {
        "resident": GaugeMetricFamily("loraplex_shard_adapters_resident", "Adapters held in the tier", labels=["tier"]),
        "capacity": GaugeMetricFamily("loraplex_shard_adapter_tier_capacity", "Adapters the tier can hold (0 = unbounded)", labels=["tier"]),
        "bytes": GaugeMetricFamily("loraplex_shard_adapter_tier_bytes", "Bytes of adapters held in the tier", labels=["tier"]),
        "capacity_bytes": GaugeMetricFamily(
            "loraplex_shard_adapter_tier_capacity_bytes", "Bytes the tier may hold (0 = no byte bound)", labels=["tier"]
        ),
        "hits": CounterMetricFamily("loraplex_shard_adapter_tier_hits", "Lookups that found the adapter in the tier", labels=["tier"]),
        "misses": CounterMetricFamily("loraplex_shard_adapter_tier_misses", "Lookups that had to load from the tier below", labels=["tier"]),
        "evictions": CounterMetricFamily("loraplex_shard_adapter_evictions", "Adapters evicted from the tier (least recently used)", labels=["tier"]),
    }
    for tier in tiers:
        families["resident"].add_metric([tier.tier], tier.used)
        families["capacity"].add_metric([tier.tier], tier.capacity)
        families["bytes"].add_metric([tier.tier], tier.used_bytes)
        families["capacity_bytes"].add_metric([tier.tier], tier.capacity_bytes)
        families["hits"].add_metric([tier.tier], tier.hits)
        families["misses"].add_metric([tier.tier], tier.misses)
        families["evictions"].add_metric([tier.tier], tier.evictions)
    yield from families.values()
