"""Tokenizers: build a small byte-level BPE tokenizer (Qwen's chat format by default, or any family's special
tokens and template), and find the image token."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

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


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    chats: Iterable[Sequence[Mapping[str, str]]] = (),
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    chat_template: str = CHATML_TEMPLATE,
    eos_token: str = IM_END,
    pad_token: str | None = PAD_TOKEN,
    bos_token: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` with Qwen's special tokens and a ChatML template.

    The keyword arguments give another family's special tokens (ids 0.. in this order), template, eos, pad
    (None: the tokenizer has none, as Llama 3's) and bos; the tests build each LM family's tokenizer this way.

    ``chats`` (conversations as chat messages) are rendered with that template and trained on as rendered,
    so the role names and the words that open a turn ("user", "assistant", an answer such as "yes") become
    tokens of their own, as they are in Qwen's tokenizer. Trained on the bare texts only, a small BPE never
    sees them where the template puts them (after a newline, with no leading space) and spells them out
    letter by letter: 89 instead of 59 tokens for the demo's average conversation.

    Byte-level BPE decodes exactly to the input text (no spacing artefacts), like Qwen's own tokenizer,
    so captions round-trip unchanged through generation and evaluation.
    """
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {256 + len(special_tokens)} "
            "entries"
        )
    chats = [list(c) for c in chats]
    specials = _Specials(tuple(special_tokens), chat_template, eos_token, pad_token, bos_token)
    # The template renders without any vocabulary: one untrained tokenizer renders every chat for training.
    rendered = _wrap(_byte_level_bpe(), specials).apply_chat_template(chats, tokenize=False) if chats else []
    tok = _byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*texts, *rendered], trainer=trainer)
    return _wrap(tok, specials)


def _byte_level_bpe() -> Tokenizer:
    """An empty BPE model with Qwen's byte-level pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@dataclass(frozen=True)
class _Specials:
    tokens: tuple[str, ...]
    chat_template: str
    eos: str
    pad: str | None
    bos: str | None


def _wrap(tok: Tokenizer, specials: _Specials) -> PreTrainedTokenizerFast:
    """``tok`` as a transformers tokenizer with the given special tokens and chat template."""
    named = {"eos_token": specials.eos, "pad_token": specials.pad, "bos_token": specials.bos}
    extra = {"image_token": IMAGE_TOKEN} if IMAGE_TOKEN in specials.tokens else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, **{k: v for k, v in named.items() if v is not None}, extra_special_tokens=extra
    )
    others = [t for t in specials.tokens if t not in named.values()]
    fast.add_special_tokens({"additional_special_tokens": others})
    fast.chat_template = specials.chat_template
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
