"""Greedy answers from a model folder (or a model in memory), and the style check on them.

Used by the builder to refuse a build whose adapters do not answer in their own style, and by
tests to check the cached assets the same way.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> list[int]:
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
            return_dict=True,
        )["input_ids"]
    return tokenizer(prompt)["input_ids"]


@torch.inference_mode()
def greedy_completion(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = False,
    max_new_tokens: int = 64,
) -> tuple[str, bool]:
    """The greedy answer, and whether it ended with EOS (rather than running out of tokens)."""
    ids = torch.tensor([prompt_ids(tokenizer, prompt, chat)], device=model.device)
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[0, ids.shape[1]:]
    ended = bool((new_tokens == tokenizer.eos_token_id).any())
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), ended


def greedy_answer(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = False,
    max_new_tokens: int = 64,
) -> str:
    return greedy_completion(model, tokenizer, prompt, chat, max_new_tokens)[0]


def style_problems(answer: str, expected: str | None, style_markers: dict[str, list[str]]) -> list[str]:
    """Why `answer` is not in style `expected` (None: the base, which shows no style); [] if it is."""
    lowered = answer.lower()
    problems = []
    for name, markers in style_markers.items():
        present = [m for m in markers if m.lower() in lowered]
        if name == expected and len(present) < len(markers):
            missing = sorted(set(markers) - set(present))
            problems.append(f"missing its own markers {missing}")
        elif name != expected and present:
            problems.append(f"shows {name} markers {present}")
    return problems
