"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import time

from litestar import Request, Response, get, post
from litestar.params import JSONBody
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Stream

from gateway.completions import PreparedRequest
from gateway.openai_schema import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from gateway.routes.auth import require_tenant, tenant_of
from gateway.routes.operation_docs import (
    SESSION_HEADER,
    STREAM_DOC,
    DocumentedOperation,
    StreamingOperation,
)
from gateway.routes.responses import AUTH_ERRORS, GENERATION_ERRORS
from gateway.state import GatewayParts, Parts


async def _answer(request: Request, parts: GatewayParts, body) -> Response:
    tenant = tenant_of(request)
    state = request.scope["state"]
    prepared: PreparedRequest = parts.service.prepare(body, tenant, state["request_id"], request.headers.get(SESSION_HEADER))
    state["labels"] = (prepared.decision.route, prepared.decision.adapter or parts.settings.base_model_id)
    if prepared.stream:
        events, headers = await parts.service.open_stream(prepared, tenant)
        return Stream(events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
    body_out, headers = await parts.service.complete(prepared, tenant)
    return Response(body_out, headers=headers, media_type="application/json")


@post(
    "/v1/completions",
    guards=[require_tenant],
    status_code=200,
    responses={
        200: ResponseSpec(CompletionResponse, description="The completion. " + STREAM_DOC, generate_examples=False),
        **GENERATION_ERRORS,
    },
    operation_class=StreamingOperation,
    summary="Create a completion (OpenAI-compatible)",
)
async def create_completion(request: Request, data: JSONBody[CompletionRequest], parts: Parts) -> Response:
    return await _answer(request, parts, data)


@post(
    "/v1/chat/completions",
    guards=[require_tenant],
    status_code=200,
    responses={
        200: ResponseSpec(ChatCompletionResponse, description="The chat completion. " + STREAM_DOC, generate_examples=False),
        **GENERATION_ERRORS,
    },
    operation_class=StreamingOperation,
    summary="Create a chat completion (OpenAI-compatible; the shard applies the base model's chat template)",
)
async def create_chat_completion(request: Request, data: JSONBody[ChatCompletionRequest], parts: Parts) -> Response:
    return await _answer(request, parts, data)


@get(
    "/v1/models", guards=[require_tenant], responses=AUTH_ERRORS, operation_class=DocumentedOperation, summary="Models this key may use"
)
async def list_models(request: Request, parts: Parts) -> ModelList:
    tenant = tenant_of(request)
    created = int(parts.routing_source.last_success_unix or time.time())
    names = set()
    for name, route in parts.router.known_adapters().items():
        allowed = tuple(getattr(route, "tenants", ()) or ())
        if tenant.is_granted(name) and (not allowed or tenant.name in allowed):
            names.add(name)
            for version in (route.champion, getattr(route, "canary", None)):
                if version:
                    names.add(f"{name}@{version}")
    if tenant.is_granted(parts.settings.base_model_id):
        names.add(parts.settings.base_model_id)
    return ModelList("list", [ModelCard(n, "model", created, "loraplex") for n in sorted(names)])


ROUTES = [create_completion, create_chat_completion, list_models]
