"""Generation: cached decoding equals full recomputation token for token (greedy, beam, sampling); no
deprecation warnings from transformers."""

from __future__ import annotations

import warnings

import pytest
import torch

from vlmtrain.data.prompt import ChatRenderer, Prompt
from vlmtrain.eval.generate import GenerationConfig, Generator


@pytest.fixture
def prompts(tiny_model, tokenizer):
    msgs = [
        [{"role": "user", "content": "Describe the image in detail."}],
        [{"role": "user", "content": "How many shapes are there?"}],
        [{"role": "user", "content": "What color is the square?"}],
    ]
    has_image = [True, False, True]  # a text-only prompt in the same batch
    renderer = ChatRenderer(tokenizer)
    ps = [
        renderer.build_prompt(m, h, tiny_model.num_image_tokens) for m, h in zip(msgs, has_image, strict=True)
    ]
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    return ps, pixels


def sharpen(model):
    # A random tiny LM is almost uniform; scale the head so argmax and beams are well separated.
    with torch.no_grad():
        model.language.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.mark.parametrize("mode", ["prefix", "causal"])
@pytest.mark.parametrize(
    "strategy,extra",
    [
        ("greedy", {}),
        ("beam", {"num_beams": 3}),
        ("sample", {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 5}),
    ],
)
def test_cached_equals_uncached(tiny_model, tokenizer, prompts, mode, strategy, extra):
    model = sharpen(tiny_model)
    ps, pixels = prompts
    outs = {}
    for use_cache in (True, False):
        cfg = GenerationConfig(
            max_new_tokens=12, strategy=strategy, mask_mode=mode, use_cache=use_cache, **extra
        )
        outs[use_cache] = Generator(model, tokenizer, cfg).generate(ps, pixels)
    assert outs[True] == outs[False]
    assert any(len(o) > 3 for o in outs[True]), "nothing was generated; the test would be vacuous"


def test_batched_equals_one_by_one(tiny_model, tokenizer, prompts):
    """Left padding must not change any row's result."""
    model = sharpen(tiny_model)
    ps, pixels = prompts
    gen = Generator(model, tokenizer, GenerationConfig(max_new_tokens=10))
    batched = gen.generate(ps, pixels)
    singles = [
        gen.generate([ps[0]], pixels[:1]),
        gen.generate([ps[1]], None),
        gen.generate([ps[2]], pixels[1:]),
    ]
    assert batched == [s[0] for s in singles]


def test_greedy_matches_argmax_of_full_forward(tiny_model, tokenizer, prompts):
    """The first generated token is the argmax of the model's own training-path logits at the last prompt token."""
    model = sharpen(tiny_model)
    ps, pixels = prompts
    p = ps[0]
    ids = torch.tensor([p.input_ids])
    flags = torch.zeros_like(ids, dtype=torch.bool)
    flags[0, : model.num_image_tokens] = True
    with torch.no_grad():
        logits = model(
            ids, torch.ones_like(ids), flags, pixel_values=pixels[:1], mask_mode="prefix", return_logits=True
        ).logits
    out = Generator(model, tokenizer, GenerationConfig(max_new_tokens=1)).generate([p], pixels[:1])
    expected = int(logits[0, -1].argmax())
    assert out[0] == ([] if expected in Generator(model, tokenizer, GenerationConfig()).stops else [expected])


def busy_other_rank(asked: list[bool]):
    """An `all_done` for a process whose peer rank always has rows left: records this process's answers."""

    def all_done(done: bool) -> bool:
        asked.append(done)
        return False

    return all_done


def test_lockstep_decodes_on_while_another_rank_generates(tiny_model, tokenizer, prompts):
    """With `all_done` saying another rank still generates, a process whose rows have all stopped keeps
    decoding padding: one decision per step, every step up to max_new_tokens, the answers unchanged."""
    model = sharpen(tiny_model)
    ps, pixels = prompts
    # The sharpened random model repeats one token greedily and never emits a stop token; sampling hot with
    # every odd token id as a stop ends the rows after a few tokens, at different steps.
    cfg = GenerationConfig(max_new_tokens=20, strategy="sample", temperature=2.0, seed=1)
    odd = set(range(1, len(tokenizer), 2))
    asked: list[bool] = []
    alone = Generator(model, tokenizer, cfg)
    lockstep = Generator(model, tokenizer, cfg, all_done=busy_other_rank(asked))
    alone.stops |= odd
    lockstep.stops |= odd
    answers = lockstep.generate(ps, pixels)
    assert answers == alone.generate(ps, pixels)
    assert len({len(a) for a in answers}) > 1 and any(answers), f"rows did not stop apart: {answers}"
    assert len(asked) == cfg.max_new_tokens
    stopped = asked.index(True)
    assert stopped == max(map(len, answers)) and all(asked[stopped:]), asked
    with pytest.raises(ValueError, match="at least one prompt"):
        lockstep.generate([], None)


def test_lockstep_beam_search_keeps_finished_beams(tiny_model, tokenizer, prompts):
    """Beams that all stopped at their first token keep their (empty) answers over 20 padded steps."""
    model = sharpen(tiny_model)
    ps, pixels = prompts
    cfg = GenerationConfig(max_new_tokens=20, strategy="beam", num_beams=3)
    asked: list[bool] = []
    lockstep = Generator(model, tokenizer, cfg, all_done=busy_other_rank(asked))
    lockstep.stops = set(range(len(tokenizer)))
    assert lockstep.generate(ps, pixels) == [[], [], []]
    assert asked == [True] * cfg.max_new_tokens


def test_image_count_mismatch_is_an_error(tiny_model, tokenizer, prompts):
    ps, pixels = prompts
    with pytest.raises(ValueError, match="2 prompts have an image but 1 images"):
        Generator(tiny_model, tokenizer, GenerationConfig()).generate(ps, pixels[:1])


def test_prompt_layout(tiny_model, tokenizer):
    p = ChatRenderer(tokenizer).build_prompt(
        [{"role": "user", "content": "hi"}], True, tiny_model.num_image_tokens
    )
    assert (
        p.input_ids[: tiny_model.num_image_tokens]
        == [tiny_model.image_token_id] * tiny_model.num_image_tokens
    )
    text = tokenizer.decode(p.input_ids[tiny_model.num_image_tokens :])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert isinstance(p, Prompt)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_generation_emits_no_deprecation_warning(tiny_model, tokenizer, prompts, strategy):
    """The KV cache goes to the decoder as `cache` (transformers 5.24; `past_key_values` warns and goes in 5.40):
    a cached run and a multi-turn prompt warn nothing, with every warning turned on."""
    model = sharpen(tiny_model)
    ps, pixels = prompts
    gen = Generator(model, tokenizer, GenerationConfig(max_new_tokens=6, strategy=strategy))
    chat = [
        {"role": "user", "content": "What color is the square?"},
        {"role": "assistant", "content": "It is blue."},
        {"role": "user", "content": "How many shapes are there?"},
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gen.generate(ps, pixels)
        gen.generate([gen.prompt(chat, True)], pixels[:1])
    bad = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, [f"{w.filename}:{w.lineno}: {w.message}" for w in bad]
    assert any(len(o) > 3 for o in out), "nothing was decoded with the cache; the check would be vacuous"
