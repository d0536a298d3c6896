"""The admin port: Prometheus metrics, and the admin API (admin key): shards and the ring, adapters on
shards (load, unload, pin, merge into the base weights and unmerge), routing reload, shadow
comparisons."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import grpc
from google.protobuf.json_format import MessageToDict
from litestar import Request, Response, Router, get, post
from litestar.exceptions import TooManyRequestsException
from litestar.middleware.rate_limit import RateLimitConfig, RateLimitMiddleware
from litestar.params import FromPath, FromQuery, JSONBody
from msgspec import Meta, Struct

from gateway import errors
from gateway.audit import key_id
from gateway.errors import OpenAIError, bad_request
from gateway.parts import GatewayParts, Parts
from gateway.routes.authentication import EXCLUDE_FROM_AUTH
from gateway.routes.operation_docs import DocumentedOperation
from gateway.routes.responses import ADMIN_ERRORS, error_responses
from gateway.settings import GatewaySettings
from gateway.shadow import ShadowPair
from gateway.shards import ShardView
from gateway.version_fallback import VersionFallbacks
from loraplex.adapter_format import adapter_ref
from protos import shard_pb2

ADMIN_TIMEOUT_S = 60.0


class AdapterAction(Struct, kw_only=True):
    adapter: Annotated[str, Meta(min_length=1)]
    version: str | None = None  # default: the champion in the routing table
    shards: list[str] | None = None  # default: the shards that own adapter@version on the ring
    replicas: Annotated[int, Meta(ge=1)] = 1
    pin: bool = True  # /pin: pin (true) or unpin (false); /load: load pinned
    unpin_only: bool = False  # /unload: keep it cached, just allow eviction


class RingView(Struct):
    members: list[str]
    virtual_nodes: int
    epsilon: float
    hot_inflight: int


class ShardsView(Struct):
    shards: list[ShardView]
    ring: RingView
    placement: dict[str, list[str]]  # adapter@version -> its shards in ring order
    version_fallback: VersionFallbacks  # versions the shards refused and the last good ones serving instead


class ShardAdapters(Struct):
    """A shard's ListAdapters answer (its fields as protobuf's JSON mapping names them)."""

    shard: str
    adapters: list[dict[str, Any]]
    tiers: list[dict[str, Any]]


class AdapterActionResult(Struct, omit_defaults=True):
    adapter: str
    version: str
    shards: dict[str, dict[str, Any]]  # shard -> {"ok": true, ...its answer} or {"ok": false, code, message}
    pinned: bool | None = None


class AdapterAliases(Struct):
    champion: str | None
    canary: str | None
    shadow: str | None
    canary_percent: float


class RoutingReload(Struct):
    adapters: dict[str, AdapterAliases]
    stale: bool
    tenants_reloaded: bool
    tenants_error: str | None


class ShadowView(Struct):
    adapter: str
    aggregates: dict[str, dict[str, float]]  # adapter@shadow version -> agreement, latency, pairs
    pairs: list[ShadowPair]
    running: int
    dropped: int


def _targets(parts: GatewayParts, action: AdapterAction) -> tuple[str, list[str]]:
    version = action.version
    if not version:
        route = parts.routing_source.current().route(action.adapter)
        if route is None or not route.champion:
            raise errors.model_not_found(action.adapter, "no version given and no champion in the routing table")
        version = route.champion
    if action.shards:
        unknown = [s for s in action.shards if parts.pool.get(s) is None]
        if unknown:
            raise OpenAIError(404, f"Unknown shards: {unknown}", "invalid_request_error", "shard_not_found", "shards")
        return version, list(action.shards)
    owners = parts.pool.ring.owners(adapter_ref(action.adapter, version), action.replicas)
    if not owners:
        raise errors.no_shard_available()
    return version, owners


async def _on_shards(parts: GatewayParts, shards: list[str], call) -> dict:
    async def one(shard_id: str):
        try:
            reply = await call(parts.pool.get(shard_id).stub)
            return shard_id, {"ok": True, **MessageToDict(reply, preserving_proto_field_name=True)}
        except grpc.aio.AioRpcError as exc:
            return shard_id, {"ok": False, "code": exc.code().name, "message": exc.details()}

    return dict(await asyncio.gather(*(one(s) for s in shards)))


@get("/shards", responses=ADMIN_ERRORS, operation_class=DocumentedOperation, summary="Shards, their health and the placement ring")
async def list_shards(parts: Parts) -> ShardsView:
    ring = parts.pool.ring
    placement = {}
    for name, route in parts.routing_source.current().adapters.items():
        for version in route.alias_versions().values():
            key = adapter_ref(name, version)
            placement[key] = ring.ring_order(key)
    return ShardsView(
        [s.describe() for s in parts.pool.all()],
        RingView(ring.shards, ring.virtual_nodes, ring.epsilon, ring.hot_inflight),
        placement,
        parts.service.last_good.snapshot(),
    )


@get("/shards/{shard_id:str}/adapters", responses=ADMIN_ERRORS, operation_class=DocumentedOperation, summary="A shard's adapter cache (ListAdapters)")
async def shard_adapters(shard_id: FromPath[str], parts: Parts) -> ShardAdapters:
    state = parts.pool.get(shard_id)
    if state is None:
        raise OpenAIError(404, f"Unknown shard {shard_id!r}.", "invalid_request_error", "shard_not_found")
    try:
        reply = await state.stub.ListAdapters(shard_pb2.ListAdaptersRequest(), timeout=ADMIN_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        raise errors.from_grpc(exc.code(), exc.details() or "", shard_id) from exc
    listed = MessageToDict(reply, preserving_proto_field_name=True)
    return ShardAdapters(shard_id, listed.get("adapters", []), listed.get("tiers", []))


def _client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def _audit(parts: GatewayParts, request: Request, event: str, result: AdapterActionResult) -> None:
    parts.audit.admin_action(
        request.auth,
        event,
        _client_host(request),
        adapter=result.adapter,
        version=result.version,
        pinned=result.pinned,
        shards={shard: "ok" if answer["ok"] else answer["code"] for shard, answer in result.shards.items()},
    )


async def _act_on_shards(parts: GatewayParts, request: Request, event: str, data: AdapterAction, version: str, shards: list[str], call, pinned: bool | None = None) -> AdapterActionResult:
    """One admin adapter action: the same shard call on every target, one result, one audit line."""
    result = AdapterActionResult(data.adapter, version, await _on_shards(parts, shards, call), pinned)
    _audit(parts, request, event, result)
    return result


def _load(ref: shard_pb2.AdapterRef, pin: bool):
    req = shard_pb2.LoadAdapterRequest(adapter=ref, pin=pin)
    return lambda stub: stub.LoadAdapter(req, timeout=ADMIN_TIMEOUT_S)


def _unload(ref: shard_pb2.AdapterRef, unpin_only: bool):
    req = shard_pb2.UnloadAdapterRequest(adapter=ref, unpin_only=unpin_only)
    return lambda stub: stub.UnloadAdapter(req, timeout=ADMIN_TIMEOUT_S)


@post("/adapters/load", responses=ADMIN_ERRORS, operation_class=DocumentedOperation, status_code=200, summary="Load an adapter version on the shards that own it")
async def load_adapter(data: JSONBody[AdapterAction], parts: Parts, request: Request) -> AdapterActionResult:
    version, shards = _targets(parts, data)
    ref = shard_pb2.AdapterRef(name=data.adapter, version=version)
    return await _act_on_shards(parts, request, "adapters.load", data, version, shards, _load(ref, data.pin))


@post("/adapters/unload", responses=ADMIN_ERRORS, operation_class=DocumentedOperation, status_code=200, summary="Unload (or only unpin) an adapter version on shards")
async def unload_adapter(data: JSONBody[AdapterAction], parts: Parts, request: Request) -> AdapterActionResult:
    if not data.version:
        raise bad_request("'version' is required to unload.", "version")
    version, shards = _targets(parts, data)
    if not data.shards:
        shards = parts.pool.healthy_shards()  # it may have spilled anywhere: unload everywhere
    ref = shard_pb2.AdapterRef(name=data.adapter, version=version)
    return await _act_on_shards(parts, request, "adapters.unload", data, version, shards, _unload(ref, data.unpin_only))


@post("/adapters/pin", responses=ADMIN_ERRORS, operation_class=DocumentedOperation, status_code=200, summary="Pin (pin=true) or unpin (pin=false) an adapter version")
async def pin_adapter(data: JSONBody[AdapterAction], parts: Parts, request: Request) -> AdapterActionResult:
    version, shards = _targets(parts, data)
    ref = shard_pb2.AdapterRef(name=data.adapter, version=version)
    if data.pin:
        return await _act_on_shards(parts, request, "adapters.pin", data, version, shards, _load(ref, True), pinned=True)
    # An unpin goes everywhere: the version may have spilled onto any shard.
    return await _act_on_shards(parts, request, "adapters.pin", data, version, parts.pool.healthy_shards(), _unload(ref, True), pinned=False)


def _merge(ref: shard_pb2.AdapterRef):
    req = shard_pb2.MergeAdapterRequest(adapter=ref)
    return lambda stub: stub.MergeAdapter(req, timeout=ADMIN_TIMEOUT_S)


def _unmerge(stub):
    return stub.UnmergeAdapter(shard_pb2.UnmergeAdapterRequest(), timeout=ADMIN_TIMEOUT_S)


@post("/adapters/merge", responses=ADMIN_ERRORS, operation_class=DocumentedOperation, status_code=200, summary="Merge an adapter version into the base weights of shards")
async def merge_adapter(data: JSONBody[AdapterAction], parts: Parts, request: Request) -> AdapterActionResult:
    """Merges on the shards given, or on the `replicas` shards that own adapter@version on the ring;
    each replaces whatever it had merged. Shards with a quantized (nf4/int8) base answer
    FAILED_PRECONDITION and keep serving unchanged. Placement prefers the merged shards."""
    version, shards = _targets(parts, data)
    ref = shard_pb2.AdapterRef(name=data.adapter, version=version)
    result = await _act_on_shards(parts, request, "adapters.merge", data, version, shards, _merge(ref))
    for shard, answer in result.shards.items():
        if answer["ok"]:
            parts.pool.record_merged(shard, adapter_ref(data.adapter, version))
    return result


@post("/adapters/unmerge", responses=ADMIN_ERRORS, operation_class=DocumentedOperation, status_code=200, summary="Unmerge an adapter version from the shards holding it merged")
async def unmerge_adapter(data: JSONBody[AdapterAction], parts: Parts, request: Request) -> AdapterActionResult:
    """Restores the base weights exactly on the shards given, or on every healthy shard that
    reports adapter@version merged."""
    version, shards = _targets(parts, data)
    if not data.shards:
        shards = parts.pool.merged_on(adapter_ref(data.adapter, version))
    result = await _act_on_shards(parts, request, "adapters.unmerge", data, version, shards, _unmerge)
    for shard, answer in result.shards.items():
        if answer["ok"]:
            parts.pool.record_merged(shard, "")
    return result


@post("/routing/reload", responses=ADMIN_ERRORS, operation_class=DocumentedOperation, status_code=200, summary="Re-read the routing table and the tenants file now")
async def reload_routing(parts: Parts, request: Request) -> RoutingReload:
    source = parts.routing_source
    polled = await asyncio.to_thread(source.poll_now)
    tenants_reloaded = parts.tenants.refresh()
    parts.audit.admin_action(
        request.auth,
        "routing.reload",
        _client_host(request),
        polled=polled,
        tenants_reloaded=tenants_reloaded,
        tenants_error=parts.tenants.last_error,
    )
    adapters = {name: AdapterAliases(r.champion, r.canary, r.shadow, r.canary_percent) for name, r in source.current().adapters.items()}
    return RoutingReload(adapters, source.is_stale, tenants_reloaded, parts.tenants.last_error)


@get("/shadow", responses=ADMIN_ERRORS, operation_class=DocumentedOperation, summary="Recent shadow pairs and aggregates for an adapter")
async def shadow_pairs(adapter: FromQuery[str], parts: Parts) -> ShadowView:
    recorder = parts.shadow_recorder
    return ShadowView(adapter, recorder.aggregates(adapter), recorder.recent(adapter), parts.shadow.running, parts.shadow.dropped)


@get(
    "/metrics",
    summary="Prometheus metrics",
    media_type="text/plain; version=0.0.4",
    responses=error_responses(405),
    operation_class=DocumentedOperation,
    opt={EXCLUDE_FROM_AUTH: True},
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


class AdminRateLimit(RateLimitMiddleware):
    """Litestar's rate limit (per admin key id, in this process's memory store), answering past it
    with the gateway's 429 and a `Retry-After` of the seconds until the window frees a call."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except TooManyRequestsException as exc:
            reset = int((exc.headers or {}).get(self.config.rate_limit_reset_header_key, 1))
            raise errors.rate_limited(
                f"Too many admin calls: the limit is {self.max_requests} per {self.unit}.", max(1, reset)
            ) from exc


def _admin_key_id(request: Request) -> str:
    return key_id(request.auth)


def admin_router(settings: GatewaySettings) -> Router:
    rate_limit = RateLimitConfig(
        rate_limit=("minute", settings.admin_rate_per_minute),
        identifier_for_request=_admin_key_id,
        middleware_class=AdminRateLimit,
        store="admin_rate_limit",
    )
    return Router(
        path="/admin",
        tags=["admin"],
        route_handlers=[
            list_shards, shard_adapters, load_adapter, unload_adapter, pin_adapter, merge_adapter, unmerge_adapter,
            reload_routing, shadow_pairs,
        ],
        middleware=[rate_limit.middleware],
    )


def routes(settings: GatewaySettings) -> list:
    return [metrics, admin_router(settings)]
