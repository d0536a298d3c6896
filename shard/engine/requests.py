"""What goes into the engine and what comes out of it, plus the handle a caller streams from."""

from __future__ import annotations

import asyncio
import enum
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from shard.engine.sampling import SamplingOptions


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context was reached
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationRequest:
    """Exactly one of ``prompt``, ``messages`` (rendered with the chat template) or ``prompt_ids``."""

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_ids: list[int] | None = None
    adapter: Any = None  # a shard.lora.AdapterKey or AdapterMix, or None for the base model
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # A chunk once this many tokens are pending (1: every token as it is generated). The first
    # text and the end are never held back; a caller that wants only the whole answer sets it to
    # max_tokens and is spared one hand-off (and one message downstream) per token.
    stream_interval: int = 1


@dataclass(frozen=True)
class GenerationChunk:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None  # set on the last chunk only
    usage: Usage | None = None  # set on the last chunk only
    adapter: Any = None  # what served the request; set on the first chunk
    logits: Any = None  # per-token logits [n, vocab], only when the engine records them (tests)


class RequestHandle:
    """Stream of one request's chunks. ``async for`` when submitted from an event loop,
    plain ``for`` otherwise; a failed request raises its error from the iteration."""

    _END = object()

    def __init__(
        self,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        loop: asyncio.AbstractEventLoop | None,
        on_cancel: Callable[["RequestHandle"], None],
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self._loop = loop
        self._on_cancel = on_cancel
        self._async_queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._sync_queue: queue.SimpleQueue | None = queue.SimpleQueue() if loop is None else None
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    # --- engine side (engine thread) -----------------------------------------------------------

    def _put(self, item: object) -> None:
        if self._async_queue is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                pass
        else:
            self._sync_queue.put(item)

    def _emit(self, chunk: GenerationChunk) -> None:
        self._put(chunk)
        if chunk.finish_reason is not None:
            self.finished.set()
            self._put(self._END)

    def _fail(self, error: BaseException) -> None:
        self.finished.set()
        self._put(error)
        self._put(self._END)

    # --- caller side -----------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop generating (the client went away); the stream ends with a CANCELLED chunk."""
        if not self.finished.is_set() and not self.cancelled.is_set():
            self.cancelled.set()
            self._on_cancel(self)

    def __aiter__(self):
        if self._async_queue is None:
            raise TypeError("this request was submitted outside an event loop; iterate it with `for`")
        return self._aiter()

    async def _aiter(self):
        while True:
            item = await self._async_queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __iter__(self):
        if self._sync_queue is None:
            raise TypeError("this request was submitted from an event loop; iterate it with `async for`")
        while True:
            item = self._sync_queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
