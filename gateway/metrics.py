"""The gateway's Prometheus metrics, in a registry of its own (one per app: no process globals).

With several worker processes (gateway/workers.py) a scrape reaches one of them, so every worker
writes its values to files in `PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode,
chosen when that variable is set before the worker starts) and `exposition()` merges all workers':
counters and histograms add up, each gauge as its `multiprocess_mode` says.

`assignment` is how a request's version was chosen: champion, canary, pinned, base, or fallback
(the base model answered for an adapter whose version could not; the `x-loraplex-route` response header).

Labels stay bounded at 10,000 adapters: an `adapter` label names at most `max_adapter_labels`
distinct adapters per process (the first seen); the rest share the value `_other`, so a gateway
exports O(max_adapter_labels) series whatever the catalogue. Tenants (bounded by the tenants file)
get counters of their own, never crossed with adapters. No label carries a request id or a
version number.
"""

from __future__ import annotations

import os
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.metrics import MetricWrapperBase

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
AGREEMENT_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
OTHER_ADAPTERS = "_other"


class AdapterLabels:
    """The `adapter` label value: the adapter's name for the first `limit` adapters seen,
    `_other` after that."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter: str) -> str:
        if adapter in self._named or not adapter:
            return adapter
        with self._lock:
            if len(self._named) < self.limit:
                self._named.add(adapter)
                return adapter
        return OTHER_ADAPTERS


class LabelledChildren:
    """A metric's children by label values, each looked up in prometheus_client once: its `labels()`
    validates and locks on every call, which the per-request metrics would pay several times."""

    def __init__(self, metric: MetricWrapperBase):
        self.metric = metric
        self._children: dict[tuple[str, ...], MetricWrapperBase] = {}

    def __call__(self, *values: str) -> MetricWrapperBase:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class GatewayMetrics:
    def __init__(self, max_adapter_labels: int = 1000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.adapter_label = AdapterLabels(max_adapter_labels)
        r = self.registry
        self.requests = Counter(
            "loraplex_gateway_requests", "HTTP requests answered", ["endpoint", "status", "assignment", "adapter"], registry=r
        )
        self.latency = Histogram(
            "loraplex_gateway_request_seconds", "Time to the end of the answer", ["endpoint", "assignment"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "loraplex_gateway_first_token_seconds", "Time until the first text arrived from a shard", ["assignment"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("loraplex_gateway_tokens", "Tokens served", ["kind", "adapter"], registry=r)
        self.tenant_requests = Counter(
            "loraplex_gateway_tenant_requests", "API requests answered per authenticated tenant", ["tenant", "status"], registry=r
        )
        self.tenant_tokens = Counter("loraplex_gateway_tenant_tokens", "Tokens served per tenant", ["tenant", "kind"], registry=r)
        self.shadow_comparisons = Counter(
            "loraplex_gateway_shadow_comparisons",
            "Shadow answers compared with the answer the client got: outcome exact (same text) or different",
            ["adapter", "outcome"],
            registry=r,
        )
        self.shadow_agreement = Histogram(
            "loraplex_gateway_shadow_token_agreement",
            "Share of positions where the shadow generated the same token as the answer the client got",
            ["adapter"],
            buckets=AGREEMENT_BUCKETS,
            registry=r,
        )
        self.shard_healthy = Gauge("loraplex_gateway_shard_healthy", "1 when the shard is in the ring", ["shard"], multiprocess_mode="livemin", registry=r)
        self.shard_in_flight = Gauge("loraplex_gateway_shard_in_flight", "Requests in flight per shard", ["shard"], multiprocess_mode="livesum", registry=r)
        self.shard_failures = Counter("loraplex_gateway_shard_attempt_failures", "Failed shard calls", ["shard", "code"], registry=r)
        self.routing_stale = Gauge("loraplex_gateway_routing_table_stale", "1 when the routing table could not be refreshed", multiprocess_mode="livemax", registry=r)
        self.routing_age = Gauge("loraplex_gateway_routing_table_age_seconds", "Seconds since the routing table was last refreshed", multiprocess_mode="livemax", registry=r)
        self.version_fallbacks = Counter(
            "loraplex_gateway_version_fallbacks", "Requests served by the last good version after the shards refused a promoted one", ["adapter"], registry=r
        )
        self.base_fallbacks = Counter(
            "loraplex_gateway_base_fallbacks",
            "Requests the base model answered because the adapter's version could not be served and its fallback policy is base",
            ["adapter", "reason"],
            registry=r,
        )
        self.stream_cuts = Counter("loraplex_gateway_stream_cuts", "Streams ended by an error event after text was sent", registry=r)
        self.shadow_pairs = Gauge("loraplex_gateway_shadow_started", "Shadow copies started", multiprocess_mode="livesum", registry=r)
        self.limits_store_up = Gauge(
            "loraplex_gateway_limits_store_up", "1 while the shared tenant-limits store (Redis/Valkey) answers", multiprocess_mode="livemin", registry=r
        )
        self.limits_degraded = Counter(
            "loraplex_gateway_limits_degraded",
            "Requests whose tenant limits were decided without the shared store, by the failure policy applied",
            ["policy"],
            registry=r,
        )
        self.serving_status_writer = Gauge(
            "loraplex_gateway_serving_status_writer",
            "1 while this process holds the cluster's lease to write serving status tags to MLflow",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.serving_status_checked = Counter(
            "loraplex_gateway_serving_status_versions_checked", "Model versions whose serving status tags this process read in MLflow", registry=r
        )
        self.serving_status_written = Counter(
            "loraplex_gateway_serving_status_tags_written", "Serving status tags this process wrote to MLflow (only changed values)", registry=r
        )
        self.shadow_dropped = Gauge("loraplex_gateway_shadow_dropped", "Shadow copies shed because the shadow pool was full", multiprocess_mode="livesum", registry=r)

        # The per-request ones, as children looked up once (label sets are bounded, as the metrics' are).
        self.request_count = LabelledChildren(self.requests)
        self.request_latency = LabelledChildren(self.latency)
        self.first_token_latency = LabelledChildren(self.first_token)
        self.token_count = LabelledChildren(self.tokens)
        self.tenant_request_count = LabelledChildren(self.tenant_requests)
        self.tenant_token_count = LabelledChildren(self.tenant_tokens)

    def exposition(self) -> bytes:
        directory = os.environ.get(MULTIPROCESS_DIR_ENV)
        if not directory:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, directory)
        return generate_latest(merged)
