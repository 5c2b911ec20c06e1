"""LM families for the tests: each family's special tokens and REAL chat template (tests/assets/chat_templates),
a small tokenizer built with them, and a tiny random-init LM of the family's real transformers class."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from conftest import CORPUS

TEMPLATES = Path(__file__).parent / "assets" / "chat_templates"


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    """File under tests/assets/chat_templates."""
    specials: tuple[str, ...]
    """Special tokens, in vocabulary order."""
    eos: str
    pad: str | None
    bos: str | None
    turn_end: str
    """The token the family's template closes an assistant turn with (what the tests expect to be derived)."""
    expected_pad: str
    """The pad token vlmtrain should use (the tokenizer's, or the free special token it picks)."""
    answer_prefix: str = ""
    """What the template writes between the generation prompt and the final answer."""
    trims_content: bool = False
    """The template strips whitespace around message contents (Llama 3, Gemma 3)."""
    plain_tokens: tuple[str, ...] = ()
    """Added tokens that are not special (Qwen3's <think> and </think>)."""
    model: dict[str, Any] = field(default_factory=dict)
    """Tiny config of the family's real architecture (vocab_size filled in from the tokenizer)."""


_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
_SMALL_KV = {**_SMALL, "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True}

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>")

FAMILIES = {
    f.name: f
    for f in (
        Family(
            "qwen2.5",
            "qwen2_5.jinja",
            QWEN_SPECIALS,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            bos=None,
            turn_end="<|im_end|>",
            expected_pad="<|endoftext|>",
            model={"model_type": "qwen2", **_SMALL_KV, "rope_theta": 10000.0},
        ),
        Family(
            "qwen3",
            "qwen3.jinja",
            QWEN_SPECIALS,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            bos=None,
            turn_end="<|im_end|>",
            expected_pad="<|endoftext|>",
            answer_prefix="<think>\n\n</think>\n\n",
            plain_tokens=("<think>", "</think>"),
            model={"model_type": "qwen3", **_SMALL_KV, "head_dim": 16, "rope_theta": 10000.0},
        ),
        Family(
            "llama3.2",
            "llama3_2.jinja",
            (
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>",
                "<|step_id|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eom_id|>",
                "<|eot_id|>",
                "<|python_tag|>",
            ),
            eos="<|eot_id|>",
            pad=None,  # Llama 3 ships no pad token
            bos="<|begin_of_text|>",
            turn_end="<|eot_id|>",
            expected_pad="<|finetune_right_pad_id|>",
            trims_content=True,
            model={"model_type": "llama", **_SMALL_KV, "rope_theta": 10000.0},
        ),
        Family(
            "smollm2",
            "smollm2.jinja",
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            eos="<|im_end|>",
            pad="<|im_end|>",  # SmolLM2-Instruct pads with its turn end
            bos="<|im_start|>",
            turn_end="<|im_end|>",
            expected_pad="<|im_end|>",
            model={"model_type": "llama", **_SMALL_KV, "rope_theta": 10000.0},
        ),
        Family(
            "gemma3",
            "gemma3.jinja",
            ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            eos="<eos>",
            pad="<pad>",
            bos="<bos>",
            turn_end="<end_of_turn>",
            expected_pad="<pad>",
            trims_content=True,
            model={
                "model_type": "gemma3_text",
                **_SMALL_KV,
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "layer_types": ["sliding_attention", "full_attention"],
                "sliding_window": 4,
                "rope_theta": 10000.0,
            },
        ),
    )
}

CHATS = [
    [
        {"role": "user", "content": "Write a short caption for the image."},
        {"role": "assistant", "content": "a red circle on the left"},
    ],
    [
        {"role": "user", "content": "How many shapes are there?"},
        {"role": "assistant", "content": "There are three shapes."},
        {"role": "user", "content": "What color is the square?"},
        {"role": "assistant", "content": " It is blue. "},
        {"role": "user", "content": "Is it large?"},
        {"role": "assistant", "content": "yes"},
    ],
]


def build_family_tokenizer(family: Family, *, template: bool = True):
    """A small BPE tokenizer with the family's special tokens, eos/pad/bos and (by default) its real template."""
    from vlmtrain.data.tokenizer import build_tokenizer

    text = (TEMPLATES / family.template).read_text()
    tok = build_tokenizer(
        CORPUS * 20,
        vocab_size=360,
        chats=CHATS,
        special_tokens=family.specials,
        chat_template=text,
        eos_token=family.eos,
        pad_token=family.pad,
        bos_token=family.bos,
    )
    if family.plain_tokens:
        tok.add_tokens(list(family.plain_tokens))
    if not template:
        tok.chat_template = None
    return tok


def save_family_lm(family: Family, tokenizer, out: Path, seed: int = 0) -> Path:
    """A tiny random-init LM of the family's real class with `tokenizer`, saved as a checkpoint directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(family.model)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **cfg)
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
