"""Choosing the next token of each row: greedy, or temperature / top-k / top-p sampling.

Each sampling request owns a ``torch.Generator`` seeded from its ``seed``, and every row is sampled
on its own from its own logits, so the tokens a request gets do not depend on which other requests
share its batch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from shard.engine.errors import InvalidRequestError


class InvalidSamplingError(InvalidRequestError):
    """Sampling options out of range."""


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = 0  # 0 = the engine's default; always capped by the context
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 0 or 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if self.max_tokens < 0:
            raise InvalidSamplingError("max_tokens must be >= 0")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidSamplingError("temperature must be a finite number >= 0")
        if not math.isfinite(self.top_p) or not 0 <= self.top_p <= 1:
            raise InvalidSamplingError("top_p must be within [0, 1]")
        if self.top_k < 0:
            raise InvalidSamplingError("top_k must be >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidSamplingError("seed must fit in 64 unsigned bits")
        if any(not s for s in self.stop):
            raise InvalidSamplingError("stop strings must not be empty")
        if len(self.stop) > 16:
            raise InvalidSamplingError("at most 16 stop strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# top-p first looks among this many best tokens, widening (x8) only when they hold less than
# top_p of the mass: exact, and it avoids sorting the whole vocabulary on almost every step.
_TOP_P_FIRST_CANDIDATES = 64


class RowSampler:
    """The sampling state of one request."""

    def __init__(self, options: SamplingOptions, device: torch.device | str) -> None:
        self.options = options
        self.generator: torch.Generator | None = None
        if not options.greedy:
            self.generator = torch.Generator(device=device)
            seed = options.seed if options.seed is not None else random.getrandbits(63)
            # torch seeds are signed 64-bit; fold the unsigned proto value into that range.
            self.generator.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)

    def sample(self, logits: torch.Tensor) -> int:
        """Pick the next token from one row's logits ``[vocab]``."""
        if self.options.greedy:
            return int(greedy_tokens(logits))
        probs = torch.softmax(logits.float() / self.options.temperature, dim=-1)
        return self.sample_from_probs(probs)

    def sample_from_probs(self, probs: torch.Tensor) -> int:
        """Pick from ``probs [vocab]`` (softmax of logits / temperature) after top-k and top-p."""
        opts = self.options
        vocab = probs.shape[-1]
        top_p = opts.top_p if 0 < opts.top_p < 1 else 1.0
        candidates = None  # (probabilities, token ids), best first
        if opts.top_k and opts.top_k < vocab:
            values, ids = torch.topk(probs, opts.top_k)
            candidates = (values / values.sum(), ids)
        elif top_p < 1:
            k = min(_TOP_P_FIRST_CANDIDATES, vocab)
            while True:
                values, ids = torch.topk(probs, k)
                if k == vocab or float(values.sum()) >= top_p:
                    break
                k = min(k * 8, vocab)
            candidates = (values, ids)
        if candidates is None:
            # Exponential race (Gumbel-max): the same distribution as multinomial, in one pass;
            # -log(uniform) is several times cheaper than exponential_() on CPU.
            race = torch.rand(probs.shape, generator=self.generator, device=probs.device).log_().neg_()
            return int((probs / race).argmax())
        values, ids = candidates
        if top_p < 1:
            # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
            keep = (torch.cumsum(values, dim=-1) - values) < top_p
            values, ids = values[keep], ids[keep]
        pick = torch.multinomial(values, 1, generator=self.generator)
        return int(ids[pick])


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first highest logit, as ``argmax`` picks it (ties and NaN alike). ``max`` with a
    dim finds it ~4x faster on CPU (bf16 logits [32, 32000] on 2 cores: 0.35 ms against 1.6 ms for
    ``argmax``; a bf16 decode step's sampling 1.0 -> 0.36 ms)."""
    return logits.max(dim=-1).indices


def sample_batch(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """Next token of every row of ``logits [B, vocab]``: greedy rows share one greedy pick, sampled
    rows one batched softmax; each sampled row then draws with its own generator."""
    greedy_rows = [i for i, s in enumerate(samplers) if s.options.greedy]
    if len(greedy_rows) == len(samplers):
        return greedy_tokens(logits).tolist()
    tokens: list[int] = [0] * len(samplers)
    if greedy_rows:
        for i, t in zip(greedy_rows, greedy_tokens(logits[greedy_rows]).tolist()):
            tokens[i] = t
    sampled_rows = [i for i, s in enumerate(samplers) if not s.options.greedy]
    temperatures = torch.tensor(
        [samplers[i].options.temperature for i in sampled_rows], dtype=torch.float32, device=logits.device
    )
    probs = torch.softmax(logits[sampled_rows].float() / temperatures[:, None], dim=-1)
    for row, i in enumerate(sampled_rows):
        tokens[i] = samplers[i].sample_from_probs(probs[row])
    return tokens
