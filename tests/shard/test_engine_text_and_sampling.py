"""Incremental detokenization, stop strings and per-request sampling."""

import pytest
import torch

from shard.engine import Engine, GenerationRequest, InvalidSamplingError, SamplingOptions
from shard.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from shard.engine.sampling import RowSampler, greedy_tokens, sample_batch

torch.set_num_threads(1)


def test_detokenizer_never_releases_partial_characters(tiny_llama):
    _, tokenizer = tiny_llama
    text = "héllo wörld — 世界 🙂!"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text)  # byte tokens: multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tokenizer, tokenizer("prompt: ")["input_ids"])
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stop_matcher_holds_possible_prefixes_and_cuts_before_the_stop():
    matcher = StopStringMatcher(["END", "##"])
    out = [matcher.feed(piece) for piece in ["hello E", "N", "x and #", "#tail"]]
    assert [r.text for r in out] == ["hello ", "", "ENx and ", ""]
    assert [r.stopped for r in out] == [False, False, False, True]
    other = StopStringMatcher(["END"])
    assert other.feed("abc EN").text == "abc "
    assert other.flush() == "EN"  # generation ended: what was held is not a stop string


def test_sampling_options_are_validated():
    for bad in (
        SamplingOptions(temperature=-1),
        SamplingOptions(top_p=1.5),
        SamplingOptions(top_k=-2),
        SamplingOptions(temperature=float("nan")),
        SamplingOptions(stop=("",)),
    ):
        with pytest.raises(InvalidSamplingError):
            bad.validate()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1).tolist()
    for options in (SamplingOptions(temperature=1.0, top_k=1, seed=3), SamplingOptions(temperature=1.0, top_p=1e-6, seed=3)):
        assert sample_batch(logits, [RowSampler(options, "cpu") for _ in range(4)]) == greedy


def test_top_k_keeps_sampling_inside_the_k_best():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    best = set(torch.topk(logits, 5).indices.tolist())
    sampler = RowSampler(SamplingOptions(temperature=5.0, top_k=5, seed=7), "cpu")
    picks = {sampler.sample(logits) for _ in range(200)}
    assert picks <= best and len(picks) > 1


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(tiny_llama):
    model, tokenizer = tiny_llama
    options = SamplingOptions(max_tokens=12, temperature=0.9, top_p=0.95, top_k=40, seed=1234)

    def run(extra_prompts):
        engine = Engine(model, tokenizer, max_batch_size=4, max_queue=8, max_context=128)
        engine.eos_ids = set()
        others = [
            engine.submit(GenerationRequest(f"o{i}", prompt=p, sampling=SamplingOptions(max_tokens=5 + i, temperature=1.2, seed=i)))
            for i, p in enumerate(extra_prompts)
        ]
        mine = engine.submit(GenerationRequest("mine", prompt="seeded prompt", sampling=options))
        while engine.run_once():
            pass
        for h in others:
            list(h)
        return [t for c in mine for t in c.token_ids]

    alone = run([])
    assert run(["a much longer prompt than the others, to shift rows", "x"]) == alone
    assert run(["b", "c", "d"]) == alone
    different_seed = SamplingOptions(max_tokens=12, temperature=0.9, top_p=0.95, top_k=40, seed=99)
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=2, max_context=128)
    engine.eos_ids = set()
    h = engine.submit(GenerationRequest("other", prompt="seeded prompt", sampling=different_seed))
    while engine.run_once():
        pass
    assert [t for c in h for t in c.token_ids] != alone


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    draws = 4000
    for options, expected in (
        (SamplingOptions(temperature=1.0, seed=5), probs),  # full vocabulary (exponential race)
        (SamplingOptions(temperature=1.0, top_p=0.7, seed=5), torch.tensor([0.5, 0.3, 0, 0]) / 0.8),
        (SamplingOptions(temperature=1.0, top_k=3, seed=5), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95),
    ):
        sampler = RowSampler(options, "cpu")
        counts = torch.bincount(torch.tensor([sampler.sample(logits) for _ in range(draws)]), minlength=4)
        frequencies = counts.float() / draws
        # 4 standard deviations of a binomial proportion at n=4000 is at most 0.032.
        assert (frequencies - expected).abs().max().item() < 0.035, (options, frequencies)


def test_top_p_keeps_exactly_the_smallest_prefix_reaching_p():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(1000, generator=g) * 2, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    for top_p in (0.3, 0.9, 0.999):
        allowed = set(order[(torch.cumsum(sorted_probs, 0) - sorted_probs) < top_p].tolist())
        sampler = RowSampler(SamplingOptions(temperature=1.0, top_p=top_p, seed=1), "cpu")
        picks = {sampler.sample_from_probs(probs) for _ in range(300)}
        assert picks <= allowed


def test_stream_interval_groups_tokens_but_never_holds_back_the_first_text_or_the_end(tiny_llama):
    model, tokenizer = tiny_llama
    engine = Engine(model, tokenizer, max_batch_size=3, max_queue=4, max_context=128)
    engine.eos_ids = set()
    handles = {
        interval: engine.submit(GenerationRequest(
            f"every-{interval}", prompt="abcdefgh", sampling=SamplingOptions(max_tokens=13), stream_interval=interval
        ))
        for interval in (1, 4, 13)
    }
    while engine.run_once():
        pass
    chunks = {interval: list(handle) for interval, handle in handles.items()}
    every = chunks[1]
    for interval, got in chunks.items():
        assert [t for c in got for t in c.token_ids] == [t for c in every for t in c.token_ids]
        assert "".join(c.text for c in got) == "".join(c.text for c in every)
        assert got[-1].usage == every[-1].usage and got[-1].finish_reason is every[-1].finish_reason
        assert [c.finish_reason for c in got[:-1]] == [None] * (len(got) - 1)
        # The first chunk is the first text, as soon as there is any, whatever the interval.
        assert got[0].token_ids == every[0].token_ids and got[0].text == every[0].text
        assert all(len(c.token_ids) >= interval for c in got[1:-1])
    assert len(chunks[13]) <= 2 < len(chunks[4]) < len(every)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_pick_what_argmax_picks_with_ties_and_nan(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(32, 5000, generator=g) * 0.05).to(dtype)  # bf16 at this scale: many ties
    top = logits.max()
    logits[:, 100] = top
    logits[:, 4000] = top  # an exact tie: the first one wins
    logits[3, 7] = float("nan")  # NaN wins, as in argmax
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
    assert greedy_tokens(logits)[0] == 100 and greedy_tokens(logits)[3] == 7
