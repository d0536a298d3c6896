"""Send a generation to a shard chosen by the placement ring, with failover.

- Streaming: a request is retried (once; RESOURCE_EXHAUSTED moves on without using the retry) until
  its first text reaches the gateway, so nothing has reached the client yet. After that a failure is
  the client's to see (the HTTP layer ends the stream with an error event).
- Non-streaming: nothing reaches the client before the end, so a failure anywhere in the call is
  retried on the next shard in ring order.
Failures are typed (`gateway.errors.ShardError`): a refused version is a `VersionRefused`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from gateway import errors
from gateway.errors import NoShardAvailable, ShardCallFailed
from gateway.shards import ShardPool
from loraplex.adapter_format import adapter_ref
from loraplex.adapter_mix import MixComponent
from protos import shard_pb2

FINISH_REASONS = {
    shard_pb2.FINISH_REASON_STOP: "stop",
    shard_pb2.FINISH_REASON_LENGTH: "length",
}


@dataclass(frozen=True)
class GenerationJob:
    request_id: str
    adapter: str
    version: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    mix: tuple[MixComponent, ...] = ()  # an ad-hoc mix (adapter and version then ""), versions pinned

    @property
    def placement_key(self) -> str:
        """A mix goes where its first component is placed: the shard most likely to hold it warm."""
        if self.mix:
            return adapter_ref(self.mix[0].name, self.mix[0].version)
        return adapter_ref(self.adapter, self.version) if self.adapter else ""

    def to_proto(self, stream_interval: int = 1) -> shard_pb2.GenerateRequest:
        sampling = shard_pb2.SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, stop=list(self.stop)
        )
        if self.seed is not None:
            sampling.seed = self.seed
        req = shard_pb2.GenerateRequest(
            request_id=self.request_id,
            adapter=shard_pb2.AdapterRef(name=self.adapter, version=self.version),
            sampling=sampling,
            stream_interval=stream_interval,
        )
        req.mix.extend(
            shard_pb2.MixComponent(adapter=shard_pb2.AdapterRef(name=c.name, version=c.version), weight=c.weight)
            for c in self.mix
        )
        if self.messages:
            req.messages.extend(shard_pb2.ChatMessage(role=r, content=c) for r, c in self.messages)
        else:
            req.prompt = self.prompt or ""
        return req


class StreamCut(Exception):
    """A shard stream failed after text had reached the gateway."""

    def __init__(self, message: str, code: grpc.StatusCode):
        super().__init__(message)
        self.code = code


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    shard_id: str
    adapter: str
    version: str
    latency_s: float
    first_token_s: float


@dataclass
class ShardStream:
    """An open `Generate` call whose first text (or end) has arrived."""

    shard_id: str
    adapter: str
    version: str
    started: float
    first_token_s: float
    _call: grpc.aio.UnaryStreamCall
    _pending: list[shard_pb2.GenerateChunk]
    _release: Callable[[], None]  # ends the shard's in-flight count for this request
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    closed: bool = False

    async def chunks(self) -> AsyncIterator[shard_pb2.GenerateChunk]:
        """Every chunk, buffered ones first; raises StreamCut if the shard stops early."""
        try:
            while self._pending:
                chunk = self._pending.pop(0)
                self._account(chunk)
                yield chunk
            while self.finish_reason is None:
                try:
                    chunk = await self._call.read()
                except grpc.aio.AioRpcError as exc:
                    raise StreamCut(f"shard {self.shard_id} failed mid-stream: {exc.code().name} {exc.details() or ''}", exc.code()) from exc
                if chunk is grpc.aio.EOF:
                    raise StreamCut(f"shard {self.shard_id} ended the stream without a finish reason", grpc.StatusCode.UNKNOWN)
                self._account(chunk)
                yield chunk
        finally:
            await self.aclose()

    def _account(self, chunk: shard_pb2.GenerateChunk) -> None:
        self.text_parts.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        if chunk.finish_reason == shard_pb2.FINISH_REASON_CANCELLED:
            raise StreamCut(f"shard {self.shard_id} cancelled the request", grpc.StatusCode.CANCELLED)
        if chunk.finish_reason:
            self.finish_reason = FINISH_REASONS.get(chunk.finish_reason, "stop")
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.finish_reason is None:
            self._call.cancel()  # the client went away or the stream broke: free the shard's slot
        else:
            # Read the end of the stream: the tracing interceptor ends the call's client span only
            # when the response stream is exhausted; unread, the span never ends nor is exported.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._call.read()
        self._release()

    def result(self) -> GenerationResult:
        return GenerationResult(
            "".join(self.text_parts),
            list(self.token_ids),
            self.finish_reason or "stop",
            self.prompt_tokens,
            self.completion_tokens,
            self.shard_id,
            self.adapter,
            self.version,
            time.perf_counter() - self.started,
            self.first_token_s,
        )


class Dispatcher:
    def __init__(
        self,
        pool: ShardPool,
        timeout_s: float = 120.0,
        on_attempt_failed: Callable[[str, grpc.StatusCode | None], None] | None = None,
    ):
        self.pool = pool
        self.timeout_s = timeout_s
        self._on_attempt_failed = on_attempt_failed

    async def open_stream(self, job: GenerationJob, model: str, allow_retry: bool = True) -> ShardStream:
        """Start generating; returns once text (or the end) has arrived from some shard."""
        return await self._with_failover(job, model, allow_retry, lambda shard_id: self._open_on(shard_id, job))

    async def generate(self, job: GenerationJob, model: str, allow_retry: bool = True) -> GenerationResult:
        """A whole generation; any failure is retried on the next shard (nothing was sent yet)."""

        async def run(shard_id: str) -> GenerationResult:
            # Nobody reads the text as it is generated: the shard sends the first token (timed as
            # the first-token latency) and the rest with the end, not a message per token.
            stream = await self._open_on(shard_id, job, stream_interval=max(1, job.max_tokens))
            async for _ in stream.chunks():
                pass
            return stream.result()

        return await self._with_failover(job, model, allow_retry, run)

    async def _with_failover(self, job, model, allow_retry, attempt):
        """Try the placement pick, then the next shards in ring order: one retry after a failure;
        RESOURCE_EXHAUSTED (a full queue) moves on without using it up."""
        candidates = self.pool.candidates(job.placement_key)
        if not candidates:
            raise NoShardAvailable()
        failures_allowed = 2 if allow_retry else 1
        failures = 0
        last_error: ShardCallFailed | None = None
        for shard_id in candidates:
            state = self.pool.get(shard_id)
            if state is None or not state.healthy:
                continue
            try:
                return await attempt(shard_id)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
            except StreamCut as exc:
                code, details = exc.code, str(exc)
            last_error = self._attempt_failed(shard_id, code, details, model, job)
            if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                failures += 1
                if failures >= failures_allowed:
                    break
        raise last_error or NoShardAvailable()

    def _attempt_failed(self, shard_id: str, code: grpc.StatusCode, details: str, model: str, job: GenerationJob) -> ShardCallFailed:
        """The error to report if no other shard succeeds; raises at once for non-retryable codes."""
        if self._on_attempt_failed:
            self._on_attempt_failed(shard_id, code)
        if code in errors.SHARD_DOWN_CODES:
            self.pool.mark_down(shard_id, f"Generate: {code.name} {details}".strip())
        error = errors.shard_call_failed(code, details, model, job.adapter, job.version)
        if code not in errors.RETRYABLE_CODES:
            raise error
        return error

    async def _open_on(self, shard_id: str, job: GenerationJob, stream_interval: int = 1) -> ShardStream:
        state = self.pool.get(shard_id)
        started = time.perf_counter()
        key = job.placement_key
        self.pool.begin(state, key)
        release = functools.partial(self.pool.end, state, key)
        pending: list[shard_pb2.GenerateChunk] = []
        adapter, version = job.adapter, job.version
        call = None
        try:
            call = state.stub.Generate(job.to_proto(stream_interval), timeout=self.timeout_s)
            while True:
                chunk = await call.read()
                if chunk is grpc.aio.EOF:
                    raise StreamCut(f"shard {shard_id} ended the stream before any text", grpc.StatusCode.UNKNOWN)
                if chunk.HasField("adapter"):
                    adapter, version = chunk.adapter.name, chunk.adapter.version
                pending.append(chunk)
                if chunk.text or chunk.finish_reason:
                    break
        except BaseException:
            if call is not None:
                call.cancel()
            release()
            raise
        state.served += 1
        return ShardStream(shard_id, adapter, version, started, time.perf_counter() - started, call, pending, release)
