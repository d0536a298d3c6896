"""Shadow mode: a sampled copy of a request goes to the adapter's `shadow` version, and the pair is compared.

The copy starts only after the primary answer is under way, runs as a background task that the
client's answer never waits for, and is the first load shed: at most `max_concurrency` copies run,
further ones are dropped (counted), and a copy is never retried on another shard.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import random
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from redis.exceptions import RedisError

from gateway.dispatch import Dispatcher, GenerationJob, GenerationResult
from gateway.errors import ShardError, VersionRefused
from gateway.metrics import GatewayMetrics
from loraplex.adapter_format import adapter_ref

log = logging.getLogger(__name__)


def compare_outputs(primary_tokens: list[int], shadow_tokens: list[int], primary_text: str, shadow_text: str) -> tuple[bool, float]:
    """(exact match of the texts, token-level agreement = same token at the same position / longer length)."""
    longest = max(len(primary_tokens), len(shadow_tokens))
    if longest == 0:
        agreement = 1.0 if primary_text == shadow_text else 0.0
    else:
        same = sum(1 for a, b in zip(primary_tokens, shadow_tokens) if a == b)
        agreement = same / longest
    return primary_text == shadow_text, agreement


@dataclass(frozen=True)
class ShadowPair:
    request_id: str
    tenant: str
    adapter: str
    primary_version: str
    shadow_version: str
    primary_output: str
    shadow_output: str
    exact_match: bool
    token_agreement: float
    primary_latency_ms: float
    shadow_latency_ms: float
    created_unix: float


@dataclass
class ShadowAggregate:
    pairs: int = 0
    exact_matches: int = 0
    agreement_sum: float = 0.0
    primary_latency_ms_sum: float = 0.0
    shadow_latency_ms_sum: float = 0.0

    def add(self, pair: ShadowPair) -> None:
        self.pairs += 1
        self.exact_matches += int(pair.exact_match)
        self.agreement_sum += pair.token_agreement
        self.primary_latency_ms_sum += pair.primary_latency_ms
        self.shadow_latency_ms_sum += pair.shadow_latency_ms

    def metrics(self) -> dict[str, float]:
        n = max(1, self.pairs)
        return {
            "shadow_pairs": float(self.pairs),
            "shadow_exact_match_rate": self.exact_matches / n,
            "shadow_token_agreement": self.agreement_sum / n,
            "shadow_primary_latency_ms": self.primary_latency_ms_sum / n,
            "shadow_latency_ms": self.shadow_latency_ms_sum / n,
        }


class LocalShadowAggregates:
    """Aggregates of this process's pairs: right for one gateway process."""

    def __init__(self) -> None:
        self._aggregates: dict[tuple[str, str], ShadowAggregate] = defaultdict(ShadowAggregate)

    async def add(self, pair: ShadowPair) -> ShadowAggregate | None:
        aggregate = self._aggregates[(pair.adapter, pair.shadow_version)]
        aggregate.add(pair)
        return replace(aggregate)

    async def get(self, adapter: str, version: str) -> ShadowAggregate | None:
        aggregate = self._aggregates.get((adapter, version))
        return None if aggregate is None else replace(aggregate)


# KEYS: the (adapter, shadow version) hash. ARGV: exact match (0/1), agreement, primary ms, shadow
# ms, ttl s. Returns the merged totals, `pairs` first.
_ADD_PAIR = """
local pairs = redis.call('HINCRBY', KEYS[1], 'pairs', 1)
local exact = redis.call('HINCRBY', KEYS[1], 'exact_matches', tonumber(ARGV[1]))
local agreement = redis.call('HINCRBYFLOAT', KEYS[1], 'agreement_sum', ARGV[2])
local primary = redis.call('HINCRBYFLOAT', KEYS[1], 'primary_latency_ms_sum', ARGV[3])
local shadow = redis.call('HINCRBYFLOAT', KEYS[1], 'shadow_latency_ms_sum', ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return {pairs, exact, agreement, primary, shadow}
"""


class SharedShadowAggregates:
    """Aggregates merged over every gateway process and replica in Redis/Valkey. Each pair bumps the
    merged count by one atomically, so each count - the step of the MLflow metrics logged at it -
    is seen by exactly one process: no two processes log the same step. While the store is down,
    pairs are still logged and kept as recent pairs, but do not count in the aggregates."""

    def __init__(self, client, ttl_s: int = 7 * 24 * 3600, key_prefix: str = "loraplex:shadow"):
        self._client = client
        self._add = client.register_script(_ADD_PAIR)
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self._store_up = True

    def _key(self, adapter: str, version: str) -> str:
        return f"{self.key_prefix}:{{{adapter}}}:{version}"

    async def get(self, adapter: str, version: str) -> ShadowAggregate | None:
        """The merged totals of one shadow version, None when it has none; raises RedisError while the store is down."""
        totals = await self._client.hgetall(self._key(adapter, version))
        if not totals:
            return None
        read = {key.decode() if isinstance(key, bytes) else key: float(value) for key, value in totals.items()}
        return ShadowAggregate(
            int(read.get("pairs", 0)),
            int(read.get("exact_matches", 0)),
            read.get("agreement_sum", 0.0),
            read.get("primary_latency_ms_sum", 0.0),
            read.get("shadow_latency_ms_sum", 0.0),
        )

    async def add(self, pair: ShadowPair) -> ShadowAggregate | None:
        key = self._key(pair.adapter, pair.shadow_version)
        args = [int(pair.exact_match), pair.token_agreement, pair.primary_latency_ms, pair.shadow_latency_ms, self.ttl_s]
        try:
            pairs, exact, agreement, primary, shadow = await self._add(keys=[key], args=args)
        except (RedisError, OSError) as error:
            if self._store_up:
                log.warning("shadow aggregates not merged while the shared store is unreachable: %s", error)
            self._store_up = False
            return None
        self._store_up = True
        return ShadowAggregate(int(pairs), int(exact), float(agreement), float(primary), float(shadow))


class ShadowLog:
    """The pairs as JSON lines in a file bounded by bytes: past `max_bytes` the file is renamed to
    `.1` (`.1` to `.2`, ...) and the oldest beyond `backup_count` is deleted - the standard library's
    `RotatingFileHandler`, which rolls over before a line would cross the bound, so a file exceeds
    `max_bytes` only by a single line longer than the bound. On disk: at most `backup_count + 1` files.

    Several worker processes writing one path each roll over on their own count; a process still
    writing to a file another renamed keeps that file open until its own rollover, so the disk used
    stays below (backup_count + 1 + workers) x max_bytes."""

    def __init__(self, path: str | Path, max_bytes: int, backup_count: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8", delay=True
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, pair: ShadowPair) -> None:
        record = logging.makeLogRecord({"msg": json.dumps(asdict(pair)), "levelno": logging.INFO})
        self._handler.handle(record)

    def close(self) -> None:
        self._handler.close()


class ShadowRecorder:
    """Writes pairs as JSON lines, keeps recent pairs, and counts them in per-(adapter, shadow version)
    aggregates (`LocalShadowAggregates`, or `SharedShadowAggregates` across processes).

    `on_aggregate(adapter, shadow_version, metrics)` is called each time the aggregate's pair count
    reaches a multiple of `aggregate_every` (the registry logs them as MLflow metrics on the
    version's run, with that count as the step).
    """

    def __init__(
        self,
        log: ShadowLog | None = None,
        recent_pairs: int = 100,
        on_aggregate: Callable[[str, str, dict[str, float]], None] | None = None,
        aggregate_every: int = 10,
        aggregates: LocalShadowAggregates | SharedShadowAggregates | None = None,
    ):
        self.log = log
        self.on_aggregate = on_aggregate
        self.aggregate_every = max(1, aggregate_every)
        self._store = aggregates or LocalShadowAggregates()
        self._recent: dict[str, deque[ShadowPair]] = defaultdict(lambda: deque(maxlen=recent_pairs))
        self._latest: dict[tuple[str, str], ShadowAggregate] = {}  # the newest totals this process saw
        self._lock = threading.Lock()

    async def record(self, pair: ShadowPair) -> None:
        with self._lock:
            if self.log is not None:
                self.log.write(pair)
            self._recent[pair.adapter].append(pair)
        aggregate = await self._store.add(pair)
        if aggregate is None:
            return
        key = (pair.adapter, pair.shadow_version)
        with self._lock:
            if key not in self._latest or aggregate.pairs > self._latest[key].pairs:
                self._latest[key] = aggregate
        if aggregate.pairs % self.aggregate_every == 0 and self.on_aggregate:
            try:
                self.on_aggregate(pair.adapter, pair.shadow_version, aggregate.metrics())
            except Exception:  # the sink is best effort: serving must not notice it failing
                log.exception("shadow aggregate sink failed for %s@%s", pair.adapter, pair.shadow_version)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def recent(self, adapter: str) -> list[ShadowPair]:
        with self._lock:
            return list(self._recent.get(adapter, ()))

    def aggregates(self, adapter: str | None = None) -> dict[str, dict[str, float]]:
        with self._lock:
            return {adapter_ref(a, v): agg.metrics() for (a, v), agg in self._latest.items() if adapter is None or a == adapter}


class ShadowMode:
    def __init__(
        self,
        dispatcher: Dispatcher,
        recorder: ShadowRecorder,
        sample_share: float = 1.0,
        max_concurrency: int = 4,
        rng: random.Random | None = None,
        primary_wait_s: float = 300.0,
        metrics: GatewayMetrics | None = None,
        on_refused: Callable[[str, str, str, str], None] | None = None,
    ):
        self.dispatcher = dispatcher
        self.recorder = recorder
        self.metrics = metrics
        self.on_refused = on_refused  # (adapter, version, "shadow", reason): the shards refused the shadow version
        self.sample_share = sample_share
        self.max_concurrency = max_concurrency
        self.primary_wait_s = primary_wait_s
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task] = set()
        self.started = 0
        self.dropped = 0

    @property
    def running(self) -> int:
        return len(self._tasks)

    def maybe_start(
        self, job: GenerationJob, shadow_version: str | None, tenant: str, primary: asyncio.Future[GenerationResult]
    ) -> bool:
        """Start a shadow copy if sampled and there is room; `primary` resolves with the client's answer."""
        if not shadow_version or shadow_version == job.version or self.sample_share <= 0:
            return False
        if self._rng.random() >= self.sample_share:
            return False
        if len(self._tasks) >= self.max_concurrency:
            self.dropped += 1
            return False
        self.started += 1
        shadow_job = replace(job, version=shadow_version, request_id=f"{job.request_id}-shadow")
        task = asyncio.create_task(self._run(job, shadow_job, tenant, primary), name=f"shadow-{job.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, job: GenerationJob, shadow_job: GenerationJob, tenant: str, primary: asyncio.Future) -> None:
        try:
            shadow = await self.dispatcher.generate(shadow_job, adapter_ref(job.adapter, shadow_job.version), allow_retry=False)
            first = await asyncio.wait_for(asyncio.shield(primary), self.primary_wait_s)
        except (ShardError, asyncio.TimeoutError, asyncio.CancelledError) as exc:
            log.info("shadow copy of %s dropped: %s", job.request_id, exc)
            if isinstance(exc, VersionRefused) and self.on_refused is not None:
                self.on_refused(job.adapter, shadow_job.version, "shadow", exc.details)
            return
        except Exception:
            log.exception("shadow copy of %s failed", job.request_id)
            return
        exact, agreement = compare_outputs(first.token_ids, shadow.token_ids, first.text, shadow.text)
        if self.metrics is not None:
            adapter = self.metrics.adapter_label(job.adapter)
            self.metrics.shadow_comparisons.labels(adapter, "exact" if exact else "different").inc()
            self.metrics.shadow_agreement.labels(adapter).observe(agreement)
        await self.recorder.record(
            ShadowPair(
                job.request_id,
                tenant,
                job.adapter,
                first.version,
                shadow.version,
                first.text,
                shadow.text,
                exact,
                agreement,
                first.latency_s * 1000.0,
                shadow.latency_s * 1000.0,
                time.time(),
            )
        )

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.drain()
