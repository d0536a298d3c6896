"""Seeded request sets shared by the engine and the baselines, so both sides do the same work."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt_ids: tuple[int, ...]
    new_tokens: int
    adapter: str | None  # adapter name; None = the base model
    arrival_s: float = 0.0  # offset from the start of the run


def _prompt(rng: random.Random, length: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(rng.randrange(1, vocab_size) for _ in range(length))


def closed_batch(
    *, count: int, prompt_tokens: int, new_tokens: int | tuple[int, int], adapters: list[str | None],
    vocab_size: int, seed: int,
) -> list[BenchRequest]:
    """`count` requests that all arrive at once; request i uses adapters[i % len(adapters)]."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        length = new_tokens if isinstance(new_tokens, int) else rng.randint(*new_tokens)
        requests.append(BenchRequest(i, _prompt(rng, prompt_tokens, vocab_size), length, adapters[i % len(adapters)]))
    return requests


def poisson_arrivals(
    *, count: int, rate_per_s: float, prompt_tokens: tuple[int, int], new_tokens: tuple[int, int],
    adapters: list[str], vocab_size: int, seed: int,
) -> list[BenchRequest]:
    """Exponential inter-arrival gaps (a Poisson process), uniform prompt and output lengths,
    adapters drawn uniformly."""
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    rng = random.Random(seed)
    requests, clock = [], 0.0
    for i in range(count):
        if i:
            clock += rng.expovariate(rate_per_s)
        requests.append(
            BenchRequest(
                i,
                _prompt(rng, rng.randint(*prompt_tokens), vocab_size),
                rng.randint(*new_tokens),
                rng.choice(adapters),
                clock,
            )
        )
    return requests


def with_adapters(requests: list[BenchRequest], adapters: list[str | None]) -> list[BenchRequest]:
    """The same prompts, lengths and arrivals with request i on adapters[i % len(adapters)]."""
    return [BenchRequest(r.index, r.prompt_ids, r.new_tokens, adapters[r.index % len(adapters)], r.arrival_s) for r in requests]
