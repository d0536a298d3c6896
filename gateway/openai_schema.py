"""OpenAI request/response shapes (the subset loraplex serves), as msgspec structs Litestar validates.

Unknown fields are ignored (clients send many); fields we cannot honour with a non-default value
(n > 1, logprobs, echo, penalties, tools) answer 400 rather than being silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

# Litestar 2.25 drops a zero lower bound from the OpenAPI schema (it tests the bound for truth),
# so the schema would accept negative values the validator rejects; `extra` restates it.
_FROM_ZERO = {"extra": {"minimum": 0}}
Temperature = Annotated[float, Meta(ge=0.0, le=2.0, extra_json_schema=_FROM_ZERO)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0, extra_json_schema=_FROM_ZERO)]
PositiveInt = Annotated[int, Meta(ge=1)]
# Bounded by the shard contract's uint32: a larger value cannot be sent and was a 500.
TopK = Annotated[int, Meta(ge=0, le=2**32 - 1, extra_json_schema=_FROM_ZERO)]
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1, extra_json_schema=_FROM_ZERO)]


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class MixComponentIn(Struct, kw_only=True):
    """One adapter of an ad-hoc mix: `legal` (its champion) or `legal@3`, and its weight."""

    adapter: str
    weight: float


class _SamplingFields(Struct, kw_only=True):
    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None  # loraplex extension
    n: PositiveInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    # loraplex extension: answer with a weighted sum of adapters instead of `model` (which is then
    # only echoed back); each must be granted to the key. The official client sends it in `extra_body`.
    loraplex_mix: list[MixComponentIn] | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


class ChatMessageIn(Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessageIn]
    max_completion_tokens: PositiveInt | None = None
    tools: list[dict[str, Any]] | None = None


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(Struct):
    error: ErrorDetail


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(Struct):
    text: str
    index: int
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(Struct):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatMessageOut(Struct):
    role: Literal["assistant"]
    content: str


class ChatChoice(Struct):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Struct):
    object: Literal["list"]
    data: list[ModelCard]


class ChatDelta(Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: None = None


class CompletionChunk(Struct, omit_defaults=True):
    """One event of a streamed completion; the last one before `[DONE]` may carry only usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChunk(Struct, omit_defaults=True):
    """One event of a streamed chat completion; the last one before `[DONE]` may carry only usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# Every body the gateway writes is one of these structs, encoded once by this encoder.
JSON = msgspec.json.Encoder()
