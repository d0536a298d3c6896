"""Adapter mixes in the engine: an ad-hoc mix (`AdapterMix`) and a registered mix version (a folder
holding a mix manifest) run in the same batch as plain and base rows, each with the greedy tokens of
PEFT's "cat" combination; components are held while a mix row runs; bad mixes fail their request."""

import shutil
import time

import pytest
import torch

from loraplex.adapter_mix import MixComponent, write_manifest
from shard.engine import Engine, FinishReason, GenerationRequest, SamplingOptions
from shard.lora import AdapterInUseError, AdapterKey, AdapterMix, AdapterRejectedError, LocalAdapterSource, LoraManager
from tests.support.shard_models import tiny_llama_config
from bench.synthetic_models import byte_tokenizer, random_llama

torch.set_num_threads(1)

BLEND = (("alpha", 0.7), ("beta", -0.4))  # the registered mix "blend" v1
SPICE = (("gamma", 1.5), ("alpha", 0.25))  # asked for ad hoc


def peft_cat_reference(adapter_dirs, components, prompt_ids, max_new_tokens):
    """Greedy tokens of PEFT's add_weighted_adapter(..., "cat") over `components` (None = base)."""
    from peft import PeftModel

    model = random_llama(tiny_llama_config(), seed=0)
    if components is not None:
        names = [name for name, _ in components]
        model = PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapter_dirs[name], adapter_name=name)
        model.add_weighted_adapter(names, [w for _, w in components], "combined", combination_type="cat")
        model.set_adapter("combined")
        model.eval()
    out = model.generate(
        input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture
def pinned_dirs(tiny_adapter_dirs, tmp_path):
    """The tiny adapters as version "1" (a registry-style pin) plus the mix "blend" v1 and a mix
    "nested" v1 that names "blend"."""
    dirs = {}
    for name, folder in tiny_adapter_dirs.items():
        dirs[name] = shutil.copytree(folder, tmp_path / name / "1")
    write_manifest(tmp_path / "blend" / "1", [MixComponent(n, "1", w) for n, w in BLEND], "fp", 4)
    write_manifest(tmp_path / "nested" / "1", [MixComponent("blend", "1", 1.0), MixComponent("gamma", "1", 1.0)], "fp", 4)
    dirs["blend"] = tmp_path / "blend" / "1"
    dirs["nested"] = tmp_path / "nested" / "1"
    return dirs


@pytest.fixture
def mix_engine(pinned_dirs):
    model = random_llama(tiny_llama_config(), seed=0)
    # Three slots for three adapters and two mixes over them: a mix waits for all its components.
    lora = LoraManager.install(model, LocalAdapterSource(pinned_dirs), device_slots=3, max_rank=16, host_capacity=3)
    engine = Engine(model, byte_tokenizer(), max_batch_size=4, max_queue=16, max_context=96, prefill_chunk_tokens=16, lora=lora)
    engine.eos_ids = set()
    yield engine, lora
    engine.stop(timeout=10)
    lora.close()


def key(name):
    return AdapterKey(name, "1")


def prompt(seed, length):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (length,), generator=g).tolist()


def test_mix_rows_in_one_batch_with_plain_and_base_rows_match_peft(mix_engine, tiny_adapter_dirs):
    engine, lora = mix_engine
    spice = AdapterMix(tuple((key(n), w) for n, w in SPICE))
    specs = [  # (what the request asks for, its PEFT reference components)
        (key("blend"), BLEND),
        (spice, SPICE),
        (key("beta"), (("beta", 1.0),)),
        (None, None),
    ]
    handles = [
        engine.submit(GenerationRequest(str(i), prompt_ids=prompt(i, 5 + i), adapter=asked, sampling=SamplingOptions(max_tokens=6)))
        for i, (asked, _) in enumerate(specs)
    ]
    engine.start()
    outputs = [list(h) for h in handles]
    for i, ((asked, components), chunks) in enumerate(zip(specs, outputs)):
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == peft_cat_reference(tiny_adapter_dirs, components, prompt(i, 5 + i), 6), f"request {i} ({asked})"
        assert chunks[0].adapter == asked
        assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert len({tuple(t for c in chunks for t in c.token_ids) for chunks in outputs}) == len(specs)
    assert all(info.active_requests == 0 for info in lora.adapters())


def test_a_running_mix_holds_its_components(mix_engine):
    engine, lora = mix_engine
    handle = engine.submit(GenerationRequest("m", prompt_ids=prompt(9, 4), adapter=key("blend"), sampling=SamplingOptions(max_tokens=40)))
    deadline = time.monotonic() + 60
    while not engine.scheduler.decoding:
        assert time.monotonic() < deadline, "the mix request never started decoding"
        engine.run_once()
        time.sleep(0.005)  # only waiting for background adapter loads
    held = {info.adapter: info.active_requests for info in lora.adapters()}
    assert held[key("alpha")] == 1 and held[key("beta")] == 1
    with pytest.raises(AdapterInUseError):
        lora.unload(key("alpha"))  # a component is not evicted or unloaded under a running mix row
    handle.cancel()
    engine.run_once()
    assert all(info.active_requests == 0 for info in lora.adapters())


def test_a_nested_mix_fails_its_request_only(mix_engine):
    engine, _ = mix_engine
    engine.start()
    nested = engine.submit(GenerationRequest("n", prompt_ids=[5, 6], adapter=key("nested")))
    good = engine.submit(GenerationRequest("g", prompt_ids=[5, 6], adapter=key("blend"), sampling=SamplingOptions(max_tokens=3)))
    with pytest.raises(AdapterRejectedError, match="do not nest"):
        list(nested)
    assert list(good)[-1].finish_reason is FinishReason.LENGTH


def test_a_mix_over_an_unloadable_component_fails_with_its_reason(mix_engine):
    engine, _ = mix_engine
    engine.start()
    bad = engine.submit(GenerationRequest(
        "b", prompt_ids=[5, 6], adapter=AdapterMix(((key("alpha"), 0.5), (AdapterKey("nope", "1"), 0.5)))
    ))
    with pytest.raises(AdapterRejectedError, match="nope"):
        list(bad)


def test_admin_load_of_a_registered_mix_loads_its_components(mix_engine):
    _, lora = mix_engine
    lora.load(key("blend"))
    tiers = {info.adapter: info.tier for info in lora.adapters()}
    assert tiers[key("alpha")] == "device" and tiers[key("beta")] == "device"
