"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time

from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec

from gateway.routes.operation_docs import DocumentedOperation
from gateway.routes.responses import error_responses
from gateway.state import GatewayParts, Parts


@get("/healthz", summary="Alive", responses=error_responses(405), operation_class=DocumentedOperation)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def readiness(parts: Parts) -> tuple[bool, dict]:
    source = parts.routing_source
    try:
        table = source.current()
    except Exception as exc:  # a watcher that has never loaded may raise: not ready, say why
        table, table_error = None, repr(exc)
    else:
        table_error = None
    healthy = parts.pool.healthy_shards()
    last = source.last_success_unix
    details = {
        "routing_table": table is not None,
        "routing_table_error": table_error,
        "routing_table_stale": bool(source.is_stale),
        "routing_table_age_s": None if last is None else round(time.time() - last, 3),
        "adapters": sorted(table.adapters) if table is not None else [],
        "healthy_shards": healthy,
        "shards": {s.shard_id: {"healthy": s.healthy, "last_error": s.last_error} for s in parts.pool.all()},
        "tenants_file_error": parts.tenants.last_error,
    }
    has_table = table is not None and bool(getattr(source, "has_table", True))
    details["routing_table"] = has_table
    ready = has_table and bool(healthy)
    details["ready"] = ready
    return ready, details


@get(
    "/readyz",
    summary="Ready: a routing table and at least one healthy shard",
    responses={503: ResponseSpec(dict, description="Not ready; the body says why (see Retry-After)"), **error_responses(405)},
    operation_class=DocumentedOperation,
)
async def readyz(parts: Parts) -> Response:
    ready, details = readiness(parts)
    if ready:
        return Response(details, status_code=200)
    return Response(details, status_code=503, headers={"retry-after": "1"})


@get(
    "/metrics",
    summary="Prometheus metrics",
    media_type="text/plain; version=0.0.4",
    responses=error_responses(405),
    operation_class=DocumentedOperation,
)
async def metrics(parts: Parts) -> Response:
    m = parts.metrics
    source = parts.routing_source
    m.routing_stale.set(1 if source.is_stale else 0)
    if source.last_success_unix:
        m.routing_age.set(time.time() - source.last_success_unix)
    for shard in parts.pool.all():
        m.shard_healthy.labels(shard.shard_id).set(1 if shard.healthy else 0)
        m.shard_in_flight.labels(shard.shard_id).set(shard.in_flight)
    m.shadow_pairs.set(parts.shadow.started)
    m.shadow_dropped.set(parts.shadow.dropped)
    return Response(m.exposition(), media_type="text/plain; version=0.0.4")


ROUTES = [healthz, readyz, metrics]
