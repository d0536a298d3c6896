"""The Redis/Valkey connection a gateway process shares its state through: tenant limits
(gateway/shared_limits.py) and shadow aggregates (gateway/shadow.py). One client per process."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def connect(url: str, timeout_s: float = 0.5) -> aioredis.Redis:
    # One immediate retry: it replaces a pooled connection that a store restart closed; more (with
    # backoff, the client's default) would hold requests up while the store is down.
    return aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1))
