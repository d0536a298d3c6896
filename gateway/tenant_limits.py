"""Per-tenant limits: concurrent requests and tokens per (sliding) minute."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import rate_limited
from gateway.tenants import Tenant

WINDOW_S = 60.0


@dataclass
class _TenantUsage:
    in_flight: int = 0
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens) charged
    tokens_in_window: int = 0


class TenantLimiter:
    """`admit()` before a request (raises a 429 OpenAIError), `release()` after, with its tokens.

    Tokens are charged when known (after the answer), so a tenant may overshoot its minute by the
    requests already in flight; the next request then waits for the window to free up.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._usage: dict[str, _TenantUsage] = {}

    def _get(self, tenant: Tenant) -> _TenantUsage:
        return self._usage.setdefault(tenant.name, _TenantUsage())

    def _expire(self, usage: _TenantUsage, now: float) -> None:
        while usage.tokens and usage.tokens[0][0] <= now - WINDOW_S:
            _, n = usage.tokens.popleft()
            usage.tokens_in_window -= n

    def admit(self, tenant: Tenant) -> None:
        usage = self._get(tenant)
        limits = tenant.limits
        now = self._clock()
        if limits.concurrent_requests and usage.in_flight >= limits.concurrent_requests:
            raise rate_limited(
                f"Tenant '{tenant.name}' has {usage.in_flight} requests in flight (limit {limits.concurrent_requests}).", 1.0
            )
        if limits.tokens_per_minute:
            self._expire(usage, now)
            if usage.tokens_in_window >= limits.tokens_per_minute:
                retry_after = self._seconds_until_below(usage, limits.tokens_per_minute, now)
                raise rate_limited(
                    f"Tenant '{tenant.name}' used {usage.tokens_in_window} tokens in the last minute "
                    f"(limit {limits.tokens_per_minute}).",
                    retry_after,
                )
        usage.in_flight += 1

    def release(self, tenant: Tenant, tokens: int = 0) -> None:
        usage = self._get(tenant)
        usage.in_flight = max(0, usage.in_flight - 1)
        self.charge(tenant, tokens)

    def charge(self, tenant: Tenant, tokens: int) -> None:
        if tokens <= 0 or not tenant.limits.tokens_per_minute:
            return
        usage = self._get(tenant)
        usage.tokens.append((self._clock(), tokens))
        usage.tokens_in_window += tokens

    def _seconds_until_below(self, usage: _TenantUsage, limit: int, now: float) -> float:
        remaining = usage.tokens_in_window
        for stamp, n in usage.tokens:
            remaining -= n
            if remaining < limit:
                return max(1.0, stamp + WINDOW_S - now)
        return WINDOW_S

    def in_flight(self, tenant: Tenant) -> int:
        return self._get(tenant).in_flight
