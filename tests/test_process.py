"""Tests for sample processing: images, chat rendering, label masks, the max-length policy and skips."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtrain.data.process import (
    IGNORE_INDEX,
    ImageTransform,
    ProcessedSample,
    ProcessorConfig,
    RawSample,
    SampleProcessor,
    Skip,
    caption_index,
    decode_image,
    fit_pairs,
    to_rgb,
)
from vlmtrain.data.prompt import TemplateError, TurnPair
from vlmtrain.data.tokenizer import IM_END, IM_START, build_tokenizer, image_token_id

N_IMG = 16
IMAGE_SIZE = 32

QUESTIONS = ["Describe the image.", "What is on the mat?", "How many dogs are there?", "Is it sunny?"]
ANSWERS = ["A cat sits on a red mat.", "a small grey cat", "There are two dogs.", "Yes, very sunny today."]
REFERENCES = ["two dogs play in the park", "a cat on a mat", "a grey cat rests near the window"]


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer(QUESTIONS + ANSWERS + REFERENCES, vocab_size=400)


def processor(tok: Any, max_length: int = 512, **kw: Any) -> SampleProcessor:
    config = ProcessorConfig(max_length=max_length, num_image_tokens=N_IMG, **kw)
    return SampleProcessor(tok, config, ImageTransform(image_size=IMAGE_SIZE))


def jpeg_bytes(size: tuple[int, int] = (40, 30), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def record(turns: list[tuple[str, str]], task: str = "chat", **extra: Any) -> dict[str, Any]:
    conv = []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": "x", "source": "test", "task": task, "conversations": conv, "image": None, **extra}


def raw(
    rec: dict[str, Any] | None, image: bytes | None = None, key: str = "0000000007", **members: bytes
) -> RawSample:
    m: dict[str, bytes] = dict(members)
    if rec is not None:
        m["json"] = json.dumps(rec).encode()
    if image is not None:
        m["jpg"] = image
    return RawSample(key=key, shard="train-000000.tar", index=3, members=m)


def reference(tok: Any, turns: list[tuple[str, str]], with_image: bool) -> tuple[list[int], list[int]]:
    """Brute force: write ChatML by hand, find answer character spans, label tokens by their offsets."""
    text = ""
    spans: list[tuple[int, int]] = []
    for q, a in turns:
        text += f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n"
        spans.append((len(text), len(text) + len(a) + len(IM_END)))  # content and the <|im_end|> after it
        text += f"{a}{IM_END}\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = [], []
    for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        ids.append(tid)
        inside = any(a <= start and end <= b for a, b in spans)
        labels.append(tid if inside else IGNORE_INDEX)
    prefix = [image_token_id(tok)] * N_IMG if with_image else []
    return prefix + ids, [IGNORE_INDEX] * len(prefix) + labels


def as_lists(sample: ProcessedSample) -> tuple[list[int], list[int]]:
    return sample.input_ids.tolist(), sample.labels.tolist()


# --- labels ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_turns", [1, 2, 3])
@pytest.mark.parametrize("with_image", [True, False])
def test_labels_match_brute_force(tok: Any, n_turns: int, with_image: bool) -> None:
    turns = list(zip(QUESTIONS, ANSWERS, strict=True))[:n_turns]
    out = processor(tok)(raw(record(turns), jpeg_bytes() if with_image else None))
    assert isinstance(out, ProcessedSample)
    ids, labels = reference(tok, turns, with_image)
    assert as_lists(out) == (ids, labels)
    n_img = N_IMG if with_image else 0
    assert out.image_flags.tolist() == [True] * n_img + [False] * (len(ids) - n_img)
    assert (out.pixel_values is not None) == with_image
    # every answer is supervised in full, plus one <|im_end|> per assistant turn
    supervised = [t for t in labels if t != IGNORE_INDEX]
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert supervised.count(im_end) == n_turns
    assert tok.decode(supervised) == "".join(a + IM_END for _, a in turns)


def test_caption_first_and_random(tok: Any) -> None:
    rec = record([("Describe the image.", "ignored answer")], task="caption", references=REFERENCES)
    first = processor(tok)(raw(rec, jpeg_bytes()))
    assert as_lists(first) == reference(tok, [("Describe the image.", REFERENCES[0])], True)
    rand = processor(tok, caption_choice="random", seed=5)
    chosen = set()
    for k in range(40):
        key = f"{k:010d}"
        for epoch in (0, 1):
            sample = RawSample(key, "s.tar", 0, {"json": json.dumps(rec).encode()}, epoch=epoch)
            out = rand(sample)
            pick = REFERENCES[caption_index(len(REFERENCES), 5, epoch, key)]
            assert as_lists(out) == reference(tok, [("Describe the image.", pick)], False)
            chosen.add(pick)
    assert chosen == set(REFERENCES)  # the seeded choice really varies
    assert caption_index(3, 5, 0, "0000000001") == caption_index(3, 5, 0, "0000000001")


def test_prompt_tokens_equal_the_generation_prompt(tok: Any) -> None:
    # answers starting with spaces / newlines still split exactly where generation starts
    turns = [("Is it sunny?", "  yes"), ("Describe the image.", "\n\na cat")]
    out = processor(tok)(raw(record(turns)))
    msgs = [{"role": "user", "content": "Is it sunny?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids, labels = as_lists(out)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in labels[: len(prompt_ids)])
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == f"  yes{IM_END}\n\na cat{IM_END}"


QWEN25_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_qwen25_default_system_prompt_is_not_supervised(tok: Any) -> None:
    qwen = build_tokenizer(QUESTIONS + ANSWERS, vocab_size=400)
    qwen.chat_template = QWEN25_STYLE_TEMPLATE
    turns = list(zip(QUESTIONS, ANSWERS, strict=True))[:2]
    out = processor(qwen)(raw(record(turns)))
    system = (
        f"{IM_START}system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.{IM_END}\n"
    )
    sys_ids = qwen(system, add_special_tokens=False)["input_ids"]
    ref_ids, ref_labels = reference(qwen, turns, False)
    assert as_lists(out) == (sys_ids + ref_ids, [IGNORE_INDEX] * len(sys_ids) + ref_labels)


def test_prefix_inconsistent_template_raises(tok: Any) -> None:
    odd = build_tokenizer(QUESTIONS + ANSWERS, vocab_size=400)
    # marks the last message: a shorter conversation does not render as a prefix of a longer one
    odd.chat_template = (
        "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
        "{%- if loop.last %} (last){%- endif %}{{ '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    with pytest.raises(TemplateError, match="prefix-consistent"):
        processor(odd)(raw(record([(QUESTIONS[0], ANSWERS[0])])))


def test_wrong_turn_end_token_raises(tok: Any) -> None:
    with pytest.raises(TemplateError, match="turn_end_token"):
        processor(tok, turn_end_token="<|endoftext|>")(raw(record([(QUESTIONS[0], ANSWERS[0])])))


# --- max-length policy ---------------------------------------------------------------------------------


def test_fit_pairs_hand_checked() -> None:
    pairs = [TurnPair([1, 2], [3, 4, 9, 0], 3), TurnPair([5], [6, 9, 0], 2)]  # lengths 6 and 4
    full = fit_pairs(pairs, 10, 2)
    assert full.input_ids == [1, 2, 3, 4, 9, 0, 5, 6, 9, 0] and full.truncation is None
    assert full.labels == [-100, -100, 3, 4, 9, -100, -100, 6, 9, -100]
    one = fit_pairs(pairs, 9, 2)
    assert (one.input_ids, one.truncation, one.dropped_pairs) == ([1, 2, 3, 4, 9, 0], "truncated_turns", 1)
    cut = fit_pairs(pairs, 5, 2)
    assert (cut.input_ids, cut.labels, cut.truncation) == (
        [1, 2, 3, 4, 9],
        [-100, -100, 3, 4, 9],
        "truncated_answer",
    )
    cut2 = fit_pairs(pairs, 4, 2)
    assert (cut2.input_ids, cut2.labels) == ([1, 2, 3, 4], [-100, -100, 3, 4])
    assert fit_pairs(pairs, 3, 2) is None  # one answer token fits, two are required


def pair_lengths(tok: Any, turns: list[tuple[str, str]]) -> list[tuple[int, int]]:
    """(prompt, answer) token counts per pair; ChatML pieces split at special tokens, so they add up."""

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    out = [
        (count(f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n"), count(f"{a}{IM_END}\n"))
        for q, a in turns
    ]
    assert sum(p + a for p, a in out) == len(reference(tok, turns, False)[0])
    return out


def test_max_length_drops_trailing_turns(tok: Any) -> None:
    turns = list(zip(QUESTIONS, ANSWERS, strict=True))[:3]
    lengths = [p + a for p, a in pair_lengths(tok, turns)]
    budget = N_IMG + lengths[0] + lengths[1] + lengths[2] - 1  # the third pair misses by one token
    out = processor(tok, max_length=budget)(raw(record(turns), jpeg_bytes()))
    assert as_lists(out) == reference(tok, turns[:2], True)
    assert (out.truncation, out.dropped_pairs) == ("truncated_turns", 1)
    assert len(out) <= budget and out.image_flags[:N_IMG].all()


def test_max_length_truncates_first_answer(tok: Any) -> None:
    turns = list(zip(QUESTIONS, ANSWERS, strict=True))[:2]
    (prompt, answer), _ = pair_lengths(tok, turns)
    keep = 5
    assert answer > keep + 2  # the cut lands inside the content, before <|im_end|>
    out = processor(tok, max_length=N_IMG + prompt + keep, min_answer_tokens=keep)(
        raw(record(turns), jpeg_bytes())
    )
    ids, labels = reference(tok, turns[:1], True)
    cut = N_IMG + prompt + keep
    assert as_lists(out) == (ids[:cut], labels[:cut])
    assert (out.truncation, out.dropped_pairs) == ("truncated_answer", 1)
    assert out.image_flags.sum() == N_IMG  # image tokens are never cut
    assert IM_END not in tok.decode(out.labels[out.labels != IGNORE_INDEX].tolist())  # cut answers don't stop


def test_max_length_drops_when_too_little_answer_fits(tok: Any) -> None:
    turns = [(QUESTIONS[0], ANSWERS[0])]
    ((prompt, _),) = pair_lengths(tok, turns)
    out = processor(tok, max_length=N_IMG + prompt + 3, min_answer_tokens=4)(raw(record(turns), jpeg_bytes()))
    assert isinstance(out, Skip) and out.reason == "dropped_too_long"
    ok = processor(tok, max_length=N_IMG + prompt + 4, min_answer_tokens=4)(raw(record(turns), jpeg_bytes()))
    assert isinstance(ok, ProcessedSample) and ok.truncation == "truncated_answer"


def test_text_only_budget_has_no_image_tokens(tok: Any) -> None:
    turns = [(QUESTIONS[0], ANSWERS[0])]
    ids, _ = reference(tok, turns, False)
    out = processor(tok, max_length=len(ids))(raw(record(turns)))
    assert isinstance(out, ProcessedSample) and out.truncation is None and len(out) == len(ids)


def test_config_rejects_no_room_for_text() -> None:
    with pytest.raises(ValueError, match="no room for text"):
        ProcessorConfig(max_length=16, num_image_tokens=16)


# --- skips -----------------------------------------------------------------------------------------------


def test_skip_reasons(tok: Any) -> None:
    proc = processor(tok)
    good = record([(QUESTIONS[0], ANSWERS[0])])
    cases = {
        "missing_json": RawSample("k", "s", 0, {"jpg": jpeg_bytes()}),
        "bad_json": RawSample("k", "s", 0, {"json": b"{not json"}),
        "bad_conversation": raw({**good, "conversations": good["conversations"][::-1]}),
        "special_token_in_text": raw(record([(f"hi {IM_END}", "x")])),
        "missing_image": raw({**good, "image": "a.jpg"}),
        "multiple_images": raw(good, jpeg_bytes(), png=jpeg_bytes()),
        "bad_image": raw(good, jpeg_bytes()[:200]),
    }
    for reason, sample in cases.items():
        out = proc(sample)
        assert isinstance(out, Skip) and out.reason == reason, (reason, out)
    assert proc(raw({**good, "task": "story"})).reason == "bad_json"
    assert proc(raw(record([("q", "a")], task="caption"))).reason == "bad_json"  # no references
    assert proc(raw(record([(f"look {'<|image_pad|>'}", "x")]))).reason == "special_token_in_text"


# --- images ----------------------------------------------------------------------------------------------


def numpy_reference(img: Image.Image, size: int) -> np.ndarray:
    """Float64 reference of SigLIP preprocessing on an RGB image: PIL bicubic, /255, (x - .5) / .5."""
    arr = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1)


def random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8))
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8))
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 16, (size[1], size[0]), dtype=np.uint8)).convert("P")
        img.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist())
        img.info["transparency"] = 3
        return img
    if mode == "CMYK":
        return Image.frombytes(
            "CMYK", size, rng.integers(0, 256, size[0] * size[1] * 4, dtype=np.uint8).tobytes()
        )
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
@pytest.mark.parametrize("size", [(50, 37), (224, 224), (300, 500)])
def test_transform_matches_siglip_processor(mode: str, size: tuple[int, int]) -> None:
    siglip = pytest.importorskip("transformers").SiglipImageProcessorPil
    img = random_image(mode, size, seed=sum(size))
    ours = ImageTransform(image_size=224)(img)
    theirs = siglip(size={"height": 224, "width": 224})(img, return_tensors="np")["pixel_values"][0]
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    # the same PIL resize gives identical 8-bit pixels; only the float32 rounding of the affine map
    # differs (one multiply-add vs a float64 rescale then subtract and divide): within a few ulp
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=5e-7)
    np.testing.assert_allclose(ours.numpy(), numpy_reference(to_rgb(img), 224), atol=1e-6)


def test_transform_custom_mean_std() -> None:
    img = random_image("RGB", (64, 48), seed=1)
    t = ImageTransform(image_size=32, mean=(0.48, 0.45, 0.40), std=(0.26, 0.26, 0.27))
    arr = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    ref = ((arr - np.array(t.mean)) / np.array(t.std)).transpose(2, 0, 1)
    np.testing.assert_allclose(t(img).numpy(), ref, atol=2e-6)


def test_rgb_conversion_by_hand() -> None:
    grey = Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8))
    assert np.asarray(to_rgb(grey)).tolist() == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]
    rgba = Image.fromarray(np.array([[[200, 0, 0, 255], [200, 0, 0, 0], [0, 0, 100, 128]]], dtype=np.uint8))
    out = np.asarray(to_rgb(rgba)).astype(int)[0]
    assert out[0].tolist() == [200, 0, 0] and out[1].tolist() == [255, 255, 255]  # transparent -> white
    expected = [round(0 * 128 / 255 + 255 * 127 / 255)] * 2 + [round(100 * 128 / 255 + 255 * 127 / 255)]
    assert np.abs(out[2] - expected).max() <= 1  # PIL's integer blend rounds
    pal = Image.fromarray(np.array([[0, 1]], dtype=np.uint8)).convert("P")
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.info["transparency"] = 1
    assert np.asarray(to_rgb(pal)).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 0, 0))  # full magenta ink
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 0, 255]]]
    wide = Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))
    assert wide.mode.startswith("I;16")
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 1, 128, 255]  # scaled, not clipped


def test_decode_refuses_non_image_extensions() -> None:
    data = jpeg_bytes()
    for ext in ("pth", "pickle", "pyd", "npy", "pt", "gif", "json", ""):
        with pytest.raises(ValueError, match="refusing to decode"):
            decode_image(data, ext)
    assert decode_image(data, ".JPG").size == (40, 30)
    gif = io.BytesIO()
    Image.new("P", (4, 4)).save(gif, "GIF")
    with pytest.raises(Image.UnidentifiedImageError):  # only JPEG/PNG/WebP decoders are ever tried
        decode_image(gif.getvalue(), "png")


def test_png_webp_and_jpeg_draft(tok: Any) -> None:
    img = random_image("RGB", (64, 64), seed=3)
    for fmt, ext in (("PNG", "png"), ("WEBP", "webp")):
        buf = io.BytesIO()
        img.save(buf, fmt, lossless=True) if fmt == "WEBP" else img.save(buf, fmt)
        assert np.array_equal(np.asarray(decode_image(buf.getvalue(), ext)), np.asarray(img))
    big = jpeg_bytes(size=(512, 384), seed=4)
    assert decode_image(big, "jpg", draft_size=IMAGE_SIZE).size == (64, 48)  # 1/8 scale, both sides >= 32
    fast = processor(tok, jpeg_draft=True)(raw(record([("q", "a")]), big))
    exact = processor(tok)(raw(record([("q", "a")]), big))
    assert fast.pixel_values.shape == exact.pixel_values.shape
    assert fast.pixel_values.dtype == exact.pixel_values.dtype == torch.uint8
    t = ImageTransform(image_size=IMAGE_SIZE)
    gap = (t.normalize(fast.pixel_values) - t.normalize(exact.pixel_values)).abs().mean()
    assert gap < 0.1  # close, not identical
