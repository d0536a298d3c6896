"""Calling the start/stop/poll methods of parts that may be coroutines or blocking."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable


async def call_blocking_or_async(method: Callable | None) -> None:
    """Runs a start/stop/poll method that may be a coroutine or blocking (MLflow I/O) off the loop."""
    if method is None:
        return
    if inspect.iscoroutinefunction(method):
        await method()
    else:
        await asyncio.to_thread(method)
