"""A streamed answer (Server-Sent Events) that never waits long on its client and always closes its
source, so a stuck or vanished client holds no memory and no shard batch row.

Nothing between the shard stream and the socket buffers more than one event: the event iterator
(`CompletionService._sse_events`) pulls the next chunk from the gRPC call only after the previous
event was handed to the server, and uvicorn's flow control makes that hand-over wait while its
transport holds more than its high-water mark (64 KiB). So a client that stops reading stops the
pull, and gRPC's own flow control then holds the shard's sends. A hand-over that waits longer than
`write_timeout_s` ends the answer: the iterator is closed - which cancels the shard call and frees
its row - and the connection is dropped. A client that disconnects ends it the same way, at once.
"""

from __future__ import annotations

import logging

from anyio import CancelScope, create_task_group, move_on_after
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send

log = logging.getLogger(__name__)


class WriteBoundedStream(ASGIStreamingResponse):
    __slots__ = ("write_timeout_s",)

    def __init__(self, *, write_timeout_s: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.write_timeout_s = write_timeout_s

    async def send_body(self, send: Send, receive: Receive) -> None:
        try:
            async with create_task_group() as task_group:
                task_group.start_soon(self._stream_bounded, send, task_group.cancel_scope)
                await self._listen_for_disconnect(cancel_scope=task_group.cancel_scope, receive=receive)
        finally:
            # Cancelled mid-event (a disconnect) or cut, the iterator's cleanup (cancel the shard
            # call, release the tenant's lease) runs now, not whenever the generator is collected.
            close = getattr(self.iterator, "aclose", None)
            if close is not None:
                with CancelScope(shield=True):
                    await close()

    async def _stream_bounded(self, send: Send, scope: CancelScope) -> None:
        async for chunk in self.iterator:
            if not await self._send_within_timeout(send, chunk, more_body=True):
                scope.cancel()
                return
        await self._send_within_timeout(send, b"", more_body=False)
        scope.cancel()

    async def _send_within_timeout(self, send: Send, body: bytes, more_body: bool) -> bool:
        with move_on_after(self.write_timeout_s) as write:
            await send({"type": "http.response.body", "body": body, "more_body": more_body})
        if write.cancelled_caught:
            # Returning without the last body event makes the server close the connection.
            log.warning("a client read nothing for %.0f s; its stream is cut and the shard call cancelled", self.write_timeout_s)
            return False
        return True
