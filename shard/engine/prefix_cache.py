"""Keys and values of prompt prefixes already computed, reused by later requests, keyed by adapter.

The KV of a token depends on every token before it *and* on the adapter that computed it (LoRA
changes k_proj and v_proj, and every layer's input). So a cached block is found only through a
chain that starts at the request's adapter version (or the base model): block ``i`` of a prompt is
keyed by (the entry of block ``i-1``, its own tokens), block 0 by (adapter version, its tokens).
Keys hold the tokens themselves, not a hash of them: a lookup matches exactly or not at all, and two
adapters, or two versions of one adapter, can never share an entry.

Memory is bounded: at most ``max_blocks`` blocks of ``block_tokens`` tokens in one tensor, allocated
and written once when the cache is made (like a serving engine's KV cache space), so filling it
costs no page faults while requests wait: grown block by block, a bf16 shard's default 256 MB took
~18,000 first-touch faults per batch of 32 prompts for its first four batches, and those batches'
first tokens came ~0.1-0.2 s late (measured on a 2-core Xeon). The least recently used block is
evicted when a new one needs room. Using a
chain touches it from its last block to its first, so a chain's head is always newer than its tail
and a chain shrinks from its end; an entry whose parent was evicted anyway can no longer be reached
(its key names a parent id never reused) and ages out like any other.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch


@dataclass
class _Entry:
    key: tuple
    storage: int  # its block in the storage tensor


@dataclass(frozen=True)
class PrefixCacheStats:
    lookups: int  # requests that asked
    queried_tokens: int  # prompt tokens of those requests
    hit_tokens: int  # of which came from the cache (not computed)
    stored_blocks: int
    evicted_blocks: int
    cached_blocks: int
    capacity_blocks: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PrefixCache:
    def __init__(self, *, block_tokens: int, max_blocks: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if block_tokens < 1 or max_blocks < 1:
            raise ValueError("block_tokens and max_blocks must be >= 1")
        self.block_tokens = block_tokens
        self.max_blocks = max_blocks
        self._block_shape = (2, num_layers, num_kv_heads, block_tokens, head_dim)  # keys, values
        self.dtype = dtype
        self.device = torch.device(device)
        # Zeros, not empty: every page is touched here rather than on a request's prefill.
        self._storage = torch.zeros((max_blocks, *self._block_shape), dtype=dtype, device=self.device)
        self._free: list[int] = list(range(max_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self._by_key: dict[tuple, int] = {}
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # entry id -> entry, least recent first
        self._next_id = 0
        self._lookups = self._queried = self._hits = self._stored = self._evicted = 0

    @classmethod
    def for_cache(cls, kv_cache, *, block_tokens: int, max_bytes: int) -> "PrefixCache":
        """Sized in bytes, shaped like ``kv_cache`` (a SlotKVCache)."""
        layers = len(kv_cache.keys)
        _, heads, _, head_dim = kv_cache.keys[0].shape
        element = torch.empty((), dtype=kv_cache.dtype).element_size()
        block_bytes = 2 * layers * heads * block_tokens * head_dim * element
        return cls(block_tokens=block_tokens, max_blocks=max(1, max_bytes // block_bytes), num_layers=layers,
                   num_kv_heads=heads, head_dim=head_dim, dtype=kv_cache.dtype, device=kv_cache.device)

    @property
    def block_bytes(self) -> int:
        n = 1
        for d in self._block_shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._lookups, self._queried, self._hits, self._stored, self._evicted,
                                len(self._entries), self.max_blocks)

    # --- reading -------------------------------------------------------------------------------

    def _chain(self, adapter: Hashable, tokens: list[int], blocks: int) -> list[int]:
        """Entry ids of the first ``blocks`` blocks of ``tokens`` that are cached, in order."""
        found, parent = [], ("adapter", adapter)
        bt = self.block_tokens
        for i in range(blocks):
            entry_id = self._by_key.get((parent, tuple(tokens[i * bt:(i + 1) * bt])))
            if entry_id is None:
                break
            found.append(entry_id)
            parent = entry_id
        return found

    def _touch(self, chain: list[int]) -> None:
        for entry_id in reversed(chain):
            if entry_id in self._entries:
                self._entries.move_to_end(entry_id)

    def load_into(self, adapter: Hashable, tokens: list[int], kv_cache, row: int) -> int:
        """Copy the longest cached prefix of ``tokens`` under ``adapter`` into ``row`` of
        ``kv_cache`` (whose row must be empty) and return how many tokens it covers. At least one
        prompt token is always left to compute: its logits give the first generated token."""
        self._lookups += 1
        self._queried += len(tokens)
        found = self._chain(adapter, tokens, (len(tokens) - 1) // self.block_tokens)
        if not found:
            return 0
        self._touch(found)
        blocks = self._storage[[self._entries[e].storage for e in found]]  # [n, 2, L, H, bt, D]
        n, _, layers, heads, bt, dim = blocks.shape
        # -> [2, L, H, n * bt, D]: each layer's keys/values for the whole prefix, in token order
        kv = blocks.permute(1, 2, 3, 0, 4, 5).reshape(2, layers, heads, n * bt, dim)
        kv_cache.write_row(row, 0, kv[0], kv[1])
        self._hits += n * bt
        return n * bt

    # --- writing -------------------------------------------------------------------------------

    def store_from(self, adapter: Hashable, tokens: list[int], kv_cache, row: int, computed: int) -> None:
        """Cache every whole block among the first ``computed`` tokens of ``tokens``, whose keys
        and values ``row`` of ``kv_cache`` now holds; blocks already cached are only touched."""
        bt = self.block_tokens
        whole = min(computed, len(tokens)) // bt
        chain = self._chain(adapter, tokens, whole)
        if len(chain) < whole:
            self._add(adapter, tokens, kv_cache, row, chain, whole)
        self._touch(chain)

    def _add(self, adapter: Hashable, tokens: list[int], kv_cache, row: int, chain: list[int], whole: int) -> None:
        """Append blocks ``len(chain)..whole-1`` to ``chain`` (in place)."""
        bt = self.block_tokens
        parent = chain[-1] if chain else ("adapter", adapter)
        keys, values = kv_cache.read_row(row, len(chain) * bt, whole * bt)  # [L, H, tokens, D] each
        first = len(chain)
        for i in range(first, whole):
            storage = self._allocate()
            if storage is None:
                return
            local = slice((i - first) * bt, (i - first + 1) * bt)
            self._storage[storage][0].copy_(keys[:, :, local])
            self._storage[storage][1].copy_(values[:, :, local])
            key = (parent, tuple(tokens[i * bt:(i + 1) * bt]))
            entry_id = self._next_id
            self._next_id += 1
            self._entries[entry_id] = _Entry(key, storage)
            self._by_key[key] = entry_id
            self._stored += 1
            chain.append(entry_id)
            parent = entry_id

    def _allocate(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._entries:
            return None
        _, oldest = self._entries.popitem(last=False)
        del self._by_key[oldest.key]
        self._evicted += 1
        return oldest.storage

    def clear(self) -> None:
        self._free.extend(e.storage for e in self._entries.values())
        self._entries.clear()
        self._by_key.clear()
