"""Shutting a gateway process down without cutting answers.

On SIGTERM the process drains: readiness (`/readyz`) answers 503 at once and new completions are
refused with 503 + `Retry-After` (and `Connection: close`), while the listening sockets stay open
for `drain_delay_s` so that load balancers see the readiness change rather than refused
connections. Then uvicorn's own shutdown runs: it stops accepting, lets every in-flight request
(streams included) finish within `drain_grace_s` - at least the request timeout, so no answer the
gateway would still wait for is cut - and only then stops the parts (shard channels, watchers).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

SignalHandler = Callable[[int, FrameType | None], object]


class Drain:
    """Whether this process is shutting down, and since when (readiness and admission read it)."""

    def __init__(self) -> None:
        self.since: float | None = None

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self) -> None:
        if self.since is None:
            self.since = time.monotonic()


class SigtermDrain:
    """Turns the SIGTERM that uvicorn would act on at once into: drain first, then uvicorn's
    graceful shutdown `delay_s` later. A second SIGTERM (or SIGINT) goes to uvicorn straight away.

    `install` is a lifespan startup hook: it runs after uvicorn installed its signal handlers (in
    the single process and in each worker alike), and wraps the handler it finds."""

    def __init__(self, drain: Drain, delay_s: float) -> None:
        self.drain = drain
        self.delay_s = delay_s
        self._server_handler: SignalHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def install(self) -> None:
        handler = signal.getsignal(signal.SIGTERM)
        if not callable(handler):
            return  # not served by uvicorn (nothing would stop the server): leave SIGTERM as it is
        self._server_handler = handler
        self._loop = asyncio.get_running_loop()
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining:
            self._server_handler(sig, frame)
            return
        self.drain.begin()
        log.warning("SIGTERM: draining; readiness is off, in-flight requests finish, the port closes in %.1f s", self.delay_s)
        # A signal handler runs between two bytecodes of the loop's thread: hand over through the
        # loop's self-pipe rather than touching its timers directly.
        self._loop.call_soon_threadsafe(self._loop.call_later, self.delay_s, self._server_handler, sig, None)
