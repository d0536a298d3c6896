"""OpenAPI descriptions of every error status a route can answer, and the error-to-response mapping."""

from __future__ import annotations

import logging

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from gateway.errors import OpenAIError
from gateway.openai_schema import ErrorBody

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
    503: "No healthy shard can take the request, or the adapter version is refused by the shards (see Retry-After)",
    504: "The shard did not answer within the request timeout",
}


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    return {s: ResponseSpec(data_container=ErrorBody, description=_DESCRIPTIONS[s], generate_examples=False) for s in statuses}


GENERATION_ERRORS = error_responses(400, 401, 403, 404, 405, 413, 429, 500, 503, 504)
AUTH_ERRORS = error_responses(401, 405, 500)
ADMIN_ERRORS = error_responses(400, 401, 403, 404, 405, 413, 500, 502, 503, 504)


def openai_error_response(request: Request, exc: Exception) -> Response:
    if isinstance(exc, OpenAIError):
        error = exc
    elif isinstance(exc, ValidationException):
        error = OpenAIError(400, _validation_message(exc), "invalid_request_error", "invalid_request", _validation_param(exc))
    elif isinstance(exc, HTTPException):
        error = OpenAIError(
            exc.status_code,
            exc.detail,
            "invalid_request_error" if exc.status_code < 500 else "server_error",
            {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code),
            headers={k.lower(): v for k, v in (exc.headers or {}).items()},
        )
    else:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        error = OpenAIError(HTTP_500_INTERNAL_SERVER_ERROR, "Internal error.", "server_error", "internal_error")
    return Response(error.body(), status_code=error.status, headers=error.headers, media_type="application/json")


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
