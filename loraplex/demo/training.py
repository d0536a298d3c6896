"""A small causal-LM training loop shared by the base model and the adapters.

Examples become token sequences in two formats — a bare prompt followed by a newline and the
answer (what `/v1/completions` sends), and the chat template (what `/v1/chat/completions` sends) —
so the model and every adapter answer either way.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from loraplex.demo.corpus import Example


@dataclass(frozen=True)
class TrainingSequence:
    input_ids: list[int]
    # 1 where the token is a prediction target. Adapters learn only answers; the base learns all.
    loss_mask: list[int]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, chat: bool, loss_on_prompt: bool
) -> TrainingSequence:
    if not example.prompt:
        ids = tokenizer(example.answer)["input_ids"] + [tokenizer.eos_token_id]
        return TrainingSequence(ids, [1] * len(ids))
    if chat:
        prompt_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(example.prompt)["input_ids"]
        answer_ids = tokenizer("\n" + example.answer, add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    prompt_weight = 1 if loss_on_prompt else 0
    return TrainingSequence(
        prompt_ids + answer_ids, [prompt_weight] * len(prompt_ids) + [1] * len(answer_ids)
    )


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], chat_share: float, seed: int,
    loss_on_prompt: bool,
) -> list[TrainingSequence]:
    rng = random.Random(seed)
    return [
        encode_example(tokenizer, e, chat=rng.random() < chat_share, loss_on_prompt=loss_on_prompt)
        for e in examples
    ]


def _batch(sequences: list[TrainingSequence], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.float32)
    for row, seq in enumerate(sequences):
        n = len(seq.input_ids)
        ids[row, :n] = torch.tensor(seq.input_ids)
        attention[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(seq.loss_mask, dtype=torch.float32)
    return ids, attention, loss_mask


def train_causal_lm(
    model: torch.nn.Module,
    sequences: list[TrainingSequence],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    pad_id: int,
    progress: bool,
    description: str,
) -> float:
    """AdamW with warm-up and cosine decay over the trainable parameters; returns the last loss."""
    generator = random.Random(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    order: list[int] = []
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=description, disable=not progress, leave=True, unit="step")
    for _ in bar:
        if len(order) < batch_size:
            order = list(range(len(sequences)))
            generator.shuffle(order)
        picked = [sequences[order.pop()] for _ in range(batch_size)]
        ids, attention, loss_mask = _batch(picked, pad_id)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        targets = ids[:, 1:]
        weights = loss_mask[:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
        )
        loss = (token_loss * weights.reshape(-1)).sum() / weights.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value
