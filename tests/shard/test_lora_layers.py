"""Every row of a mixed multi-adapter batch must match PEFT running that row's adapter alone; a
row that mixes adapters must match PEFT's `add_weighted_adapter(..., combination_type="cat")`.

A row is given as None (base model), an adapter name, or a tuple of (name, weight) pairs (a mix)."""

import contextlib
import copy
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from loraplex.adapter_format import PROJECTIONS
from shard.lora import AdapterKey, install_multi_lora, read_peft_adapter
from shard.lora.batch_plan import plan_batch
from bench.synthetic_models import random_llama, random_llama_config, save_random_peft_adapter

ALL = PROJECTIONS

# name -> options for save_random_peft_adapter: ranks 4..64, different module subsets and options.
ADAPTERS = {
    "r4_qv": dict(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
    "r16_all": dict(rank=16, alpha=32, target_modules=ALL),
    "r64_mlp_rslora": dict(rank=64, alpha=16, target_modules=("gate_proj", "up_proj", "down_proj"), use_rslora=True),
    "r8_attn_patterns": dict(
        rank=8,
        alpha=16,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        rank_pattern={"k_proj": 32},
        alpha_pattern={"o_proj": 4},
    ),
    "r32_layer1_only": dict(rank=32, alpha=64, target_modules=("o_proj", "down_proj"), layers_to_transform=[1]),
    "r8_attn_up": dict(rank=8, alpha=24, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")),
}


@pytest.fixture(scope="module")
def tiny_llama():
    torch.set_num_threads(2)
    return random_llama(random_llama_config(), seed=0)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: save_random_peft_adapter(tiny_llama, root / name, seed=i + 1, **options)
        for i, (name, options) in enumerate(ADAPTERS.items())
    }


def peft_model_with(base_model, adapter_dirs, row_adapters):
    """A PeftModel holding every adapter, plus one PEFT "cat" combination per distinct mix row,
    named by `mix_name`."""
    names = list(adapter_dirs)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapter_dirs[name], adapter_name=name)
    for spec in dict.fromkeys(a for a in row_adapters if isinstance(a, tuple)):
        components, weights = zip(*spec)
        peft_model.add_weighted_adapter(list(components), list(weights), mix_name(spec), combination_type="cat")
    return peft_model.eval()


def mix_name(spec) -> str:
    return "mix_" + "_".join(f"{name}_{weight}".replace(".", "p") for name, weight in spec)


def activate(peft_model, adapter):
    """Context in which `peft_model` runs `adapter` (None = base, a name, or a mix tuple) alone."""
    if adapter is None:
        return peft_model.disable_adapter()
    peft_model.set_adapter(mix_name(adapter) if isinstance(adapter, tuple) else adapter)
    return contextlib.nullcontext()


def peft_reference_logits(base_model, adapter_dirs, row_adapters, input_ids):
    """Logits of each row run alone through PEFT with only its adapter (or combination) active."""
    peft_model = peft_model_with(base_model, adapter_dirs, row_adapters)
    rows = []
    with torch.no_grad():
        for row, adapter in enumerate(row_adapters):
            with activate(peft_model, adapter):
                rows.append(peft_model(input_ids=input_ids[row : row + 1]).logits)
    return torch.cat(rows)


def batch_rows(row_adapters, slot_of):
    """The runtime's (slot, weight) entries for each row spec."""
    rows = []
    for adapter in row_adapters:
        if adapter is None:
            rows.append([])
        elif isinstance(adapter, tuple):
            rows.append([(slot_of[name], weight) for name, weight in adapter])
        else:
            rows.append([(slot_of[adapter], 1.0)])
    return rows


def serve_mixed_batch(
    base_model, adapter_dirs, row_adapters, input_ids, *, max_rank=64, pool_dtype=None, decode_kernel="torch"
):
    model = copy.deepcopy(base_model)
    runtime = install_multi_lora(
        model,
        device_slots=len(adapter_dirs) + 1,
        max_rank=max_rank,
        pool_dtype=pool_dtype,
        decode_kernel=decode_kernel,
    )
    if decode_kernel == "auto" and shutil.which("c++"):
        assert runtime.uses_decode_kernel, "a C++ compiler is present but the CPU decode kernel did not build"
    slot_of = {}
    for slot, (name, folder) in enumerate(adapter_dirs.items()):
        adapter = read_peft_adapter(
            folder, AdapterKey(name, "local"), runtime.module_shapes, max_rank=max_rank, dtype=runtime.pool.dtype
        )
        runtime.pool.write(slot, adapter)
        slot_of[name] = slot
    runtime.set_batch_rows(batch_rows(row_adapters, slot_of))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    runtime.clear_batch_slots()
    return logits, model, runtime


def test_mixed_batch_matches_peft_per_adapter_fp32(tiny_llama, adapter_dirs):
    row_adapters = ["r4_qv", None, "r16_all", "r64_mlp_rslora", "r8_attn_patterns", "r32_layer1_only", "r16_all", None]
    input_ids = torch.randint(3, 320, (len(row_adapters), 12), generator=torch.Generator().manual_seed(7))
    expected = peft_reference_logits(tiny_llama, adapter_dirs, row_adapters, input_ids)
    got, _, _ = serve_mixed_batch(tiny_llama, adapter_dirs, row_adapters, input_ids)
    for row, adapter in enumerate(row_adapters):
        diff = (got[row] - expected[row]).abs().max().item()
        assert diff <= 1e-4, f"row {row} ({adapter}): max abs logit diff {diff}"
    # The adapters really change the output, so the comparison above is not vacuous.
    with torch.no_grad():
        base = tiny_llama(input_ids=input_ids).logits
    for row, adapter in enumerate(row_adapters):
        changed = (got[row] - base[row]).abs().max().item()
        assert (changed > 1e-3) == (adapter is not None), f"row {row} ({adapter}) changed by {changed}"


@pytest.mark.parametrize("decode_kernel", ["auto", "torch"])
def test_single_token_decode_rows_match_peft(tiny_llama, adapter_dirs, decode_kernel):
    row_adapters = ["r64_mlp_rslora", "r4_qv", None, "r8_attn_patterns", "r32_layer1_only", "r16_all", "r4_qv"]
    input_ids = torch.randint(3, 320, (len(row_adapters), 1), generator=torch.Generator().manual_seed(8))
    expected = peft_reference_logits(tiny_llama, adapter_dirs, row_adapters, input_ids)
    got, _, _ = serve_mixed_batch(tiny_llama, adapter_dirs, row_adapters, input_ids, decode_kernel=decode_kernel)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "row_adapters",
    [
        ["r16_all"] * 5,  # every row, one adapter: factors used in place, no gather
        ["r16_all", None, "r16_all", None],  # some rows: gathered rows, scattered back
        [(("r16_all", 0.5),), (("r16_all", -1.5),), "r16_all"],  # one adapter at several weights
    ],
)
def test_rows_that_share_one_adapter_match_peft(tiny_llama, adapter_dirs, row_adapters):
    input_ids = torch.randint(3, 320, (len(row_adapters), 9), generator=torch.Generator().manual_seed(11))
    expected = peft_reference_logits(tiny_llama, adapter_dirs, row_adapters, input_ids)
    got, _, runtime = serve_mixed_batch(tiny_llama, adapter_dirs, row_adapters, input_ids)
    assert (got - expected).abs().max().item() <= 1e-4
    slot_of = {name: i for i, name in enumerate(adapter_dirs)}
    plan = plan_batch(runtime.pool, batch_rows(row_adapters, slot_of))
    assert [g.slot for g in plan.groups] == [slot_of["r16_all"]]


# Mixes next to plain and base rows: K=2 in different rank buckets; K=2 in one bucket (a row
# appears twice in one group); K=3 with a negative weight and an rslora component; a single adapter
# scaled by a weight; a mix whose components cover different layers.
MIX_ROWS = [
    (("r4_qv", 0.7), ("r16_all", 0.3)),
    "r16_all",
    None,
    (("r4_qv", 0.5), ("r8_attn_up", -1.25)),
    (("r8_attn_patterns", 0.6), ("r64_mlp_rslora", -0.4), ("r16_all", 1.1)),
    (("r16_all", 2.0),),
    (("r16_all", 0.8), ("r32_layer1_only", 0.5)),
    "r4_qv",
]


@pytest.mark.parametrize("tokens, decode_kernel", [(7, "torch"), (1, "torch"), (1, "auto")])
def test_mix_rows_match_peft_cat_combination(tiny_llama, adapter_dirs, tokens, decode_kernel):
    input_ids = torch.randint(3, 320, (len(MIX_ROWS), tokens), generator=torch.Generator().manual_seed(12))
    expected = peft_reference_logits(tiny_llama, adapter_dirs, MIX_ROWS, input_ids)
    got, _, _ = serve_mixed_batch(tiny_llama, adapter_dirs, MIX_ROWS, input_ids, decode_kernel=decode_kernel)
    for row, adapter in enumerate(MIX_ROWS):
        diff = (got[row] - expected[row]).abs().max().item()
        assert diff <= 1e-4, f"row {row} ({adapter}): max abs logit diff {diff}"
    # A mix is neither of its components: each mix row differs from every component served alone.
    singles, _, _ = serve_mixed_batch(
        tiny_llama, adapter_dirs, [name for name, _ in MIX_ROWS[0]], input_ids[:1].repeat(2, 1), decode_kernel=decode_kernel
    )
    assert all((got[0] - single).abs().max().item() > 1e-3 for single in singles)


def test_mix_rows_with_bf16_activations_and_pool_are_close(tiny_llama, adapter_dirs):
    """The kernel sums a row's entries in fp32 and rounds the bf16 output once."""
    input_ids = torch.randint(3, 320, (len(MIX_ROWS), 1), generator=torch.Generator().manual_seed(13))
    expected = peft_reference_logits(tiny_llama, adapter_dirs, MIX_ROWS, input_ids)
    bf16_llama = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    by_path = [
        serve_mixed_batch(bf16_llama, adapter_dirs, MIX_ROWS, input_ids, decode_kernel=kernel)[0]
        for kernel in ("auto", "torch")
    ]
    for got in by_path:
        assert got.dtype == torch.bfloat16
        assert (got.float() - expected).abs().max().item() <= 0.1


def greedy_tokens(model, prompt, steps):
    from transformers import DynamicCache

    cache, ids, generated = DynamicCache(), prompt, []
    with torch.no_grad():
        for _ in range(steps):
            next_ids = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            generated.append(next_ids)
            ids = next_ids
    return torch.cat(generated, dim=1)


@pytest.mark.parametrize("decode_kernel", ["auto", "torch"])
def test_decode_with_kv_cache_matches_peft_generate(tiny_llama, adapter_dirs, decode_kernel):
    """Prefill then token-by-token decode through a KV cache: greedy tokens equal PEFT's per
    adapter, per base row and per mix (PEFT's "cat" combination)."""
    row_adapters = ["r16_all", None, "r8_attn_patterns", MIX_ROWS[0], MIX_ROWS[4]]
    prompt = torch.randint(3, 320, (len(row_adapters), 6), generator=torch.Generator().manual_seed(11))
    _, model, runtime = serve_mixed_batch(
        tiny_llama, adapter_dirs, [None], torch.zeros(1, 1, dtype=torch.long), decode_kernel=decode_kernel
    )
    runtime.set_batch_rows(batch_rows(row_adapters, {name: i for i, name in enumerate(adapter_dirs)}))
    ours = greedy_tokens(model, prompt, 5)

    peft_model = peft_model_with(tiny_llama, adapter_dirs, row_adapters)
    for row, adapter in enumerate(row_adapters):
        with torch.no_grad(), activate(peft_model, adapter):
            reference = peft_model.generate(input_ids=prompt[row : row + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert ours[row].tolist() == reference[0, prompt.shape[1] :].tolist(), f"row {row} ({adapter})"


def test_base_only_batch_equals_base_model(tiny_llama, adapter_dirs):
    input_ids = torch.randint(3, 320, (3, 5), generator=torch.Generator().manual_seed(9))
    got, _, _ = serve_mixed_batch(tiny_llama, adapter_dirs, [None, None, None], input_ids)
    with torch.no_grad():
        expected = tiny_llama(input_ids=input_ids).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("tokens, decode_kernel", [(6, "torch"), (1, "auto")])
def test_bf16_pool_over_fp32_base_is_close(tiny_llama, adapter_dirs, tokens, decode_kernel):
    row_adapters = ["r16_all", None, "r64_mlp_rslora"]
    input_ids = torch.randint(3, 320, (3, tokens), generator=torch.Generator().manual_seed(10))
    expected = peft_reference_logits(tiny_llama, adapter_dirs, row_adapters, input_ids)
    got, _, runtime = serve_mixed_batch(
        tiny_llama, adapter_dirs, row_adapters, input_ids, pool_dtype=torch.bfloat16, decode_kernel=decode_kernel
    )
    assert runtime.pool.dtype == torch.bfloat16 and got.dtype == torch.float32
    # bf16 keeps ~3 significant digits of each adapter factor; logits here are O(1).
    assert (got - expected).abs().max().item() <= 2e-2


def test_groups_compute_at_the_ranks_present_not_max_rank(tiny_llama, adapter_dirs):
    _, _, runtime = serve_mixed_batch(tiny_llama, adapter_dirs, [None], torch.zeros(1, 1, dtype=torch.long))
    slot = {name: i for i, name in enumerate(adapter_dirs)}
    plan = plan_batch(runtime.pool, [[(slot["r16_all"], 1.0)], [(slot["r16_all"], 1.0)]])
    assert [(g.rank, g.rows, g.weights, g.slot) for g in plan.groups] == [(16, None, None, slot["r16_all"])]
    plan = plan_batch(
        runtime.pool, [[(slot["r4_qv"], 1.0)], [], [(slot["r64_mlp_rslora"], 1.0)], [(slot["r8_attn_patterns"], 1.0)]]
    )
    assert [g.rank for g in plan.groups] == [4, 32, 64]  # buckets 8, 32 (rank_pattern k_proj=32), 64
    assert [g.rows.tolist() for g in plan.groups] == [[0], [3], [2]]
    assert all(g.weights is None for g in plan.groups)
    assert "model.layers.0.self_attn.q_proj" in plan.groups[0].modules
    assert "model.layers.0.mlp.up_proj" not in plan.groups[0].modules
    # Every index of the step is a view of one tensor: one host->device copy per step.
    storages = {t.untyped_storage().data_ptr() for g in plan.groups for t in (g.row_index, g.slots)}
    assert len(storages) == 1
    assert [g.slots.tolist() for g in plan.groups] == [[slot["r4_qv"]], [slot["r8_attn_patterns"]], [slot["r64_mlp_rslora"]]]
    # Two adapters in one bucket: no single slot, the batched path gathers per row.
    plan = plan_batch(runtime.pool, [[(slot["r4_qv"], 1.0)], [(slot["r8_attn_up"], 1.0)]])
    assert [(g.rank, g.slot) for g in plan.groups] == [(8, None)]


def test_mix_entries_are_grouped_by_bucket_with_their_weights(tiny_llama, adapter_dirs):
    _, _, runtime = serve_mixed_batch(tiny_llama, adapter_dirs, [None], torch.zeros(1, 1, dtype=torch.long))
    slot = {name: i for i, name in enumerate(adapter_dirs)}
    plan = plan_batch(
        runtime.pool,
        [
            [(slot["r8_attn_up"], 0.25), (slot["r16_all"], -1.0), (slot["r4_qv"], 0.5)],
            [(slot["r4_qv"], 1.0)],
            [(slot["r16_all"], 0.0)],  # a zero weight adds nothing and is dropped
        ],
    )
    assert [g.rank for g in plan.groups] == [8, 16]
    assert [g.row_index.tolist() for g in plan.groups] == [[0, 0, 1], [0]]
    assert [g.slots.tolist() for g in plan.groups] == [[slot["r8_attn_up"], slot["r4_qv"], slot["r4_qv"]], [slot["r16_all"]]]
    assert [g.weights.tolist() for g in plan.groups] == [[0.25, 0.5, 1.0], [-1.0]]
    assert all(g.rows is not None for g in plan.groups)
    storages = {t.untyped_storage().data_ptr() for g in plan.groups for t in (g.row_index, g.slots, g.weights)}
    assert len(storages) == 1
    # Every row once, in order, but one weight is not 1: no gather, but scaled.
    plan = plan_batch(runtime.pool, [[(slot["r16_all"], -1.0)], [(slot["r16_all"], 1.0)]])
    assert plan.groups[0].rows is None and plan.groups[0].weights.tolist() == [-1.0, 1.0]


def test_bad_rows_are_refused(tiny_llama, adapter_dirs):
    _, _, runtime = serve_mixed_batch(tiny_llama, adapter_dirs, [None], torch.zeros(1, 1, dtype=torch.long))
    empty_slot = runtime.pool.num_slots - 1
    with pytest.raises(ValueError, match="holds no adapter"):
        runtime.set_batch_rows([[(empty_slot, 1.0)]])
    with pytest.raises(ValueError, match="outside"):
        runtime.set_batch_rows([[(runtime.pool.num_slots, 1.0)]])
    with pytest.raises(ValueError, match="outside"):
        runtime.set_batch_rows([[(-1, 1.0)]])
    with pytest.raises(ValueError, match="sequence of"):
        runtime.set_batch_rows([0])
    with pytest.raises(ValueError, match="pair"):
        runtime.set_batch_rows([[0]])
    with pytest.raises(ValueError, match="ints"):
        runtime.set_batch_rows([[(0.0, 1.0)]])
    for weight in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="finite"):
            runtime.set_batch_rows([[(0, weight)]])


@pytest.mark.parametrize("in_f, out_f", [(96, 160), (100, 70)])  # 100/70: rows that end off the vector width
def test_the_bf16_kernel_adds_each_rows_entries_like_fp32_math(in_f, out_f):
    """bf16 activations over bf16 pools take the kernel's own bf16 loop; its sums are fp32 and the
    output is rounded once, so it stays within one bf16 rounding of the fp32 computation."""
    from shard.lora.cpu_kernel import load_cpu_kernel

    kernel = load_cpu_kernel()
    if kernel is None:
        pytest.skip("the C++ LoRA kernel could not be built here")
    g = torch.Generator().manual_seed(5)
    slots, pool_rank, rank = 4, 16, 12
    a = (torch.randn(slots, pool_rank, in_f, generator=g) * 0.1).to(torch.bfloat16)
    bt = (torch.randn(slots, pool_rank, out_f, generator=g) * 0.1).to(torch.bfloat16)
    x = torch.randn(3, 2, in_f, generator=g).to(torch.bfloat16)
    out = torch.randn(3, 2, out_f, generator=g).to(torch.bfloat16)
    rows, entry_slots = torch.tensor([0, 0, 2]), torch.tensor([3, 1, 1])  # row 0 mixes two adapters
    weights = torch.tensor([0.5, -1.5, 1.0])
    want = out.float().clone()
    for row, slot, w in zip(rows.tolist(), entry_slots.tolist(), weights.tolist()):
        hidden = x[row].float() @ a[slot, :rank].float().T * w
        want[row] += hidden @ bt[slot, :rank].float()
    got = out.clone()
    kernel.lora_delta_add_(got, x, a, bt, rows, entry_slots, weights, rank)
    assert torch.equal(got[1], out[1])  # a row without entries is left alone
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-2)
