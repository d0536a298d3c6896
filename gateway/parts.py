"""The parts one gateway is made of, built from its settings, and their start and stop.

Route handlers receive them through Litestar DI (`Parts`); tests drive them without HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from litestar.di import NamedDependency
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio import Redis

from gateway import shared_store
from gateway.audit import AuditTrail

from gateway.completions import CompletionService, PromptMeasure
from gateway.dispatch import Dispatcher
from gateway.draining import Drain
from gateway.metrics import GatewayMetrics
from gateway.placement import PlacementRing
from gateway.routing import VersionRouter
from gateway.routing_source import RoutingSource, StaticRoutingSource
from gateway.settings import GatewaySettings, SettingsError
from gateway.serving_status import LocalRefusals, ProcessLease, RefusalsSeen, ServingStatusTask, SharedRefusals, SharedWriterLease
from gateway.shadow import LocalShadowAggregates, SharedShadowAggregates, ShadowLog, ShadowMode, ShadowRecorder
from gateway.shared_limits import SharedTenantLimiter
from gateway.shards import DnsDiscovery, ShardPool, StaticDiscovery
from gateway.tenant_limits import LocalTenantLimiter, TenantLimiter
from gateway.tenants import TenantDirectory
from gateway.serving_record import ServingRecord
from gateway.version_fallback import LastGoodVersions
from loraplex.garbage_collection import freeze_startup_objects
from loraplex.routing_table import RoutingTable
from loraplex.grpc_tls import channel_credentials
from loraplex.serving_status import VersionSelection
from loraplex.telemetry import tracer_provider

ShadowAggregateSink = Callable[[str, str, dict[str, float]], None]


class ShadowMetricsLog(Protocol):
    """Sends shadow aggregates somewhere on a thread of its own (`registry.shadow_metrics.ShadowMetricsLogger`)."""

    def submit(self, adapter: str, version: str, aggregate: dict[str, float]) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class GatewayParts:
    settings: GatewaySettings
    tenants: TenantDirectory
    routing_source: RoutingSource
    router: VersionRouter
    pool: ShardPool
    service: CompletionService
    metrics: GatewayMetrics
    shadow: ShadowMode
    shadow_recorder: ShadowRecorder
    limiter: TenantLimiter
    audit: AuditTrail
    # With several processes, what they share lives in Redis/Valkey: tenant limits, shadow aggregates.
    store: Redis | None = None
    # What these parts own and so start and stop; a routing source or tracer handed in by a test is the test's.
    shadow_metrics: ShadowMetricsLog | None = None
    owns_routing_source: bool = True
    tracing: TracerProvider | None = None
    owns_tracing: bool = False
    # Writes what this cluster learns about versions onto them in MLflow (one writer per cluster).
    serving_status: ServingStatusTask | None = None
    drain: Drain = field(default_factory=Drain)  # set on SIGTERM (gateway/draining.py)
    _background: list[asyncio.Task] = field(default_factory=list)

    async def start(self) -> None:
        if self.owns_routing_source:
            await asyncio.to_thread(self.routing_source.start)
        await self.pool.start()
        await self.limiter.start()
        if self.shadow_metrics is not None:
            self.shadow_metrics.start()
        self._background.append(asyncio.create_task(self._reload_tenants_forever(), name="tenants-reload"))
        if self.serving_status is not None:
            self._background.append(asyncio.create_task(self.serving_status.run_forever(), name="serving-status"))
        freeze_startup_objects()

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()
        await self.shadow.stop()
        self.shadow_recorder.close()
        await self.limiter.stop()
        if self.store is not None:
            await self.store.aclose()
        if self.shadow_metrics is not None:
            await asyncio.to_thread(self.shadow_metrics.stop)
        await self.pool.stop()
        if self.owns_routing_source:
            await asyncio.to_thread(self.routing_source.stop)
        if self.owns_tracing and self.tracing is not None:
            self.tracing.shutdown()  # flushes the spans still batched

    async def _reload_tenants_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tenants_reload_interval_s)
            self.tenants.refresh()


Parts = NamedDependency[GatewayParts]


def build_parts(
    settings: GatewaySettings,
    *,
    routing_source: RoutingSource | None = None,
    shard_pool: ShardPool | None = None,
    on_shadow_aggregate: ShadowAggregateSink | None = None,
    tracing: TracerProvider | None = None,
) -> GatewayParts:
    """Every part from the settings; a part handed in (tests) is used instead of building one.
    Requests are traced when `tracing` is given or OTLP export is configured (OTEL_* variables)."""
    if not settings.tenants_file:
        raise SettingsError("tenants_file is required")
    tenants = TenantDirectory.from_file(settings.tenants_file)
    metrics = GatewayMetrics(settings.metrics_adapter_labels)
    owns_tracing = tracing is None
    tracing = tracing or tracer_provider("loraplex-gateway")
    record = ServingRecord(settings.serving_record_file) if settings.serving_record_file else None
    source = routing_source if routing_source is not None else build_routing_source(settings, record)
    audit = AuditTrail()
    if source.on_change is None:  # a source handed in with a listener of its own keeps it
        audit.watch(source.current())
        source.on_change = audit.routing_table_seen
    if record is not None:
        source.on_change = _also_recorded(source.on_change, record)
    pool = shard_pool if shard_pool is not None else build_shard_pool(settings, metrics, tracing)
    router = VersionRouter(source, settings.base_model_id, max_mix_components=settings.max_mix_components)
    dispatcher = Dispatcher(
        pool, settings.request_timeout_s, on_attempt_failed=lambda s, code: metrics.shard_failures.labels(s, code.name).inc()
    )
    shadow_metrics = None
    if on_shadow_aggregate is None and settings.registry_tracking_uri:
        from registry.shadow_metrics import ShadowMetricsLogger  # lazy: the registry pulls in MLflow

        # Aggregates land as metrics on the shadow version's MLflow run, sent off the event loop.
        shadow_metrics = ShadowMetricsLogger(settings.registry_tracking_uri)
        on_shadow_aggregate = shadow_metrics.submit
    store = shared_store.connect(settings.redis_url, settings.redis_timeout_s) if settings.redis_url else None
    shadow_log = (
        ShadowLog(settings.shadow_log_path, settings.shadow_log_max_bytes, settings.shadow_log_backup_count)
        if settings.shadow_log_path
        else None
    )
    aggregates = SharedShadowAggregates(store) if store is not None else LocalShadowAggregates()
    recorder = ShadowRecorder(shadow_log, settings.shadow_recent_pairs, on_shadow_aggregate, settings.shadow_aggregate_every, aggregates)
    refusals_seen = RefusalsSeen()
    serving_status = build_serving_status(settings, pool, source, refusals_seen, aggregates, metrics, store)

    def on_refused(adapter: str, version: str, assignment: str, reason: str) -> None:
        audit.version_refused(adapter, version, assignment, reason)
        if serving_status is not None:
            refusals_seen.record(adapter, version, assignment, reason)

    shadow = ShadowMode(
        dispatcher, recorder, settings.shadow_sample_share, settings.shadow_max_concurrency, metrics=metrics, on_refused=on_refused
    )
    prompt_measure = PromptMeasure(settings.max_prompt_chars, settings.max_prompt_tokens, settings.tokenizer_dir)
    limiter = build_tenant_limiter(settings, metrics, store)
    last_good = LastGoodVersions(
        settings.refused_version_retry_s,
        on_refused=on_refused,
        champion_history=lambda adapter: _champion_history(source, adapter),
        remembered=record.last_good if record is not None else None,
        on_last_good_changed=record.save_last_good if record is not None else None,
    )
    service = CompletionService(settings, router, dispatcher, limiter, metrics, shadow, prompt_measure, last_good)
    return GatewayParts(
        settings,
        tenants,
        source,
        router,
        pool,
        service,
        metrics,
        shadow,
        recorder,
        limiter,
        audit,
        store=store,
        shadow_metrics=shadow_metrics,
        owns_routing_source=routing_source is None,
        tracing=tracing,
        owns_tracing=owns_tracing,
        serving_status=serving_status,
    )


def build_serving_status(
    settings: GatewaySettings,
    pool: ShardPool,
    source: RoutingSource,
    seen: RefusalsSeen,
    aggregates: LocalShadowAggregates | SharedShadowAggregates,
    metrics: GatewayMetrics,
    store: Redis | None,
) -> ServingStatusTask | None:
    """The serving-status cycle, when there is a registry to write to and it is not switched off."""
    if not settings.registry_tracking_uri or not settings.serving_status_interval_s:
        return None
    from registry.mlflow_rest import RestPolicy  # lazy: the registry pulls in MLflow
    from registry.serving_status import ServingStatusWriter

    # Fail fast, no retries: the next cycle is the retry.
    registry = build_registry(settings, RestPolicy(timeout_s=5.0, max_retries=0))
    return ServingStatusTask(
        pool=pool,
        routing_source=source,
        writer=ServingStatusWriter(registry),
        lease=SharedWriterLease(store, settings.serving_status_lease_s) if store is not None else ProcessLease(),
        seen=seen,
        refusals=SharedRefusals(store) if store is not None else LocalRefusals(),
        shadow_aggregates=aggregates,
        selection=VersionSelection(settings.serving_status_batch),
        metrics=metrics,
        interval_s=settings.serving_status_interval_s,
        shard_timeout_s=settings.health_timeout_s * 4,
    )


def build_tenant_limiter(settings: GatewaySettings, metrics: GatewayMetrics, store: Redis | None) -> TenantLimiter:
    if store is None:
        return LocalTenantLimiter()
    return SharedTenantLimiter(
        store,
        metrics,
        lease_s=settings.limits_lease_s,
        failure_policy=settings.redis_failure_policy,
        retry_s=settings.redis_retry_s,
    )


def build_registry(settings: GatewaySettings, rest_policy=None):
    """The gateway's client of the adapter registry (`registry.AdapterRegistry`). The gateway only reads
    aliases and tags and writes tags; the cache dir is where fetches would land."""
    from registry import AdapterRegistry  # lazy: the registry pulls in MLflow

    cache_dir = Path(settings.registry_cache_dir or Path.home() / ".cache" / "loraplex" / "gateway-registry")
    return AdapterRegistry(settings.registry_tracking_uri, cache_dir, rest_policy=rest_policy)


def build_routing_source(settings: GatewaySettings, record: ServingRecord | None = None) -> RoutingSource:
    if settings.registry_tracking_uri:
        from registry import RoutingTableWatcher

        watcher = RoutingTableWatcher(build_registry(settings), settings.registry_poll_interval_s)
        if record is not None and record.table is not None:
            watcher.seed(record.table)  # in force until MLflow answers: a restart during its outage
        return watcher
    return StaticRoutingSource.from_mapping(settings.static_routes)


def _also_recorded(listener: Callable[[RoutingTable], None] | None, record: ServingRecord) -> Callable[[RoutingTable], None]:
    def on_change(table: RoutingTable) -> None:
        if listener is not None:
            listener(table)
        record.save_table(table)

    return on_change


def _champion_history(source: RoutingSource, adapter: str) -> tuple[str, ...]:
    route = source.current().route(adapter)
    return route.champion_history if route is not None else ()


def build_shard_pool(settings: GatewaySettings, metrics: GatewayMetrics, tracing: TracerProvider | None = None) -> ShardPool:
    if settings.shard_dns:
        discovery = DnsDiscovery(settings.shard_dns, settings.shard_dns_port, settings.shard_dns_interval_s)
    elif settings.shard_addresses:
        discovery = StaticDiscovery(settings.shard_addresses)
    else:
        raise SettingsError("set shard_addresses or shard_dns")
    ring = PlacementRing(
        virtual_nodes=settings.ring_virtual_nodes, epsilon=settings.ring_load_epsilon, hot_inflight=settings.hot_adapter_inflight
    )
    return ShardPool(
        discovery,
        ring,
        settings.health_interval_s,
        settings.health_timeout_s,
        on_health_change=lambda shard, ok: metrics.shard_healthy.labels(shard).set(1 if ok else 0),
        # Carries the trace into the shard's gRPC spans.
        channel_interceptors=aio_client_interceptors(tracer_provider=tracing) if tracing else (),
        channel_credentials=(
            channel_credentials(settings.shard_tls_ca_file, settings.shard_tls_cert_file, settings.shard_tls_key_file)
            if settings.shard_tls_ca_file
            else None
        ),
        tls_server_name=settings.shard_tls_server_name,
        stats_interval_s=settings.shard_stats_interval_s,
    )
