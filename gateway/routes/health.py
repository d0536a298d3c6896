"""Liveness and readiness (on the public port and the admin port)."""

from __future__ import annotations

import time

from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec
from msgspec import Struct

from gateway.parts import GatewayParts, Parts
from gateway.routes.authentication import EXCLUDE_FROM_AUTH
from gateway.routes.operation_docs import DocumentedOperation
from gateway.routes.responses import error_responses


class Health(Struct):
    status: str


class ShardHealth(Struct):
    healthy: bool
    last_error: str


class Readiness(Struct):
    ready: bool
    routing_table: bool
    routing_table_error: str | None
    routing_table_stale: bool
    routing_table_age_s: float | None
    adapters: list[str]
    healthy_shards: list[str]
    shards: dict[str, ShardHealth]
    tenants_file_error: str | None
    draining: bool  # shutting down (SIGTERM): in-flight requests finish, new ones go elsewhere


ALIVE = Health("ok")


@get("/healthz", summary="Alive", responses=error_responses(405), operation_class=DocumentedOperation, opt={EXCLUDE_FROM_AUTH: True})
async def healthz() -> Health:
    return ALIVE


def readiness(parts: GatewayParts) -> Readiness:
    source = parts.routing_source
    try:
        table = source.current()
    except Exception as exc:  # a watcher that has never loaded may raise: not ready, say why
        table, table_error = None, repr(exc)
    else:
        table_error = None
    healthy = parts.pool.healthy_shards()
    last = source.last_success_unix
    has_table = table is not None and source.has_table
    return Readiness(
        ready=has_table and bool(healthy) and not parts.drain.draining,
        routing_table=has_table,
        routing_table_error=table_error,
        routing_table_stale=source.is_stale,
        routing_table_age_s=None if last is None else round(time.time() - last, 3),
        adapters=sorted(table.adapters) if table is not None else [],
        healthy_shards=healthy,
        shards={s.shard_id: ShardHealth(s.healthy, s.last_error) for s in parts.pool.all()},
        tenants_file_error=parts.tenants.last_error,
        draining=parts.drain.draining,
    )


@get(
    "/readyz",
    summary="Ready: a routing table, at least one healthy shard, not shutting down",
    responses={503: ResponseSpec(Readiness, description="Not ready; the body says why (see Retry-After)"), **error_responses(405)},
    operation_class=DocumentedOperation,
    opt={EXCLUDE_FROM_AUTH: True},
)
async def readyz(parts: Parts) -> Response[Readiness]:
    report = readiness(parts)
    if report.ready:
        return Response(report, status_code=200)
    return Response(report, status_code=503, headers={"retry-after": "1"})


ROUTES = [healthz, readyz]
