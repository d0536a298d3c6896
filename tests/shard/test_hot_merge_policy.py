"""The hot-adapter merge policy on a simulated clock: merge only after a whole window above the
share with enough tokens, unmerge below the lower share, nothing within the cool-down."""

import pytest

from shard.lora.hot_policy import HotAdapterPolicy, HotMergeDecision


def policy(**overrides):
    options = dict(share=0.7, unmerge_share=0.4, window_s=10.0, cooldown_s=30.0, min_tokens=100)
    options.update(overrides)
    return HotAdapterPolicy(**options)


def feed(p, start, end, tokens, step=0.5):
    """One observation every `step` seconds in [start, end)."""
    t = start
    while t < end:
        p.observe(t, tokens)
        t += step
    return t


def test_merges_the_hot_adapter_only_after_a_whole_window():
    p = policy()
    feed(p, 0.0, 9.0, {"hot": 8, "cold": 1, None: 1})
    assert p.decide(9.0, merged=None) is None  # watched for less than a window
    feed(p, 9.0, 10.5, {"hot": 8, "cold": 1, None: 1})
    decision = p.decide(10.5, merged=None)
    assert decision == HotMergeDecision("merge", "hot", pytest.approx(0.8))


def test_no_merge_below_the_share_or_with_too_few_tokens():
    p = policy()
    feed(p, 0.0, 20.0, {"a": 6, "b": 4})  # 60% < 70%
    assert p.decide(20.0, merged=None) is None
    quiet = policy(min_tokens=1000)
    feed(quiet, 0.0, 20.0, {"a": 9, "b": 1})  # 90% of only ~200 tokens in the window
    assert quiet.decide(20.0, merged=None) is None


def test_the_base_model_is_never_merged():
    p = policy()
    feed(p, 0.0, 20.0, {None: 9, "a": 1})
    assert p.decide(20.0, merged=None) is None


def test_unmerges_when_it_cools_and_not_before_the_cooldown():
    p = policy()
    t = feed(p, 0.0, 11.0, {"hot": 9, "cold": 1})
    assert p.decide(t, merged=None).action == "merge"
    p.changed(t)
    merged_at = t
    t = feed(p, t, t + 15.0, {"hot": 1, "cold": 9})  # cooled at once: share 10%
    assert t - merged_at < 30.0
    assert p.decide(t, merged="hot") is None  # within the cool-down
    t = feed(p, t, merged_at + 31.0, {"hot": 1, "cold": 9})
    decision = p.decide(t, merged="hot")
    assert decision.action == "unmerge" and decision.adapter == "hot"
    assert decision.share == pytest.approx(0.1)


def test_keeps_the_merge_between_the_two_shares_and_when_idle():
    p = policy(cooldown_s=0.0)
    feed(p, 0.0, 20.0, {"hot": 5, "cold": 5})  # 50%: below the merge share, above the unmerge share
    assert p.decide(20.0, merged="hot") is None
    assert p.decide(100.0, merged="hot") is None  # the window emptied: no traffic, no change
    assert p.shares(100.0) == {}


def test_a_new_hot_adapter_replaces_the_merged_one_through_an_unmerge():
    p = policy(cooldown_s=5.0)
    t = feed(p, 0.0, 11.0, {"first": 10})
    p.changed(t)
    t = feed(p, t, t + 11.0, {"second": 10})
    assert p.decide(t, merged="first").action == "unmerge"
    p.changed(t)
    t = feed(p, t, t + 6.0, {"second": 10})
    assert p.decide(t, merged=None) == HotMergeDecision("merge", "second", 1.0)


def test_rejects_inconsistent_settings():
    with pytest.raises(ValueError):
        policy(share=0.5, unmerge_share=0.6)
    with pytest.raises(ValueError):
        policy(window_s=0)
