"""Consistent hashing with bounded loads, keyed by adapter@version.

Each shard owns `virtual_nodes` points on a 64-bit ring. A key goes to the first shard clockwise
from its hash whose load is below ceil((1+eps) * mean load) - so an adapter version keeps hitting the
same shard (warm adapter cache) until that shard is busier than its fair share, and then spills to the
next shard in ring order. Adding or removing a shard moves only the keys on its arcs (~1/N).

An adapter with many requests in flight (`hot_inflight` per replica) is spread over its first
r shards in ring order (the least loaded of them serves), i.e. replicated where it would spill to anyway.

Shards that hold a key's adapter merged into their base weights (their rows for it do no LoRA work)
come first in that key's order, ahead of its ring owner; the load bound still applies to them.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Collection, Iterable, Mapping


ORDER_CACHE_SIZE = 4096


def ring_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class PlacementRing:
    def __init__(self, shards: Iterable[str] = (), virtual_nodes: int = 128, epsilon: float = 0.25, hot_inflight: int = 8):
        if virtual_nodes < 1 or epsilon <= 0 or hot_inflight < 1:
            raise ValueError("virtual_nodes >= 1, epsilon > 0 and hot_inflight >= 1 are required")
        self.virtual_nodes = virtual_nodes
        self.epsilon = epsilon
        self.hot_inflight = hot_inflight
        self._points: list[int] = []
        self._owners: list[str] = []
        self._shards: set[str] = set()
        # Every request asks for its key's order; it changes only when the members do.
        self._orders: dict[str, tuple[str, ...]] = {}
        for shard in shards:
            self.add(shard)

    @property
    def shards(self) -> list[str]:
        return sorted(self._shards)

    def __len__(self) -> int:
        return len(self._shards)

    def __contains__(self, shard: str) -> bool:
        return shard in self._shards

    def add(self, shard: str) -> None:
        if shard in self._shards:
            return
        self._shards.add(shard)
        self._orders.clear()
        for i in range(self.virtual_nodes):
            point = ring_hash(f"{shard}#{i}")
            at = bisect.bisect_left(self._points, point)
            self._points.insert(at, point)
            self._owners.insert(at, shard)

    def remove(self, shard: str) -> None:
        if shard not in self._shards:
            return
        self._shards.discard(shard)
        self._orders.clear()
        keep = [(p, o) for p, o in zip(self._points, self._owners) if o != shard]
        self._points = [p for p, _ in keep]
        self._owners = [o for _, o in keep]

    def set_shards(self, shards: Iterable[str]) -> None:
        wanted = set(shards)
        for shard in self._shards - wanted:
            self.remove(shard)
        for shard in sorted(wanted - self._shards):
            self.add(shard)

    def ring_order(self, key: str) -> list[str]:
        """Distinct shards clockwise from the key's point: owner first, then its successors."""
        order = self._orders.get(key)
        if order is None:
            if len(self._orders) >= ORDER_CACHE_SIZE:  # pinned versions are the client's choice: stay bounded
                self._orders.clear()
            order = self._orders[key] = self._compute_order(key)
        return list(order)

    def _compute_order(self, key: str) -> tuple[str, ...]:
        if not self._points:
            return ()
        start = bisect.bisect_right(self._points, ring_hash(key))
        order: list[str] = []
        seen: set[str] = set()
        n = len(self._points)
        for i in range(n):
            owner = self._owners[(start + i) % n]
            if owner not in seen:
                seen.add(owner)
                order.append(owner)
                if len(order) == len(self._shards):
                    break
        return tuple(order)

    def capacity(self, total_load: int) -> int:
        """The most load a shard may carry when `total_load` requests (the new one included) run."""
        if not self._shards:
            return 0
        return max(1, math.ceil((1.0 + self.epsilon) * total_load / len(self._shards)))

    def choose(self, key: str, loads: Mapping[str, int], key_inflight: int = 0, merged_on: Collection[str] = ()) -> list[str]:
        """Shards to try for a request, best first (the rest is failover order).

        `loads` = requests in flight per shard; `key_inflight` = those for this key; `merged_on` =
        shards that hold this key merged, preferred over its ring owner.
        An empty key (the base model) goes to the least loaded shard.
        """
        if not self._shards:
            return []
        if not key:
            return sorted(self._shards, key=lambda s: (loads.get(s, 0), s))
        order = self.ring_order(key)
        if merged_on:
            order = [s for s in order if s in merged_on] + [s for s in order if s not in merged_on]
        cap = self.capacity(sum(loads.get(s, 0) for s in self._shards) + 1)
        under = [s for s in order if loads.get(s, 0) + 1 <= cap]
        if not under:  # cannot happen for loads counted by this ring; stay defined anyway
            under = order
        replicas = min(len(order), 1 + key_inflight // self.hot_inflight)
        pool = [s for s in order[:replicas] if s in under] or [under[0]]
        pick = min(pool, key=lambda s: (loads.get(s, 0), order.index(s)))
        return [pick] + [s for s in order if s != pick]

    def owners(self, key: str, replicas: int = 1) -> list[str]:
        """The shards that own a key when nothing is loaded (admin API: where an adapter lives)."""
        return self.ring_order(key)[:replicas]
