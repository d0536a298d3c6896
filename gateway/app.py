"""`create_app(settings)`: wires the core classes into one Litestar app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from litestar import Litestar
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.types import Message, Scope
from redis.asyncio import Redis

from gateway import shared_store
from gateway.app_lifecycle import call_blocking_or_async
from gateway.completions import CompletionService, PromptMeasure
from gateway.dispatch import Dispatcher
from gateway.metrics import GatewayMetrics
from gateway.placement import PlacementRing
from gateway.routes import admin, health, openai_api
from gateway.routes.responses import openai_error_response
from gateway.routing import Router, RoutingSource
from gateway.routing_source import StaticRoutingSource
from gateway.settings import GatewaySettings, SettingsError
from gateway.shadow import LocalShadowAggregates, SharedShadowAggregates, ShadowMode, ShadowRecorder
from gateway.shared_limits import SharedTenantLimiter
from gateway.shards import DnsDiscovery, ShardPool, StaticDiscovery
from gateway.state import GatewayParts
from gateway.tenant_limits import LocalTenantLimiter, TenantLimiter
from gateway.tenants import TenantDirectory
from loraplex.telemetry import tracer_provider

log = logging.getLogger(__name__)

_API_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def build_routing_source(settings: GatewaySettings) -> RoutingSource:
    if settings.registry_tracking_uri:
        from registry import AdapterRegistry, RoutingTableWatcher  # lazy: the registry pulls in MLflow

        # The gateway only reads the routing table; the cache dir is where fetches would land.
        cache_dir = Path(settings.registry_cache_dir or Path.home() / ".cache" / "loraplex" / "gateway-registry")
        registry = AdapterRegistry(settings.registry_tracking_uri, cache_dir)
        return RoutingTableWatcher(registry, settings.registry_poll_interval_s)
    return StaticRoutingSource.from_mapping(settings.static_routes)


def build_shard_pool(
    settings: GatewaySettings, metrics: GatewayMetrics, tracing: TracerProvider | None = None
) -> ShardPool:
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


def create_app(
    settings: GatewaySettings,
    *,
    routing_source: RoutingSource | None = None,
    shard_pool: ShardPool | None = None,
    on_shadow_aggregate: Callable[[str, str, dict[str, float]], None] | None = None,
    tracing: TracerProvider | None = None,
) -> Litestar:
    """The gateway app. Requests are traced (HTTP span, then the gRPC call to the shard) when
    `tracing` is given or OTLP export is configured through the standard OTEL_* variables."""
    if not settings.tenants_file:
        raise SettingsError("tenants_file is required")
    tenants = TenantDirectory.from_file(settings.tenants_file)
    metrics = GatewayMetrics()
    source = routing_source if routing_source is not None else build_routing_source(settings)
    owns_source = routing_source is None
    owns_tracing = tracing is None
    tracing = tracing or tracer_provider("loraplex-gateway")
    pool = shard_pool if shard_pool is not None else build_shard_pool(settings, metrics, tracing)
    router = Router(source, settings.base_model_id)
    dispatcher = Dispatcher(
        pool, settings.request_timeout_s, on_attempt_failed=lambda s, code: metrics.shard_failures.labels(s, code.name).inc()
    )
    shadow_metrics = None
    if on_shadow_aggregate is None and settings.registry_tracking_uri:
        from registry.shadow_metrics import ShadowMetricsLogger  # lazy: the registry pulls in MLflow

        # Aggregates land as metrics on the shadow version's MLflow run, sent off the event loop.
        shadow_metrics = ShadowMetricsLogger(settings.registry_tracking_uri)
        on_shadow_aggregate = shadow_metrics.submit
    # With several processes, what they share lives in Redis/Valkey: tenant limits, shadow aggregates.
    store = shared_store.connect(settings.redis_url, settings.redis_timeout_s) if settings.redis_url else None
    recorder = ShadowRecorder(
        settings.shadow_log_path or None,
        settings.shadow_recent_pairs,
        on_shadow_aggregate,
        settings.shadow_aggregate_every,
        SharedShadowAggregates(store) if store is not None else LocalShadowAggregates(),
    )
    shadow = ShadowMode(dispatcher, recorder, settings.shadow_sample_share, settings.shadow_max_concurrency)
    limiter = build_tenant_limiter(settings, metrics, store)
    service = CompletionService(
        settings,
        router,
        dispatcher,
        limiter,
        metrics,
        shadow,
        PromptMeasure(settings.max_prompt_chars, settings.max_prompt_tokens, settings.tokenizer_dir),
    )
    parts = GatewayParts(settings, tenants, source, router, pool, service, metrics, shadow, recorder)
    background: list[asyncio.Task] = []

    async def reload_tenants_forever() -> None:
        while True:
            await asyncio.sleep(settings.tenants_reload_interval_s)
            tenants.refresh()

    async def on_startup() -> None:
        if owns_source:
            await call_blocking_or_async(getattr(source, "start", None))
        await pool.start()
        await limiter.start()
        if shadow_metrics is not None:
            shadow_metrics.start()
        background.append(asyncio.create_task(reload_tenants_forever(), name="tenants-reload"))

    async def on_shutdown() -> None:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await shadow.stop()
        await limiter.stop()
        if store is not None:
            await store.aclose()
        if shadow_metrics is not None:
            await asyncio.to_thread(shadow_metrics.stop)
        await pool.stop()
        if owns_source:
            await call_blocking_or_async(getattr(source, "stop", None))

    async def before_send(message: Message, scope: Scope) -> None:
        # Every response, errors and streams included, carries the request id; request metrics
        # are counted here so that errors raised anywhere are counted too.
        if message["type"] != "http.response.start":
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state = scope.get("state", {})
                started = state.get("started")
                if started is not None and "endpoint" in state:
                    route = state.get("labels", ("", ""))[0]
                    metrics.latency.labels(state["endpoint"], route).observe(time.perf_counter() - started)
            return
        state = scope.setdefault("state", {})
        headers = message.setdefault("headers", [])
        headers.append((b"x-request-id", request_id_of(scope).encode()))
        path = scope.get("path", "")
        if path.startswith("/v1/"):
            endpoint = path if path in _API_PATHS else "other"  # scanners must not grow the label set
            route, adapter = state.get("labels", ("", ""))
            state["endpoint"] = endpoint
            metrics.requests.labels(endpoint, str(message["status"]), route, adapter).inc()

    async def before_request(request) -> None:
        request_id_of(request.scope)

    plugins, shutdown_hooks = [], [on_shutdown]
    if tracing is not None:
        plugins.append(OpenTelemetryPlugin(OpenTelemetryConfig(tracer_provider=tracing, exclude=["/healthz", "/metrics"])))
        if owns_tracing:
            shutdown_hooks.append(tracing.shutdown)  # flushes the spans still batched

    return Litestar(
        route_handlers=[*openai_api.ROUTES, *health.ROUTES, admin.admin_router],
        plugins=plugins,
        dependencies={"parts": Provide(lambda: parts, use_cache=True, sync_to_thread=False)},
        exception_handlers={Exception: openai_error_response},
        before_request=before_request,
        before_send=[before_send],
        on_startup=[on_startup],
        on_shutdown=shutdown_hooks,
        request_max_body_size=settings.max_body_bytes,
        state=State({"parts": parts}),
        openapi_config=OpenAPIConfig(
            title="loraplex gateway",
            version="0.1.0",
            description="OpenAI-compatible API over many LoRA adapters of one base model. Errors use OpenAI's shape "
            '`{"error": {"message", "type", "param", "code"}}`; validation errors are 400.',
        ),
    )


def request_id_of(scope: Scope) -> str:
    """The client's `x-request-id` when it is sane, else a fresh one; fixed for the request's life."""
    state = scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        incoming = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _CLIENT_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state["request_id"] = rid
    return rid
