"""The tiered adapter cache: background loads, LRU per tier, refcounts and pins, failures."""

import threading
from pathlib import Path

import pytest
import torch

from shard.lora import (
    AdapterInUseError,
    AdapterKey,
    AdapterLoadTimeout,
    AdapterNotFoundError,
    AdapterRejectedError,
    LocalAdapterSource,
    TieredAdapterCache,
    install_multi_lora,
)
from bench.synthetic_models import random_llama, random_llama_config, save_random_peft_adapter

WAIT_S = 60  # upper bound for a background load on a loaded 2-core machine; never reached normally


@pytest.fixture(scope="module")
def tiny_llama():
    torch.set_num_threads(2)
    return random_llama(random_llama_config(num_layers=1), seed=0)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache_adapters")
    dirs = {}
    for i, name in enumerate(["a", "b", "c", "d"]):
        dirs[name] = save_random_peft_adapter(
            tiny_llama, root / name, rank=4 * (i + 1), alpha=8, target_modules=("q_proj", "v_proj"), seed=i
        )
    other = random_llama(random_llama_config(hidden_size=64, intermediate_size=128, num_layers=1), seed=1)
    dirs["wrong_shapes"] = save_random_peft_adapter(other, root / "wrong", rank=4, alpha=8, target_modules=("q_proj",), seed=9)
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((dirs["a"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    dirs["corrupt"] = corrupt
    return dirs


@pytest.fixture
def runtime(tiny_llama):
    import copy

    return install_multi_lora(copy.deepcopy(tiny_llama), device_slots=2, max_rank=16)


class GatedSource:
    """A real local source whose fetch waits for a gate: lets a test hold a load mid-flight."""

    def __init__(self, source: LocalAdapterSource):
        self.source = source
        self.gate = threading.Event()
        self.fetching = threading.Event()

    def fetch(self, key):
        self.fetching.set()
        self.gate.wait(WAIT_S)
        return self.source.fetch(key)


def key(name: str) -> AdapterKey:
    return AdapterKey(name, "local")


def stats(cache):
    return {s.tier: s for s in cache.tier_stats()}


def tiers(cache):
    return {info.adapter.name: info.tier for info in cache.adapters()}


def wait_ready(cache, k) -> int:
    ready = threading.Event()
    cache.add_listener(lambda done_key, error: ready.set() if done_key == k else None)
    slot = cache.try_acquire(k)
    if slot is None:
        assert ready.wait(WAIT_S), f"{k} never finished loading"
        assert cache.load_error(k) is None, cache.load_error(k)
        slot = cache.try_acquire(k)
    assert slot is not None
    return slot


def test_first_acquire_loads_in_background_then_hits(runtime, adapter_dirs):
    with TieredAdapterCache(runtime.pool, LocalAdapterSource(adapter_dirs), host_capacity=4) as cache:
        slot = wait_ready(cache, key("b"))
        assert runtime.pool.slot_rank(slot) == 8
        assert stats(cache)["device"].misses == 1 and stats(cache)["device"].hits == 1
        [info] = cache.adapters()
        assert (info.adapter, info.tier, info.rank, info.active_requests) == (key("b"), "device", 8, 1)
        assert info.target_modules == ["q_proj", "v_proj"] and len(info.weights_sha256) == 64 and info.size_bytes > 0
        assert stats(cache)["device"].load_ms_p95 >= stats(cache)["device"].load_ms_p50 > 0
        cache.release(key("b"))
        assert cache.adapters()[0].active_requests == 0


def test_try_acquire_never_waits_for_a_load_in_flight(runtime, adapter_dirs):
    source = GatedSource(LocalAdapterSource(adapter_dirs))
    source.gate.set()
    with TieredAdapterCache(runtime.pool, source, host_capacity=4) as cache:
        slot_a = wait_ready(cache, key("a"))
        source.gate.clear()
        source.fetching.clear()
        assert cache.try_acquire(key("b")) is None
        assert source.fetching.wait(WAIT_S)  # the loader thread is now blocked inside fetch
        # Meanwhile the engine keeps working: more polls return at once, "a" is served.
        assert cache.try_acquire(key("b")) is None
        assert cache.try_acquire(key("a")) == slot_a
        assert stats(cache)["device"].misses == 2  # one miss per scheduled load, not per poll
        source.gate.set()
        assert wait_ready(cache, key("b")) != slot_a


def test_lru_eviction_spares_the_recently_used(runtime, adapter_dirs):
    with TieredAdapterCache(runtime.pool, LocalAdapterSource(adapter_dirs), host_capacity=4) as cache:
        cache.load(key("a"), timeout=WAIT_S)
        cache.load(key("b"), timeout=WAIT_S)
        assert cache.try_acquire(key("a")) is not None  # a request uses "a": it is now the newest
        cache.release(key("a"))
        cache.load(key("c"), timeout=WAIT_S)
        assert tiers(cache) == {"a": "device", "b": "host", "c": "device"}
        assert stats(cache)["device"].evictions == 1
        # Back from host: a host hit, no new fetch.
        disk_misses = stats(cache)["disk"].misses
        cache.load(key("b"), timeout=WAIT_S)
        assert stats(cache)["host"].hits >= 1 and stats(cache)["disk"].misses == disk_misses


def test_in_use_and_pinned_adapters_are_never_evicted(runtime, adapter_dirs):
    with TieredAdapterCache(runtime.pool, LocalAdapterSource(adapter_dirs), host_capacity=4) as cache:
        slot_a = wait_ready(cache, key("a"))  # held by a "running request"
        assert cache.load(key("b"), pin=True, timeout=WAIT_S).pinned
        loaded = threading.Event()
        cache.add_listener(lambda k, e: loaded.set() if k == key("c") else None)
        with pytest.raises(AdapterLoadTimeout):
            cache.load(key("c"), timeout=0.5)  # no slot can be freed: the load waits
        assert tiers(cache)["a"] == "device" and tiers(cache)["b"] == "device"
        with pytest.raises(AdapterInUseError):
            cache.unload(key("a"))
        cache.release(key("a"))
        assert loaded.wait(WAIT_S)
        assert tiers(cache) == {"a": "host", "b": "device", "c": "device"}
        assert cache.try_acquire(key("c")) == slot_a
        cache.unpin(key("b"))
        cache.release(key("c"))
        cache.load(key("d"), timeout=WAIT_S)
        assert tiers(cache)["b"] == "host"  # unpinned and least recently used


class CountingSource(LocalAdapterSource):
    """Local folders, counting fetches: the disk tier is the folder a fetch returns, read in place."""

    def __init__(self, dirs):
        super().__init__(dirs)
        self.fetches = []

    def fetch(self, k):
        self.fetches.append(k.name)
        return super().fetch(k)


def test_host_tier_is_lru_and_disk_tier_is_reused(runtime, adapter_dirs):
    source = CountingSource(adapter_dirs)
    with TieredAdapterCache(runtime.pool, source, host_capacity=1) as cache:
        cache.load(key("a"), timeout=WAIT_S)
        cache.load(key("b"), timeout=WAIT_S)
        assert stats(cache)["host"].evictions == 1 and stats(cache)["host"].used == 1
        assert source.fetches == ["a", "b"] and stats(cache)["disk"].used == 2
        cache.load(key("c"), timeout=WAIT_S)  # evicts "a" from the device; "a" now only on disk
        assert tiers(cache)["a"] == "disk"
        disk = stats(cache)["disk"]
        cache.load(key("a"), timeout=WAIT_S)
        assert stats(cache)["disk"].hits == disk.hits + 1 and stats(cache)["disk"].misses == disk.misses
        assert source.fetches == ["a", "b", "c"]  # "a" was read again from its folder, not fetched


def test_corrupt_adapter_fails_once_and_leaves_the_cache_intact(runtime, adapter_dirs):
    with TieredAdapterCache(runtime.pool, LocalAdapterSource(adapter_dirs), host_capacity=4) as cache:
        slot_a = wait_ready(cache, key("a"))
        before = {name: t[slot_a].clone() for name, t in runtime.pool.a.items()}
        failed = threading.Event()
        cache.add_listener(lambda k, e: failed.set() if k == key("corrupt") and e is not None else None)
        assert cache.try_acquire(key("corrupt")) is None
        assert failed.wait(WAIT_S)
        error = cache.load_error(key("corrupt"))
        assert isinstance(error, AdapterRejectedError) and "safetensors" in str(error)
        misses = stats(cache)["device"].misses
        assert cache.try_acquire(key("corrupt")) is None
        assert stats(cache)["device"].misses == misses  # not retried on its own
        assert cache.try_acquire(key("a")) == slot_a
        assert all(torch.equal(before[name], t[slot_a]) for name, t in runtime.pool.a.items())
        assert tiers(cache)["a"] == "device" and tiers(cache).get("corrupt") == "disk"
        with pytest.raises(AdapterRejectedError, match="expected"):
            cache.load(key("wrong_shapes"), timeout=WAIT_S)
        with pytest.raises(AdapterNotFoundError):
            cache.load(key("nope"), timeout=WAIT_S)
        cache.clear_error(key("corrupt"))
        assert cache.try_acquire(key("corrupt")) is None
        assert stats(cache)["device"].misses == misses + 3  # wrong_shapes, nope, and the retry


def test_unload_frees_the_slot_and_base_key_is_refused(runtime, adapter_dirs):
    with TieredAdapterCache(runtime.pool, LocalAdapterSource(adapter_dirs), host_capacity=4) as cache:
        slot = wait_ready(cache, key("d"))
        cache.release(key("d"))
        assert cache.unload(key("d")) is True
        assert runtime.pool.slot_rank(slot) == 0 and tiers(cache) == {"d": "disk"}
        assert cache.unload(key("never-seen")) is False
        with pytest.raises(ValueError):
            cache.try_acquire(AdapterKey("", ""))
        with pytest.raises(ValueError):
            cache.release(key("d"))


def test_loads_into_other_slots_do_not_disturb_a_running_batch(tiny_llama, adapter_dirs):
    import copy

    model = copy.deepcopy(tiny_llama)
    runtime = install_multi_lora(model, device_slots=4, max_rank=16)
    with TieredAdapterCache(runtime.pool, LocalAdapterSource(adapter_dirs), host_capacity=0) as cache:
        rows = [[(wait_ready(cache, key("a")), 1.0)], [(wait_ready(cache, key("b")), 1.0)], []]
        input_ids = torch.randint(3, 320, (3, 4), generator=torch.Generator().manual_seed(1))
        runtime.set_batch_rows(rows)
        with torch.no_grad():
            reference = model(input_ids=input_ids).logits
        stop, diffs = threading.Event(), []

        def decode_loop():
            with torch.no_grad():
                while not stop.is_set() and len(diffs) < 200:
                    diffs.append((model(input_ids=input_ids).logits - reference).abs().max().item())

        engine = threading.Thread(target=decode_loop)
        engine.start()
        try:
            for name in ("c", "d"):
                cache.load(key(name), timeout=WAIT_S)
            cache.unload(key("c"))
            cache.load(key("c"), timeout=WAIT_S)
        finally:
            stop.set()
            engine.join(WAIT_S)
        assert diffs and max(diffs) == 0.0
        assert tiers(cache) == {"a": "device", "b": "device", "c": "device", "d": "device"}


def test_a_load_for_a_waiting_request_is_not_evicted_before_the_request_takes_it(runtime, adapter_dirs):
    """More distinct adapters waiting than slots: each fresh load must survive until its request
    is admitted, or the loads evict one another and nothing runs (seen at 128 adapters / 32 slots)."""
    with TieredAdapterCache(runtime.pool, LocalAdapterSource(adapter_dirs), host_capacity=4) as cache:
        wait_ready(cache, key("a"))  # both slots held by running requests
        wait_ready(cache, key("b"))
        done = {name: threading.Event() for name in ("c", "d")}
        cache.add_listener(lambda k, e: done[k.name].set() if k.name in done else None)
        assert cache.try_acquire(key("c")) is None  # two waiting requests schedule their loads
        assert cache.try_acquire(key("d")) is None
        cache.release(key("a"))  # a request ends: its slot goes to c
        assert done["c"].wait(WAIT_S)
        cache.release(key("b"))  # b, released after c loaded, is now the least recently used...
        assert done["d"].wait(WAIT_S)
        # ...so d takes b's slot; c, loaded but not yet taken by its request, stays.
        assert tiers(cache) == {"a": "host", "b": "host", "c": "device", "d": "device"}
        assert cache.try_acquire(key("c")) is not None and cache.try_acquire(key("d")) is not None
        assert stats(cache)["device"].evictions == 2


def adapter_sizes(runtime, adapter_dirs) -> dict[str, int]:
    with TieredAdapterCache(runtime.pool, LocalAdapterSource(adapter_dirs), host_capacity=8) as cache:
        for name in "abcd":
            cache.load(key(name), timeout=WAIT_S)
        return {info.adapter.name: info.size_bytes for info in cache.adapters()}


def host_held(cache) -> tuple[int, int]:
    host = stats(cache)["host"]
    return host.used, host.used_bytes


def test_host_tier_is_bounded_by_bytes_least_recently_used_first(runtime, adapter_dirs):
    sizes = adapter_sizes(runtime, adapter_dirs)
    assert len(set(sizes.values())) == 4  # ranks 4, 8, 12, 16: four different sizes
    bound = sizes["c"] + sizes["d"]  # room for the two largest, never for three
    with TieredAdapterCache(runtime.pool, LocalAdapterSource(adapter_dirs), host_capacity=8, host_bytes=bound) as cache:
        for name in "abcd":
            cache.load(key(name), timeout=WAIT_S)
            host = stats(cache)["host"]
            assert host.used_bytes <= bound and host.capacity_bytes == bound
        # a and b (least recently used) went; c and d (the newest) fill the bound exactly.
        assert stats(cache)["host"].used_bytes == sizes["c"] + sizes["d"]
        assert stats(cache)["host"].evictions == 2
        cache.load(key("a"), timeout=WAIT_S)  # back from disk; now c is the least recently used
        assert stats(cache)["host"].used_bytes == sizes["d"] + sizes["a"]
        # The count bound still holds on top of the byte bound.
    with TieredAdapterCache(runtime.pool, LocalAdapterSource(adapter_dirs), host_capacity=1, host_bytes=10**9) as cache:
        cache.load(key("a"), timeout=WAIT_S)
        cache.load(key("b"), timeout=WAIT_S)
        assert stats(cache)["host"].used == 1 and stats(cache)["host"].used_bytes == sizes["b"]


def test_host_byte_bound_never_evicts_a_serving_adapter(tiny_llama, runtime, adapter_dirs):
    import copy

    sizes = adapter_sizes(runtime, adapter_dirs)
    bound = sizes["a"] + sizes["b"]
    three_slots = install_multi_lora(copy.deepcopy(tiny_llama), device_slots=3, max_rank=16)
    with TieredAdapterCache(three_slots.pool, LocalAdapterSource(adapter_dirs), host_capacity=8, host_bytes=bound) as cache:
        cache.load(key("a"), pin=True, timeout=WAIT_S)  # pinned
        cache.load(key("b"), timeout=WAIT_S)
        assert cache.try_acquire(key("b")) is not None  # a running request holds it
        cache.load(key("c"), timeout=WAIT_S)
        # c pushed the tier over its bound; a and b are older but serving, so c's own copy went.
        assert host_held(cache) == (2, sizes["a"] + sizes["b"]) and stats(cache)["host"].evictions == 1
        cache.unpin(key("a"))
        cache.release(key("b"))
        cache.load(key("d"), timeout=WAIT_S)  # now idle, a and b go; d alone exceeds the bound
        assert sizes["d"] > bound and host_held(cache) == (0, 0) and stats(cache)["host"].evictions == 4
        assert tiers(cache)["b"] == "device"  # out of the host tier, still serving from its slot
