"""What Litestar cannot say from the handlers alone: the headers every answer carries, the
request headers the gateway reads, and the Server-Sent Events of `stream: true`. Added to the
operations Litestar builds (`operation_class=`), so the OpenAPI schema documents every status,
content type and header a client (or a schema-driven fuzzer) can meet."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.enums import ParamType
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    Reference,
    Schema,
)

SESSION_HEADER = "x-loraplex-session"
STREAM_DOC = (
    "With `stream: true` the answer is `text/event-stream`: `data: {chunk}` events, then `data: [DONE]`;"
    " a stream cut midway ends with a `data: {\"error\": …}` event and no `[DONE]`."
)


def _string_header(description: str) -> OpenAPIHeader:
    return OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING), description=description, required=True)


# 429 and 503 tell the client when to come back.
_RETRY_AFTER = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER, minimum=1), description="Seconds to wait before retrying", required=True
)
RETRY_AFTER_STATUSES = ("429", "503")
# Every answer, errors included, carries the request id (gateway/routes/telemetry.py).
_REQUEST_ID = _string_header("The client's x-request-id when it is sane (`[A-Za-z0-9._:-]{1,128}`), else a fresh id")
REQUEST_ID_PARAMETER = Parameter(
    name="x-request-id",
    param_in=ParamType.HEADER,
    required=False,
    schema=Schema(type=OpenAPIType.STRING),
    description="Echoed back, and used in logs and traces, when it matches `[A-Za-z0-9._:-]{1,128}`; otherwise replaced",
)


def add_parameter(operation: Operation, parameter: Parameter) -> None:
    existing = list(operation.parameters or [])
    if not any(getattr(p, "name", None) == parameter.name for p in existing):
        operation.parameters = [*existing, parameter]


def add_response_headers(operation: Operation, statuses: tuple[str, ...] | None, headers: dict[str, OpenAPIHeader]) -> None:
    """Documents `headers` on the answers with these statuses (None: on every answer)."""
    for status, response in (operation.responses or {}).items():
        if (statuses is None or status in statuses) and isinstance(response, OpenAPIResponse):
            response.headers = {**(response.headers or {}), **headers}


@dataclass
class DocumentedOperation(Operation):
    """An operation documenting the headers the gateway adds to its answers (`ResponseSpec` cannot
    declare response headers, so they are added once Litestar has built the operation)."""

    def __post_init__(self) -> None:
        add_response_headers(self, None, {"x-request-id": _REQUEST_ID})
        add_response_headers(self, RETRY_AFTER_STATUSES, {"Retry-After": _RETRY_AFTER})
        add_parameter(self, REQUEST_ID_PARAMETER)


@dataclass
class StreamingOperation(DocumentedOperation):
    """An operation whose 200 answer is JSON, or Server-Sent Events with `stream: true`.

    Litestar documents one media type per status; without the second one a client (or a
    schema-driven fuzzer) sees `text/event-stream` as an undocumented content type.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            ok.content.setdefault("text/event-stream", OpenAPIMediaType(schema=SSE_EVENT))
        add_response_headers(self, ("200",), SERVED_BY_HEADERS)
        add_parameter(self, SESSION_PARAMETER)


# Every answer says what served it.
SERVED_BY_HEADERS = {
    "x-loraplex-adapter": _string_header("The adapter, or the base model id"),
    "x-loraplex-version": _string_header("The adapter version; empty for the base model"),
    "x-loraplex-route": _string_header("How the version was chosen: champion, canary, pinned or base; fallback when the base model answered because the adapter's version could not be served (its loraplex.fallback tag is base)"),
    "x-loraplex-shard": _string_header("The shard that answered"),
}
SESSION_PARAMETER = Parameter(
    name=SESSION_HEADER,
    param_in=ParamType.HEADER,
    required=False,
    schema=Schema(type=OpenAPIType.STRING),
    description="Sticks the end user to one side of a canary split (as OpenAI's `user` field does)",
)


# One event of the stream (OpenAPI < 3.2: a text/event-stream `schema` describes each event).
# `data` is a JSON chunk, the closing `[DONE]`, or, for a stream cut midway, an OpenAI error.
_CHUNK = Schema(
    type=OpenAPIType.OBJECT,
    required=["id", "object", "created", "model", "choices"],
    properties={
        "id": Schema(type=OpenAPIType.STRING),
        "object": Schema(enum=["text_completion", "chat.completion.chunk"]),
        "created": Schema(type=OpenAPIType.INTEGER),
        "model": Schema(type=OpenAPIType.STRING),
        "choices": Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.OBJECT, required=["index"])),
        "usage": Schema(one_of=[Reference("#/components/schemas/Usage"), Schema(type=OpenAPIType.NULL)]),
    },
)
SSE_EVENT = Schema(
    type=OpenAPIType.OBJECT,
    required=["data"],
    properties={
        "data": Schema(
            any_of=[
                Schema(const="[DONE]"),
                Schema(
                    type=OpenAPIType.STRING,
                    content_media_type="application/json",
                    content_schema=Schema(one_of=[_CHUNK, Reference("#/components/schemas/ErrorBody")]),
                ),
            ]
        )
    },
    description=STREAM_DOC,
)

