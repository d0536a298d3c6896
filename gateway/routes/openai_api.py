"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send

from gateway.openai_schema import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    JSON,
    ModelCard,
    ModelList,
)
from gateway.errors import shutting_down
from gateway.parts import GatewayParts, Parts
from gateway.routes.operation_docs import SESSION_HEADER, STREAM_DOC, DocumentedOperation, StreamingOperation
from gateway.routes.responses import AUTH_ERRORS, GENERATION_ERRORS, with_served_by
from gateway.routes.streaming import WriteBoundedStream
from gateway.tenants import Tenant

TenantRequest = Request[Tenant, str, Any]


class EncodedJSON(ASGIResponse):
    """A 200 JSON answer whose body (a struct, encoded once with `JSON`) and headers are bytes before
    it is sent: Litestar's Response would build, search and re-encode a header map per request.
    The struct the body holds is documented in the route's `responses=`."""

    __slots__ = ("_start", "_body")

    def __init__(self, body: bytes, headers: dict[str, str]):
        encoded = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        encoded += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        self._start = {"type": "http.response.start", "status": 200, "headers": encoded}
        self._body = {"type": "http.response.body", "body": body, "more_body": False}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(self._start)
        await send(self._body)


async def _answer(request: TenantRequest, parts: GatewayParts, body: CompletionRequest | ChatCompletionRequest) -> ASGIResponse:
    if parts.drain.draining:
        raise shutting_down()
    service, tenant = parts.service, request.user
    headers = request.headers
    prepared = service.prepare(body, tenant, headers["x-request-id"], headers.get(SESSION_HEADER))
    try:
        if prepared.stream:
            events, served_by = await service.open_stream(prepared, tenant)
            served_by["cache-control"] = "no-cache"
            return WriteBoundedStream(
                iterator=events, media_type="text/event-stream", headers=served_by, write_timeout_s=parts.settings.stream_write_timeout_s
            )
        answer, served_by = await service.complete(prepared, tenant)
    except Exception as error:
        raise with_served_by(error, service.served_by(prepared.choice)) from error
    return EncodedJSON(JSON.encode(answer), served_by)


@post(
    "/v1/completions",
    status_code=200,
    responses={
        200: ResponseSpec(CompletionResponse, description="The completion. " + STREAM_DOC, generate_examples=False),
        **GENERATION_ERRORS,
    },
    operation_class=StreamingOperation,
    summary="Create a completion (OpenAI-compatible)",
)
async def create_completion(request: TenantRequest, data: JSONBody[CompletionRequest], parts: Parts) -> ASGIResponse:
    return await _answer(request, parts, data)


@post(
    "/v1/chat/completions",
    status_code=200,
    responses={
        200: ResponseSpec(ChatCompletionResponse, description="The chat completion. " + STREAM_DOC, generate_examples=False),
        **GENERATION_ERRORS,
    },
    operation_class=StreamingOperation,
    summary="Create a chat completion (OpenAI-compatible; the shard applies the base model's chat template)",
)
async def create_chat_completion(request: TenantRequest, data: JSONBody[ChatCompletionRequest], parts: Parts) -> ASGIResponse:
    return await _answer(request, parts, data)


@get("/v1/models", responses=AUTH_ERRORS, operation_class=DocumentedOperation, summary="Models this key may use")
async def list_models(request: TenantRequest, parts: Parts) -> ModelList:
    created = int(parts.routing_source.last_success_unix or time.time())
    return ModelList("list", [ModelCard(name, "model", created, "loraplex") for name in parts.router.usable_models(request.user)])


ROUTES = [create_completion, create_chat_completion, list_models]
