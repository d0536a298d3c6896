"""The engine against transformers' own generate: requests that join and leave the running batch
at different steps each get exactly the tokens they would get alone (greedy, fp32)."""

import pytest
import torch

from shard.engine import (
    Engine,
    EngineClosedError,
    InvalidRequestError,
    FinishReason,
    GenerationRequest,
    PromptTooLongError,
    QueueFullError,
    SamplingOptions,
)
from bench.synthetic_models import byte_tokenizer

torch.set_num_threads(1)


def reference_tokens(model, prompt_ids, max_new_tokens):
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids):].tolist()


def collect(handle):
    chunks = list(handle)
    return [t for c in chunks for t in c.token_ids], chunks


def run_until_idle(engine, limit=500):
    for _ in range(limit):
        if not engine.run_once():
            return
    raise AssertionError("engine did not become idle")


def prompt(seed, length):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (length,), generator=g).tolist()


def test_requests_joining_and_leaving_match_generate_alone(tiny_llama):
    model, tokenizer = tiny_llama
    # EOS off: random weights emit </s> at arbitrary points; we want fixed lengths here.
    engine = Engine(
        model, tokenizer, max_batch_size=3, max_queue=8, max_context=128, prefill_chunk_tokens=7, initial_kv_columns=8
    )
    engine.eos_ids = set()
    specs = [  # (prompt, max_tokens, step at which it is submitted)
        (prompt(1, 5), 9, 0),
        (prompt(2, 12), 4, 0),
        (prompt(3, 20), 11, 2),  # longer than a prefill chunk: prefilled over 3 steps
        (prompt(4, 3), 6, 3),  # waits for a free row
        (prompt(5, 9), 5, 6),
    ]
    handles = {}
    for step in range(200):
        for i, (ids, max_tokens, at) in enumerate(specs):
            if at == step:
                handles[i] = engine.submit(
                    GenerationRequest(str(i), prompt_ids=ids, sampling=SamplingOptions(max_tokens=max_tokens))
                )
        busy = engine.run_once()
        if not busy and len(handles) == len(specs):
            break
    for i, (ids, max_tokens, _) in enumerate(specs):
        tokens, chunks = collect(handles[i])
        assert tokens == reference_tokens(model, ids, max_tokens), f"request {i}"
        assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert chunks[-1].usage.prompt_tokens == len(ids)
        assert chunks[-1].usage.completion_tokens == max_tokens
    stats = engine.stats()
    assert stats.running == 0 and stats.queued == 0
    assert stats.requests_completed == len(specs)
    assert stats.tokens_generated == sum(s[1] for s in specs)


def test_engine_thread_serves_concurrent_requests(tiny_llama):
    model, tokenizer = tiny_llama
    engine = Engine(model, tokenizer, max_batch_size=4, max_queue=8, max_context=128).start()
    try:
        engine.eos_ids = set()
        prompts = ["hello world", "the quick brown fox", "é", "zzz"]
        handles = [
            engine.submit(GenerationRequest(p, prompt=p, sampling=SamplingOptions(max_tokens=6 + i)))
            for i, p in enumerate(prompts)
        ]
        for i, (p, handle) in enumerate(zip(prompts, handles)):
            tokens, chunks = collect(handle)
            ids = tokenizer(p)["input_ids"]
            assert tokens == reference_tokens(model, ids, 6 + i)
            # The streamed text is exactly the decoded tokens, with no partial characters on the way.
            assert "".join(c.text for c in chunks) == tokenizer.decode(tokens)
    finally:
        engine.stop(timeout=10)


def test_full_queue_is_refused_at_once(tiny_llama):
    model, tokenizer = tiny_llama
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=2, max_context=64)
    for i in range(2):
        engine.submit(GenerationRequest(str(i), prompt_ids=[5, 6]))
    with pytest.raises(QueueFullError):
        engine.submit(GenerationRequest("x", prompt_ids=[5, 6]))
    assert engine.stats().queued == 2


def test_prompt_longer_than_context_is_refused_and_max_tokens_is_capped(tiny_llama):
    model, tokenizer = tiny_llama
    engine = Engine(model, tokenizer, max_batch_size=2, max_queue=4, max_context=32)
    engine.eos_ids = set()
    with pytest.raises(PromptTooLongError):
        engine.submit(GenerationRequest("long", prompt_ids=prompt(7, 32)))
    handle = engine.submit(
        GenerationRequest("capped", prompt_ids=prompt(8, 28), sampling=SamplingOptions(max_tokens=100))
    )
    run_until_idle(engine)
    tokens, chunks = collect(handle)
    assert len(tokens) == 4 and chunks[-1].finish_reason is FinishReason.LENGTH


def test_cancel_frees_the_row_for_a_waiting_request(tiny_llama):
    model, tokenizer = tiny_llama
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=4, max_context=128)
    engine.eos_ids = set()
    first = engine.submit(GenerationRequest("a", prompt_ids=prompt(9, 4), sampling=SamplingOptions(max_tokens=100)))
    second = engine.submit(GenerationRequest("b", prompt_ids=prompt(10, 4), sampling=SamplingOptions(max_tokens=3)))
    for _ in range(3):
        engine.run_once()
    assert engine.stats().running == 1 and engine.stats().queued == 1
    first.cancel()
    run_until_idle(engine)
    tokens_a, chunks_a = collect(first)
    assert chunks_a[-1].finish_reason is FinishReason.CANCELLED and 0 < len(tokens_a) < 100
    tokens_b, chunks_b = collect(second)
    assert tokens_b == reference_tokens(model, prompt(10, 4), 3)
    assert engine.stats().running == 0


def test_eos_ends_a_request_with_stop(tiny_llama):
    model, tokenizer = tiny_llama
    ids = prompt(11, 6)
    expected = reference_tokens(model, ids, 8)
    engine = Engine(model, tokenizer, max_batch_size=2, max_queue=4, max_context=64)
    engine.eos_ids = {expected[3]}  # pretend the 4th token is end-of-sequence
    handle = engine.submit(GenerationRequest("e", prompt_ids=ids, sampling=SamplingOptions(max_tokens=8)))
    run_until_idle(engine)
    tokens, chunks = collect(handle)
    first_eos = expected.index(expected[3])
    assert tokens == expected[:first_eos]  # the EOS token itself is not part of the text
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert chunks[-1].usage.completion_tokens == first_eos + 1


def test_stop_string_ends_output_just_before_it(tiny_llama):
    model, tokenizer = tiny_llama
    text = "abcdefgh"
    engine = Engine(model, tokenizer, max_batch_size=2, max_queue=4, max_context=128)
    engine.eos_ids = set()
    full = engine.submit(GenerationRequest("f", prompt=text, sampling=SamplingOptions(max_tokens=24)))
    run_until_idle(engine)
    full_text = "".join(c.text for c in full)
    # A stop string made of output characters (a random model's text is mostly odd symbols).
    cut = next((i for i in range(3, len(full_text) - 1) if "\ufffd" not in full_text[i : i + 2]), None)
    assert cut is not None, f"no usable stop string in {full_text!r}"
    stop = full_text[cut : cut + 2]
    stopped = engine.submit(
        GenerationRequest("s", prompt=text, sampling=SamplingOptions(max_tokens=24, stop=(stop, "\x00never")))
    )
    run_until_idle(engine)
    chunks = list(stopped)
    assert "".join(c.text for c in chunks) == full_text[: full_text.index(stop)]
    assert chunks[-1].finish_reason is FinishReason.STOP


def test_chat_messages_are_rendered_with_the_chat_template(tiny_llama):
    model, _ = tiny_llama
    chat_tokenizer = byte_tokenizer()
    chat_tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    engine = Engine(model, chat_tokenizer, max_batch_size=2, max_queue=4, max_context=128)
    engine.eos_ids = set()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    handle = engine.submit(GenerationRequest("chat", messages=messages, sampling=SamplingOptions(max_tokens=4)))
    run_until_idle(engine)
    tokens, chunks = collect(handle)
    rendered = chat_tokenizer("<system>be brief\n<user>hi\n<assistant>", add_special_tokens=False)["input_ids"]
    assert chunks[-1].usage.prompt_tokens == len(rendered)
    assert tokens == reference_tokens(model, rendered, 4)
    with pytest.raises(InvalidRequestError):
        Engine(model, byte_tokenizer(), max_batch_size=1, max_queue=1, max_context=64).submit(
            GenerationRequest("no-template", messages=messages)
        )
    with pytest.raises(InvalidRequestError):
        engine.submit(GenerationRequest("both", prompt="x", messages=messages))


def test_closed_engine_refuses_new_requests_and_drains_running_ones(tiny_llama):
    model, tokenizer = tiny_llama
    engine = Engine(model, tokenizer, max_batch_size=2, max_queue=4, max_context=64).start()
    try:
        engine.eos_ids = set()
        running = engine.submit(GenerationRequest("r", prompt_ids=[5, 6, 7], sampling=SamplingOptions(max_tokens=20)))
        first = next(iter(running))  # admitted: a request still queued at drain would be refused
        assert engine.drain(timeout=60)
        with pytest.raises(EngineClosedError):
            engine.submit(GenerationRequest("late", prompt_ids=[5]))
        chunks = [first, *running]
        assert chunks[-1].finish_reason is FinishReason.LENGTH and chunks[-1].usage.completion_tokens == 20
    finally:
        engine.stop(timeout=10)


def test_drain_refuses_queued_requests_that_have_not_started_and_finishes_running_ones(tiny_llama):
    model, tokenizer = tiny_llama
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=4, max_context=64)
    engine.eos_ids = set()
    running = engine.submit(GenerationRequest("running", prompt_ids=[5, 6, 7], sampling=SamplingOptions(max_tokens=12)))
    queued = engine.submit(GenerationRequest("queued", prompt_ids=[8, 9], sampling=SamplingOptions(max_tokens=12)))
    engine.run_once()  # the one row goes to the first request; the second waits
    assert engine.stats().running == 1 and engine.stats().queued == 1
    engine.start()
    try:
        assert engine.drain(timeout=60)
        with pytest.raises(EngineClosedError, match="had not started"):
            list(queued)
        chunks = list(running)
        assert chunks[-1].finish_reason is FinishReason.LENGTH and chunks[-1].usage.completion_tokens == 12
        assert engine.stats().running == 0 and engine.stats().queued == 0
    finally:
        engine.stop(timeout=10)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures_match_generate(arch):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=320, max_position_embeddings=256, sliding_window=64,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    engine = Engine(model, byte_tokenizer(), max_batch_size=3, max_queue=4, max_context=128, prefill_chunk_tokens=8)
    engine.eos_ids = set()
    # Mistral's sliding window bounds the context (this engine's mask is fully causal).
    assert engine.max_context == (64 if arch == "mistral" else 128)
    specs = [(prompt(21, 9), 7), (prompt(22, 3), 10), (prompt(23, 14), 5)]
    handles = [
        engine.submit(GenerationRequest(str(i), prompt_ids=ids, sampling=SamplingOptions(max_tokens=n)))
        for i, (ids, n) in enumerate(specs)
    ]
    run_until_idle(engine)
    for (ids, n), handle in zip(specs, handles):
        assert collect(handle)[0] == reference_tokens(model, ids, n)


def prefill_steps(metrics) -> tuple[float, float]:
    """(prefill forwards, rows they carried) as the shard exports them."""
    get = metrics.registry.get_sample_value
    return get("loraplex_shard_step_rows_count", {"phase": "prefill"}), get("loraplex_shard_step_rows_sum", {"phase": "prefill"})


def test_an_idle_engine_prefills_a_burst_as_one_batch_and_a_late_request_alone(tiny_llama):
    import time

    from shard.metrics import ShardMetrics

    model, tokenizer = tiny_llama
    metrics = ShardMetrics("t")
    engine = Engine(model, tokenizer, max_batch_size=4, max_context=128, metrics=metrics,
                    admission_window_s=0.1).start()
    try:
        handles = []
        for i in range(3):  # arrivals 30 ms apart, each inside the 100 ms window of the one before
            handles.append(engine.submit(GenerationRequest(str(i), prompt_ids=prompt(i, 5), sampling=SamplingOptions(max_tokens=3))))
            time.sleep(0.03)
        for handle in handles:
            collect(handle)
        assert prefill_steps(metrics) == (1, 3)
        # Once idle again, a request alone waits one window with nothing arriving, then runs.
        started = time.monotonic()
        collect(engine.submit(GenerationRequest("late", prompt_ids=prompt(9, 5), sampling=SamplingOptions(max_tokens=2))))
        assert 0.1 <= time.monotonic() - started < 5
        assert prefill_steps(metrics) == (2, 4)
    finally:
        engine.stop(timeout=10)


def test_a_full_batch_does_not_wait_for_the_window(tiny_llama):
    import time

    model, tokenizer = tiny_llama
    engine = Engine(model, tokenizer, max_batch_size=2, max_context=128, admission_window_s=30.0)
    handles = [engine.submit(GenerationRequest(str(i), prompt_ids=prompt(i, 4), sampling=SamplingOptions(max_tokens=2)))
               for i in range(2)]
    started = time.monotonic()
    engine.start()  # both rows already asked for: no window to wait out
    try:
        for handle in handles:
            collect(handle)
        assert time.monotonic() - started < 20
    finally:
        engine.stop(timeout=10)


def test_start_runs_a_warm_up_forward_that_leaves_no_trace(tiny_llama):
    """`start` returns after one full-size prefill and a decode step on the engine's thread; the
    rows are empty again, nothing is counted, the cache did not grow, and answers are unchanged."""
    model, tokenizer = tiny_llama
    forwards = []
    answers = {}
    for warm_up in (True, False):
        engine = Engine(model, tokenizer, max_batch_size=3, max_queue=8, max_context=128, prefill_chunk_tokens=12,
                        initial_kv_columns=16, warm_up=warm_up)
        engine.eos_ids = set()
        calls = []
        # Every forward embeds its input ids first: the hook sees each forward's [rows, tokens].
        hook = model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape))
        engine.start()
        hook.remove()
        try:
            forwards.append(list(calls))
            stats = engine.stats()
            assert (stats.tokens_generated, stats.prefill_tokens_computed, stats.kv_used_tokens) == (0, 0, 0)
            assert engine.cache.columns == 16 and list(engine.cache.lengths) == [0, 0, 0]
            request = GenerationRequest("after", prompt_ids=prompt(9, 6), sampling=SamplingOptions(max_tokens=5))
            answers[warm_up] = collect(engine.submit(request))[0]
        finally:
            engine.stop(timeout=10)
    assert forwards == [[torch.Size([3, 4]), torch.Size([3, 1])], []]
    assert answers[True] == answers[False] == reference_tokens(model, prompt(9, 6), 5)
