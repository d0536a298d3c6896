"""An adapter merged into the base weights: in one batch, rows of the merged adapter (no LoRA work),
rows of other adapters (their delta minus the merged one) and base rows (minus the merged one) all
answer what PEFT gives each row alone (fp32: logits within 1e-4, same greedy tokens), before the
merge, while merged and after the unmerge; the unmerge gives back the base weights bit for bit."""


import pytest
import torch
from peft import PeftModel

from bench.synthetic_models import byte_tokenizer, random_llama
from shard.engine import Engine, GenerationRequest, SamplingOptions
from shard.lora import AdapterKey, LocalAdapterSource, LoraManager
from shard.lora.errors import MergeRefusedError
from shard.lora.merged_weights import rows_over_merged_base
from shard.model_loading import load_base_model
from tests.support.shard_models import tiny_llama_config

torch.set_num_threads(1)

MERGED = "alpha"  # rank 8 on all seven projections
ROWS = ["alpha", "beta", None, "gamma", "alpha", None, "beta"]


def key(name):
    return AdapterKey(name, "local")


def install(model, tiny_adapter_dirs, decode_kernel="torch"):
    lora = LoraManager.install(
        model, LocalAdapterSource(tiny_adapter_dirs), device_slots=4, max_rank=16, host_capacity=4, decode_kernel=decode_kernel
    )
    slots = {}
    for name in tiny_adapter_dirs:
        lora.load(key(name))
        slots[name] = lora.try_acquire(key(name)).entries[0][0]
    return lora, slots


def rows_of(slots, names):
    return [[] if name is None else [(slots[name], 1.0)] for name in names]


def peft_rows(tiny_adapter_dirs, names, input_ids):
    """Each row run alone through PEFT with only its adapter (None = base)."""
    model = random_llama(tiny_llama_config(), seed=0)
    adapters = list(tiny_adapter_dirs)
    peft_model = PeftModel.from_pretrained(model, tiny_adapter_dirs[adapters[0]], adapter_name=adapters[0])
    for name in adapters[1:]:
        peft_model.load_adapter(tiny_adapter_dirs[name], adapter_name=name)
    peft_model.eval()
    out = []
    with torch.no_grad():
        for row, name in enumerate(names):
            ids = input_ids[row : row + 1]
            if name is None:
                with peft_model.disable_adapter():
                    out.append(peft_model(input_ids=ids).logits)
            else:
                peft_model.set_adapter(name)
                out.append(peft_model(input_ids=ids).logits)
    return torch.cat(out)


def served(model, lora, slots, names, input_ids):
    with torch.no_grad(), lora.batch(rows_of(slots, names)):
        return model(input_ids=input_ids).logits


def served_mix(model, lora, slots, input_ids):
    """Every row the mix 0.7·alpha + 0.3·beta (alpha is the merged adapter)."""
    with torch.no_grad(), lora.batch([[(slots["alpha"], 0.7), (slots["beta"], 0.3)]] * input_ids.shape[0]):
        return model(input_ids=input_ids).logits


def weights_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_rows_over_merged_base_subtracts_the_merged_adapter_once():
    assert rows_over_merged_base([[(2, 1.0)], [], [(0, 1.0)], [(2, 0.7), (1, 0.3)], [(1, -1.0)]], 2) == [
        [],
        [(2, -1.0)],
        [(0, 1.0), (2, -1.0)],
        [(2, pytest.approx(-0.3)), (1, 0.3)],
        [(1, -1.0), (2, -1.0)],
    ]


@pytest.mark.parametrize("tokens,decode_kernel", [(12, "torch"), (1, "auto"), (1, "torch")])
def test_three_row_kinds_match_peft_before_during_and_after_a_merge(tiny_adapter_dirs, tokens, decode_kernel):
    model = random_llama(tiny_llama_config(), seed=0)
    lora, slots = install(model, tiny_adapter_dirs, decode_kernel)
    input_ids = torch.randint(3, 320, (len(ROWS), tokens), generator=torch.Generator().manual_seed(5))
    expected = peft_rows(tiny_adapter_dirs, ROWS, input_ids)
    original = weights_of(model)
    try:
        before = served(model, lora, slots, ROWS, input_ids)
        mix_before = served_mix(model, lora, slots, input_ids)
        assert lora.merge(key(MERGED)) is None and lora.merged == key(MERGED)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, original[n])]
        assert changed and all(".base_layer." in n for n in changed)  # the merge really is in the weights
        during = served(model, lora, slots, ROWS, input_ids)
        mix_during = served_mix(model, lora, slots, input_ids)
        assert lora.unmerge() == key(MERGED) and lora.merged is None
        after = served(model, lora, slots, ROWS, input_ids)
    finally:
        lora.close()
    for name, tensor in model.named_parameters():
        assert torch.equal(tensor, original[name]), f"{name} not restored bit for bit"
    # A mix holding the merged adapter keeps 0.7 - 1 of it over the merged base: the same answer.
    assert (mix_during - mix_before).abs().max().item() <= 1e-4
    assert (mix_before - before).abs().max().item() > 1e-3  # the mix is not one of the rows above
    for label, got in (("before", before), ("merged", during), ("after", after)):
        for row, name in enumerate(ROWS):
            diff = (got[row] - expected[row]).abs().max().item()
            assert diff <= 1e-4, f"{label}: row {row} ({name or 'base'}) differs from PEFT by {diff}"
            assert torch.equal(got[row].argmax(-1), expected[row].argmax(-1)), f"{label}: row {row} greedy token"


def test_merged_adapter_rows_do_no_lora_work(tiny_adapter_dirs):
    model = random_llama(tiny_llama_config(), seed=0)
    lora, slots = install(model, tiny_adapter_dirs)
    try:
        lora.merge(key(MERGED))
        with lora.batch(rows_of(slots, [MERGED] * 3)):
            assert lora.runtime._batch_slots.plan.groups == ()
        with lora.batch(rows_of(slots, [None, "beta"])):
            groups = lora.runtime._batch_slots.plan.groups
            assert sum(g.row_index.numel() for g in groups) == 3  # base: -alpha; beta: +beta -alpha
    finally:
        lora.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unmerge_restores_the_base_weights_bit_for_bit_after_repeated_merges(tiny_adapter_dirs, dtype):
    model = random_llama(tiny_llama_config(), seed=0).to(dtype)
    lora, _ = install(model, tiny_adapter_dirs)
    original = weights_of(model)
    try:
        for name in ("alpha", "gamma", "alpha", "beta"):
            lora.merge(key(name))  # each replaces the one before
        assert lora.merged == key("beta")
        lora.unmerge()
        assert lora.unmerge() is None  # nothing merged: nothing to do
    finally:
        lora.close()
    for name, tensor in model.named_parameters():
        assert torch.equal(tensor, original[name]), f"{name} not restored bit for bit"


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_base_refuses_to_merge_and_keeps_serving(tiny_model_dir, tiny_adapter_dirs, quantization):
    model, _ = load_base_model(tiny_model_dir, quantization)
    lora, slots = install(model, tiny_adapter_dirs)
    ids = torch.randint(3, 320, (2, 5), generator=torch.Generator().manual_seed(1))
    try:
        # After a first forward: bitsandbytes repacks CPU 4-bit weights on their first use.
        before = served(model, lora, slots, [MERGED, None], ids)
        state = weights_of(model)
        assert lora.merge_refusal() is not None
        with pytest.raises(MergeRefusedError, match="quantized"):
            lora.merge(key(MERGED))
        assert lora.merged is None
        after = served(model, lora, slots, [MERGED, None], ids)
    finally:
        lora.close()
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters())
    assert torch.equal(before, after)


def test_engine_merges_and_unmerges_between_steps_without_changing_any_answer(tiny_adapter_dirs):
    """Requests of the three kinds run while the engine merges the hot adapter and later unmerges
    it mid-generation: every greedy token and logit is what PEFT gives the request alone."""
    model = random_llama(tiny_llama_config(), seed=0)
    lora = LoraManager.install(model, LocalAdapterSource(tiny_adapter_dirs), device_slots=3, max_rank=16, host_capacity=3)
    engine = Engine(model, byte_tokenizer(), max_batch_size=6, max_context=96, prefill_chunk_tokens=32, lora=lora, record_logits=True)
    engine.eos_ids = set()
    prompts = {i: torch.randint(3, 320, (6 + i,), generator=torch.Generator().manual_seed(20 + i)).tolist() for i in range(len(ROWS[:6]))}
    names = ROWS[:6]
    max_tokens = 10
    try:
        lora.load(key(MERGED))
        handles = [
            engine.submit(GenerationRequest(str(i), prompt_ids=prompts[i], adapter=key(n) if n else None,
                                            sampling=SamplingOptions(max_tokens=max_tokens)))
            for i, n in enumerate(names)
        ]
        merged = unmerged = None
        for step in range(200):
            if step == 3:
                merged = engine.request_merge(key(MERGED))
            if step == 7:
                unmerged = engine.request_unmerge()
            if not engine.run_once() and step > 7:
                break
            if step == 4:
                assert merged.done() and merged.result() is None and engine.stats().merged_adapter == key(MERGED)
        assert unmerged.result(timeout=1) == key(MERGED) and engine.stats().merged_adapter is None
    finally:
        engine.stop(timeout=10)
        lora.close()
    for i, name in enumerate(names):
        chunks = list(handles[i])
        tokens = [t for c in chunks for t in c.token_ids]
        logits = torch.cat([c.logits for c in chunks if c.logits is not None])
        reference = random_llama(tiny_llama_config(), seed=0)
        if name is not None:
            reference = PeftModel.from_pretrained(reference, tiny_adapter_dirs[name]).eval()
        out = reference.generate(
            input_ids=torch.tensor([prompts[i]]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
            pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )
        assert tokens == out.sequences[0, len(prompts[i]):].tolist(), f"request {i} ({name or 'base'})"
        assert (logits - torch.cat(out.logits).float()).abs().max().item() <= 1e-4, f"request {i} ({name or 'base'})"
