"""OpenAPI descriptions of every error status a route can answer, and the error-to-response mapping:
the one place where the core's errors become HTTP answers."""

from __future__ import annotations

import logging
from dataclasses import replace

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from gateway.errors import OpenAIError, to_openai
from gateway.openai_schema import ErrorBody
from gateway.routes.telemetry import request_id_header

log = logging.getLogger(__name__)

_DESCRIPTIONS = {
    400: "Bad input: the body failed validation (always 400, never 422), or a parameter is out of range or unsupported",
    401: "Missing or unknown API key",
    403: "The model does not exist or is not granted to this key (indistinguishable on purpose)",
    404: "Not found: unknown route, or a granted adapter with no servable version",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body larger than the configured limit",
    429: "Over the tenant's concurrency or tokens-per-minute limit (see Retry-After)",
    500: "Internal error",
    502: "A shard answered with an error the gateway could not recover from",
    503: "No healthy shard can take the request, the adapter version is refused by the shards, or this gateway is shutting down (see Retry-After)",
    504: "The shard did not answer within the request timeout",
}


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    return {s: ResponseSpec(data_container=ErrorBody, description=_DESCRIPTIONS[s], generate_examples=False) for s in statuses}


GENERATION_ERRORS = error_responses(400, 401, 403, 404, 405, 413, 429, 500, 503, 504)
AUTH_ERRORS = error_responses(401, 405, 500)
ADMIN_ERRORS = error_responses(400, 401, 403, 404, 405, 413, 429, 500, 502, 503, 504)


def with_served_by(error: Exception, served_by: dict[str, str]) -> Exception:
    """An error raised after a version was chosen, as the client sees it, saying which version."""
    answer = to_openai(error)
    if answer is None:
        return error
    return replace(answer, headers={**answer.headers, **served_by})


def openai_error_response(request: Request, exc: Exception) -> Response:
    error = to_openai(exc) or _framework_error(request, exc)
    # Errors raised before any route (unknown path, wrong method) miss RequestTelemetry: the id is set here too.
    _, request_id = request_id_header(request.scope["headers"])
    headers = {**error.headers, "x-request-id": request_id.decode()}
    return Response(error.body(), status_code=error.status, headers=headers, media_type="application/json")


def _framework_error(request: Request, exc: Exception) -> OpenAIError:
    """Litestar's own errors (validation, 404, 405, 413) in OpenAI's shape; anything else is a 500."""
    if isinstance(exc, ValidationException):
        return OpenAIError(400, _validation_message(exc), "invalid_request_error", "invalid_request", _validation_param(exc))
    if isinstance(exc, HTTPException):
        return OpenAIError(
            exc.status_code,
            exc.detail,
            "invalid_request_error" if exc.status_code < 500 else "server_error",
            {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code),
            headers={k.lower(): v for k, v in (exc.headers or {}).items()},
        )
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return OpenAIError(HTTP_500_INTERNAL_SERVER_ERROR, "Internal error.", "server_error", "internal_error")


def _validation_message(exc: ValidationException) -> str:
    details = exc.extra if isinstance(exc.extra, list) else []
    parts = [f"{d.get('key', '')}: {d.get('message', '')}".strip(": ") for d in details if isinstance(d, dict)]
    return "Invalid request: " + ("; ".join(parts) if parts else str(exc.detail))


def _validation_param(exc: ValidationException) -> str | None:
    details = exc.extra if isinstance(exc.extra, list) else []
    for d in details:
        if isinstance(d, dict) and d.get("key"):
            return str(d["key"])
    return None
