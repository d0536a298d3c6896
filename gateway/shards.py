"""gRPC channels to the shards, their health, and the ring of healthy ones.

Health is active (grpc.health.v1 `Check` every `health_interval_s`) and passive (a call that fails
with a connection-level error marks the shard down at once). A shard leaves the placement ring when
it goes down and rejoins when a health check answers SERVING.

Each healthy shard's `Stats` is read again every `stats_interval_s` to learn which adapter it holds
merged into its base weights (placement prefers that shard for that adapter); an admin merge or
unmerge through this gateway records its answer at once.

The ring, the metrics and the admin API name a shard by the id it reports in `Stats` (its
`shard_id` setting: the StatefulSet pod name on Kubernetes), not by its address: a shard that
restarts on a new IP gets its own adapters, and the warm cache volume that holds them, back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc
import msgspec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.placement import PlacementRing
from loraplex.adapter_format import adapter_ref
from protos import shard_pb2, shard_pb2_grpc

log = logging.getLogger(__name__)

# Reconnect fast: a restarted shard should rejoin within a health interval or two, not after
# grpc's default exponential backoff (up to 2 minutes).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 2_000),
)


class StaticDiscovery:
    def __init__(self, addresses: Iterable[str]):
        self.addresses = tuple(addresses)
        self.interval_s = 0.0

    async def resolve(self) -> list[str]:
        return list(self.addresses)


class DnsDiscovery:
    """Every A/AAAA record of a name (a Kubernetes headless service) is a shard."""

    def __init__(self, name: str, port: int, interval_s: float = 5.0):
        self.name, self.port, self.interval_s = name, port, interval_s

    async def resolve(self) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(self.name, self.port, type=socket.SOCK_STREAM)
        addrs = set()
        for family, _, _, _, sockaddr in infos:
            host = sockaddr[0]
            addrs.add(f"[{host}]:{self.port}" if family == socket.AF_INET6 else f"{host}:{self.port}")
        return sorted(addrs)


@dataclass
class ShardState:
    address: str
    channel: grpc.aio.Channel
    stub: shard_pb2_grpc.ShardStub
    health: health_pb2_grpc.HealthStub
    # Learned from `Stats` each time the shard turns SERVING ("" until then): a new process on
    # this address may be another shard.
    shard_id: str = ""
    healthy: bool = False
    last_error: str = ""
    last_change_unix: float = field(default_factory=time.time)
    last_check_unix: float = 0.0
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    key_in_flight: Counter = field(default_factory=Counter)
    merged_adapter: str = ""  # adapter@version merged into its base weights, "" = none (from Stats)
    stats_read_monotonic: float = 0.0

    def describe(self) -> ShardView:
        return ShardView(
            self.shard_id,
            self.address,
            self.healthy,
            self.in_flight,
            self.served,
            self.failures,
            self.last_error,
            self.last_change_unix,
            self.last_check_unix,
            dict(self.key_in_flight),
            self.merged_adapter,
        )


class ShardView(msgspec.Struct):
    """A shard as the admin API shows it."""

    id: str
    address: str
    healthy: bool
    in_flight: int
    served: int
    failures: int
    last_error: str
    last_change_unix: float
    last_check_unix: float
    adapters_in_flight: dict[str, int]
    merged_adapter: str  # adapter@version merged into its base weights; "" = none


class ShardPool:
    def __init__(
        self,
        discovery: StaticDiscovery | DnsDiscovery,
        ring: PlacementRing,
        health_interval_s: float = 0.5,
        health_timeout_s: float = 0.4,
        on_health_change: Callable[[str, bool], None] | None = None,
        channel_interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        channel_credentials: grpc.ChannelCredentials | None = None,
        tls_server_name: str = "",
        stats_interval_s: float = 2.0,
    ):
        self.discovery = discovery
        self.ring = ring
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.stats_interval_s = stats_interval_s
        self._on_health_change = on_health_change
        self._channel_interceptors = list(channel_interceptors)
        self._channel_credentials = channel_credentials  # None: plaintext
        self._channel_options = CHANNEL_OPTIONS + ((("grpc.ssl_target_name_override", tls_server_name),) if tls_server_name else ())
        self._by_address: dict[str, ShardState] = {}
        # Each id's current holder; it stays after the holder goes down so that the admin API
        # still shows the shard and a restart on another address can take the id over.
        self._by_id: dict[str, ShardState] = {}
        self._tasks: list[asyncio.Task] = []
        self._last_discovery = 0.0

    # lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._discover()
        await self.check_all()
        self._tasks.append(asyncio.create_task(self._health_loop(), name="shard-health"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for state in self._by_address.values():
            await state.channel.close(grace=None)
        self._by_address.clear()
        self._by_id.clear()
        self.ring.set_shards(())

    async def _discover(self) -> None:
        self._last_discovery = time.monotonic()
        try:
            addresses = set(await self.discovery.resolve())
        except OSError as exc:
            log.warning("shard discovery failed, keeping the known shards: %s", exc)
            return
        for gone in set(self._by_address) - addresses:
            state = self._by_address.pop(gone)
            self._set_health(state, False, "no longer discovered")
            if self._by_id.get(state.shard_id) is state:
                del self._by_id[state.shard_id]
            await state.channel.close(grace=None)
        for new in sorted(addresses - set(self._by_address)):
            interceptors = self._channel_interceptors or None
            if self._channel_credentials is None:
                channel = grpc.aio.insecure_channel(new, options=self._channel_options, interceptors=interceptors)
            else:
                channel = grpc.aio.secure_channel(new, self._channel_credentials, options=self._channel_options, interceptors=interceptors)
            self._by_address[new] = ShardState(new, channel, shard_pb2_grpc.ShardStub(channel), health_pb2_grpc.HealthStub(channel))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            interval = self.discovery.interval_s
            if interval and time.monotonic() - self._last_discovery >= interval:
                await self._discover()
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(s) for s in list(self._by_address.values())))

    async def _check(self, state: ShardState) -> None:
        state.last_check_unix = time.time()
        try:
            reply = await state.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.health_timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._set_health(state, False, f"health check: {exc.code().name} {exc.details() or ''}".strip())
            return
        except Exception as exc:  # a broken channel must not stop the loop
            self._set_health(state, False, f"health check: {exc!r}")
            return
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            self._set_health(state, False, f"health status {reply.status}")
        elif not state.healthy:
            await self._join(state)
        elif time.monotonic() - state.stats_read_monotonic >= self.stats_interval_s:
            await self._read_stats(state)

    async def _read_stats(self, state: ShardState) -> None:
        try:
            stats = await state.stub.Stats(shard_pb2.StatsRequest(), timeout=self.health_timeout_s)
        except grpc.aio.AioRpcError:
            return  # the health check decides whether it is down
        self._record_stats(state, stats)

    @staticmethod
    def _record_stats(state: ShardState, stats: shard_pb2.StatsResponse) -> None:
        state.stats_read_monotonic = time.monotonic()
        merged = stats.merged_adapter
        state.merged_adapter = adapter_ref(merged.name, merged.version) if merged.name else ""

    async def _join(self, state: ShardState) -> None:
        """A shard answered SERVING: learn who it is, then put it in the ring under that id."""
        try:
            stats = await state.stub.Stats(shard_pb2.StatsRequest(), timeout=self.health_timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._set_health(state, False, f"Stats: {exc.code().name} {exc.details() or ''}".strip())
            return
        shard_id = stats.shard_id or state.address
        holder = self._by_id.get(shard_id)
        if holder is not None and holder is not state and holder.healthy:
            # Two live shards with one id would share one arc of the ring: keep the first.
            self._set_health(state, False, f"shard id {shard_id!r} is already served by {holder.address}")
            return
        if state.shard_id and state.shard_id != shard_id and self._by_id.get(state.shard_id) is state:
            del self._by_id[state.shard_id]  # another shard now listens on this address
        state.shard_id = shard_id
        self._by_id[shard_id] = state
        self._record_stats(state, stats)
        self._set_health(state, True, "")

    def _set_health(self, state: ShardState, healthy: bool, reason: str) -> None:
        if not healthy:
            state.last_error = reason
        if state.healthy == healthy:
            return
        state.healthy = healthy
        state.last_change_unix = time.time()
        if not state.shard_id:
            return  # never joined: nothing to take out of the ring
        if healthy:
            self.ring.add(state.shard_id)
            log.info("shard %s (%s) joined the ring", state.shard_id, state.address)
        else:
            self.ring.remove(state.shard_id)
            log.warning("shard %s (%s) left the ring: %s", state.shard_id, state.address, reason)
        if self._on_health_change:
            self._on_health_change(state.shard_id, healthy)

    # queries used by dispatch and admin -------------------------------------------------------
    def mark_down(self, shard_id: str, reason: str) -> None:
        """Passive failure detection: a call failed at the connection level."""
        state = self._by_id.get(shard_id)
        if state is not None:
            state.failures += 1
            self._set_health(state, False, reason)

    def healthy_shards(self) -> list[str]:
        return sorted(s for s, st in self._by_id.items() if st.healthy)

    def get(self, shard_id: str) -> ShardState | None:
        return self._by_id.get(shard_id)

    def all(self) -> list[ShardState]:
        """Every discovered address, including those that never answered (no id yet)."""
        return [self._by_address[k] for k in sorted(self._by_address)]

    def loads(self) -> dict[str, int]:
        return {s: st.in_flight for s, st in self._by_id.items() if st.healthy}

    def key_in_flight(self, key: str) -> int:
        return sum(st.key_in_flight[key] for st in self._by_address.values())

    def record_merged(self, shard_id: str, key: str) -> None:
        """An admin merge (key) or unmerge ("") answered: placement follows it now, not at the next Stats."""
        state = self._by_id.get(shard_id)
        if state is not None:
            state.merged_adapter = key

    def merged_on(self, key: str) -> list[str]:
        """Healthy shards holding `key` (adapter@version) merged into their base weights."""
        return sorted(s for s, st in self._by_id.items() if st.healthy and key and st.merged_adapter == key)

    def candidates(self, key: str) -> list[str]:
        return self.ring.choose(key, self.loads(), self.key_in_flight(key), self.merged_on(key))

    @staticmethod
    def begin(state: ShardState, key: str) -> None:
        """A request for `key` is in flight on this shard (placement counts it) until `end`."""
        state.in_flight += 1
        state.key_in_flight[key] += 1

    @staticmethod
    def end(state: ShardState, key: str) -> None:
        state.in_flight -= 1
        state.key_in_flight[key] -= 1
        if state.key_in_flight[key] <= 0:
            del state.key_in_flight[key]
