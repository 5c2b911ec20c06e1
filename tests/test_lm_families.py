"""Any chat LM: the chat format derived from each family's real template, labels against a brute-force
rendering, generation prompts and stop tokens, the pad choice, and Gemma 3's sliding layers under the stage mask."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import TINY_VISION
from lm_families import CHATS, FAMILIES, TEMPLATES, Family, build_family_tokenizer, save_family_lm

from vlmtrain.data.chat_format import TemplateError, derive_chat_format, load_chat_template, prepare_tokenizer
from vlmtrain.data.process import (
    IGNORE_INDEX,
    ImageTransform,
    ProcessedSample,
    ProcessorConfig,
    RawSample,
    SampleProcessor,
)
from vlmtrain.data.prompt import ChatRenderer, stop_token_ids

NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    return {name: build_family_tokenizer(FAMILIES[name]) for name in NAMES}


def sample(messages: list[dict[str, str]]) -> RawSample:
    conv = [
        {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in messages
    ]
    rec = {"id": "x", "source": "test", "task": "chat", "conversations": conv, "image": None}
    return RawSample(key="0000000001", shard="t.tar", index=0, members={"json": json.dumps(rec).encode()})


def brute_force(tok: Any, family: Family, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The whole conversation rendered by the template and tokenized in one piece; a token is supervised when
    its characters lie in an answer's rendered content or the turn-end token right after it."""
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ranges, pos = [], 0
    for q, a in zip(messages[0::2], messages[1::2], strict=True):
        q_text, a_text = (q["content"], a["content"])
        if family.trims_content:
            q_text, a_text = q_text.strip(), a_text.strip()
        pos = text.index(q_text, pos) + len(q_text)
        start = text.index(a_text, pos)
        end = start + len(a_text)
        assert text.startswith(family.turn_end, end), text[end : end + 20]
        ranges.append((start, end + len(family.turn_end)))
        pos = end
    labels = []
    for token, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        assert not any(s < r < e for rng in ranges for r in rng), "a token straddles an answer boundary"
        labels.append(token if any(rs <= s and e <= re for rs, re in ranges) else IGNORE_INDEX)
    return enc["input_ids"], labels


@pytest.mark.parametrize("name", NAMES)
def test_chat_format_is_derived_from_the_template(tokenizers: dict[str, Any], name: str) -> None:
    family, tok = FAMILIES[name], tokenizers[name]
    n_before = len(tok)
    fmt = derive_chat_format(tok)
    assert fmt.turn_end == family.turn_end
    assert fmt.turn_end_id == tok.convert_tokens_to_ids(family.turn_end)
    assert fmt.eos_id == tok.convert_tokens_to_ids(family.eos)
    assert fmt.pad_token == family.expected_pad
    assert fmt.pad_id == tok.convert_tokens_to_ids(family.expected_pad) < n_before  # an existing row
    assert fmt.answer_prefix == family.answer_prefix
    assert len(tok) == n_before  # deriving adds no token
    # Stops: the turn end first, then eos and pad, each once.
    expected = [fmt.turn_end_id] + [i for i in (fmt.eos_id, fmt.pad_id) if i != fmt.turn_end_id]
    assert list(stop_token_ids(tok)) == list(dict.fromkeys(expected))


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("name", NAMES)
def test_labels_match_brute_force_rendering(tokenizers: dict[str, Any], name: str, chat: int) -> None:
    family, tok, messages = FAMILIES[name], tokenizers[name], CHATS[chat]
    out = SampleProcessor(tok, ProcessorConfig(max_length=512, num_image_tokens=4), ImageTransform(32))(
        sample(messages)
    )
    assert isinstance(out, ProcessedSample)
    ids, labels = brute_force(tok, family, messages)
    assert (out.input_ids.tolist(), out.labels.tolist()) == (ids, labels)
    n_turns = len(messages) // 2
    turn_end = tok.convert_tokens_to_ids(family.turn_end)
    assert sum(t == turn_end for t in out.labels.tolist()) == n_turns  # every answer learns to stop


def test_qwen3_think_block_is_prompt_not_answer(tokenizers: dict[str, Any]) -> None:
    """Qwen3 writes an empty think block before the final answer only; it stays unsupervised (the prompt of
    the template's own non-thinking mode), and the generation prompt ends with it."""
    tok = tokenizers["qwen3"]
    think = tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    out = SampleProcessor(tok, ProcessorConfig(max_length=512, num_image_tokens=4))(sample(CHATS[1]))
    ids, labels = out.input_ids.tolist(), out.labels.tolist()
    starts = [i for i in range(len(ids)) if ids[i : i + len(think)] == think]
    assert len(starts) == 1  # only the last turn carries it; earlier answers render without
    assert all(label == IGNORE_INDEX for label in labels[starts[0] : starts[0] + len(think)])
    assert labels[starts[0] + len(think)] != IGNORE_INDEX  # the answer right after it is supervised


@pytest.mark.parametrize("name", NAMES)
def test_generation_prompt_is_the_templates(tokenizers: dict[str, Any], name: str) -> None:
    """What generation feeds equals the template's own generation prompt tokenized in one piece (for Qwen3 the
    non-thinking prompt, enable_thinking=False), and is the prompt part of the training sequence."""
    tok = tokenizers[name]
    messages = CHATS[1][:5]
    ids = ChatRenderer(tok).prompt_ids(messages)
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    train = SampleProcessor(tok, ProcessorConfig(max_length=512, num_image_tokens=4))(sample(CHATS[1]))
    assert train.input_ids.tolist()[: len(ids)] == ids
    assert (
        train.labels.tolist()[len(ids) - 1] == IGNORE_INDEX
        and train.labels.tolist()[len(ids)] != IGNORE_INDEX
    )


def test_base_lm_without_template_names_the_fix(tmp_path) -> None:
    tok = build_family_tokenizer(FAMILIES["llama3.2"], template=False)
    with pytest.raises(TemplateError, match=r"model\.chat_template"):
        ChatRenderer(tok)
    with pytest.raises(TemplateError, match=r"model\.chat_template"):
        prepare_tokenizer(tok)
    with pytest.raises(FileNotFoundError, match=r"model\.chat_template"):
        prepare_tokenizer(tok, str(tmp_path / "missing.jinja"))
    fmt = prepare_tokenizer(tok, str(TEMPLATES / "llama3_2.jinja"))  # a path to a .jinja file
    assert (fmt.turn_end, tok.pad_token) == ("<|eot_id|>", "<|finetune_right_pad_id|>")
    other = build_family_tokenizer(FAMILIES["llama3.2"], template=False)  # the template text itself
    assert prepare_tokenizer(other, (TEMPLATES / "llama3_2.jinja").read_text()).turn_end == "<|eot_id|>"
    # A template whose turn end this vocabulary lacks (ChatML on Llama's tokens) is refused, not guessed at.
    with pytest.raises(TemplateError, match="does not start with a special token"):
        prepare_tokenizer(other, str(TEMPLATES / "smollm2.jinja"))
    assert load_chat_template(str(TEMPLATES / "gemma3.jinja")) == (TEMPLATES / "gemma3.jinja").read_text()


def test_template_without_special_turn_end_is_refused(tokenizers: dict[str, Any]) -> None:
    tok = build_family_tokenizer(FAMILIES["qwen2.5"])
    tok.chat_template = (
        "{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}"
    )
    with pytest.raises(TemplateError, match="does not start with a special token"):
        derive_chat_format(tok)


# ---- models: pad choice, embeddings, Gemma's sliding layers ---------------------------------------


def vlm_for(name: str, tokenizers: dict[str, Any], tmp_path, attn_backend: str = "sdpa"):
    from vlmtrain.config.schema import ModelConfig
    from vlmtrain.models.vlm import VisionLanguageModel

    tok = build_family_tokenizer(FAMILIES[name])
    lm_dir = save_family_lm(FAMILIES[name], tok, tmp_path / name)
    prepare_tokenizer(tok)
    cfg = ModelConfig(
        vision=None,
        vision_config={**TINY_VISION, "patch_size": 16},  # 2 x 2 = 4 image tokens
        language=str(lm_dir),
        tokenizer=str(lm_dir),
        attn_backend=attn_backend,
    )
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(cfg, tok).eval(), tok, lm_dir


def test_llama_without_pad_keeps_its_embeddings(tokenizers: dict[str, Any], tmp_path) -> None:
    """The pad is an existing reserved token; the only new row is the image token's, added to embeddings
    and head alike, and every checkpoint row is unchanged."""
    from transformers import AutoModelForCausalLM

    model, tok, lm_dir = vlm_for("llama3.2", tokenizers, tmp_path)
    original = AutoModelForCausalLM.from_pretrained(str(lm_dir))
    n = original.get_input_embeddings().num_embeddings
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.pad_token_id < n
    emb, head = model.language.get_input_embeddings(), model.language.get_output_embeddings()
    assert emb.num_embeddings == head.out_features == len(tok) == n + 1  # + <|image_pad|>
    torch.testing.assert_close(emb.weight[:n], original.get_input_embeddings().weight, rtol=0, atol=0)
    assert model.image_token_id == n


def gemma_batch(tok: Any) -> dict[str, torch.Tensor]:
    """Two rows of 14: a packed row (sample 1: 4 image + 5 text tokens, sample 2: 5 text) and a padded one
    (4 image + 6 text, 4 pads). Long enough that the window (4) cuts into both the image and the text."""
    ids = torch.randint(10, 300, (2, 14))
    sample_ids = torch.tensor([[1] * 9 + [2] * 5, [1] * 10 + [0] * 4])
    flags = torch.zeros(2, 14, dtype=torch.bool)
    flags[0, :4] = flags[1, :4] = True
    ids[flags] = tok.convert_tokens_to_ids("<|image_pad|>")
    ids[sample_ids == 0] = tok.pad_token_id
    return {"input_ids": ids, "sample_ids": sample_ids, "image_flags": flags}


def brute_mask(sample_ids: torch.Tensor, flags: torch.Tensor, mode: str, window: int | None) -> torch.Tensor:
    """The stage mask written out entry by entry (docs/architecture.md), with Gemma's window |q - k| < w."""
    b, t = sample_ids.shape
    out = torch.zeros(b, 1, t, t, dtype=torch.bool)
    for r in range(b):
        for q in range(t):
            for k in range(t):
                sq, sk = int(sample_ids[r, q]), int(sample_ids[r, k])
                if sq == 0:
                    ok = q == k
                elif sq != sk:
                    ok = False
                elif mode == "causal":
                    ok = k <= q
                else:  # prefix: image keys visible to the sample; text keys to text queries at or after them
                    ok = bool(flags[r, k]) or (not flags[r, q] and k <= q)
                image_pair = bool(flags[r, q]) and bool(flags[r, k])  # an image sees all of itself (Gemma 3)
                if window is not None and abs(q - k) >= window and sq != 0 and not image_pair:
                    ok = False
                out[r, 0, q, k] = ok
    return out


def test_gemma3_sliding_layers_get_the_stage_mask_and_their_window(
    tokenizers: dict[str, Any], tmp_path
) -> None:
    """Gemma3ForCausalLM logits under vlmtrain's prefix mask equal eager attention given the brute-force mask of
    each layer type, and differ from the causal mask and from ignoring the window."""
    model, tok, _ = vlm_for("gemma3", tokenizers, tmp_path)
    assert model.attn_windows == {"full_attention": None, "sliding_attention": 4}
    torch.manual_seed(1)
    batch = gemma_batch(tok)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(**batch, pixel_values=pixels, mask_mode="prefix", return_logits=True).logits
        causal = model(**batch, pixel_values=pixels, mask_mode="causal", return_logits=True).logits
        embeds = model.embed(batch["input_ids"], batch["image_flags"], pixels)
        from vlmtrain.models.masks import additive, position_ids_from_sample_ids

        positions = position_ids_from_sample_ids(batch["sample_ids"])
        model.language.set_attn_implementation("eager")

        def reference(full_window: int | None, sliding_window: int | None) -> torch.Tensor:
            masks = {
                "full_attention": additive(
                    brute_mask(batch["sample_ids"], batch["image_flags"], "prefix", full_window), embeds.dtype
                ),
                "sliding_attention": additive(
                    brute_mask(batch["sample_ids"], batch["image_flags"], "prefix", sliding_window),
                    embeds.dtype,
                ),
            }
            hidden = model.language.get_decoder()(
                inputs_embeds=embeds, attention_mask=masks, position_ids=positions, use_cache=False
            ).last_hidden_state
            return model.language.get_output_embeddings()(hidden)

        ref = reference(None, 4)
        no_window = reference(None, None)
    real = batch["sample_ids"] > 0
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    assert (ours[real] - causal[real]).abs().max() > 1e-3
    assert (ours[real] - no_window[real]).abs().max() > 1e-3


def test_gemma3_cached_generation_equals_recomputation(tokenizers: dict[str, Any], tmp_path) -> None:
    """Decoding past the window: the one-token decode mask keeps only the window on sliding layers, so cached
    greedy generation equals recomputing the whole sequence with the dense masks at every step."""
    from vlmtrain.eval.generate import GenerationConfig, Generator

    model, tok, _ = vlm_for("gemma3", tokenizers, tmp_path)
    gen = Generator(model, tok, GenerationConfig(max_new_tokens=10))
    prompts = [
        gen.prompt([{"role": "user", "content": "Write a short caption for the image."}], True),
        gen.prompt([{"role": "user", "content": "Is it large?"}], False),
    ]
    pixels = torch.randn(1, 3, 32, 32)
    cached = gen.generate(prompts, pixels)
    slow = Generator(model, tok, GenerationConfig(max_new_tokens=10, use_cache=False)).generate(
        prompts, pixels
    )
    assert cached == slow
    assert max(len(c) for c in cached) > 4  # decoding ran past the sliding window


@pytest.mark.parametrize("mode", ["bidirectional", "prefix", "causal"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_windowed_masks_match_brute_force(mode: str, backend: str) -> None:
    """Per layer type, the prepared mask is the stage mask (padded and packed) and, on sliding layers, the
    window; one tensor per distinct window. The bidirectional rule is written out here as well."""
    from vlmtrain.models.masks import additive, prepare_mask

    sample_ids = torch.tensor([[1] * 9 + [2] * 5, [1] * 10 + [0] * 4])
    flags = torch.zeros(2, 14, dtype=torch.bool)
    flags[:, :4] = True
    windows = {"full_attention": None, "sliding_attention": 3}
    got = prepare_mask(backend, mode, sample_ids, flags, torch.float32, windows)
    assert set(got) == set(windows)
    for layer_type, window in windows.items():
        if mode == "bidirectional":
            same = (sample_ids[:, :, None] == sample_ids[:, None, :]) & (sample_ids[:, :, None] > 0)
            pad_diag = (sample_ids[:, :, None] == 0) & torch.eye(14, dtype=torch.bool)
            near = (
                torch.ones(14, 14, dtype=torch.bool)
                if window is None
                else torch.tensor([[abs(q - k) < window for k in range(14)] for q in range(14)])
            )
            pairs = flags[:, :, None].bool() & flags[:, None, :].bool()
            want = ((same & (near | pairs)) | pad_diag)[:, None]
        else:
            want = brute_mask(sample_ids, flags, mode, window)
        expected = additive(want, torch.float32) if backend == "eager" else want
        torch.testing.assert_close(got[layer_type], expected, rtol=0, atol=0)


def test_decode_mask_windows() -> None:
    """One new token (the last column) sees the valid keys of its row, on sliding layers only the last
    `window` columns (itself included)."""
    from vlmtrain.models.masks import decode_mask

    key_valid = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    got = decode_mask(key_valid, "sdpa", torch.float32, {"full_attention": None, "sliding_attention": 3})
    assert got["full_attention"][:, 0, 0].tolist() == key_valid.tolist()
    assert got["sliding_attention"][:, 0, 0].tolist() == [[False] * 4 + [True] * 3] * 2


def test_attention_windows_per_config() -> None:
    """Which LMs need per-layer masks: Gemma 3 (sliding + full layers), a Qwen2 with sliding layers switched
    on, a Mistral-style config sliding everywhere; Qwen2 as shipped and Llama need one mask."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    from vlmtrain.models.masks import attention_windows

    gemma = Gemma3TextConfig(num_hidden_layers=6, sliding_window=512)
    assert attention_windows(gemma) == {"full_attention": None, "sliding_attention": 512}
    assert attention_windows(Qwen2Config()) is None
    qwen_sliding = Qwen2Config(
        use_sliding_window=True, sliding_window=64, max_window_layers=1, num_hidden_layers=2
    )
    assert attention_windows(qwen_sliding) == {"full_attention": None, "sliding_attention": 64}
    assert attention_windows(LlamaConfig()) is None
    assert attention_windows(MistralConfig(sliding_window=128)) == {"*": 128}  # no layer types: one mask


@pytest.mark.parametrize("name", NAMES)
def test_each_family_trains_through_the_vlm(tokenizers: dict[str, Any], tmp_path, name: str) -> None:
    """Each family's real class (Qwen2, Qwen3, Llama, Llama+ChatML, Gemma 3) from a checkpoint directory: a
    padded batch of an image chat and a text-only chat gives the loss of running each sample alone, unpadded,
    through the LM with the brute-force prefix mask (per layer type), cross-entropy on its labels."""
    import io

    import torch.nn.functional as F
    from PIL import Image

    from vlmtrain.data.collate import pad_collate
    from vlmtrain.models.masks import position_ids_from_sample_ids

    model, tok, _ = vlm_for(name, tokenizers, tmp_path)
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(png, "PNG")
    with_image = sample(CHATS[0])
    rec = json.loads(with_image.members["json"])
    rec["image"] = "x.png"
    with_image = RawSample(
        "0000000002", "t.tar", 1, {"json": json.dumps(rec).encode(), "png": png.getvalue()}
    )
    processor = SampleProcessor(tok, ProcessorConfig(max_length=512, num_image_tokens=4), ImageTransform(32))
    samples = [processor(with_image), processor(sample(CHATS[1]))]
    batch = pad_collate(samples, tok.pad_token_id, image_size=32)
    with torch.no_grad():
        out = model(**batch, mask_mode="prefix")
        want = []
        for i, s in enumerate(samples):
            ids = s.input_ids[None]
            flags = ids == model.image_token_id
            sid = torch.ones_like(ids)
            pixels = batch["pixel_values"][:1] if i == 0 else None
            embeds = model.embed(ids, flags, pixels)
            masks = {
                t: brute_mask(sid, flags, "prefix", w)
                for t, w in (model.attn_windows or {"one": None}).items()
            }
            hidden = model.language.get_decoder()(
                inputs_embeds=embeds,
                attention_mask=masks if model.attn_windows else masks["one"],
                position_ids=position_ids_from_sample_ids(sid),
                use_cache=False,
            ).last_hidden_state
            logits = model.language.get_output_embeddings()(hidden)[0, :-1]
            want.append(
                F.cross_entropy(logits.float(), s.labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
            )
    assert int(batch["sample_ids"].eq(0).sum()) > 0  # the text-only row pads the image row
    torch.testing.assert_close(out.loss_sum, sum(want), rtol=1e-5, atol=1e-5)
    assert out.num_label_tokens == sum(
        int((s.labels != IGNORE_INDEX).sum()) - int(s.labels[0] != IGNORE_INDEX) for s in samples
    )


@pytest.mark.parametrize("name", NAMES)
def test_exported_template_prompts_as_training(tokenizers: dict[str, Any], name: str) -> None:
    """The export's multimodal template, with the family's answer prefix: string and multimodal messages give
    the generation prompt vlmtrain trains and generates with (the image placeholder first), with Qwen3's
    think block written once whether or not the caller asks for no thinking."""
    from vlmtrain.data.prompt import multimodal_chat_template
    from vlmtrain.data.tokenizer import IMAGE_TOKEN

    tok = build_family_tokenizer(FAMILIES[name])
    renderer = ChatRenderer(tok)
    text_msgs = CHATS[1][:3]
    expected = renderer.prompt_ids(text_msgs)
    tok.chat_template = multimodal_chat_template(tok.chat_template, renderer.format.answer_prefix)
    mm_msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text_msgs[0]["content"]}]}
    ]
    mm_msgs += text_msgs[1:]
    for kw in ({}, {"enable_thinking": False}):
        plain = tok.apply_chat_template(text_msgs, tokenize=False, add_generation_prompt=True, **kw)
        assert tok(plain, add_special_tokens=False)["input_ids"] == expected
        mm = tok.apply_chat_template(mm_msgs, tokenize=False, add_generation_prompt=True, **kw)
        assert mm == IMAGE_TOKEN + plain


def test_dated_template_splits_across_midnight(tokenizers: dict[str, Any], monkeypatch) -> None:
    """Llama 3.2's template writes today's date; when the day changes between the renderings of one
    conversation (a worker at midnight), they are taken again, and the spans carry one date."""
    import datetime as dt

    import transformers.utils.chat_template_utils as ctu

    tok = tokenizers["llama3.2"]
    renderer = ChatRenderer(tok)

    class MidnightAfterFirstCall(dt.datetime):
        calls = 0

        @classmethod
        def now(cls, tz=None):
            cls.calls += 1
            return dt.datetime(2026, 12, 7, 23, 59, 59) + dt.timedelta(seconds=0 if cls.calls == 1 else 2)

    monkeypatch.setattr(ctu, "datetime", MidnightAfterFirstCall)
    # The clock really moves the rendering: the first call renders 07 Dec, the next ones 08 Dec...
    first = tok.apply_chat_template(CHATS[1], tokenize=False)
    assert "07 Dec 2026" in first and "08 Dec 2026" in tok.apply_chat_template(CHATS[1], tokenize=False)
    MidnightAfterFirstCall.calls = 0
    # ...and a split whose first rendering is the day before still yields one consistent conversation.
    pairs = renderer.tokenize_pairs(CHATS[1])
    assert MidnightAfterFirstCall.calls > 4  # rendered again
    text = tok.decode([t for p in pairs for t in (*p.prompt, *p.answer)])
    assert text == tok.apply_chat_template(CHATS[1], tokenize=False)  # 08 Dec, once
    assert "08 Dec 2026" in text and "07 Dec" not in text
