"""Prefix caching keyed by adapter: a request whose prompt starts like an earlier one on the SAME
adapter version reuses that prefix's keys/values (fewer prompt tokens computed, the same tokens and
logits as without the cache); a request on another adapter, another version or the base model never
does, because the KV of a prefix depends on the adapter that computed it."""

import pytest
import torch

from tests.support.shard_models import tiny_llama_config
from shard.engine import Engine, GenerationRequest, SamplingOptions
from shard.engine.kv_cache import SlotKVCache
from shard.engine.prefix_cache import PrefixCache
from shard.lora import AdapterKey, LocalAdapterSource, LoraManager
from bench.synthetic_models import byte_tokenizer, random_llama

torch.set_num_threads(1)
BLOCK = 8


def prompt(seed, length):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (length,), generator=g).tolist()


def build_engine(adapter_dirs, prefix_cache_bytes):
    model = random_llama(tiny_llama_config(), seed=0)
    lora = LoraManager.install(model, LocalAdapterSource(adapter_dirs), device_slots=3, max_rank=16, host_capacity=3)
    engine = Engine(model, byte_tokenizer(), max_batch_size=4, max_queue=16, max_context=128, prefill_chunk_tokens=64,
                    lora=lora, record_logits=True,
                    prefix_cache_bytes=prefix_cache_bytes, prefix_block_tokens=BLOCK)
    engine.eos_ids = set()
    return engine, lora


def generate(engine, adapter, prompt_ids, max_tokens=6):
    """Serve one request to the end on an engine driven step by step; (tokens, logits)."""
    handle = engine.submit(GenerationRequest(
        request_id=f"r{len(prompt_ids)}-{adapter}", prompt_ids=prompt_ids,
        adapter=AdapterKey(adapter, "local") if adapter else None, sampling=SamplingOptions(max_tokens=max_tokens)))
    for _ in range(200):
        if not engine.run_once():
            break
    chunks = list(handle)  # finished: the whole stream is queued
    tokens = [t for c in chunks for t in c.token_ids]
    logits = torch.cat([c.logits for c in chunks if c.logits is not None])
    return tokens, logits


@pytest.fixture
def engines(tiny_adapter_dirs):
    cached, cached_adapters = build_engine(tiny_adapter_dirs, prefix_cache_bytes=2**20)
    plain, plain_adapters = build_engine(tiny_adapter_dirs, prefix_cache_bytes=0)
    for engine, adapters in ((cached, cached_adapters), (plain, plain_adapters)):
        for name in ("alpha", "beta"):
            adapters.load(AdapterKey(name, "local"))
    yield cached, plain
    for engine, adapters in ((cached, cached_adapters), (plain, plain_adapters)):
        engine.stop(timeout=10)
        adapters.close()


def test_same_adapter_reuses_the_prefix_and_answers_the_same(engines):
    cached, plain = engines
    shared = prompt(1, 4 * BLOCK + 3)
    first, second = shared + prompt(2, 5), shared + prompt(3, 7)

    generate(cached, "alpha", first)
    before = cached.stats()
    tokens, logits = generate(cached, "alpha", second)
    after = cached.stats()
    reference_tokens, reference_logits = generate(plain, "alpha", second)

    reused = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
    assert reused == 4 * BLOCK  # every whole block of the shared prefix
    assert after.prefill_tokens_computed - before.prefill_tokens_computed == len(second) - reused
    assert tokens == reference_tokens
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=1e-4)
    assert 0 < after.prefix_cache_hit_rate < 1


@pytest.mark.parametrize("first_adapter, second_adapter", [("alpha", "beta"), ("alpha", None), (None, "beta")])
def test_other_adapter_or_base_never_reuses(engines, first_adapter, second_adapter):
    cached, plain = engines
    same_prompt = prompt(4, 5 * BLOCK + 1)

    generate(cached, first_adapter, same_prompt)
    before = cached.stats()
    tokens, logits = generate(cached, second_adapter, same_prompt)
    after = cached.stats()
    reference_tokens, reference_logits = generate(plain, second_adapter, same_prompt)

    assert after.prefix_cache_hit_tokens == before.prefix_cache_hit_tokens
    assert after.prefill_tokens_computed - before.prefill_tokens_computed == len(same_prompt)
    assert tokens == reference_tokens
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=1e-4)


def small_kv(rows=2, columns=64):
    return SlotKVCache(num_layers=2, max_batch=rows, max_context=columns, num_kv_heads=2, head_dim=4,
                       dtype=torch.float32, device="cpu")


def fill_row(kv, row, tokens):
    g = torch.Generator().manual_seed(row + len(tokens))
    shape = (len(kv.keys), 2, len(tokens), 4)
    kv.write_row(row, 0, torch.randn(shape, generator=g), torch.randn(shape, generator=g))


def test_versions_of_one_adapter_never_share():
    kv = small_kv()
    prefix = PrefixCache.for_cache(kv, block_tokens=4, max_bytes=1 << 20)
    tokens = list(range(1, 14))
    fill_row(kv, 0, tokens)
    prefix.store_from(AdapterKey("legal", "1"), tokens, kv, 0, computed=len(tokens))

    kv.reset_row(1)
    assert prefix.load_into(AdapterKey("legal", "2"), tokens, kv, 1) == 0
    assert prefix.load_into(AdapterKey("legal", "1"), tokens, kv, 1) == 12
    keys, values = kv.read_row(1, 0, 12)
    expected_keys, expected_values = kv.read_row(0, 0, 12)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert kv.lengths[1] == 12


def test_memory_is_bounded_and_the_least_recently_used_block_goes_first():
    kv = small_kv()
    prefix = PrefixCache(block_tokens=4, max_blocks=3, num_layers=2, num_kv_heads=2, head_dim=4,
                         dtype=torch.float32, device="cpu")
    old, hot, new = [1] * 9, [2] * 9, [3] * 9  # two whole blocks each
    for tokens in (old, hot):
        fill_row(kv, 0, tokens)
        prefix.store_from("a", tokens, kv, 0, computed=9)
    kv.reset_row(1)
    assert prefix.load_into("a", hot, kv, 1) == 8  # hot becomes the most recently used
    fill_row(kv, 0, new)
    prefix.store_from("a", new, kv, 0, computed=9)

    stats = prefix.stats()
    assert stats.cached_blocks == 3 and stats.capacity_blocks == 3
    assert stats.evicted_blocks == 3  # old's two blocks, then hot's tail (a chain shrinks from its end)
    kv.reset_row(1)
    assert prefix.load_into("a", old, kv, 1) == 0
    kv.reset_row(1)
    assert prefix.load_into("a", new, kv, 1) == 8
    kv.reset_row(1)
    assert prefix.load_into("a", hot, kv, 1) == 4


def test_requests_admitted_together_reuse_what_earlier_steps_computed(engines):
    cached, plain = engines
    shared = prompt(6, 5 * BLOCK)
    prompts = [shared + prompt(7 + i, 7) for i in range(3)]  # 47 tokens each; 64 prompt tokens per step

    def serve_together(engine):
        handles = [engine.submit(GenerationRequest(request_id=f"t{i}", prompt_ids=p, adapter=AdapterKey("alpha", "local"),
                                                   sampling=SamplingOptions(max_tokens=4))) for i, p in enumerate(prompts)]
        while engine.run_once():
            pass
        return [[t for c in h for t in c.token_ids] for h in handles]

    before = cached.stats()
    tokens = serve_together(cached)
    after = cached.stats()
    # Step 1 prefills the first prompt and starts the second; the third starts in step 2 and
    # finds the shared prefix the first one stored.
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == 5 * BLOCK
    assert tokens == serve_together(plain)


def test_filling_the_cache_touches_no_new_memory():
    """The storage is allocated and written when the cache is made: storing blocks while requests
    wait copies into pages already there instead of faulting in fresh ones."""
    resource = pytest.importorskip("resource")
    kv = SlotKVCache(num_layers=2, max_batch=1, max_context=64, num_kv_heads=4, head_dim=64,
                     dtype=torch.float32, device="cpu")
    prefix = PrefixCache.for_cache(kv, block_tokens=16, max_bytes=16 << 20)  # 32 KiB blocks, 512 of them
    pages = prefix.max_blocks * prefix.block_bytes // 4096
    prompts = [prompt(100 + i, 64) for i in range(prefix.max_blocks // 4)]  # 4 whole blocks each: fills it
    g = torch.Generator().manual_seed(0)
    kv.write_row(0, 0, *(torch.randn(2, 4, 64, 64, generator=g) for _ in range(2)))
    prefix.store_from("warm", prompts[0][:16], kv, 0, computed=16)  # the copy path's own first use
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for tokens in prompts:
        prefix.store_from("a", tokens, kv, 0, computed=len(tokens))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert prefix.stats().cached_blocks == prefix.max_blocks
    assert faults < pages // 10, f"{faults} page faults while filling {pages} pages of storage"
