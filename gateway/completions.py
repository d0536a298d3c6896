"""The completion core: request -> tenant limits -> route -> shard -> OpenAI-shaped answer or SSE events.

Plain async code; the Litestar routes only move HTTP in and out of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import msgspec

from gateway.dispatch import Dispatcher, GenerationJob, GenerationResult, ShardStream, StreamCut
from gateway.errors import OpenAIError, ShardError, VersionRefused, bad_request, unservable_reason
from gateway.metrics import GatewayMetrics
from gateway.openai_schema import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    JSON,
    Usage,
)
from gateway.routing import VersionChoice, VersionRouter
from gateway.settings import GatewaySettings
from gateway.shadow import ShadowMode
from gateway.tenant_limits import Lease, TenantLimiter
from gateway.tenants import Tenant
from gateway.version_fallback import LastGoodVersions
from loraplex.adapter_mix import describe
from loraplex.routing_table import FALLBACK_BASE

log = logging.getLogger(__name__)
# Versions tried one after another when the shards refuse the routed one and then its fallback
# (an earlier champion can be broken too); each refusal is one quick round trip.
MAX_VERSION_FALLBACKS = 3
MIX_NAME = "mix"  # x-loraplex-adapter and the metrics' adapter label of an ad-hoc mix

Served = TypeVar("Served", GenerationResult, ShardStream)


@dataclass
class PreparedRequest:
    kind: str  # "completion" | "chat"
    request_id: str
    choice: VersionChoice
    job: GenerationJob
    stream: bool
    include_usage: bool
    reserve_tokens: int  # counted against the tenant's tokens per minute until the answer's real count


class PromptMeasure:
    """Checks prompt size: characters always; tokens when a tokenizer folder is configured.

    `check` returns the prompt's tokens: counted with the tokenizer when there is one, else an
    estimate of one token per 3 UTF-8 bytes (BPE tokenizers average 3-4 on text; the real count
    replaces it when the answer ends).
    """

    def __init__(self, max_chars: int, max_tokens: int = 0, tokenizer_dir: str = ""):
        self.max_chars = max_chars
        self.max_tokens = max_tokens
        self._tokenizer = None
        if max_tokens and tokenizer_dir:
            from transformers import AutoTokenizer  # only when configured: it is slow to import

            self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def check(self, text: str, param: str) -> int:
        if len(text) > self.max_chars:
            raise bad_request(f"The prompt has {len(text)} characters; the limit is {self.max_chars}.", param, "prompt_too_long")
        if self._tokenizer is None:
            return -(-len(text.encode()) // 3)
        n = len(self._tokenizer(text)["input_ids"])
        if n > self.max_tokens:
            raise bad_request(f"The prompt has {n} tokens; the limit is {self.max_tokens}.", param, "prompt_too_long")
        return n


class CompletionService:
    def __init__(
        self,
        settings: GatewaySettings,
        router: VersionRouter,
        dispatcher: Dispatcher,
        limiter: TenantLimiter,
        metrics: GatewayMetrics,
        shadow: ShadowMode | None = None,
        prompt_measure: PromptMeasure | None = None,
        last_good: LastGoodVersions | None = None,
    ):
        self.settings = settings
        self.router = router
        self.dispatcher = dispatcher
        self.limiter = limiter
        self.metrics = metrics
        self.shadow = shadow
        self.prompt_measure = prompt_measure or PromptMeasure(settings.max_prompt_chars)
        self.last_good = last_good or LastGoodVersions(settings.refused_version_retry_s)

    # preparing -------------------------------------------------------------------------------
    def prepare(
        self, body: CompletionRequest | ChatCompletionRequest, tenant: Tenant, request_id: str, session: str | None = None
    ) -> PreparedRequest:
        chat = isinstance(body, ChatCompletionRequest)
        self._reject_unsupported(body)
        if chat:
            default = self.settings.default_chat_max_tokens or self.settings.max_tokens_limit
            max_tokens = body.max_completion_tokens or body.max_tokens or default
        else:
            max_tokens = body.max_tokens or self.settings.default_max_tokens
        if max_tokens > self.settings.max_tokens_limit:
            raise bad_request(
                f"max_tokens is {max_tokens}; the limit is {self.settings.max_tokens_limit}.", "max_tokens", "max_tokens_too_large"
            )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4 or any(not s for s in stop):
            raise bad_request("'stop' takes up to 4 non-empty strings.", "stop")
        if body.loraplex_mix is not None:
            routed = self.router.resolve_mix(body.model, body.loraplex_mix, tenant)
        else:
            routed = self.router.resolve(body.model, tenant, body.user or session)
        choice = self.last_good.substitute(routed)
        if choice is not routed:
            self.metrics.version_fallbacks.labels(self.metrics.adapter_label(choice.adapter)).inc()
        prompt: str | None = None
        messages: tuple[tuple[str, str], ...] = ()
        if chat:
            if not body.messages:
                raise bad_request("'messages' must not be empty.", "messages")
            messages = tuple((_role(m.role), _message_text(m.content)) for m in body.messages)
            prompt_tokens = self.prompt_measure.check("\n".join(c for _, c in messages), "messages")
        else:
            prompt = body.prompt if isinstance(body.prompt, str) else _single_prompt(body.prompt)
            prompt_tokens = self.prompt_measure.check(prompt, "prompt")
        job = GenerationJob(
            request_id=request_id,
            adapter=choice.adapter,
            version=choice.version,
            prompt=prompt,
            messages=messages,
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            stop=stop,
            mix=choice.mix,
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return PreparedRequest(
            "chat" if chat else "completion", request_id, choice, job, body.stream, include_usage, prompt_tokens + max_tokens
        )

    def _reject_unsupported(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        if body.n not in (None, 1):
            raise bad_request("Only n=1 is supported.", "n", "unsupported_parameter")
        if body.logprobs not in (None, False, 0):
            raise bad_request("logprobs are not supported.", "logprobs", "unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise bad_request(f"{name} is not supported.", name, "unsupported_parameter")
        if isinstance(body, CompletionRequest):
            if body.echo:
                raise bad_request("echo is not supported.", "echo", "unsupported_parameter")
            if body.suffix:
                raise bad_request("suffix is not supported.", "suffix", "unsupported_parameter")
        elif body.tools:
            raise bad_request("tools are not supported.", "tools", "unsupported_parameter")

    def served_by(self, choice: VersionChoice, shard_id: str | None = None, adapter: str | None = None, version: str | None = None) -> dict[str, str]:
        """The headers that say what served an answer (or, without a shard, what was chosen for it)."""
        headers = {
            "x-loraplex-adapter": (choice.adapter if adapter is None else adapter) or self._served_name(choice),
            "x-loraplex-version": choice.version if version is None else version,
            "x-loraplex-route": choice.assignment,
        }
        if choice.mix:
            headers["x-loraplex-mix"] = describe(choice.mix)
        if shard_id is not None:
            headers["x-loraplex-shard"] = shard_id
        return headers

    def _served_name(self, choice: VersionChoice) -> str:
        """The adapter an answer is counted under: its name, `mix` for an ad-hoc mix, or the base model."""
        return choice.adapter or (MIX_NAME if choice.mix else self.settings.base_model_id)

    # answering -------------------------------------------------------------------------------
    async def complete(
        self, prepared: PreparedRequest, tenant: Tenant
    ) -> tuple[CompletionResponse | ChatCompletionResponse, dict[str, str]]:
        lease = await self.limiter.admit(tenant, prepared.reserve_tokens)
        tokens = 0
        primary = asyncio.get_running_loop().create_future()
        try:
            prepared, result = await self._dispatch(prepared, self.dispatcher.generate)
            self.last_good.served(prepared.choice, result.version)
            tokens = result.prompt_tokens + result.completion_tokens
            self._observe(prepared, result, tenant)
            primary.set_result(result)
            self._start_shadow(prepared, tenant, primary)
            return self._answer(prepared, result), self.served_by(prepared.choice, result.shard_id, result.adapter, result.version)
        finally:
            if not primary.done():
                primary.cancel()
            await self.limiter.release(lease, tokens)

    async def open_stream(self, prepared: PreparedRequest, tenant: Tenant) -> tuple[AsyncIterator[bytes], dict[str, str]]:
        """Opens the shard stream (with failover) before any byte is sent, so headers name the shard."""
        lease = await self.limiter.admit(tenant, prepared.reserve_tokens)
        try:
            # Nothing was sent yet: safe to aim the request elsewhere.
            prepared, stream = await self._dispatch(prepared, self.dispatcher.open_stream)
            self.last_good.served(prepared.choice, stream.version)
        except BaseException:
            await self.limiter.release(lease, 0)
            raise
        self.metrics.first_token_latency(prepared.choice.assignment).observe(stream.first_token_s)
        primary = asyncio.get_running_loop().create_future()
        self._start_shadow(prepared, tenant, primary)
        headers = self.served_by(prepared.choice, stream.shard_id, stream.adapter, stream.version)
        return self._sse_events(prepared, tenant, lease, stream, primary), headers

    async def _sse_events(
        self, prepared: PreparedRequest, tenant: Tenant, lease: Lease, stream: ShardStream, primary: asyncio.Future
    ) -> AsyncIterator[bytes]:
        chunks = _ChunkMaker(prepared, int(time.time()))
        try:
            if prepared.kind == "chat":
                yield _sse(chunks.chat(ChatDelta(role="assistant", content=""), None))
            async for chunk in stream.chunks():
                finish = stream.finish_reason if chunk.finish_reason else None
                if chunk.text or finish:
                    if prepared.kind == "chat":
                        yield _sse(chunks.chat(ChatDelta(content=chunk.text) if chunk.text else ChatDelta(), finish))
                    else:
                        yield _sse(chunks.completion(chunk.text, finish))
            result = stream.result()
            self._observe(prepared, result, tenant)
            primary.set_result(result)
            if prepared.include_usage:
                yield _sse(chunks.usage(_usage(result)))
            yield b"data: [DONE]\n\n"
        except StreamCut as exc:
            # Never a silent truncation: the client sees an error event and no [DONE].
            self.metrics.stream_cuts.inc()
            yield _sse(OpenAIError(502, f"The stream was cut: {exc}", "server_error", "stream_cut").body())
        finally:
            if not primary.done():
                primary.cancel()
            await stream.aclose()
            await self.limiter.release(lease, stream.prompt_tokens + stream.completion_tokens)

    def _answer(self, prepared: PreparedRequest, result: GenerationResult) -> CompletionResponse | ChatCompletionResponse:
        ident, created, model, usage = _response_id(prepared), int(time.time()), prepared.choice.model, _usage(result)
        if prepared.kind == "chat":
            choice = ChatChoice(0, ChatMessageOut("assistant", result.text), result.finish_reason)
            return ChatCompletionResponse(ident, "chat.completion", created, model, [choice], usage)
        return CompletionResponse(ident, "text_completion", created, model, [CompletionChoice(result.text, 0, result.finish_reason)], usage)

    def _observe(self, prepared: PreparedRequest, result: GenerationResult, tenant: Tenant) -> None:
        adapter = self.metrics.adapter_label(self._served_name(prepared.choice))
        self.metrics.token_count("prompt", adapter).inc(result.prompt_tokens)
        self.metrics.token_count("completion", adapter).inc(result.completion_tokens)
        self.metrics.tenant_token_count(tenant.name, "prompt").inc(result.prompt_tokens)
        self.metrics.tenant_token_count(tenant.name, "completion").inc(result.completion_tokens)
        if prepared.stream is False:
            self.metrics.first_token_latency(prepared.choice.assignment).observe(result.first_token_s)

    async def _dispatch(self, prepared: PreparedRequest, call: Callable[[GenerationJob, str], Awaitable[Served]]) -> tuple[PreparedRequest, Served]:
        """`call` (the dispatcher's `generate` or `open_stream`) for the request, and the request as it
        was finally served. The one place that decides what answers when the routed version cannot:
        a refused version's last good one, then - when the adapter's fallback policy is `base` - the
        base model, said by `x-loraplex-route: fallback`, a metric and a log line; else the error."""
        try:
            for attempt in range(MAX_VERSION_FALLBACKS + 1):
                try:
                    return prepared, await call(prepared.job, prepared.choice.model)
                except VersionRefused as refused:
                    if attempt == MAX_VERSION_FALLBACKS:
                        raise
                    prepared = self._fall_back(prepared, refused)
        except ShardError as failure:
            reason = unservable_reason(failure)
            if prepared.choice.fallback != FALLBACK_BASE or reason is None:
                raise
            prepared = self._fall_back_to_base(prepared, failure, reason)
            return prepared, await call(prepared.job, prepared.choice.model)

    def _fall_back_to_base(self, prepared: PreparedRequest, failure: ShardError, reason: str) -> PreparedRequest:
        """The request re-aimed at the base model. The tenant needs no grant of the base model for this:
        falling back is the adapter owner's choice, open to whoever may use the adapter."""
        choice = prepared.choice
        log.warning(
            "%s@%s cannot be served (%s: %s); the base model answers, as the adapter's fallback policy says",
            choice.adapter, choice.version, reason, failure,
        )
        self.metrics.base_fallbacks.labels(self.metrics.adapter_label(choice.adapter), reason).inc()
        base = replace(choice, adapter="", version="", assignment="fallback", shadow_version=None)
        return replace(prepared, choice=base, job=replace(prepared.job, adapter="", version=""))

    def _fall_back(self, prepared: PreparedRequest, refused: VersionRefused) -> PreparedRequest:
        """The request re-aimed at the adapter's last good version, or `refused` raised again. An ad-hoc
        mix has no version of its own to fall back to (nor to be recorded as refused)."""
        if prepared.choice.mix:
            raise refused
        fallback = self.last_good.after_refusal(prepared.choice, refused.details)
        if fallback is None:
            raise refused
        log.warning(
            "%s@%s refused by the shards (%s); serving the last good version %s",
            prepared.choice.adapter, prepared.choice.version, refused.details, fallback.version,
        )
        self.metrics.version_fallbacks.labels(self.metrics.adapter_label(prepared.choice.adapter)).inc()
        return replace(prepared, choice=fallback, job=replace(prepared.job, version=fallback.version))

    def _start_shadow(self, prepared: PreparedRequest, tenant: Tenant, primary: asyncio.Future) -> None:
        if self.shadow is not None and prepared.choice.shadow_version:
            self.shadow.maybe_start(prepared.job, prepared.choice.shadow_version, tenant.name, primary)


class _ChunkMaker:
    """The events of one stream: every chunk shares the answer's id, creation time and model."""

    def __init__(self, prepared: PreparedRequest, created: int):
        self.ident, self.created, self.model = _response_id(prepared), created, prepared.choice.model
        self.is_chat = prepared.kind == "chat"

    def completion(self, text: str, finish: str | None) -> CompletionChunk:
        return CompletionChunk(self.ident, "text_completion", self.created, self.model, [CompletionChoice(text, 0, finish)])

    def chat(self, delta: ChatDelta, finish: str | None) -> ChatChunk:
        return ChatChunk(self.ident, "chat.completion.chunk", self.created, self.model, [ChatChunkChoice(0, delta, finish)])

    def usage(self, usage: Usage) -> CompletionChunk | ChatChunk:
        if self.is_chat:
            return ChatChunk(self.ident, "chat.completion.chunk", self.created, self.model, [], usage)
        return CompletionChunk(self.ident, "text_completion", self.created, self.model, [], usage)


def _response_id(prepared: PreparedRequest) -> str:
    return ("chatcmpl-" if prepared.kind == "chat" else "cmpl-") + prepared.request_id


def _usage(result: GenerationResult) -> Usage:
    return Usage(result.prompt_tokens, result.completion_tokens, result.prompt_tokens + result.completion_tokens)


def _sse(event: msgspec.Struct) -> bytes:
    return b"data: " + JSON.encode(event) + b"\n\n"


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _message_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request("Only text content parts are supported.", "messages")
        parts.append(part["text"])
    return "".join(parts)


def _single_prompt(prompts: list[str]) -> str:
    if len(prompts) != 1:
        raise bad_request("Exactly one prompt per request is supported.", "prompt")
    return prompts[0]


__all__ = ["CompletionService", "PreparedRequest", "PromptMeasure"]
