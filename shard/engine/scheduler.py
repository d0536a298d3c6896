"""Who waits, who prefills and who decodes, and which KV-cache row each request owns.

Row layout: the ``n`` decoding requests own rows ``0..n-1`` so that a decode step reads the cache
as a view. Requests being prefilled own free rows above them ("staging"); when a prefill
completes the request moves (or swaps) into row ``n``. When a decoding request ends, the last
decoding row moves into its hole. Prefill tokens are handed out in admission order, so staged
requests finish prefill in that order and a long prompt is split over several steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from shard.engine.errors import QueueFullError


class RowStore(Protocol):
    """What the scheduler needs from the KV cache."""

    def move_row(self, src: int, dst: int) -> None: ...

    def swap_rows(self, a: int, b: int) -> None: ...

    def reset_row(self, row: int) -> None: ...


@dataclass
class PrefillChunk:
    sequence: Any
    start: int  # index into the sequence's prompt_ids
    count: int

    @property
    def completes(self) -> bool:
        return self.start + self.count == len(self.sequence.prompt_ids)


class Scheduler:
    def __init__(self, *, max_batch: int, max_queue: int, rows: RowStore) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.rows = rows
        self.waiting: deque = deque()
        self.decoding: list = []  # index == cache row
        self.prefilling: list = []  # admission order; each has .row and .prefilled
        self._owner: list = [None] * max_batch

    # --- queue -------------------------------------------------------------------------------

    def enqueue(self, sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"request queue is full ({self.max_queue} waiting)")
        self.waiting.append(sequence)

    def remove_waiting(self, sequence) -> None:
        self.waiting.remove(sequence)

    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.decoding) - len(self.prefilling)

    @property
    def running(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    def admit(self, can_start: Callable[[Any], bool]) -> list:
        """Move waiting requests into free rows, oldest first. ``can_start(seq)`` acquires what
        the request needs (its adapter slot) or returns False to leave it waiting, without
        blocking those behind it."""
        admitted = []
        for sequence in list(self.waiting):
            if self.free_rows == 0:
                break
            if not can_start(sequence):
                continue
            self.waiting.remove(sequence)
            # The lowest free row: staged requests then sit in admission order right above the
            # decoding rows, the order their prefills finish in, so each joins the decoding rows
            # where it already is (a burst of 32 swapped half its rows, every layer's keys and
            # values, when staging took the highest free rows).
            row = min(r for r in range(len(self.decoding), self.max_batch) if self._owner[r] is None)
            self._owner[row] = sequence
            sequence.row = sequence_row = row
            sequence.prefilled = 0
            self.rows.reset_row(sequence_row)
            self.prefilling.append(sequence)
            admitted.append(sequence)
        return admitted

    # --- prefill -----------------------------------------------------------------------------

    def prefill_chunks(self, token_budget: int) -> list[PrefillChunk]:
        """The next piece of prompt for staged requests, in admission order, within the budget
        (the first staged request always gets at least one chunk)."""
        chunks = []
        budget = token_budget
        for sequence in self.prefilling:
            remaining = len(sequence.prompt_ids) - sequence.prefilled
            count = min(remaining, budget) if chunks else min(remaining, max(budget, 1))
            if count <= 0:
                break
            chunks.append(PrefillChunk(sequence, sequence.prefilled, count))
            budget -= count
            if count < remaining:
                break
        return chunks

    def prefill_done(self, sequence) -> None:
        """The request's whole prompt is in its row: it joins the decoding rows."""
        self.prefilling.remove(sequence)
        target = len(self.decoding)
        if sequence.row != target:
            other = self._owner[target]
            if other is not None:
                self.rows.swap_rows(sequence.row, target)
                other.row = sequence.row
                self._owner[other.row] = other
            else:
                self.rows.move_row(sequence.row, target)
                self._owner[sequence.row] = None
            sequence.row = target
            self._owner[target] = sequence
        self.decoding.append(sequence)

    # --- leaving -----------------------------------------------------------------------------

    def retire(self, sequence) -> None:
        """Free the request's row (it finished, failed or was cancelled)."""
        if sequence in self.prefilling:
            self.prefilling.remove(sequence)
            self._owner[sequence.row] = None
            self.rows.reset_row(sequence.row)
        elif sequence in self.decoding:
            hole = sequence.row
            last = len(self.decoding) - 1
            moved = self.decoding.pop()
            if moved is not sequence:
                self.rows.move_row(last, hole)
                self.decoding[hole] = moved
                moved.row = hole
                self._owner[hole] = moved
            self._owner[last] = None
            self.rows.reset_row(last)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        sequence.row = None
