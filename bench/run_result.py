"""What one timed run produced, and the statistics the report uses."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def spread(values: list[float]) -> dict:
    return {
        "median": statistics.median(values) if values else 0.0,
        "min": min(values) if values else 0.0,
        "max": max(values) if values else 0.0,
        "n": len(values),
    }


@dataclass
class RunResult:
    """A set of requests served start to finish. `seconds` runs from the first arrival to the
    last completion; `latencies_s` from each request's arrival to its completion."""

    system: str
    tokens: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "system": self.system,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "latency_p50_s": round(percentile(self.latencies_s, 0.5), 4),
            "latency_p95_s": round(percentile(self.latencies_s, 0.95), 4),
            **self.extra,
        }
