"""Tenant limits shared by every gateway worker and replica, kept in Redis/Valkey.

Per tenant, three keys (one hash slot through the `{tenant}` tag, so Redis Cluster works too):
- `...:leases`   sorted set: lease id -> expiry (ms, the server's clock). A process renews its
                 leases every `lease_s / 3`; a process that dies stops renewing, and its leases
                 stop counting `lease_s` later - a crash cannot leak a tenant's concurrency.
- `...:reserved` hash: lease id -> tokens reserved at admission (prompt + max_tokens).
- `...:settled`  hash: second (server clock) -> tokens charged when requests ended, one field per
                 second of the window: the sliding minute at one-second resolution.

Admission, release and renewal are each one Lua script, so they are atomic on the server and cost
one round trip. Time is the server's (`TIME`), so replicas with skewed clocks agree.

When the store cannot be reached (`redis_failure_policy`):
- "open" (default): the request is admitted against this process's own limiter - each process
  then enforces the limits alone, so a tenant can get up to N times its limits across N processes
  while the store is down. The metric `loraplex_gateway_limits_store_up` drops to 0, each request
  decided without the store counts in `loraplex_gateway_limits_degraded_total`, and one warning is
  logged per outage.
- "closed": the request is refused with 503 `limits_unavailable` and `Retry-After`.
After a failure the store is left alone for `retry_s` (no timeout paid per request), then tried
again; the first success logs that it is back and shared limits apply again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import OpenAIError
from gateway.metrics import GatewayMetrics
from gateway.shared_store import connect
from gateway.tenant_limits import (
    WINDOW_S,
    Lease,
    LocalTenantLimiter,
    TenantLimiter,
    TenantUsage,
    concurrency_refusal,
    new_lease_id,
    seconds_until_room,
    tokens_refusal,
    unlimited,
)
from gateway.tenants import Tenant

log = logging.getLogger(__name__)

FAIL_OPEN = "open"
FAIL_CLOSED = "closed"
FAILURE_POLICIES = (FAIL_OPEN, FAIL_CLOSED)

# KEYS: leases, reserved, settled. ARGV: lease id, lease ms, concurrency limit, tokens limit,
# reservation, window s. Returns {1, in_flight} when admitted; {0, in_flight, -1} over the
# concurrency limit; {0, in_flight, used, reserved, now s, second, tokens, ...} over the tokens limit,
# with the window's settled seconds oldest first (the caller works out when to retry).
_ADMIT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_s = tonumber(t[1])
local lease_ms = tonumber(ARGV[2])
local max_in_flight = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local reserve = tonumber(ARGV[5])
local window_s = tonumber(ARGV[6])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms)
for i = 1, #expired, 500 do
  local chunk = {unpack(expired, i, math.min(i + 499, #expired))}
  redis.call('ZREM', KEYS[1], unpack(chunk))
  redis.call('HDEL', KEYS[2], unpack(chunk))
end
local in_flight = redis.call('ZCARD', KEYS[1])
if max_in_flight > 0 and in_flight >= max_in_flight then
  return {0, in_flight, -1}
end
if tpm > 0 then
  local used = 0
  local reserved = 0
  local settled = {}
  local stale = {}
  local fields = redis.call('HGETALL', KEYS[3])
  for i = 1, #fields, 2 do
    local second = tonumber(fields[i])
    if second <= now_s - window_s then
      table.insert(stale, fields[i])
    else
      used = used + tonumber(fields[i + 1])
      table.insert(settled, {second, tonumber(fields[i + 1])})
    end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[3], unpack(stale)) end
  for _, v in ipairs(redis.call('HVALS', KEYS[2])) do reserved = reserved + tonumber(v) end
  used = used + reserved
  if used > 0 and used + reserve > tpm then
    table.sort(settled, function(a, b) return a[1] < b[1] end)
    local reply = {0, in_flight, used, reserved, now_s}
    for _, entry in ipairs(settled) do
      table.insert(reply, entry[1])
      table.insert(reply, entry[2])
    end
    return reply
  end
  if reserve > 0 then
    redis.call('HSET', KEYS[2], ARGV[1], reserve)
    redis.call('PEXPIRE', KEYS[2], lease_ms * 2)
  end
end
redis.call('ZADD', KEYS[1], now_ms + lease_ms, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease_ms * 2)
return {1, in_flight + 1}
"""

# KEYS: leases, reserved, settled. ARGV: lease id, tokens used, window s.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local tokens = tonumber(ARGV[2])
if tokens > 0 then
  local second = redis.call('TIME')[1]
  redis.call('HINCRBY', KEYS[3], second, tokens)
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]) + 1)
end
return 1
"""

# KEYS: leases, reserved. ARGV: lease ms, lease ids... Only leases still present are renewed: one
# released meanwhile (or dropped by a store restart) is not brought back.
_RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[1]) * 2) end
return 1
"""

# KEYS: leases, reserved, settled. ARGV: window s. Returns {in_flight, used}; read-only (leases
# past their expiry are left for the next admission to drop, and not counted).
_USAGE = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local in_flight = redis.call('ZCOUNT', KEYS[1], '(' .. now_ms, '+inf')
local used = 0
local fields = redis.call('HGETALL', KEYS[3])
for i = 1, #fields, 2 do
  if tonumber(fields[i]) > tonumber(t[1]) - tonumber(ARGV[1]) then used = used + tonumber(fields[i + 1]) end
end
local reserved = redis.call('HGETALL', KEYS[2])
for i = 1, #reserved, 2 do
  local expiry = redis.call('ZSCORE', KEYS[1], reserved[i])
  if expiry and tonumber(expiry) > now_ms then used = used + tonumber(reserved[i + 1]) end
end
return {in_flight, used}
"""


def limits_unavailable(retry_after_s: float) -> OpenAIError:
    return OpenAIError(
        503,
        "Tenant limits cannot be checked right now (the shared limits store is unreachable).",
        "server_error",
        "limits_unavailable",
        headers={"retry-after": str(max(1, round(retry_after_s)))},
    )


class SharedTenantLimiter(TenantLimiter):
    def __init__(
        self,
        client: aioredis.Redis,
        metrics: GatewayMetrics,
        *,
        lease_s: float = 10.0,
        failure_policy: str = FAIL_OPEN,
        retry_s: float = 1.0,
        window_s: float = WINDOW_S,
        key_prefix: str = "loraplex:limits",
    ):
        if failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"failure_policy must be one of {FAILURE_POLICIES}, got {failure_policy!r}")
        self.client = client
        self.metrics = metrics
        self.lease_ms = max(1, int(lease_s * 1000))
        self.failure_policy = failure_policy
        self.retry_s = retry_s
        self.window_s = int(window_s)
        self.key_prefix = key_prefix
        # When the store is down and the policy is to fail open, this process limits on its own.
        self.fallback = LocalTenantLimiter(window_s=window_s)
        self._admit = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._usage = client.register_script(_USAGE)
        self._live: dict[str, set[str]] = {}  # tenant -> lease ids this process holds in the store
        self._down_until = 0.0
        self._store_up = True
        self._renewer: asyncio.Task | None = None
        self._owns_client = False
        metrics.limits_store_up.set(1)

    @classmethod
    def from_url(cls, url: str, metrics: GatewayMetrics, *, timeout_s: float = 0.5, **kwargs) -> SharedTenantLimiter:
        """A limiter with a client of its own, closed by `stop()`."""
        limiter = cls(connect(url, timeout_s), metrics, **kwargs)
        limiter._owns_client = True
        return limiter

    def _keys(self, tenant: str) -> list[str]:
        base = f"{self.key_prefix}:{{{tenant}}}"
        return [f"{base}:leases", f"{base}:reserved", f"{base}:settled"]

    # ---- the store's health ------------------------------------------------------------------
    def _store_usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _store_failed(self, error: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_s
        if self._store_up:
            self._store_up = False
            self.metrics.limits_store_up.set(0)
            what = (
                "admitting against each process's own limits" if self.failure_policy == FAIL_OPEN else "refusing limited tenants with 503"
            )
            log.warning("shared limits store unreachable (%s): failing %s, %s until it answers", error, self.failure_policy, what)

    def _store_answered(self) -> None:
        if not self._store_up:
            self._store_up = True
            self.metrics.limits_store_up.set(1)
            log.warning("shared limits store reachable again: tenant limits are shared again")

    def _degraded(self, tenant: Tenant, reserve_tokens: int) -> Lease:
        self.metrics.limits_degraded.labels(self.failure_policy).inc()
        if self.failure_policy == FAIL_CLOSED:
            raise limits_unavailable(self.retry_s)
        return self.fallback.admit_now(tenant, reserve_tokens)

    # ---- the interface -----------------------------------------------------------------------
    async def admit(self, tenant: Tenant, reserve_tokens: int) -> Lease:
        if unlimited(tenant):
            return Lease(tenant.name, "", 0, False)
        if not self._store_usable():
            return self._degraded(tenant, reserve_tokens)
        limits = tenant.limits
        reserve = max(0, reserve_tokens) if limits.tokens_per_minute else 0
        lease_id = new_lease_id()
        args = [lease_id, self.lease_ms, limits.concurrent_requests, limits.tokens_per_minute, reserve, self.window_s]
        try:
            reply = await self._admit(keys=self._keys(tenant.name), args=args)
        except (RedisError, OSError) as error:
            self._store_failed(error)
            return self._degraded(tenant, reserve_tokens)
        self._store_answered()
        if reply[0] != 1:
            in_flight, used = int(reply[1]), int(reply[2])
            if used < 0:
                raise concurrency_refusal(tenant, in_flight)
            reserved, now_s = int(reply[3]), float(reply[4])
            settled = [(float(reply[i]), int(reply[i + 1])) for i in range(5, len(reply), 2)]
            retry = seconds_until_room(settled, reserved, used, reserve, limits.tokens_per_minute, self.window_s, now_s)
            raise tokens_refusal(tenant, used, reserve, retry)
        self._live.setdefault(tenant.name, set()).add(lease_id)
        return Lease(tenant.name, lease_id, reserve, bool(limits.tokens_per_minute), shared=True)

    async def release(self, lease: Lease, used_tokens: int) -> None:
        if not lease.lease_id:
            return
        if not lease.shared:
            self.fallback.release_now(lease, used_tokens)
            return
        held = self._live.get(lease.tenant)
        if held is not None:
            held.discard(lease.lease_id)  # first: whatever happens next, it is no longer renewed
            if not held:
                del self._live[lease.tenant]
        tokens = used_tokens if lease.track_tokens else 0
        try:
            await self._release(keys=self._keys(lease.tenant), args=[lease.lease_id, max(0, tokens), self.window_s])
        except (RedisError, OSError) as error:
            # The lease expires by itself; the tokens go uncounted.
            self._store_failed(error)
        except asyncio.CancelledError:
            raise
        else:
            self._store_answered()

    async def usage(self, tenant: Tenant) -> TenantUsage:
        in_flight, used = await self._usage(keys=self._keys(tenant.name), args=[self.window_s])
        return TenantUsage(int(in_flight), int(used))

    # ---- renewal -----------------------------------------------------------------------------
    async def renew(self) -> None:
        """Pushes the expiry of every lease this process holds `lease_s` ahead."""
        held = {tenant: list(ids) for tenant, ids in self._live.items() if ids}
        if not held:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for tenant, ids in held.items():
                await self._renew(keys=self._keys(tenant)[:2], args=[self.lease_ms, *ids], client=pipe)
            await pipe.execute()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self.renew()
            except (RedisError, OSError) as error:
                self._store_failed(error)

    async def start(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="tenant-lease-renewal")

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._owns_client:
            await self.client.aclose()
