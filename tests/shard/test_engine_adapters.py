"""Mixed-adapter batches: every row - base rows and rows that joined mid-flight included - gets
what PEFT running that adapter alone gives (fp32: same greedy tokens, logits within 1e-4)."""

import time

import pytest
import torch

from shard.engine import Engine, FinishReason, GenerationRequest, SamplingOptions
from shard.lora import AdapterKey, AdapterNotFoundError, LocalAdapterSource, LoraManager
from tests.support.shard_models import tiny_llama_config
from bench.synthetic_models import byte_tokenizer, random_llama

torch.set_num_threads(1)


def peft_reference(adapter_dir, prompt_ids, max_new_tokens):
    """(tokens, logits [n, vocab]) of a greedy generate on the adapter alone (None = base)."""
    model = random_llama(tiny_llama_config(), seed=0)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    out = model.generate(
        input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt_ids):].tolist(), torch.cat(out.logits).float()


def prompt(seed, length):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (length,), generator=g).tolist()


@pytest.fixture
def adapter_engine(tiny_adapter_dirs):
    model = random_llama(tiny_llama_config(), seed=0)
    # Two device slots for three adapters: the cache must evict and requests must wait.
    lora = LoraManager.install(model, LocalAdapterSource(tiny_adapter_dirs), device_slots=2, max_rank=16, host_capacity=3)
    engine = Engine(
        model, byte_tokenizer(), max_batch_size=4, max_queue=16, max_context=96,
        prefill_chunk_tokens=16, lora=lora, record_logits=True,
    )
    engine.eos_ids = set()
    yield engine, lora
    engine.stop(timeout=10)
    lora.close()


def test_mixed_adapter_rows_match_peft_alone(adapter_engine, tiny_adapter_dirs):
    engine, lora = adapter_engine
    specs = [  # (adapter name or None, prompt, max_tokens, submitted at iteration)
        ("alpha", prompt(1, 6), 8, 0),
        (None, prompt(2, 10), 6, 0),
        ("beta", prompt(3, 20), 7, 0),  # two prefill chunks
        ("alpha", prompt(4, 3), 5, 4),  # joins while the others decode
        ("gamma", prompt(5, 8), 6, 6),  # needs a slot: waits until alpha or beta is released
    ]
    handles = {}
    for iteration in range(2000):
        for i, (name, ids, max_tokens, at) in enumerate(specs):
            if at == iteration:
                handles[i] = engine.submit(GenerationRequest(
                    str(i), prompt_ids=ids, adapter=AdapterKey(name, "local") if name else None,
                    sampling=SamplingOptions(max_tokens=max_tokens),
                ))
        busy = engine.run_once()
        if not busy and len(handles) == len(specs):
            break
        if engine.stats().running == 0:
            time.sleep(0.005)  # only waiting for a background adapter load
    else:
        raise AssertionError("requests did not finish")
    for i, (name, ids, max_tokens, _) in enumerate(specs):
        chunks = list(handles[i])
        tokens = [t for c in chunks for t in c.token_ids]
        logits = torch.cat([c.logits for c in chunks if c.logits is not None])
        expected_tokens, expected_logits = peft_reference(tiny_adapter_dirs[name] if name else None, ids, max_tokens)
        assert tokens == expected_tokens, f"request {i} ({name})"
        assert (logits - expected_logits).abs().max().item() <= 1e-4, f"request {i} ({name})"
        assert chunks[0].adapter == (AdapterKey(name, "local") if name else None)
        assert chunks[-1].finish_reason is FinishReason.LENGTH
    # Every acquired adapter was released when its request ended.
    assert all(info.active_requests == 0 for info in lora.adapters())


def test_concurrent_requests_for_different_adapters_get_their_own(adapter_engine, tiny_adapter_dirs):
    engine, _ = adapter_engine
    engine.start()
    ids = prompt(7, 8)
    handles = {
        name: engine.submit(GenerationRequest(name, prompt_ids=ids, adapter=AdapterKey(name, "local"),
                                              sampling=SamplingOptions(max_tokens=10)))
        for name in ("alpha", "beta")
    }
    outputs = {name: [t for c in h for t in c.token_ids] for name, h in handles.items()}
    for name, tokens in outputs.items():
        assert tokens == peft_reference(tiny_adapter_dirs[name], ids, 10)[0]
    assert outputs["alpha"] != outputs["beta"]


def test_unknown_adapter_fails_only_its_request(adapter_engine):
    engine, _ = adapter_engine
    engine.start()
    bad = engine.submit(GenerationRequest("bad", prompt_ids=[5, 6], adapter=AdapterKey("nope", "local")))
    good = engine.submit(GenerationRequest("good", prompt_ids=[5, 6], sampling=SamplingOptions(max_tokens=3)))
    with pytest.raises(AdapterNotFoundError):
        list(bad)
    assert list(good)[-1].finish_reason is FinishReason.LENGTH


class GatedSource(LocalAdapterSource):
    """Local folders, but a fetch waits until the test opens the gate (a slow registry)."""

    def __init__(self, dirs, gate):
        super().__init__(dirs)
        self.gate = gate

    def fetch(self, key):
        assert self.gate.wait(60), "gate never opened"
        return super().fetch(key)


def test_a_loading_adapter_does_not_stall_other_requests(tiny_adapter_dirs):
    import threading

    gate = threading.Event()
    model = random_llama(tiny_llama_config(), seed=0)
    lora = LoraManager.install(model, GatedSource(tiny_adapter_dirs, gate), device_slots=2, max_rank=16, host_capacity=3)
    engine = Engine(model, byte_tokenizer(), max_batch_size=4, max_queue=8, max_context=64, lora=lora).start()
    try:
        engine.eos_ids = set()
        ids = prompt(8, 5)
        slow = engine.submit(GenerationRequest("slow", prompt_ids=ids, adapter=AdapterKey("gamma", "local"),
                                               sampling=SamplingOptions(max_tokens=6)))
        base = engine.submit(GenerationRequest("base", prompt_ids=ids, sampling=SamplingOptions(max_tokens=6)))
        base_chunks = list(base)  # finishes while gamma is still being fetched
        assert base_chunks[-1].finish_reason is FinishReason.LENGTH
        assert not slow.finished.is_set() and engine.stats().queued == 1
        gate.set()
        tokens = [t for c in slow for t in c.token_ids]
        assert tokens == peft_reference(tiny_adapter_dirs["gamma"], ids, 6)[0]
    finally:
        gate.set()
        engine.stop(timeout=10)
        lora.close()
