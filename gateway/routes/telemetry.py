"""One ASGI middleware for what every answer shares: its request id, the request metrics, and
what served it on the request's trace span (`loraplex.*` attributes: tenant, adapter, version,
assignment, shard, request id).

The request id is the client's `x-request-id` when it is sane, else a fresh one; the request's
headers are rewritten to carry it, so handlers read it as any header, and the answer echoes it.
Metrics take their labels from the answer's own served-by headers, so errors raised anywhere
are counted too, and the latency timer runs from the first middleware to the last body byte.
"""

from __future__ import annotations

import os
import re
import time

from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import trace

from gateway.errors import to_openai
from gateway.metrics import GatewayMetrics

REQUEST_ID = b"x-request-id"
API_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})
_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_ASSIGNMENT, _ADAPTER = b"x-loraplex-route", b"x-loraplex-adapter"
# Served-by headers -> span attributes.
_SPAN_ATTRIBUTES = {
    _ASSIGNMENT: "loraplex.assignment",
    _ADAPTER: "loraplex.adapter",
    b"x-loraplex-version": "loraplex.version",
    b"x-loraplex-shard": "loraplex.shard",
}


def request_id_header(headers: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers with exactly one sane `x-request-id`, and its value."""
    for name, value in headers:
        if name == REQUEST_ID:
            if _SANE_REQUEST_ID.match(value):
                return headers, value
            break
    fresh = os.urandom(16).hex().encode()
    return [*(h for h in headers if h[0] != REQUEST_ID), (REQUEST_ID, fresh)], fresh


class RequestTelemetry(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, metrics: GatewayMetrics):
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        started = time.perf_counter()
        scope["headers"], request_id = request_id_header(scope["headers"])
        path = scope["path"]
        # Only the API is counted, and scanners' paths must not grow the label set.
        endpoint = (path if path in API_PATHS else "other") if path.startswith("/v1/") else None
        assignment = ""
        metrics = self.metrics

        async def send_with_telemetry(message: Message) -> None:
            nonlocal assignment
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                adapter, has_request_id = "", False
                served: dict[str, str] = {}
                for name, value in headers:
                    if name == _ASSIGNMENT:
                        assignment = value.decode()
                    elif name == _ADAPTER:
                        adapter = value.decode()
                    elif name == REQUEST_ID:
                        has_request_id = True  # an error answer (gateway/routes/responses.py) set it already
                    if name in _SPAN_ATTRIBUTES:
                        served[_SPAN_ATTRIBUTES[name]] = value.decode()
                if not has_request_id:
                    headers.append((REQUEST_ID, request_id))
                tenant = getattr(scope.get("user"), "name", "")  # set by authentication, when it passed
                _describe_span(served, tenant, request_id)
                if endpoint is not None:
                    status = str(message["status"])
                    metrics.request_count(endpoint, status, assignment, metrics.adapter_label(adapter)).inc()
                    if tenant:
                        metrics.tenant_request_count(tenant, status).inc()
            elif endpoint is not None and not message.get("more_body", False):
                metrics.request_latency(endpoint, assignment).observe(time.perf_counter() - started)
            await send(message)

        try:
            await next_app(scope, receive, send_with_telemetry)
        except Exception as error:
            # Raised by a middleware after this one (authentication): Litestar answers it outside
            # this middleware (gateway/routes/responses.py), so it is counted here.
            if endpoint is not None:
                metrics.request_count(endpoint, str(_status_of(error)), "", "").inc()
                metrics.request_latency(endpoint, "").observe(time.perf_counter() - started)
            raise


def _describe_span(served: dict[str, str], tenant: str, request_id: bytes) -> None:
    span = trace.get_current_span()  # the HTTP server span, when tracing is on
    if span.is_recording():
        span.set_attributes({**served, "loraplex.request_id": request_id.decode()})
        if tenant:
            span.set_attribute("loraplex.tenant", tenant)


def _status_of(error: Exception) -> int:
    answer = to_openai(error)
    if answer is not None:
        return answer.status
    return error.status_code if isinstance(error, HTTPException) else 500
