"""Adapters in tiers: device slots (the slot pool), host memory, then local disk.

The disk tier is the folder the source hands over, read in place: with the registry that is its
content-addressed download cache (a miss there downloads from MLflow); with local adapters it is
the adapter's own folder. There is no second copy.

Everything slow — fetching, parsing, validating, copying into a slot — runs on loader threads.
`try_acquire` only looks at state under a lock, so the decoding loop never waits for a load: it
asks again next step, or is woken by a listener. Each tier evicts least-recently-used; on the
device an adapter with running requests (refcount > 0) or a pin is never evicted, and a load that
finds every slot held waits until one is released.

The host tier is bounded by bytes (`host_bytes`) and, on top, by a count (`host_capacity`); the
disk tier by bytes through its source (`TrimmableSource.trim`), after every download. Neither
bound evicts an adapter that is serving: pinned, in a slot with running requests, or being
loaded. Such adapters can hold a tier over its bound until they stop serving; the next eviction
pass then brings it back under.

A registered mix version is a folder holding only a mix manifest (`loraplex.adapter_mix`): its
entry records the components (`mix_of`) and takes no slot; its components are entries of their own."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Protocol, runtime_checkable

from loraplex.adapter_mix import DEFAULT_MAX_COMPONENTS, MixError, is_mix_folder, read_manifest
from shard.intra_op_threads import confine_to_one_thread
from shard.lora.errors import AdapterError, AdapterInUseError, AdapterLoadTimeout, AdapterRejectedError
from shard.lora.keys import AdapterKey, AdapterMix
from shard.lora.peft_adapter import HostAdapter, read_peft_adapter
from shard.lora.slot_pool import AdapterSlotPool
from shard.lora.sources import AdapterSource

log = logging.getLogger(__name__)

DEVICE, HOST, DISK = "device", "host", "disk"
_LOAD_TIME_WINDOW = 1000
# An adapter loaded for a waiting request is not evicted before that request takes it (the
# engine admits on its next step). Without this, with more distinct adapters waiting than slots,
# each fresh load evicted the previous one before its request ran: 700+ evictions for 128
# requests. The protection lapses so that a load whose request was cancelled cannot hold a slot.
FRESH_LOAD_PROTECTION_S = 2.0

Listener = Callable[[AdapterKey, "Exception | None"], None]


@dataclass
class AdapterInfo:
    """Mirrors protos.shard_pb2.AdapterInfo."""

    adapter: AdapterKey
    tier: str
    rank: int
    target_modules: list[str]
    pinned: bool
    active_requests: int
    size_bytes: int
    load_ms: float
    weights_sha256: str
    last_used_unix_ms: int


@dataclass
class TierStats:
    """Mirrors protos.shard_pb2.TierStats. capacity 0 = no count bound (the disk tier);
    capacity_bytes 0 = no byte bound."""

    tier: str
    capacity: int
    used: int
    hits: int
    misses: int
    evictions: int
    load_ms_p50: float
    load_ms_p95: float
    capacity_bytes: int = 0
    used_bytes: int = 0


@runtime_checkable
class TrimmableSource(Protocol):
    """A source whose folders are a cache it may shrink (the registry's download cache; local
    adapter folders are not)."""

    max_bytes: int  # the cache's byte bound (0 = none)

    def trim(self, keep: Collection[Path]) -> tuple[list[Path], int]:
        """Removes least-recently-used folders until the cache fits its byte bound, never one in
        `keep`; returns the folders removed and the bytes still held."""
        ...


@dataclass
class _TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_ms: deque = field(default_factory=lambda: deque(maxlen=_LOAD_TIME_WINDOW))

    def percentile(self, q: float) -> float:
        if not self.load_ms:
            return 0.0
        ordered = sorted(self.load_ms)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class _Entry:
    key: AdapterKey
    disk_path: Path | None = None
    host: HostAdapter | None = None
    slot: int | None = None
    refcount: int = 0
    pinned: bool = False
    pin_on_load: bool = False
    loading: bool = False
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)
    last_used: int = 0
    last_used_unix_ms: int = 0
    load_ms: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    target_modules: list[str] = field(default_factory=list)
    size_bytes: int = 0
    weights_sha256: str = ""
    mix: AdapterMix | None = None  # a registered mix: its components (it holds no slot itself)
    awaited: bool = False  # a waiting request asked for it (try_acquire), not an admin load
    protected_until: float = 0.0  # monotonic time; see FRESH_LOAD_PROTECTION_S


class CacheClosedError(AdapterError):
    """The cache is shutting down; no more loads."""


class TieredAdapterCache:
    def __init__(
        self,
        pool: AdapterSlotPool,
        source: AdapterSource,
        *,
        host_capacity: int,
        host_bytes: int = 0,
        loader_threads: int = 1,
        load_observer: Callable[[str, float], None] | None = None,
        max_mix_components: int = DEFAULT_MAX_COMPONENTS,
    ):
        """`host_capacity` adapters and `host_bytes` bytes (0 = no byte bound) at most in host
        memory; host_capacity 0 keeps no host copies. `load_observer(tier, milliseconds)` is told
        of every load into a tier (metrics); a registered mix with more than `max_mix_components`
        components is refused."""
        if host_capacity < 0 or host_bytes < 0:
            raise ValueError(f"host_capacity and host_bytes must be >= 0, got {host_capacity}, {host_bytes}")
        if loader_threads < 1:
            raise ValueError(f"loader_threads must be >= 1, got {loader_threads}")
        self._pool = pool
        self._source = source
        self._host_capacity = host_capacity
        self._host_bytes = host_bytes
        self._host_used_bytes = 0
        self._disk_used_bytes = 0
        self._load_observer = load_observer
        self._max_mix_components = max_mix_components
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)
        self._entries: dict[AdapterKey, _Entry] = {}
        self._slot_owner: list[AdapterKey | None] = [None] * self._pool.num_slots
        self._reserved_slots: set[int] = set()
        self._host_lru: OrderedDict[AdapterKey, None] = OrderedDict()
        self._counters = {tier: _TierCounters() for tier in (DEVICE, HOST, DISK)}
        self._clock = itertools.count(1)
        self._listeners: list[Listener] = []
        self._queue: queue.Queue[AdapterKey | None] = queue.Queue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loader_loop, name=f"adapter-loader-{i}", daemon=True)
            for i in range(loader_threads)
        ]
        for thread in self._threads:
            thread.start()

    # ---- the engine's calls (never block on I/O) ----

    def try_acquire(self, key: AdapterKey) -> int | None:
        """Slot id of `key` with one more active request, or None while it loads (or failed:
        see `load_error`). The first miss schedules one background load."""
        slots = self.try_acquire_all((key,))
        return None if slots is None else slots[0]

    def try_acquire_all(self, keys: tuple[AdapterKey, ...]) -> list[int] | None:
        """The slots of all `keys`, each with one more active request, or None (nothing acquired)
        while any is not on the device; each missing one gets one background load. All or
        nothing, so a mix's resident components are not held (and kept from eviction) while
        another component loads. A registered mix's own key never gets a slot (see `mix_of`)."""
        for key in keys:
            _check_key(key)
        with self._lock:
            entries = [self._entry(key) for key in keys]
            missing = [entry for entry in entries if entry.slot is None]
            for entry in missing:
                if entry.mix is None and entry.error is None and not entry.loading:
                    self._counters[DEVICE].misses += 1
                    entry.awaited = True
                    self._schedule(entry)
            if missing:
                return None
            for entry in entries:
                entry.refcount += 1
                entry.protected_until = 0.0
                self._touch(entry)
                self._counters[DEVICE].hits += 1
            return [entry.slot for entry in entries]

    def mix_of(self, key: AdapterKey) -> AdapterMix | None:
        """The components of `key` once it has loaded as a registered mix; None otherwise."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.mix if entry is not None else None

    def release(self, key: AdapterKey) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.refcount == 0:
                raise ValueError(f"adapter {key} is not acquired")
            entry.refcount -= 1
            self._touch(entry)
            self._slot_freed.notify_all()

    def load_error(self, key: AdapterKey) -> Exception | None:
        with self._lock:
            entry = self._entries.get(key)
            return entry.error if entry is not None else None

    def clear_error(self, key: AdapterKey) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.error = None

    def add_listener(self, callback: Listener) -> None:
        """`callback(key, error)` runs on a loader thread when a load finishes (error None = ready)."""
        with self._lock:
            self._listeners.append(callback)

    # ---- the admin calls ----

    def load(self, key: AdapterKey, pin: bool = False, timeout: float | None = None) -> AdapterInfo:
        """Bring `key` into a device slot and wait for it; retries a previously failed load."""
        _check_key(key)
        with self._lock:
            entry = self._entry(key)
            entry.error = None
            if entry.slot is not None or entry.mix is not None:
                self._counters[DEVICE].hits += 1
                self._touch(entry)
                entry.pinned = entry.pinned or pin
                return self._info(entry)
            entry.pin_on_load = entry.pin_on_load or pin
            if not entry.loading:
                self._counters[DEVICE].misses += 1
                self._schedule(entry)
            done = entry.done
        if not done.wait(timeout):
            raise AdapterLoadTimeout(f"adapter {key} did not load within {timeout} s (still loading)")
        with self._lock:
            if entry.error is not None:
                raise entry.error
            return self._info(entry)

    def unload(self, key: AdapterKey) -> bool:
        """Drop `key` from the device and host tiers (its disk copy stays). False if it was not
        cached. Raises AdapterInUseError while requests use it or a load of it is under way."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry.refcount > 0:
                raise AdapterInUseError(f"adapter {key} is used by {entry.refcount} running request(s)")
            if entry.loading:
                raise AdapterInUseError(f"adapter {key} is being loaded; unload it after the load finishes")
            removed = False
            if entry.slot is not None:
                self._slot_owner[entry.slot] = None
                self._pool.clear(entry.slot)
                entry.slot = None
                removed = True
                self._slot_freed.notify_all()
            if entry.host is not None:
                self._locked_drop_host(entry)
                removed = True
            if entry.mix is not None:
                entry.mix = None
                removed = True
            entry.pinned = entry.pin_on_load = False
            entry.error = None
            if entry.disk_path is None:
                del self._entries[key]
            return removed

    def unpin(self, key: AdapterKey) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pinned = entry.pin_on_load = False
                self._slot_freed.notify_all()

    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [
                self._info(e)
                for e in sorted(self._entries.values(), key=lambda e: (e.key.name, e.key.version))
                if e.slot is not None or e.host is not None or e.disk_path is not None
            ]

    def tier_stats(self) -> list[TierStats]:
        with self._lock:
            used = {
                DEVICE: sum(owner is not None for owner in self._slot_owner),
                HOST: len(self._host_lru),
                DISK: sum(e.disk_path is not None for e in self._entries.values()),
            }
            capacity = {DEVICE: self._pool.num_slots, HOST: self._host_capacity, DISK: 0}
            used_bytes = {
                DEVICE: sum(self._entries[o].size_bytes for o in self._slot_owner if o is not None),
                HOST: self._host_used_bytes,
                DISK: self._disk_used_bytes,
            }
            capacity_bytes = {DEVICE: 0, HOST: self._host_bytes, DISK: self._disk_capacity_bytes()}
            return [
                TierStats(
                    tier=tier,
                    capacity=capacity[tier],
                    used=used[tier],
                    hits=c.hits,
                    misses=c.misses,
                    evictions=c.evictions,
                    load_ms_p50=c.percentile(0.50),
                    load_ms_p95=c.percentile(0.95),
                    capacity_bytes=capacity_bytes[tier],
                    used_bytes=used_bytes[tier],
                )
                for tier, c in self._counters.items()
            ]

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            self._slot_freed.notify_all()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def __enter__(self) -> "TieredAdapterCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals; methods named _locked_* expect self._lock held ----

    def _entry(self, key: AdapterKey) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(key)
        return entry

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = next(self._clock)
        entry.last_used_unix_ms = int(time.time() * 1000)

    def _schedule(self, entry: _Entry) -> None:
        if self._closed:
            entry.error = CacheClosedError("the adapter cache is closed")
            entry.done.set()
            return
        entry.loading = True
        entry.done = threading.Event()
        self._queue.put(entry.key)

    def _info(self, entry: _Entry) -> AdapterInfo:
        tier = DEVICE if entry.slot is not None else HOST if entry.host is not None else DISK
        return AdapterInfo(
            adapter=entry.key,
            tier=tier,
            rank=entry.rank,
            target_modules=list(entry.target_modules),
            pinned=entry.pinned,
            active_requests=entry.refcount,
            size_bytes=entry.size_bytes,
            load_ms=entry.load_ms.get(tier, 0.0),
            weights_sha256=entry.weights_sha256,
            last_used_unix_ms=entry.last_used_unix_ms,
        )

    def _loader_loop(self) -> None:
        # Adapter tensors are small; a second multi-threaded pool would slow the engine's steps.
        confine_to_one_thread()
        while True:
            key = self._queue.get()
            if key is None:
                return
            error: Exception | None = None
            try:
                self._load_to_device(key)
            except AdapterError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - any failure must reach the waiting request
                log.exception("loading adapter %s failed", key)
                error = AdapterRejectedError(f"adapter {key}: loading failed ({type(exc).__name__}: {exc})")
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.loading = False
                    entry.error = error
                    if error is not None:
                        entry.pin_on_load = False
                    entry.done.set()
                    self._locked_trim_host()  # the copy just loaded no longer counts as serving
                listeners = list(self._listeners)
            for listener in listeners:
                try:
                    listener(key, error)
                except Exception:  # noqa: BLE001 - a listener's bug must not kill the loader
                    log.exception("adapter cache listener failed for %s", key)

    def _load_to_device(self, key: AdapterKey) -> None:
        with self._lock:
            if self._entries[key].slot is not None or self._entries[key].mix is not None:
                return
        adapter = self._host_copy(key)
        if isinstance(adapter, AdapterMix):
            return
        slot = self._claim_slot(key)
        started = time.perf_counter()
        try:
            self._pool.write(slot, adapter)
        except BaseException:
            with self._lock:
                self._reserved_slots.discard(slot)
                self._slot_owner[slot] = None
                self._slot_freed.notify_all()
            raise
        elapsed_ms = (time.perf_counter() - started) * 1000
        with self._lock:
            entry = self._entries[key]
            self._reserved_slots.discard(slot)
            entry.slot = slot
            if entry.awaited:
                entry.protected_until = time.monotonic() + FRESH_LOAD_PROTECTION_S
                entry.awaited = False
            entry.load_ms[DEVICE] = elapsed_ms
            self._locked_record_load(DEVICE, elapsed_ms)
            entry.pinned = entry.pinned or entry.pin_on_load
            entry.pin_on_load = False
            self._touch(entry)

    def _host_copy(self, key: AdapterKey) -> HostAdapter | AdapterMix:
        with self._lock:
            entry = self._entries[key]
            if entry.host is not None:
                self._counters[HOST].hits += 1
                self._host_lru.move_to_end(key)
                return entry.host
            self._counters[HOST].misses += 1
            disk_path = entry.disk_path if entry.disk_path is not None and entry.disk_path.is_dir() else None
            if disk_path is not None:
                self._counters[DISK].hits += 1
            else:
                self._counters[DISK].misses += 1
        if disk_path is None:
            started = time.perf_counter()
            disk_path = Path(self._source.fetch(key))
            elapsed_ms = (time.perf_counter() - started) * 1000
            with self._lock:
                entry.disk_path = disk_path
                entry.load_ms[DISK] = elapsed_ms
                self._locked_record_load(DISK, elapsed_ms)
            self._trim_disk()
        if is_mix_folder(disk_path):
            return self._record_mix(entry, disk_path)
        started = time.perf_counter()
        adapter = read_peft_adapter(
            disk_path, key, self._pool.module_shapes, max_rank=self._pool.max_rank, dtype=self._pool.dtype
        )
        elapsed_ms = (time.perf_counter() - started) * 1000
        with self._lock:
            entry.rank = adapter.rank
            entry.target_modules = adapter.target_modules
            entry.size_bytes = adapter.size_bytes
            entry.weights_sha256 = adapter.weights_sha256
            entry.load_ms[HOST] = elapsed_ms
            self._locked_record_load(HOST, elapsed_ms)
            if self._host_capacity > 0:
                entry.host = adapter
                self._host_used_bytes += adapter.size_bytes
                self._host_lru[key] = None
                self._host_lru.move_to_end(key)
                self._locked_trim_host()
        return adapter

    def _record_mix(self, entry: _Entry, folder: Path) -> AdapterMix:
        try:
            manifest = read_manifest(folder, self._max_mix_components)
        except MixError as error:
            raise AdapterRejectedError(f"mix {entry.key}: {error}") from None
        mix = AdapterMix(tuple((AdapterKey(c.name, c.version), float(c.weight)) for c in manifest.components))
        with self._lock:
            entry.mix = mix
            entry.size_bytes = sum(p.stat().st_size for p in folder.iterdir())
            entry.pinned = entry.pinned or entry.pin_on_load
            entry.pin_on_load = False
            self._touch(entry)
        return mix

    def _locked_serving(self, entry: _Entry) -> bool:
        return entry.pinned or entry.pin_on_load or entry.refcount > 0 or entry.loading

    def _locked_drop_host(self, entry: _Entry) -> None:
        self._host_lru.pop(entry.key, None)
        self._host_used_bytes -= entry.host.size_bytes
        entry.host = None

    def _locked_over_host_bound(self) -> bool:
        over_count = len(self._host_lru) > self._host_capacity
        return over_count or (self._host_bytes > 0 and self._host_used_bytes > self._host_bytes)

    def _locked_trim_host(self) -> None:
        """Least recently used host copies go until the tier fits both bounds; serving ones stay."""
        for key in list(self._host_lru):  # oldest first
            if not self._locked_over_host_bound():
                return
            entry = self._entries[key]
            if self._locked_serving(entry):
                continue
            self._locked_drop_host(entry)
            self._counters[HOST].evictions += 1

    def _disk_capacity_bytes(self) -> int:
        return self._source.max_bytes if isinstance(self._source, TrimmableSource) else 0

    def _trim_disk(self) -> None:
        if not isinstance(self._source, TrimmableSource):
            return
        with self._lock:
            keep = {e.disk_path for e in self._entries.values() if e.disk_path is not None and self._locked_serving(e)}
        removed, used_bytes = self._source.trim(keep)
        gone = set(removed)
        with self._lock:
            self._disk_used_bytes = used_bytes
            for entry in self._entries.values():
                if entry.disk_path is not None and entry.disk_path in gone:
                    entry.disk_path = None
                    self._counters[DISK].evictions += 1

    def _claim_slot(self, key: AdapterKey) -> int:
        """A free slot, else the least-recently-used evictable one; waits while every slot is
        in use, pinned or being written."""
        with self._lock:
            while True:
                if self._closed:
                    raise CacheClosedError(f"adapter {key}: the adapter cache is closed")
                slot = self._locked_free_or_victim_slot()
                if slot is not None:
                    self._slot_owner[slot] = key
                    self._reserved_slots.add(slot)
                    return slot
                # Also wakes when a fresh load's protection lapses.
                self._slot_freed.wait(timeout=FRESH_LOAD_PROTECTION_S)

    def _locked_record_load(self, tier: str, elapsed_ms: float) -> None:
        self._counters[tier].load_ms.append(elapsed_ms)
        if self._load_observer is not None:
            self._load_observer(tier, elapsed_ms)

    def _locked_free_or_victim_slot(self) -> int | None:
        for slot, owner in enumerate(self._slot_owner):
            if owner is None:
                return slot
        victim: _Entry | None = None
        now = time.monotonic()
        for slot, owner in enumerate(self._slot_owner):
            if slot in self._reserved_slots:
                continue
            entry = self._entries[owner]
            if entry.refcount > 0 or entry.pinned or entry.protected_until > now:
                continue
            if victim is None or entry.last_used < victim.last_used:
                victim = entry
        if victim is None:
            return None
        slot = victim.slot
        victim.slot = None
        self._pool.clear(slot)
        self._counters[DEVICE].evictions += 1
        return slot


def _check_key(key: AdapterKey) -> None:
    if not isinstance(key, AdapterKey):
        raise TypeError(f"expected an AdapterKey, got {type(key).__name__}")
    if not key.name:
        raise ValueError("the base model (empty adapter name) needs no adapter slot")

