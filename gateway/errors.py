"""Errors in OpenAI's shape, and how shard (gRPC) status codes become HTTP statuses.

Choices (documented in the OpenAPI schema too):
- request validation errors answer 400 `invalid_request_error` (OpenAI does the same; 422 unused);
- a granted adapter with no `champion` in the registry, or a pinned version the registry does
  not know, answers 404 `model_not_found` - the tenant is granted the name, so existence is no secret;
- FAILED_PRECONDITION (the shard refused the adapter version: corrupt, wrong base) answers 503
  `adapter_unavailable`: the caller did nothing wrong and a promotion fixes it. For the champion
  and canary routes the gateway first falls back to the adapter's last good version
  (gateway/version_fallback.py), so a broken promotion does not take over; pinned requests see the 503.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc


@dataclass
class OpenAIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.code or self.type}: {self.message}"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_request") -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", code, param)


def unauthorized() -> OpenAIError:
    return OpenAIError(
        401,
        "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
        "authentication_error",
        "invalid_api_key",
        headers={"www-authenticate": "Bearer"},
    )


def model_forbidden(model: str) -> OpenAIError:
    # Identical for "does not exist" and "not granted": strangers learn nothing.
    return OpenAIError(
        403,
        f"The model '{model}' does not exist or you do not have access to it.",
        "permission_error",
        "model_not_permitted",
        "model",
    )


def model_not_found(model: str, why: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{model}' has no servable version: {why}", "invalid_request_error", "model_not_found", "model")


def rate_limited(message: str, retry_after_s: float) -> OpenAIError:
    return OpenAIError(429, message, "rate_limit_error", "rate_limit_exceeded", headers={"retry-after": _seconds(retry_after_s)})


def no_shard_available(message: str = "No healthy shard can take this request now.", retry_after_s: float = 1.0) -> OpenAIError:
    return OpenAIError(503, message, "server_error", "no_healthy_shard", headers={"retry-after": _seconds(retry_after_s)})


def _seconds(value: float) -> str:
    return str(max(1, int(-(-value // 1))))


# Whether a failed shard call may be retried on another shard, and whether it says the shard is down.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
SHARD_DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


# The code of the error for a version the shards refused (FAILED_PRECONDITION): the gateway falls
# back to the adapter's last good version on it (gateway/version_fallback.py).
ADAPTER_REFUSED = "adapter_unavailable"


def from_grpc(code: grpc.StatusCode, details: str, model: str) -> OpenAIError:
    """The HTTP error a client sees for a shard's final (not retried) gRPC failure."""
    details = details or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return bad_request(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return model_not_found(model, details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return OpenAIError(503, f"The model '{model}' cannot be served: {details}", "server_error", ADAPTER_REFUSED, "model", {"retry-after": "5"})
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return no_shard_available("Every shard that could take this request is at capacity.", 1.0)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return OpenAIError(504, "The shard did not answer within the request timeout.", "server_error", "timeout")
    return no_shard_available(f"Shard call failed: {details}", 1.0)
