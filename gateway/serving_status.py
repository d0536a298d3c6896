"""What the gateway learns about each version, written back onto the version in MLflow by one
process per cluster (the tags and their values: `loraplex/serving_status.py`).

Every gateway process notes the refusals it sees (`RefusalsSeen`, fed by the completion service
and shadow mode) and hands them to a `RefusalStore` each cycle: a dict in a lone process, a Redis
hash when processes share a store. One process, the holder of the `WriterLease` (a key in
Redis/Valkey that expires unless its holder renews it, so a dead writer is replaced within a
lease; the lone process otherwise), then gathers the rest - residency from each healthy shard's
`ListAdapters`, shadow aggregates - derives a batch of statuses and has the registry write the
tags that changed (`registry.serving_status.ServingStatusWriter`, on a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

import grpc
from redis.exceptions import RedisError

from gateway.metrics import GatewayMetrics
from gateway.routing_source import RoutingSource
from gateway.shadow import LocalShadowAggregates, SharedShadowAggregates
from gateway.shards import ShardPool
from loraplex.serving_status import Refusal, Residency, VersionKey, VersionSelection, VersionStatus, statuses_for
from protos import shard_pb2

log = logging.getLogger(__name__)

STORE_ERRORS = (RedisError, OSError)
MAX_REFUSALS = 10_000  # remembered refused versions; the oldest are forgotten first


class RefusalsSeen:
    """The refusals this process saw since its last cycle; called from the event loop and threads."""

    def __init__(self) -> None:
        self._pending: dict[VersionKey, Refusal] = {}
        self._lock = threading.Lock()

    def record(self, adapter: str, version: str, assignment: str, reason: str) -> None:
        """The `on_refused(adapter, version, assignment, reason)` hook of `LastGoodVersions` and `ShadowMode`."""
        with self._lock:
            if len(self._pending) < MAX_REFUSALS:
                self._pending[(adapter, version)] = Refusal(reason, time.time())

    def take(self) -> dict[VersionKey, Refusal]:
        with self._lock:
            taken, self._pending = self._pending, {}
        return taken


class RefusalStore(Protocol):
    async def add(self, refusals: Mapping[VersionKey, Refusal]) -> None: ...

    async def read(self) -> dict[VersionKey, Refusal]: ...

    async def forget(self, keys: list[VersionKey]) -> None: ...


class LocalRefusals:
    """Refused versions known to one process, the oldest forgotten past `max_entries`."""

    def __init__(self, max_entries: int = MAX_REFUSALS) -> None:
        self.max_entries = max_entries
        self._refusals: OrderedDict[VersionKey, Refusal] = OrderedDict()

    async def add(self, refusals: Mapping[VersionKey, Refusal]) -> None:
        for key, refusal in refusals.items():
            self._refusals.pop(key, None)
            self._refusals[key] = refusal
        while len(self._refusals) > self.max_entries:
            self._refusals.popitem(last=False)

    async def read(self) -> dict[VersionKey, Refusal]:
        return dict(self._refusals)

    async def forget(self, keys: list[VersionKey]) -> None:
        for key in keys:
            self._refusals.pop(key, None)


class SharedRefusals:
    """Refused versions known to every process sharing the store: one hash, `adapter@version` -> the
    refusal as JSON. It expires `ttl_s` after the last refusal; the writer trims it to `max_entries`."""

    def __init__(self, client, key: str = "loraplex:serving-status:refused", ttl_s: int = 7 * 24 * 3600, max_entries: int = MAX_REFUSALS):
        self._client = client
        self.key = key
        self.ttl_s = ttl_s
        self.max_entries = max_entries

    async def add(self, refusals: Mapping[VersionKey, Refusal]) -> None:
        if not refusals:
            return
        fields = {f"{a}@{v}": json.dumps({"reason": r.reason, "unix": r.unix}) for (a, v), r in refusals.items()}
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hset(self.key, mapping=fields)
            pipe.expire(self.key, self.ttl_s)
            await pipe.execute()

    async def read(self) -> dict[VersionKey, Refusal]:
        refusals: dict[VersionKey, Refusal] = {}
        for field, value in (await self._client.hgetall(self.key)).items():
            adapter, _, version = _text(field).rpartition("@")
            try:
                entry = json.loads(_text(value))
                refusals[(adapter, version)] = Refusal(str(entry["reason"]), float(entry["unix"]))
            except (ValueError, KeyError, TypeError):
                continue
        if len(refusals) > self.max_entries:
            oldest = sorted(refusals, key=lambda k: refusals[k].unix)[: len(refusals) - self.max_entries]
            await self.forget(oldest)
            for key in oldest:
                del refusals[key]
        return refusals

    async def forget(self, keys: list[VersionKey]) -> None:
        if keys:
            await self._client.hdel(self.key, *(f"{a}@{v}" for a, v in keys))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class WriterLease(Protocol):
    async def hold(self) -> bool:
        """True when this process is the writer now (taking or renewing the lease)."""

    async def release(self) -> None: ...


class ProcessLease:
    """A lone process (no shared store) is its cluster's only writer."""

    async def hold(self) -> bool:
        return True

    async def release(self) -> None:
        return None


# KEYS: the lease. ARGV: this holder's id, the lease in ms. 1 when this holder has it now.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class SharedWriterLease:
    """One writer among every process sharing the store: a key naming the holder that expires
    `lease_s` after its last renewal, so a writer that dies is replaced within a lease. While the
    store cannot be reached nobody writes (better no status than two writers racing)."""

    def __init__(self, client, lease_s: float, key: str = "loraplex:serving-status:writer", holder: str | None = None):
        self.lease_ms = max(1, int(lease_s * 1000))
        self.key = key
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)
        self._store_up = True

    async def hold(self) -> bool:
        try:
            held = bool(await self._hold(keys=[self.key], args=[self.holder, self.lease_ms]))
        except STORE_ERRORS as error:
            if self._store_up:
                log.warning("serving status: the shared store is unreachable, so no process writes: %s", error)
            self._store_up = False
            return False
        self._store_up = True
        return held

    async def release(self) -> None:
        with contextlib.suppress(*STORE_ERRORS):
            await self._release(keys=[self.key], args=[self.holder])


class ShardsUnanswered(Exception):
    """A healthy shard did not list its adapters: the residency this cycle would be incomplete."""


async def gather_residency(pool: ShardPool, timeout_s: float) -> dict[VersionKey, list[Residency]]:
    """Every adapter version each healthy shard holds, and in which tier (one `ListAdapters` per shard)."""

    async def listed(shard_id: str):
        state = pool.get(shard_id)
        if state is None:
            return shard_id, None
        try:
            return shard_id, await state.stub.ListAdapters(shard_pb2.ListAdaptersRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise ShardsUnanswered(f"{shard_id}: ListAdapters {error.code().name}") from error

    residency: dict[VersionKey, list[Residency]] = {}
    for shard_id, reply in await asyncio.gather(*(listed(s) for s in pool.healthy_shards())):
        for info in reply.adapters if reply is not None else ():
            if info.adapter.name:
                residency.setdefault((info.adapter.name, info.adapter.version), []).append(Residency(shard_id, info.tier))
    return residency


class StatusWriter(Protocol):
    """`registry.serving_status.ServingStatusWriter`: synchronous MLflow calls."""

    def tagged_versions(self) -> list[VersionKey] | None: ...

    def write(self, statuses: list[VersionStatus]): ...


class ServingStatusTask:
    """The cycle every `interval_s` in every gateway process: hand over this process's refusals;
    then, in the lease holder only, derive a batch of statuses and write the changed tags."""

    def __init__(
        self,
        *,
        pool: ShardPool,
        routing_source: RoutingSource,
        writer: StatusWriter,
        lease: WriterLease,
        seen: RefusalsSeen,
        refusals: RefusalStore,
        shadow_aggregates: LocalShadowAggregates | SharedShadowAggregates,
        selection: VersionSelection,
        metrics: GatewayMetrics,
        interval_s: float,
        shard_timeout_s: float = 2.0,
    ):
        self.pool = pool
        self.routing_source = routing_source
        self.writer = writer
        self.lease = lease
        self.seen = seen
        self.refusals = refusals
        self.shadow_aggregates = shadow_aggregates
        self.selection = selection
        self.metrics = metrics
        self.interval_s = interval_s
        self.shard_timeout_s = shard_timeout_s
        self.is_writer = False

    async def run_forever(self) -> None:
        try:
            while True:
                try:
                    await self.cycle()
                except Exception:  # a bad cycle must not end the task: the next one retries
                    log.exception("serving status cycle failed")
                await asyncio.sleep(self.interval_s)
        finally:
            if self.is_writer:
                await self.lease.release()  # the next process takes over at once, not a lease later

    async def cycle(self) -> bool:
        """One cycle; True when this process wrote (or found nothing to change)."""
        fresh = self.seen.take()
        try:
            await self.refusals.add(fresh)
        except STORE_ERRORS as error:
            log.warning("serving status: %d refusals not shared (store unreachable): %s", len(fresh), error)
        self._set_writer(await self.lease.hold())
        if not self.is_writer:
            return False
        try:
            residency = await gather_residency(self.pool, self.shard_timeout_s)
            refusals = await self.refusals.read()
        except ShardsUnanswered as error:
            log.info("serving status not written this cycle: %s", error)
            return False
        except STORE_ERRORS as error:
            log.info("serving status not written this cycle, store unreachable: %s", error)
            return False
        tagged = await asyncio.to_thread(self.writer.tagged_versions)
        if tagged is None:
            return False  # MLflow unreachable: the next cycle tries again
        batch = self.selection.next_batch(self.routing_source.current(), residency, refusals, tagged)
        shadows = {}
        for adapter, version in batch:
            with contextlib.suppress(*STORE_ERRORS):
                aggregate = await self.shadow_aggregates.get(adapter, version)
                if aggregate is not None:
                    shadows[(adapter, version)] = aggregate.metrics()
        statuses = statuses_for(batch, residency, refusals, shadows)
        report = await asyncio.to_thread(self.writer.write, statuses)
        self.metrics.serving_status_checked.inc(report.checked)
        self.metrics.serving_status_written.inc(report.written)
        # A version that loaded since it was refused is no longer refused anywhere.
        loaded_again = [key for key in refusals if key in residency]
        with contextlib.suppress(*STORE_ERRORS):
            await self.refusals.forget(loaded_again)
        return not report.failed

    def _set_writer(self, holds: bool) -> None:
        if holds != self.is_writer:
            log.info("serving status: this process %s the cluster's writer", "is now" if holds else "is no longer")
        self.is_writer = holds
        self.metrics.serving_status_writer.set(1 if holds else 0)
