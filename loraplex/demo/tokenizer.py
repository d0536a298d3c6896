"""The demo model's own tokenizer: byte-level BPE trained on the generated corpus.

Saved as a `PreTrainedTokenizerFast` folder, so `AutoTokenizer.from_pretrained` loads it like any
Hugging Face tokenizer. Plain `tokenizer(text)` prepends `<s>`; the chat template writes `<s>`
itself (apply_chat_template tokenizes without special tokens), so both paths start with exactly
one BOS. Tokenizing the *rendered* chat string with `tokenizer(...)` would add a second one — pass
`add_special_tokens=False` then, as with any Llama-style tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Role-tagged turns; an assistant turn ends with EOS, which is where generation stops.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train BPE to exactly `vocab_size` entries (padding with unused tokens if the corpus runs
    out of merges), so the model's embedding size equals the tokenizer's length."""
    if vocab_size % 64:
        raise ValueError(f"vocab_size must be a multiple of 64, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = [BOS, EOS, PAD, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    shortfall = vocab_size - tokenizer.get_vocab_size()
    if shortfall > 0:
        tokenizer.add_special_tokens([f"<unused{i}>" for i in range(shortfall)])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=512,
        padding_side="left",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    if len(wrapped) != vocab_size:
        raise AssertionError(f"tokenizer has {len(wrapped)} entries, expected {vocab_size}")
    return wrapped
