"""Polling for a condition in tests: readiness is waited for, never slept for."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float = 5.0, step_s: float = 0.05) -> T:
    """The predicate's first truthy value within `timeout_s`, else its last (falsy) one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    return predicate()
