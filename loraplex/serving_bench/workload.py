"""When requests arrive (a Poisson process at a given rate) and which adapter each one names
(uniform, or Zipf over the adapters in the order given: the first is the most popular)."""

from __future__ import annotations

import random
from dataclasses import dataclass


class DistributionError(ValueError):
    pass


@dataclass(frozen=True)
class AdapterDistribution:
    """``uniform`` or ``zipf:S`` (S > 0): adapter k (1-based, in the given order) has weight 1/k^S."""

    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    spec: str

    @classmethod
    def parse(cls, spec: str, adapters: list[str]) -> "AdapterDistribution":
        if not adapters or any(not a for a in adapters):
            raise DistributionError("give at least one adapter name (comma-separated, none empty)")
        kind, _, arg = spec.partition(":")
        if kind == "uniform" and not arg:
            weights = [1.0] * len(adapters)
        elif kind == "zipf":
            try:
                exponent = float(arg)
            except ValueError:
                raise DistributionError(f"zipf needs an exponent, e.g. zipf:1.1, got {spec!r}") from None
            if not exponent > 0:
                raise DistributionError(f"the zipf exponent must be > 0, got {exponent}")
            weights = [1.0 / (rank**exponent) for rank in range(1, len(adapters) + 1)]
        else:
            raise DistributionError(f"distribution must be uniform or zipf:S, got {spec!r}")
        total = sum(weights)
        return cls(tuple(adapters), tuple(w / total for w in weights), spec)

    def sample(self, rng: random.Random) -> str:
        return rng.choices(self.adapters, weights=self.weights)[0]


@dataclass(frozen=True)
class PlannedRequest:
    at_s: float  # seconds after the start
    adapter: str
    prompt: str


def plan_requests(
    distribution: AdapterDistribution, rate: float, duration_s: float, prompts: list[str], seed: int
) -> list[PlannedRequest]:
    """Arrival times of a Poisson process (exponential gaps, mean 1/rate) within ``duration_s``."""
    if not rate > 0 or not duration_s > 0:
        raise DistributionError("rate and duration must be > 0")
    rng = random.Random(seed)
    planned, t = [], rng.expovariate(rate)
    while t < duration_s:
        planned.append(PlannedRequest(t, distribution.sample(rng), rng.choice(prompts)))
        t += rng.expovariate(rate)
    return planned
