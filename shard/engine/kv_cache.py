"""A KV cache in which every running request owns one row.

transformers' own caches cannot hold rows of different lengths in one forward (StaticCache keeps
one shared length; Llama ignores ``cache_position``), so this cache is told, before each forward,
where every row of the batch writes (``plan``). The model then gets per-row ``position_ids`` and an
explicit 4D additive mask from the same plan; ``update`` scatters the new keys/values at the
planned positions and returns the rows' keys/values up to the longest row.

Rows ``0..n-1`` that decode together are read as a view (no copy); a forward over any other set
of rows (prefill of newly admitted requests) reads a gathered copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache


@dataclass(frozen=True)
class ForwardPlan:
    """Where each row of one forward reads and writes. Inputs are left-padded to ``width``."""

    rows: torch.Tensor  # [B] cache row of each batch row
    position_ids: torch.Tensor  # [B, width] RoPE positions (0 for padding)
    attention_mask: torch.Tensor  # [B, 1, width, kv_len] additive, 0 or finfo.min
    kv_len: int
    rows_are_prefix: bool  # rows == 0..B-1: read the cache as a view
    write_batch: torch.Tensor | None  # [N] batch index of every real (non-padding) token
    write_step: torch.Tensor | None  # [N] its index along the width
    write_row: torch.Tensor | None  # [N] its cache row
    write_pos: torch.Tensor | None  # [N] the column it is written to
    # A decode step (one new token per row, rows 0..B-1): row b writes its one token at column
    # write_column[b], one indexed assignment per layer (no gather of the inputs first).
    write_column: torch.Tensor | None = None  # [B]


class SlotKVCache(Cache):
    """``[max_batch, kv_heads, columns, head_dim]`` keys and values per layer, written in place;
``columns`` grows by doubling up to ``max_context``."""

    def __init__(
        self,
        *,
        num_layers: int,
        max_batch: int,
        max_context: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        initial_context: int | None = None,
        token_scatter=None,
    ) -> None:
        """``token_scatter``: the fused CPU kernels (shard.engine.llama_forward.load_fused_ops) to
        write a forward's keys/values with, or None for stock indexed assignment."""
        super().__init__(layers=[])
        self._token_scatter = token_scatter
        self.max_batch = max_batch
        self.max_context = max_context
        self.dtype = dtype
        self.device = torch.device(device)
        # Columns are allocated up front up to ``initial_context`` and doubled on demand (one copy
        # per doubling), so a shard configured for long contexts only pays for what it uses.
        self.columns = min(max_context, initial_context or max_context)
        shape = (max_batch, num_kv_heads, self.columns, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        # Tokens already stored per row; only the scheduler changes them (via commit/move/reset).
        self.lengths = [0] * max_batch
        self._plan: ForwardPlan | None = None
        self._columns_cache: torch.Tensor | None = None

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        *,
        max_batch: int,
        max_context: int,
        dtype: torch.dtype,
        initial_context: int | None = None,
        token_scatter=None,
    ) -> "SlotKVCache":
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=config.num_hidden_layers,
            max_batch=max_batch,
            max_context=max_context,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=dtype,
            device=model.get_input_embeddings().weight.device,
            initial_context=initial_context,
            token_scatter=token_scatter,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # --- planning (called by the engine before a forward) -------------------------------------

    def plan(self, rows: list[int], new_tokens: list[int]) -> ForwardPlan:
        """Plan a forward in which batch row ``b`` appends ``new_tokens[b]`` tokens to cache row
        ``rows[b]``; inputs must be left-padded to ``max(new_tokens)``."""
        if len(rows) != len(new_tokens) or not rows:
            raise ValueError("plan needs one token count per row and at least one row")
        width = max(new_tokens)
        starts = [self.lengths[r] for r in rows]
        for r, start, count in zip(rows, starts, new_tokens):
            if count < 1:
                raise ValueError(f"row {r}: a forward must add at least one token")
            if start + count > self.max_context:
                raise ValueError(f"row {r}: {start}+{count} tokens exceed the context of {self.max_context}")
        kv_len = max(s + c for s, c in zip(starts, new_tokens))
        if kv_len > self.columns:
            self._grow(min(self.max_context, max(kv_len, 2 * self.columns)))
        if width == 1 and rows == list(range(len(rows))):
            return self._plan_decode(rows, starts, kv_len)
        dev = self.device
        batch = len(rows)
        step = torch.arange(width, device=dev)
        start_t = torch.tensor(starts, device=dev)
        count_t = torch.tensor(new_tokens, device=dev)
        pad_t = width - count_t  # left padding of each row
        real = step[None, :] >= pad_t[:, None]  # [B, width]
        pos = start_t[:, None] + step[None, :] - pad_t[:, None]
        position_ids = torch.where(real, pos, torch.zeros_like(pos))
        cols = torch.arange(kv_len, device=dev)
        visible = cols[None, None, :] <= position_ids[:, :, None]  # causal within the row
        # Padding queries see column 0 only, so their softmax stays finite; their output is dropped.
        visible = torch.where(real[:, :, None], visible, cols[None, None, :] == 0)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=dev)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        write_batch, write_step = real.nonzero(as_tuple=True)
        rows_t = torch.tensor(rows, device=dev)
        plan = ForwardPlan(
            rows=rows_t,
            position_ids=position_ids,
            attention_mask=mask[:, None, :, :],
            kv_len=kv_len,
            rows_are_prefix=rows == list(range(batch)),
            write_batch=write_batch,
            write_step=write_step,
            write_row=rows_t[write_batch],
            write_pos=position_ids[write_batch, write_step],
        )
        self._plan = plan
        self._pending = (rows, new_tokens)
        return plan

    def _plan_decode(self, rows: list[int], starts: list[int], kv_len: int) -> ForwardPlan:
        """The plan of a decode step: a handful of ops, one host-to-device copy."""
        position_ids = torch.tensor(starts, device=self.device).unsqueeze(1)  # [B, 1]
        if self._columns_cache is None or self._columns_cache.shape[0] < kv_len:
            self._columns_cache = torch.arange(self.max_context, device=self.device)
        cols = self._columns_cache[:kv_len]
        # Row b sees columns 0..start_b (its own new token included).
        mask = torch.where(cols[None, :] <= position_ids, 0.0, torch.finfo(self.dtype).min).to(self.dtype)
        rows_t = torch.arange(len(rows), device=self.device)
        plan = ForwardPlan(
            rows=rows_t,
            position_ids=position_ids,
            attention_mask=mask[:, None, None, :],
            kv_len=kv_len,
            rows_are_prefix=True,
            write_batch=rows_t,
            write_step=torch.zeros_like(rows_t),
            write_row=rows_t,
            write_pos=position_ids.view(-1),
            write_column=position_ids.view(-1),
        )
        self._plan = plan
        self._pending = (rows, [1] * len(rows))
        return plan

    def _grow(self, columns: int) -> None:
        def grown(t: torch.Tensor) -> torch.Tensor:
            bigger = torch.zeros((*t.shape[:2], columns, t.shape[3]), dtype=t.dtype, device=t.device)
            bigger[:, :, : t.shape[2]] = t
            return bigger

        self.keys = [grown(t) for t in self.keys]
        self.values = [grown(t) for t in self.values]
        self.columns = columns

    def commit(self) -> None:
        """Record the tokens of the last planned forward as stored (after the forward ran)."""
        rows, new_tokens = self._pending
        for r, count in zip(rows, new_tokens):
            self.lengths[r] += count
        self._plan = None

    def abort(self) -> None:
        """Forget a planned forward that failed; the rows' lengths stay as before."""
        self._plan = None

    def reset_row(self, row: int) -> None:
        self.lengths[row] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Move a request's keys/values from row ``src`` into the free row ``dst``."""
        n = self.lengths[src]
        for k, v in zip(self.keys, self.values):
            k[dst, :, :n].copy_(k[src, :, :n])
            v[dst, :, :n].copy_(v[src, :, :n])
        self.lengths[dst] = n
        self.lengths[src] = 0

    def read_row(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens ``start..end-1`` of ``row``, every layer: [layers, heads, tokens, dim]."""
        return (torch.stack([k[row, :, start:end] for k in self.keys]),
                torch.stack([v[row, :, start:end] for v in self.values]))

    def write_row(self, row: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values ([layers, heads, tokens, dim]) as tokens ``start..`` of ``row``; the
        row then holds exactly ``start + tokens`` tokens."""
        end = start + keys.shape[2]
        if end > self.max_context:
            raise ValueError(f"row {row}: {end} tokens exceed the context of {self.max_context}")
        if end > self.columns:
            self._grow(min(self.max_context, max(end, 2 * self.columns)))
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            k[row, :, start:end].copy_(keys[layer])
            v[row, :, start:end].copy_(values[layer])
        self.lengths[row] = end

    def swap_rows(self, a: int, b: int) -> None:
        n = max(self.lengths[a], self.lengths[b])
        for k, v in zip(self.keys, self.values):
            k[[a, b], :, :n] = k[[b, a], :, :n]
            v[[a, b], :, :n] = v[[b, a], :, :n]
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    # --- the transformers Cache interface ------------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        plan = self._plan
        if plan is None:
            raise RuntimeError("SlotKVCache.update called without a plan for this forward")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._scatters(key_states, value_states, keys):
            self._token_scatter.scatter_tokens_(keys, key_states, plan.write_batch, plan.write_step, plan.write_row, plan.write_pos)
            self._token_scatter.scatter_tokens_(values, value_states, plan.write_batch, plan.write_step, plan.write_row, plan.write_pos)
        elif plan.write_column is not None:
            # An indexed assignment, not scatter_: scatter_ along the column axis costs ~100x more
            # in bf16 than in fp32 on CPU (measured ~8 ms per call at batch 32, 24 calls a step).
            keys[plan.rows, :, plan.write_column] = key_states[:, :, 0]
            values[plan.rows, :, plan.write_column] = value_states[:, :, 0]
        else:
            # [B, H, W, D] -> the real tokens as [N, H, D], written at (row, :, pos, :)
            keys[plan.write_row, :, plan.write_pos] = key_states[plan.write_batch, :, plan.write_step]
            values[plan.write_row, :, plan.write_pos] = value_states[plan.write_batch, :, plan.write_step]
        if plan.rows_are_prefix:
            n = plan.rows.shape[0]
            return keys[:n, :, : plan.kv_len], values[:n, :, : plan.kv_len]
        return (
            keys[:, :, : plan.kv_len].index_select(0, plan.rows),
            values[:, :, : plan.kv_len].index_select(0, plan.rows),
        )

    def _scatters(self, key_states: torch.Tensor, value_states: torch.Tensor, keys: torch.Tensor) -> bool:
        return (
            self._token_scatter is not None
            and keys.device.type == "cpu"
            and key_states.dtype == value_states.dtype == keys.dtype
            and key_states.stride(3) == 1
            and value_states.stride(3) == 1
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        plan = self._plan
        return plan.kv_len if plan is not None else max(self.lengths, default=0)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_context

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        plan = self._plan
        return (plan.kv_len if plan is not None else query_length), 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return (
            f"SlotKVCache(layers={len(self.keys)}, max_batch={self.max_batch}, "
            f"max_context={self.max_context}, dtype={self.dtype})"
        )
