"""Build the demo assets into a folder: tokenizer, base model, adapters, manifest.

Layout of the folder:
    base/                 Hugging Face model folder (config.json, model.safetensors, tokenizer)
    adapters/<name>/      PEFT adapter folders (adapter_config.json, adapter_model.safetensors)
    demo_assets.json      manifest read back by `ensure_demo_assets`

The build runs on CPU in fp32 whatever hardware is present, so the same seed gives the same
assets everywhere it can; the files load on any device afterwards.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from loraplex.demo import corpus
from loraplex.demo.assets import DemoAssets, write_manifest
from loraplex.demo.config import AdapterRecipe, DemoBuildConfig
from loraplex.demo.probe import greedy_answer, style_problems
from loraplex.demo.tokenizer import train_tokenizer
from loraplex.demo.training import encode_examples, train_causal_lm

BASE_MODEL_NAME = "loraplex-demo-base"


class DemoBuildFailed(RuntimeError):
    """The trained models do not behave as the demo promises (the build is not cached)."""


@contextmanager
def _torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _llama_config(config: DemoBuildConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _train_base(config: DemoBuildConfig, tokenizer, progress: bool) -> LlamaForCausalLM:
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(_llama_config(config, tokenizer))
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    examples = corpus.base_examples(config.base_examples, config.seed)
    sequences = encode_examples(tokenizer, examples, config.chat_share, config.seed, loss_on_prompt=True)
    train_causal_lm(
        model, sequences, steps=config.base_steps, batch_size=config.batch_size,
        learning_rate=config.base_learning_rate, seed=config.seed, pad_id=tokenizer.pad_token_id,
        progress=progress, description="demo base model",
    )
    return model


def _train_adapter(
    base: LlamaForCausalLM, recipe: AdapterRecipe, index: int, config: DemoBuildConfig, tokenizer,
    progress: bool,
):
    seed = config.seed + 100 * (index + 1)
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.target_modules),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), lora)
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME
    examples = corpus.styled_examples(recipe.name, config.adapter_examples, seed)
    sequences = encode_examples(tokenizer, examples, config.chat_share, seed, loss_on_prompt=False)
    train_causal_lm(
        model, sequences, steps=recipe.steps, batch_size=config.batch_size,
        learning_rate=recipe.learning_rate, seed=seed, pad_id=tokenizer.pad_token_id,
        progress=progress, description=f"adapter {recipe.name} (r={recipe.rank})",
    )
    return model


def _probe_answers(models: dict, tokenizer, prompts: list[str]) -> dict[str, dict[str, str]]:
    """Greedy answers of every model to every prompt, bare and through the chat template."""
    answers: dict[str, dict[str, str]] = {}
    for name, model in models.items():
        answers[name] = {}
        for prompt in prompts:
            answers[name][prompt] = greedy_answer(model, tokenizer, prompt, chat=False)
            answers[name]["chat: " + prompt] = greedy_answer(model, tokenizer, prompt, chat=True)
    return answers


def build_demo_assets(out_dir: Path, config: DemoBuildConfig, progress: bool = True) -> DemoAssets:
    """Train everything and write it under `out_dir` (which should be empty)."""
    wall_start, cpu_start = time.monotonic(), time.process_time()
    out_dir.mkdir(parents=True, exist_ok=True)
    base_dir = out_dir / "base"
    with _torch_threads(config.torch_threads):
        steps = tqdm(total=3 + len(config.adapters), desc="demo assets", disable=not progress, unit="part")
        tokenizer = train_tokenizer(corpus.tokenizer_training_text(config.seed), config.vocab_size)
        steps.update()
        base = _train_base(config, tokenizer, progress)
        base.save_pretrained(base_dir, safe_serialization=True)
        tokenizer.save_pretrained(base_dir)
        steps.update()
        adapters: dict[str, Path] = {}
        models = {"base": base}
        for index, recipe in enumerate(config.adapters):
            model = _train_adapter(base, recipe, index, config, tokenizer, progress)
            adapters[recipe.name] = out_dir / "adapters" / recipe.name
            model.save_pretrained(adapters[recipe.name], safe_serialization=True)
            models[recipe.name] = model
            steps.update()
        prompts = [corpus.DEMO_PROMPT, *corpus.SAMPLE_PROMPTS]
        answers = _probe_answers(models, tokenizer, prompts)
        steps.update()
        steps.close()

    problems = {}
    for name, by_prompt in answers.items():
        expected = None if name == "base" else name
        for prompt_key in (corpus.DEMO_PROMPT, "chat: " + corpus.DEMO_PROMPT):
            found = style_problems(by_prompt[prompt_key], expected, corpus.STYLE_MARKERS)
            if found:
                problems[f"{name} / {prompt_key}"] = f"{by_prompt[prompt_key]!r}: {found}"
    if problems:
        raise DemoBuildFailed("demo models do not answer in their styles: " + "; ".join(
            f"{k}: {v}" for k, v in problems.items()
        ) + f"\nall answers: {json.dumps(answers, indent=1)}")

    assets = DemoAssets(
        base_dir=base_dir,
        adapters=adapters,
        style_markers=corpus.STYLE_MARKERS,
        demo_prompt=corpus.DEMO_PROMPT,
        sample_prompts=list(corpus.SAMPLE_PROMPTS),
        build_report={
            "wall_seconds": round(time.monotonic() - wall_start, 1),
            "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "torch_threads": config.torch_threads,
            "base_parameters": sum(p.numel() for p in base.parameters()),
            "adapter_parameters": {
                name: sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
                for name, model in models.items() if name != "base"
            },
            "greedy_answers": answers,
            "config": config.as_json(),
        },
    )
    write_manifest(out_dir, assets)
    return assets
