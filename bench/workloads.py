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


def zipf_adapters(rng: random.Random, adapters: list[str], count: int, exponent: float = 1.0) -> list[str]:
    """`count` draws from `adapters` with P(rank k) ∝ 1 / k**exponent (a few hot adapters, a long tail)."""
    weights = [1.0 / (k + 1) ** exponent for k in range(len(adapters))]
    return rng.choices(adapters, weights=weights, k=count)


def shared_prefix_batch(
    *, adapters: list[str], per_adapter: int, prefix_tokens: int, prompt_tokens: int, new_tokens: int,
    vocab_size: int, seed: int,
) -> list[BenchRequest]:
    """`per_adapter` requests on each adapter; the requests of one adapter share one
    `prefix_tokens`-long prompt prefix, followed by `prompt_tokens` tokens of their own. Requests
    are interleaved across adapters (a, b, c, a, b, c, ...) as independent clients would send them."""
    rng = random.Random(seed)
    prefixes = {name: _prompt(rng, prefix_tokens, vocab_size) for name in adapters}
    requests = []
    for i in range(per_adapter * len(adapters)):
        name = adapters[i % len(adapters)]
        requests.append(BenchRequest(i, prefixes[name] + _prompt(rng, prompt_tokens, vocab_size), new_tokens, name))
    return requests
