"""When a shard should merge its hottest adapter into the base weights, and when it should undo it.

A plain class fed by the engine thread: `observe` after each forward pass with the tokens each
adapter's rows produced, `decide` now and then. Traffic is counted in tokens (what costs LoRA work),
over a trailing window. A merge is proposed when one adapter has at least `share` of the window's
tokens, the shard has been watched for a whole window and the window holds at least `min_tokens`
(a handful of requests is no reason to touch the weights). The merged adapter is unmerged when its
share falls below `unmerge_share` (lower than `share`, so a share hovering at the threshold does not
flap). No change is proposed within `cooldown_s` of the previous one, whatever made it. A window
without traffic changes nothing: an idle merged adapter costs no work."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class HotMergeDecision:
    action: str  # "merge" | "unmerge"
    adapter: Hashable  # the adapter to merge, or the one to unmerge
    share: float  # its share of the window's tokens


class HotAdapterPolicy:
    def __init__(self, *, share: float, unmerge_share: float, window_s: float, cooldown_s: float, min_tokens: int) -> None:
        if not 0 < share <= 1 or not 0 <= unmerge_share < share:
            raise ValueError(f"need 0 < share <= 1 and 0 <= unmerge_share < share, got {share} and {unmerge_share}")
        if window_s <= 0 or cooldown_s < 0 or min_tokens < 1:
            raise ValueError("window_s must be positive, cooldown_s >= 0, min_tokens >= 1")
        self.share = share
        self.unmerge_share = unmerge_share
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self.min_tokens = min_tokens
        self._steps: deque[tuple[float, Counter]] = deque()
        self._window = Counter()  # running sum of the steps in `_steps`
        self._watching_since: float | None = None
        self._last_change: float | None = None

    def observe(self, now: float, tokens: Mapping[Hashable | None, int]) -> None:
        """A forward pass produced `tokens[adapter]` tokens per adapter; None counts traffic no
        merge can serve (the base model, mixes): it is never merged but weighs in every share."""
        if self._watching_since is None:
            self._watching_since = now
        step = Counter({k: v for k, v in tokens.items() if v > 0})
        if step:
            self._steps.append((now, step))
            self._window.update(step)
        self._expire(now)

    def changed(self, now: float) -> None:
        """A merge or unmerge happened (from this policy or an admin call): the cool-down starts."""
        self._last_change = now

    def shares(self, now: float) -> dict[Hashable | None, float]:
        self._expire(now)
        total = sum(self._window.values())
        return {k: v / total for k, v in self._window.items()} if total else {}

    def decide(self, now: float, merged: Hashable | None) -> HotMergeDecision | None:
        """What to do now, given the adapter merged at present (None = none)."""
        self._expire(now)
        if self._last_change is not None and now - self._last_change < self.cooldown_s:
            return None
        total = sum(self._window.values())
        if total == 0:
            return None
        if merged is not None:
            share = self._window[merged] / total
            return HotMergeDecision("unmerge", merged, share) if share < self.unmerge_share else None
        if self._watching_since is None or now - self._watching_since < self.window_s or total < self.min_tokens:
            return None
        adapters = [(count, k) for k, count in self._window.items() if k is not None]
        if not adapters:
            return None
        count, hottest = max(adapters, key=lambda item: item[0])
        share = count / total
        return HotMergeDecision("merge", hottest, share) if share >= self.share else None

    def _expire(self, now: float) -> None:
        expired = False
        while self._steps and now - self._steps[0][0] > self.window_s:
            _, step = self._steps.popleft()
            self._window.subtract(step)
            expired = True
        if expired:
            self._window = +self._window  # drop zero counts so the map stays bounded
