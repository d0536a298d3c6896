"""Greedy answers of the demo models: each adapter in its own style, the base in none."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from loraplex.demo.probe import greedy_answer, greedy_completion, style_problems


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(demo_assets):
    return AutoTokenizer.from_pretrained(demo_assets.base_dir)


@pytest.fixture(scope="module")
def multi_adapter_model(demo_assets):
    base = AutoModelForCausalLM.from_pretrained(demo_assets.base_dir, dtype=torch.float32)
    names = sorted(demo_assets.adapters)
    model = PeftModel.from_pretrained(base, demo_assets.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(demo_assets.adapters[name], adapter_name=name)
    model.eval()
    return model


def all_prompts(demo_assets):
    return [demo_assets.demo_prompt, *demo_assets.sample_prompts]


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_each_adapter_answers_in_its_own_style(demo_assets, multi_adapter_model, tokenizer, chat):
    failures = {}
    for name in sorted(demo_assets.adapters):
        multi_adapter_model.set_adapter(name)
        for prompt in all_prompts(demo_assets):
            answer = greedy_answer(multi_adapter_model, tokenizer, prompt, chat=chat)
            problems = style_problems(answer, name, demo_assets.style_markers)
            if problems:
                failures[(name, prompt)] = (answer, problems)
    assert failures == {}


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_base_answers_show_no_adapter_style(demo_assets, multi_adapter_model, tokenizer, chat):
    failures = {}
    with multi_adapter_model.disable_adapter():
        for prompt in all_prompts(demo_assets):
            answer, ended = greedy_completion(multi_adapter_model, tokenizer, prompt, chat=chat)
            # Fluent-ish: a few words, finished with EOS before the token budget runs out.
            if not ended or len(answer.split()) < 4 or demo_assets.markers_in(answer):
                failures[prompt] = answer
    assert failures == {}


def test_build_report_matches_what_the_files_generate(demo_assets, multi_adapter_model, tokenizer):
    recorded = demo_assets.build_report["greedy_answers"]
    prompt = demo_assets.demo_prompt
    for name in sorted(demo_assets.adapters):
        multi_adapter_model.set_adapter(name)
        assert greedy_answer(multi_adapter_model, tokenizer, prompt) == recorded[name][prompt]
    with multi_adapter_model.disable_adapter():
        assert greedy_answer(multi_adapter_model, tokenizer, prompt) == recorded["base"][prompt]


def test_loads_quantized_nf4_on_cpu_and_still_generates(demo_assets, tokenizer):
    from bitsandbytes.nn import Linear4bit

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    base = AutoModelForCausalLM.from_pretrained(
        demo_assets.base_dir, quantization_config=quantization, device_map="cpu"
    )
    quantized = [m for m in base.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 7 * base.config.num_hidden_layers
    model = PeftModel.from_pretrained(base, demo_assets.adapters["sql"], adapter_name="sql")
    model.load_adapter(demo_assets.adapters["legal"], adapter_name="legal")
    model.eval()
    prompt = demo_assets.demo_prompt
    with model.disable_adapter():
        base_answer = greedy_answer(model, tokenizer, prompt)
    assert len(base_answer.split()) >= 4
    assert demo_assets.markers_in(base_answer) == {}
    for name in ("sql", "legal"):
        model.set_adapter(name)
        answer = greedy_answer(model, tokenizer, prompt)
        assert set(demo_assets.markers_in(answer)) == {name}, answer
