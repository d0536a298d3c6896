"""Per-tenant limits: concurrent requests and tokens per (sliding) minute, behind one interface.

A request is admitted with a reservation - its prompt tokens plus `max_tokens` - and holds a `Lease`
until it ends; releasing the lease settles the reservation with the tokens really used. Both
implementations follow the same rules (tests/gateway/test_gateway_tenant_limits.py drives both):

- concurrency: refused (429) while the tenant holds `concurrent_requests` leases;
- tokens: `used` = tokens settled within the window + reservations of requests in flight; a request
  is refused (429) when `used > 0` and `used + reservation > tokens_per_minute`. Requests in flight
  therefore cannot overshoot the budget; only a single request that alone reserves more than the
  whole budget runs past it, and only when nothing else counts against the window.

`LocalTenantLimiter` keeps the counts in this process (one gateway process). `SharedTenantLimiter`
(gateway/shared_limits.py) keeps them in Redis/Valkey, so that every worker and replica enforces one
set of limits.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import rate_limited
from gateway.tenants import Tenant

WINDOW_S = 60.0


@dataclass(frozen=True)
class Lease:
    """One admitted request. `lease_id` is empty when the tenant has no limits (nothing to release)."""

    tenant: str
    lease_id: str
    reserved_tokens: int
    track_tokens: bool
    shared: bool = False  # held in the shared store (else in this process)


@dataclass(frozen=True)
class TenantUsage:
    in_flight: int
    tokens_in_window: int  # settled within the window + reserved by requests in flight


class TenantLimiter(ABC):
    @abstractmethod
    async def admit(self, tenant: Tenant, reserve_tokens: int) -> Lease:
        """A lease, or an OpenAIError: 429 over a limit (503 when the shared store is down and the
        policy is to fail closed)."""

    @abstractmethod
    async def release(self, lease: Lease, used_tokens: int) -> None:
        """Ends the lease and charges `used_tokens` in place of its reservation. Never raises."""

    @abstractmethod
    async def usage(self, tenant: Tenant) -> TenantUsage: ...

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def unlimited(tenant: Tenant) -> bool:
    return not tenant.limits.concurrent_requests and not tenant.limits.tokens_per_minute


def new_lease_id() -> str:
    return uuid.uuid4().hex


def concurrency_refusal(tenant: Tenant, in_flight: int):
    return rate_limited(
        f"Tenant '{tenant.name}' has {in_flight} requests in flight (limit {tenant.limits.concurrent_requests}).", 1.0
    )


def tokens_refusal(tenant: Tenant, used: int, reserve: int, retry_after_s: float):
    return rate_limited(
        f"Tenant '{tenant.name}' has {used} tokens counted in the last minute, in flight included; this request "
        f"reserves {reserve} (prompt + max_tokens) and the limit is {tenant.limits.tokens_per_minute}.",
        retry_after_s,
    )


def seconds_until_room(settled: list[tuple[float, int]], reserved_in_flight: int, used: int, reserve: int, limit: int, window_s: float, now: float) -> float:
    """When enough settled tokens leave the window for `reserve` to fit (`settled`: (time, tokens),
    oldest first). While reservations in flight are what blocks, they settle as their requests end."""
    need = used + reserve - limit
    settled_total = used - reserved_in_flight
    if reserved_in_flight and settled_total < need:
        return 1.0
    target = min(need, settled_total)
    freed = 0
    for stamp, tokens in settled:
        freed += tokens
        if freed >= target:
            return max(1.0, stamp + window_s - now)
    return window_s


@dataclass
class _LocalUsage:
    leases: dict[str, int] = field(default_factory=dict)  # lease id -> reserved tokens
    settled: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens), oldest first
    settled_sum: int = 0

    def expire(self, now: float, window_s: float) -> None:
        while self.settled and self.settled[0][0] <= now - window_s:
            _, tokens = self.settled.popleft()
            self.settled_sum -= tokens

    @property
    def reserved(self) -> int:
        return sum(self.leases.values())


class LocalTenantLimiter(TenantLimiter):
    """The counts in this process's memory: right for one gateway process, wrong for several."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S):
        self._clock = clock
        self.window_s = window_s
        self._usage: dict[str, _LocalUsage] = {}

    def admit_now(self, tenant: Tenant, reserve_tokens: int) -> Lease:
        """`admit` without a suspension point (the shared limiter falls back on it)."""
        if unlimited(tenant):
            return Lease(tenant.name, "", 0, False)
        limits = tenant.limits
        usage = self._usage.setdefault(tenant.name, _LocalUsage())
        if limits.concurrent_requests and len(usage.leases) >= limits.concurrent_requests:
            raise concurrency_refusal(tenant, len(usage.leases))
        reserve = max(0, reserve_tokens) if limits.tokens_per_minute else 0
        if limits.tokens_per_minute:
            now = self._clock()
            usage.expire(now, self.window_s)
            reserved = usage.reserved
            used = usage.settled_sum + reserved
            if used > 0 and used + reserve > limits.tokens_per_minute:
                retry = seconds_until_room(list(usage.settled), reserved, used, reserve, limits.tokens_per_minute, self.window_s, now)
                raise tokens_refusal(tenant, used, reserve, retry)
        lease = Lease(tenant.name, new_lease_id(), reserve, bool(limits.tokens_per_minute))
        usage.leases[lease.lease_id] = reserve
        return lease

    def release_now(self, lease: Lease, used_tokens: int) -> None:
        if not lease.lease_id:
            return
        usage = self._usage.setdefault(lease.tenant, _LocalUsage())
        usage.leases.pop(lease.lease_id, None)
        if lease.track_tokens and used_tokens > 0:
            usage.settled.append((self._clock(), used_tokens))
            usage.settled_sum += used_tokens

    async def admit(self, tenant: Tenant, reserve_tokens: int) -> Lease:
        return self.admit_now(tenant, reserve_tokens)

    async def release(self, lease: Lease, used_tokens: int) -> None:
        self.release_now(lease, used_tokens)

    async def usage(self, tenant: Tenant) -> TenantUsage:
        usage = self._usage.setdefault(tenant.name, _LocalUsage())
        usage.expire(self._clock(), self.window_s)
        return TenantUsage(len(usage.leases), usage.settled_sum + usage.reserved)
