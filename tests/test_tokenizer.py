"""The built BPE tokenizer: trained on chats as the template renders them, it gives the template's words and
turn-opening answers tokens of their own; trained on bare text it spells them out."""

from __future__ import annotations

import pytest

from vlmtrain.data.tokenizer import IM_END, IM_START, build_tokenizer

QUESTIONS = ["Is the circle red?", "What shape is at the top?", "How many squares are there?"]
ANSWERS = ["yes", "triangle", "2"]


def chats(n: int = 40) -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "user", "content": QUESTIONS[i % 3]},
            {"role": "assistant", "content": ANSWERS[i % 3]},
            {"role": "user", "content": QUESTIONS[(i + 1) % 3]},
            {"role": "assistant", "content": ANSWERS[(i + 1) % 3]},
        ]
        for i in range(n)
    ]


def pieces(tok, messages) -> list[str]:
    return tok.convert_ids_to_tokens(tok(tok.apply_chat_template(messages, tokenize=False))["input_ids"])


def test_a_tokenizer_trained_on_chats_has_the_templates_words_and_the_answers_as_tokens():
    tok = build_tokenizer((), vocab_size=400, chats=chats())
    got = pieces(tok, chats(1)[0])
    # The byte-level pieces of the ChatML rendering, one per word: role names and answers after a newline
    # (no leading space, so "Ġyes" from running text would not do).
    assert got[:12] == [
        IM_START,
        "user",
        "Ċ",
        "Is",
        "Ġthe",
        "Ġcircle",
        "Ġred",
        "?",
        IM_END,
        "Ċ",
        IM_START,
        "assistant",
    ]
    assert got[12:16] == ["Ċ", "yes", IM_END, "Ċ"]
    assert "triangle" in got


def test_the_same_texts_without_the_template_spell_the_template_out():
    """Why chats are rendered before training: the bare texts never show "assistant" or a line-initial "yes"."""
    bare = [" ".join(q + " " + a for q, a in zip(QUESTIONS, ANSWERS, strict=True))] * 40
    chat_tok = build_tokenizer((), vocab_size=400, chats=chats())
    bare_tok = build_tokenizer(bare, vocab_size=400)
    message = chats(1)[0]
    assert "assistant" not in pieces(bare_tok, message)
    assert len(pieces(bare_tok, message)) >= len(pieces(chat_tok, message)) + 10


@pytest.mark.parametrize("with_chats", [False, True])
def test_text_round_trips_through_the_built_tokenizer(with_chats: bool):
    tok = build_tokenizer(QUESTIONS * 10, vocab_size=300, chats=chats() if with_chats else ())
    for message in chats(3):
        text = tok.apply_chat_template(message, tokenize=False)
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.decode(tok("A small red circle, top left.")["input_ids"]) == "A small red circle, top left."


def test_build_tokenizer_refuses_a_vocabulary_below_the_byte_alphabet():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        build_tokenizer(QUESTIONS, vocab_size=100, chats=chats())
