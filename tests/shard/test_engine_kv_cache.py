"""The per-slot KV cache and the scheduler's row bookkeeping."""

import pytest
import torch

from shard.engine.errors import QueueFullError
from shard.engine.kv_cache import SlotKVCache
from shard.engine.scheduler import Scheduler


def make_cache(max_batch=4, max_context=16):
    return SlotKVCache(
        num_layers=2, max_batch=max_batch, max_context=max_context, num_kv_heads=2, head_dim=4,
        dtype=torch.float32, device="cpu",
    )


def write(cache, rows, counts, seed):
    plan = cache.plan(rows, counts)
    width = max(counts)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(len(rows), 2, width, 4, generator=g)
    for layer in range(2):
        cache.update(k, -k, layer)
    cache.commit()
    return plan, k


def test_plan_positions_and_mask_for_rows_of_different_lengths():
    cache = make_cache()
    write(cache, [0], [3], 0)
    plan = cache.plan([0, 2], [1, 2])  # row 0 decodes its 4th token; row 2 prefills 2 (left-padded)
    assert plan.position_ids.tolist() == [[0, 3], [0, 1]]
    visible = (plan.attention_mask[:, 0] == 0).int().tolist()
    assert plan.kv_len == 4
    assert visible[0] == [[1, 0, 0, 0], [1, 1, 1, 1]]  # padding query sees column 0 only
    assert visible[1] == [[1, 0, 0, 0], [1, 1, 0, 0]]
    assert plan.attention_mask.min() == torch.finfo(torch.float32).min


def test_update_writes_each_row_at_its_own_length_and_reads_a_view_for_prefix_rows():
    cache = make_cache()
    _, k0 = write(cache, [1, 0], [2, 3], 1)
    assert cache.lengths[:2] == [3, 2]
    plan = cache.plan([0, 1], [1, 1])
    k_new = torch.randn(2, 2, 1, 4)
    keys, values = cache.update(k_new, -k_new, 0)
    assert keys.shape == (2, 2, 4, 4) and keys.data_ptr() == cache.keys[0].data_ptr()
    assert torch.equal(keys[0, :, 3], k_new[0, :, 0]) and torch.equal(keys[1, :, 2], k_new[1, :, 0])
    assert torch.equal(keys[0, :, :3], k0[1, :, :3]) and torch.equal(keys[1, :, :2], k0[0, :, 1:])
    cache.commit()
    assert cache.lengths[:2] == [4, 3]


def test_move_and_swap_rows_carry_contents_and_lengths():
    cache = make_cache()
    _, k = write(cache, [0, 1, 2], [2, 3, 1], 2)
    before = [cache.keys[1][r, :, : cache.lengths[r]].clone() for r in range(3)]
    cache.swap_rows(0, 1)
    assert cache.lengths[:2] == [3, 2]
    assert torch.equal(cache.keys[1][0, :, :3], before[1]) and torch.equal(cache.keys[1][1, :, :2], before[0])
    cache.move_row(2, 3)
    assert cache.lengths[2:] == [0, 1] and torch.equal(cache.keys[1][3, :, :1], before[2])


def test_plan_refuses_writes_past_the_context():
    cache = make_cache(max_context=4)
    write(cache, [0], [4], 3)
    with pytest.raises(ValueError):
        cache.plan([0], [1])


class Seq:
    def __init__(self, n):
        self.prompt_ids = list(range(n))
        self.row = None


def test_scheduler_keeps_decoding_rows_contiguous():
    cache = make_cache(max_batch=3)
    sched = Scheduler(max_batch=3, max_queue=2, rows=cache)
    a, b, c, d = Seq(5), Seq(2), Seq(3), Seq(1)
    sched.enqueue(a)
    sched.enqueue(b)
    with pytest.raises(QueueFullError):
        sched.enqueue(c)
    assert sched.admit(lambda s: s is not a) == [b]  # a waits (adapter not ready), b goes ahead
    sched.enqueue(c)
    sched.admit(lambda s: True)
    assert sched.free_rows == 0 and not sched.waiting
    chunks = sched.prefill_chunks(4)
    # b (admitted first) gets its whole prompt, a gets the rest of the budget; c none this step.
    assert [(ch.sequence, ch.count) for ch in chunks] == [(b, 2), (a, 2)]
    for ch in chunks:
        ch.sequence.prefilled += ch.count
    sched.prefill_done(b)
    assert b.row == 0 and sched.decoding == [b]
    a.prefilled = 5
    sched.prefill_done(a)
    c.prefilled = 3
    sched.prefill_done(c)
    assert [s.row for s in sched.decoding] == [0, 1, 2]
    sched.retire(a)
    assert sched.decoding == [b, c] and c.row == 1 and a.row is None
    sched.enqueue(d)
    assert sched.admit(lambda s: True) == [d] and d.row == 2


def test_a_burst_prefilled_together_joins_the_decoding_rows_where_it_already_is():
    class CountingCache(SlotKVCache):
        copies = 0

        def move_row(self, src, dst):
            self.copies += 1
            super().move_row(src, dst)

        def swap_rows(self, a, b):
            self.copies += 1
            super().swap_rows(a, b)

    cache = CountingCache(num_layers=2, max_batch=6, max_context=16, num_kv_heads=2, head_dim=4,
                          dtype=torch.float32, device="cpu")
    sched = Scheduler(max_batch=6, max_queue=6, rows=cache)
    first = [Seq(2) for _ in range(2)]
    for s in first:
        sched.enqueue(s)
    sched.admit(lambda s: True)
    for s in first:
        s.prefilled = 2
        sched.prefill_done(s)
    burst = [Seq(3) for _ in range(4)]
    for s in burst:
        sched.enqueue(s)
    sched.admit(lambda s: True)
    assert [s.row for s in burst] == [2, 3, 4, 5]  # admission order, right above the decoding rows
    for ch in sched.prefill_chunks(12):
        ch.sequence.prefilled += ch.count
        sched.prefill_done(ch.sequence)
    assert sched.decoding == first + burst and [s.row for s in sched.decoding] == list(range(6))
    assert cache.copies == 0


def test_columns_grow_on_demand_and_keep_contents():
    cache = SlotKVCache(
        num_layers=2, max_batch=2, max_context=20, num_kv_heads=2, head_dim=4,
        dtype=torch.float32, device="cpu", initial_context=4,
    )
    _, k = write(cache, [0, 1], [3, 2], 4)
    assert cache.columns == 4
    plan = cache.plan([0], [3])  # needs 6 columns: doubles to 8
    assert cache.columns == 8 and plan.kv_len == 6
    cache.abort()
    assert torch.equal(cache.keys[0][0, :, :3], k[0]) and torch.equal(cache.keys[0][1, :, :2], k[1, :, 1:])
    cache.plan([0], [17])  # capped at max_context
    assert cache.columns == 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_token_scatter_writes_what_indexed_assignment_writes(dtype):
    from shard.engine.llama_forward import load_fused_ops

    ops = load_fused_ops()
    if ops is None:
        pytest.skip("the fused kernels need a C++ compiler and an AVX-512 CPU")

    def cache(token_scatter):
        return SlotKVCache(num_layers=1, max_batch=4, max_context=16, num_kv_heads=2, head_dim=8,
                           dtype=dtype, device="cpu", token_scatter=token_scatter)

    stock, fused = cache(None), cache(ops)
    g = torch.Generator().manual_seed(7)
    # A prefill of rows of different lengths into rows 2 and 0, then a decode step over rows 0..3
    # (rows 1 and 3 joined by a prefill of their own), each source a strided [B, H, W, D] view.
    for rows, counts in (([2, 0], [3, 5]), ([1, 3], [1, 2]), ([0, 1, 2, 3], [1, 1, 1, 1])):
        source = torch.randn(len(rows), max(counts), 2, 8, generator=g).to(dtype).transpose(1, 2)
        read = []
        for c in (stock, fused):
            c.plan(rows, counts)
            read.append(c.update(source, source * 2, 0))
            c.commit()
        (stock_keys, stock_values), (fused_keys, fused_values) = read
        assert torch.equal(fused_keys, stock_keys) and torch.equal(fused_values, stock_values)
        assert torch.equal(fused.keys[0], stock.keys[0]) and torch.equal(fused.values[0], stock.values[0])
    assert fused.lengths == stock.lengths == [6, 2, 4, 3]


def test_the_fused_token_scatter_refuses_indices_out_of_range():
    from shard.engine.llama_forward import load_fused_ops

    ops = load_fused_ops()
    if ops is None:
        pytest.skip("the fused kernels need a C++ compiler and an AVX-512 CPU")
    cache = torch.zeros(2, 2, 4, 8)
    source = torch.ones(1, 2, 1, 8)
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.scatter_tokens_(cache, source, one, one, one, torch.tensor([4]))
    assert not cache.any()  # nothing written
