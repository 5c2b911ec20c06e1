"""Tokenizers: build a small byte-level BPE tokenizer with Qwen's chat format, and find the image token."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Qwen2.5 ships these; a tokenizer we build uses the same strings so data and templates are shared.
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN)

# ChatML as Qwen2.5 renders it, without Qwen's default system prompt (a built tokenizer has no such prior).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` with Qwen's special tokens and a ChatML template.

    Byte-level BPE decodes exactly to the input text (no spacing artefacts), like Qwen's own tokenizer,
    so captions round-trip unchanged through generation and evaluation.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 260 entries")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.add_special_tokens({"additional_special_tokens": [IM_START, IMAGE_TOKEN]})
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 1 << 20
    return fast


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of the image placeholder token; adds it as a special token when the tokenizer lacks it.

    Callers that add it must resize the language model's embeddings to ``len(tokenizer)``.
    """
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN])
    if ids[0] is None or ids[0] == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN])
    return int(ids[0])
