"""Only the engine's thread runs torch multi-threaded (shard.intra_op_threads)."""

from __future__ import annotations

import threading

import pytest
import torch

from shard.intra_op_threads import confine_to_one_thread, run_in_ending_thread


def _in_thread(function):
    result: dict = {}

    def run() -> None:
        result["value"] = function()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result["value"]


def test_confining_a_thread_leaves_every_other_thread_as_it_was():
    before = torch.get_num_threads()
    if before < 2:
        pytest.skip("torch runs single-threaded here: nothing to confine")
    fresh_before = _in_thread(torch.get_num_threads)  # what a new thread gets (set by earlier tests too)

    def confined() -> tuple[bool, int]:
        return confine_to_one_thread(), torch.get_num_threads()

    applied, inside = _in_thread(confined)
    if not applied:
        pytest.skip("torch's OpenMP runtime here is not GNU OpenMP")
    assert inside == 1
    assert torch.get_num_threads() == before
    assert _in_thread(torch.get_num_threads) == fresh_before  # new threads are not confined


def test_a_confined_thread_computes_the_same_values():
    a = torch.randn(256, 512)
    b = torch.randn(512, 384)
    expected = a @ b
    got = _in_thread(lambda: (confine_to_one_thread(), a @ b)[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_ending_thread_hands_back_its_result_and_ends():
    seen: dict = {}

    def work(x: int) -> int:
        seen["thread"] = threading.current_thread()
        return x * 2

    assert run_in_ending_thread("worker", work, 21).result(timeout=10) == 42
    seen["thread"].join(timeout=10)
    assert not seen["thread"].is_alive()
    assert seen["thread"].name == "worker"


def test_an_ending_thread_hands_back_its_exception():
    def fail() -> None:
        raise ValueError("no model here")

    with pytest.raises(ValueError, match="no model here"):
        run_in_ending_thread("worker", fail).result(timeout=10)
