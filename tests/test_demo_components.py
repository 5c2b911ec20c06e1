"""The demo's component choices: the tiny LM's initial scale and the stages' sample length bound."""

from __future__ import annotations

import pytest
import torch

from vlmtrain.data.prompt import ChatRenderer
from vlmtrain.data.tokenizer import build_tokenizer
from vlmtrain.demo.run import ROW_MULTIPLE, language_config, sample_length_bound
from vlmtrain.models.language import load_language_model


@pytest.mark.parametrize("std", [0.02, 0.08])
def test_the_tiny_lm_starts_at_the_asked_scale(std: float):
    """Qwen2 draws every linear and embedding weight from N(0, initializer_range): measured on the built model."""
    torch.manual_seed(0)
    lm = load_language_model(None, language_config(600, width=128, layers=2, init_std=std), "sdpa")
    for name, weight in [
        ("embed", lm.get_input_embeddings().weight),
        ("q_proj", lm.model.layers[0].self_attn.q_proj.weight),
        ("down_proj", lm.model.layers[1].mlp.down_proj.weight),
    ]:
        assert float(weight.detach().std()) == pytest.approx(std, rel=0.05), name
        assert abs(float(weight.detach().mean())) < std / 10, name


def chat(question: str, answer: str, turns: int) -> list[dict[str, str]]:
    return [
        m
        for _ in range(turns)
        for m in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
    ]


def test_sample_length_bound_is_the_longest_sample_rounded_up():
    """Against the training path's own span-by-span tokenization (ChatRenderer.tokenize_pairs), per chat."""
    chats = [
        chat("Is the circle red?", "yes", 1),
        chat("What shape is in the bottom right corner?", "triangle", 4),
        chat(
            "Describe the image in detail.",
            "The image shows three simple shapes on a plain white background.",
            2,
        ),
    ]
    tok = build_tokenizer((), vocab_size=320, chats=chats * 5)
    renderer = ChatRenderer(tok)
    lengths = [sum(len(p) for p in renderer.tokenize_pairs(c)) for c in chats]
    for image_tokens in (0, 36, 256):
        bound = sample_length_bound(chats, tok, image_tokens)
        longest = image_tokens + max(lengths)
        assert bound % ROW_MULTIPLE == 0
        assert longest <= bound < longest + ROW_MULTIPLE, (bound, longest)
