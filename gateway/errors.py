"""Errors in OpenAI's shape; the typed failures of shard calls; and how those become HTTP statuses.

The dispatcher raises `ShardError`s (`ShardCallFailed`, its `VersionRefused`, `NoShardAvailable`);
only the HTTP edge turns them into `OpenAIError`s (`to_openai`). Choices (documented in the OpenAPI
schema too):
- request validation errors answer 400 `invalid_request_error` (OpenAI does the same; 422 unused);
- a granted adapter with no `champion` in the registry, or a pinned version the registry does
  not know, answers 404 `model_not_found` - the tenant is granted the name, so existence is no secret;
- FAILED_PRECONDITION (the shard refused the adapter version: corrupt, wrong base; or cannot load it
  while the registry is unreachable and it is not in the shard's disk cache) is a
  `VersionRefused` and answers 503 `adapter_unavailable`: the caller did nothing wrong and a
  promotion fixes it. For champion and canary assignments the completion service first falls
  back to the adapter's last good version (gateway/version_fallback.py), so a broken promotion
  does not take over; pinned requests see the 503. When no version can be served (refused,
  `NOT_FOUND`, shards down: `unservable_reason`) and the adapter's fallback policy is `base`, the
  completion service answers with the base model instead (`x-loraplex-route: fallback`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from gateway.openai_schema import ErrorBody, ErrorDetail


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

    def body(self) -> ErrorBody:
        return ErrorBody(ErrorDetail(self.message, self.type, self.param, self.code))


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


def shutting_down() -> OpenAIError:
    """A new request while this gateway process drains (gateway/draining.py): another replica, or
    this one's successor, takes the retry; the connection closes so the retry goes elsewhere."""
    return OpenAIError(
        503,
        "This gateway is shutting down; retry the request.",
        "server_error",
        "shutting_down",
        headers={"retry-after": "1", "connection": "close"},
    )


class ShardError(Exception):
    """A generation no shard could serve."""


class NoShardAvailable(ShardError):
    """No healthy shard is in the ring."""


class ShardCallFailed(ShardError):
    """A shard call's final (not retried) failure, with the shard's gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str, model: str):
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details
        self.model = model


class VersionRefused(ShardCallFailed):
    """The shards refused the adapter version itself (FAILED_PRECONDITION: corrupt, wrong base model)."""

    def __init__(self, details: str, model: str, adapter: str, version: str):
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, details, model)
        self.adapter = adapter
        self.version = version


def shard_call_failed(code: grpc.StatusCode, details: str, model: str, adapter: str, version: str) -> ShardCallFailed:
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return VersionRefused(details, model, adapter, version)
    return ShardCallFailed(code, details, model)


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


def unservable_reason(error: ShardError) -> str | None:
    """Why no shard could serve a version, when the base model might still answer instead: `refused`
    (the version itself), `not_found` (its artifacts are gone), `shards_down`; None for failures the
    base model would meet too (capacity, timeout) or that are the request's own (bad input)."""
    if isinstance(error, VersionRefused):
        return "refused"
    if isinstance(error, NoShardAvailable):
        return "shards_down"
    if isinstance(error, ShardCallFailed):
        if error.code == grpc.StatusCode.NOT_FOUND:
            return "not_found"
        if error.code in SHARD_DOWN_CODES:
            return "shards_down"
    return None


def from_grpc(code: grpc.StatusCode, details: str, model: str) -> OpenAIError:
    """The HTTP error a client sees for a shard's final (not retried) gRPC failure."""
    details = details or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return bad_request(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return model_not_found(model, details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return OpenAIError(503, f"The model '{model}' cannot be served: {details}", "server_error", "adapter_unavailable", "model", {"retry-after": "5"})
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return no_shard_available("Every shard that could take this request is at capacity.", 1.0)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return OpenAIError(504, "The shard did not answer within the request timeout.", "server_error", "timeout")
    return no_shard_available(f"Shard call failed: {details}", 1.0)


def to_openai(error: Exception) -> OpenAIError | None:
    """The client's view of an error the gateway's core raised; None for one it does not know."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, ShardCallFailed):
        return from_grpc(error.code, error.details, error.model)
    if isinstance(error, NoShardAvailable):
        return no_shard_available()
    return None
