"""The default export keeps the trained mask: transformers (trust_remote_code) equals vlmtrain's prefix forward
and greedy generation; tower features with skipped leading tokens and a pixel shuffle export too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.conftest import TINY_VISION, tiny_language_config
from tests.test_export import CAPTIONS, caption_images, train_tiny_captioner, write_stage_config
from vlmtrain.data.process import ImageTransform
from vlmtrain.data.prompt import CAPTION_PROMPT, question_messages
from vlmtrain.data.tokenizer import image_token_id
from vlmtrain.eval.generate import GenerationConfig, Generator
from vlmtrain.export import export_hf, export_model
from vlmtrain.hf_remote.modeling_vlmtrain_llava import pixel_shuffle
from vlmtrain.models.projector import Projector
from vlmtrain.models.vlm import VisionLanguageModel

MAX_NEW = 40
QUESTIONS = [CAPTION_PROMPT, "What color is the square?"]


def load_export(folder: Path, attn: str = "sdpa"):
    model = AutoModelForImageTextToText.from_pretrained(
        str(folder), trust_remote_code=True, attn_implementation=attn
    ).eval()
    processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    return model, processor


def chat(text: str, image=None) -> list[dict]:
    item = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [item, {"type": "text", "text": text}]}]


def vlmtrain_logits(model: VisionLanguageModel, inputs, mask: str) -> torch.Tensor:
    """vlmtrain's forward on the processor's batch (right padding: sample id 1 on real tokens, 0 on padding)."""
    ids = inputs["input_ids"]
    flags = ids == model.image_token_id
    with torch.no_grad():
        out = model(
            ids,
            inputs["attention_mask"],
            flags,
            pixel_values=inputs["pixel_values"],
            mask_mode=mask,
            return_logits=True,
        )
    return out.logits


@pytest.fixture(scope="module")
def prefix_export(tmp_path_factory, tokenizer, tiny_model_config):
    """A tiny captioner trained with the prefix mask (stages 1-3), its checkpoint and its default export."""
    root = tmp_path_factory.mktemp("prefix_export")
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_model_config, tokenizer)
    paths = caption_images(root / "images")
    model, loss = train_tiny_captioner(model, tokenizer, paths, mask="prefix")
    model.save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(str(root / "ckpt"))
    write_stage_config(root / "ckpt", "prefix")
    export_hf(root / "ckpt", root / "hf")  # the default format
    return root, model, paths, loss


def test_default_export_of_a_prefix_model_ships_the_remote_class(prefix_export):
    root, _, _, _ = prefix_export
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["model_type"] == "vlmtrain_llava" and config["prefill_mask"] == "prefix"
    module, cls = config["auto_map"]["AutoModelForImageTextToText"].split(".")
    assert (root / "hf" / f"{module}.py").is_file() and cls == "VlmtrainLlavaForConditionalGeneration"
    readme = (root / "hf" / "README.md").read_text()
    assert "trust_remote_code | **needed**" in readme and "prefill | **prefix**" in readme, readme
    source = (root / "hf" / f"{module}.py").read_text()
    assert "vlmtrain" not in "".join(
        line for line in source.splitlines() if line.startswith(("import", "from"))
    )


def test_export_refuses_what_cannot_take_the_prefix_mask(prefix_export):
    """Flash attention cannot take the image block (refused at load); a static cache prepares a causal mask
    before the forward (an error at the prefill, never a silently causal generation)."""
    root, _, paths, _ = prefix_export
    with pytest.raises(ValueError, match="does not support Flash Attention"):
        AutoModelForImageTextToText.from_pretrained(
            str(root / "hf"), trust_remote_code=True, attn_implementation="flash_attention_2"
        )
    hf, processor = load_export(root / "hf")
    text = processor.apply_chat_template(chat(CAPTION_PROMPT), add_generation_prompt=True)
    inputs = processor(images=Image.open(paths[0]), text=text, return_tensors="pt")
    with pytest.raises(ValueError, match="default dynamic cache"):
        hf.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_export_prefill_logits_equal_vlmtrain_prefix_forward(prefix_export, attn):
    """Two rows (different images, prompts of different lengths, right padding): the export's logits equal
    vlmtrain's prefix forward to 1e-5 on every real token, and the causal forward is far from both."""
    root, model, paths, _ = prefix_export
    hf, processor = load_export(root / "hf", attn)
    images = [Image.open(paths[0]), Image.open(paths[3])]
    texts = [processor.apply_chat_template(chat(q), add_generation_prompt=True) for q in QUESTIONS]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    real = inputs["attention_mask"].bool()
    assert not real.all(), "the batch should carry padding"
    with torch.no_grad():
        theirs = hf(**inputs).logits
    prefix = vlmtrain_logits(model, inputs, "prefix")
    causal = vlmtrain_logits(model, inputs, "causal")
    torch.testing.assert_close(theirs[real], prefix[real], atol=1e-5, rtol=1e-5)
    gap = (prefix[real] - causal[real]).abs().max()
    assert gap > 0.1, f"prefix and causal logits should differ clearly on this model, max gap {gap}"


def vlmtrain_greedy(model, tokenizer, images, questions) -> list[list[int]]:
    """vlmtrain's own greedy generation (KV cache, prefix prefill), all prompts in one left-padded batch."""
    gen = Generator(model, tokenizer, GenerationConfig(max_new_tokens=MAX_NEW, mask_mode="prefix"))
    prompts = [gen.prompt(question_messages(q), has_image=True) for q in questions]
    transform = ImageTransform(model.vision.config.image_size)
    return gen.generate(prompts, torch.stack([transform(im) for im in images]))


@pytest.mark.slow
def test_export_greedy_generate_and_pipeline_equal_vlmtrain(prefix_export, tokenizer):
    """generate() through AutoProcessor's chat template, one image at a time and as a left-padded batch, and
    pipeline("image-text-to-text"), give vlmtrain's greedy tokens; the captions are learned text."""
    from transformers import pipeline

    root, model, paths, loss = prefix_export
    hf, processor = load_export(root / "hf")
    images = [Image.open(p) for p in paths]
    ours = vlmtrain_greedy(model, tokenizer, images, [CAPTION_PROMPT] * len(images))
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ours]
    assert sum(t == c for t, c in zip(texts, CAPTIONS, strict=True)) >= len(CAPTIONS) - 1, (texts, loss)
    assert len(set(texts)) >= len(CAPTIONS) - 1, texts  # the image decides the answer

    stops = set(hf.generation_config.eos_token_id)
    prompt = processor.apply_chat_template(chat(CAPTION_PROMPT), add_generation_prompt=True)
    causal_gap = 0.0
    for image, expected in zip(images, ours, strict=True):
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            out = hf.generate(
                **inputs, max_new_tokens=MAX_NEW, output_logits=True, return_dict_in_generate=True
            )
        new = out.sequences[0, n:].tolist()
        assert new[-1] in stops and new[:-1] == expected, (new, expected)
        # Every step's logits (the prefill's, then the cached decode steps') equal vlmtrain's prefix forward on
        # the whole generated sequence, a causal prefill's do not.
        steps = torch.cat(out.logits)  # [len(new), V]
        whole = {"input_ids": out.sequences, "attention_mask": torch.ones_like(out.sequences)}
        whole["pixel_values"] = inputs["pixel_values"]
        reference = vlmtrain_logits(model, whole, "prefix")[0, n - 1 : -1]
        torch.testing.assert_close(steps, reference, atol=1e-5, rtol=1e-5)
        causal = vlmtrain_logits(model, whole, "causal")[0, n - 1 : -1]
        causal_gap = max(causal_gap, float((causal - steps).abs().max()))
    assert causal_gap > 0.01, f"a causal prefill should give other step logits here (max gap {causal_gap})"

    # a left-padded batch of two different questions, against vlmtrain's batch of the same two
    pair = [images[2], images[5]]
    ours_pair = vlmtrain_greedy(model, tokenizer, pair, QUESTIONS)
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(chat(q), add_generation_prompt=True) for q in QUESTIONS]
    inputs = processor(images=pair, text=texts, return_tensors="pt", padding=True)
    assert not inputs["attention_mask"].bool().all()
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=MAX_NEW)[:, inputs["input_ids"].shape[1] :].tolist()
    for row, expected in zip(out, ours_pair, strict=True):
        cut = next(i for i, t in enumerate(row) if t in stops)
        assert row[:cut] == expected, (row, expected)

    pipe = pipeline("image-text-to-text", model=str(root / "hf"), trust_remote_code=True)
    for image, expected in zip(images[:3], ours[:3], strict=True):
        piped = pipe(text=chat(CAPTION_PROMPT, image), max_new_tokens=MAX_NEW)[0]["generated_text"][-1]
        assert piped == {"role": "assistant", "content": tokenizer.decode(expected, skip_special_tokens=True)}


OFFLINE_SCRIPT = """
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, image, out = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, local_files_only=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open(image), text=text, return_tensors="pt")
with torch.no_grad():
    torch.save({"input_ids": inputs["input_ids"], "logits": model(**inputs).logits}, out)
"""


@pytest.mark.slow
def test_export_loads_offline_from_the_folder_alone(prefix_export, tmp_path):
    """A fresh interpreter with HF_HUB_OFFLINE=1 and an empty module cache: the folder alone (its modeling file)
    gives the prefix forward's logits."""
    root, model, paths, _ = prefix_export
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)  # vlmtrain is not importable there: the folder must be self-contained
    out = tmp_path / "out.pt"
    args = [sys.executable, "-c", OFFLINE_SCRIPT, str(root / "hf"), str(paths[1]), str(out)]
    r = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = torch.load(out, weights_only=True)
    ids = got["input_ids"]
    pixels = ImageTransform(model.vision.config.image_size)(Image.open(paths[1]))[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    torch.testing.assert_close(got["logits"], vlmtrain_logits(model, inputs, "prefix"), atol=1e-5, rtol=1e-5)


# ---- formats, masks and refusals ----------------------------------------------------------------------------


def test_llava_format_of_a_prefix_model_is_stock_and_causal(prefix_export, tmp_path):
    """`--format llava` keeps the stock class (no auto_map) and its README says it runs causally; its logits
    equal vlmtrain's causal forward."""
    from transformers import LlavaForConditionalGeneration

    root, model, paths, _ = prefix_export
    export_hf(root / "ckpt", tmp_path / "llava", "llava")
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    assert config["model_type"] == "llava" and "auto_map" not in config
    readme = (tmp_path / "llava" / "README.md").read_text()
    assert "trust_remote_code | not needed" in readme and "runs causally" in readme, readme
    llava = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "llava")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "llava"))
    text = processor.apply_chat_template(chat(QUESTIONS[1]), add_generation_prompt=True)
    inputs = processor(images=Image.open(paths[0]), text=text, return_tensors="pt")
    with torch.no_grad():
        theirs = llava(**inputs).logits
    torch.testing.assert_close(theirs, vlmtrain_logits(model, inputs, "causal"), atol=1e-5, rtol=1e-5)


def test_stage0_export_prefills_with_prefix_and_says_so(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(str(tmp_path / "ckpt"))
    write_stage_config(tmp_path / "ckpt", "bidirectional")
    with pytest.warns(UserWarning, match="bidirectional mask"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["prefill_mask"] == "prefix"
    assert "Stage 0's bidirectional mask" in (tmp_path / "hf" / "README.md").read_text()


def test_export_cli_formats_and_errors(tiny_model, tokenizer, tmp_path):
    from typer.testing import CliRunner

    from vlmtrain.cli import app

    tiny_model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(str(tmp_path / "ckpt"))
    write_stage_config(tmp_path / "ckpt", "causal")
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "ckpt"), *map(str, args)])

    r = run("--out", tmp_path / "a")  # auto on a causal-trained SigLIP model: the stock class is exact
    assert r.exit_code == 0 and "stock class" in r.output, r.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "llava"
    r = run("--out", tmp_path / "b", "--format", "vlmtrain")  # the remote class, prefilled causally
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["prefill_mask"] == "causal"
    r = run("--out", tmp_path / "a")
    assert r.exit_code == 1 and "not an empty folder" in " ".join(r.output.split()), r.output
    r = run("--out", tmp_path / "c", "--format", "hf")
    assert r.exit_code == 2 and "llava" in r.output, r.output
    assert not (tmp_path / "c").exists()


# ---- image features: leading tokens skipped, pixel shuffle ----------------------------------------------------


def test_pixel_shuffle_equals_brute_force():
    x = torch.randn(2, 36, 5)
    k, s = 3, 6
    out = pixel_shuffle(x, k)
    ref = torch.stack(
        [
            torch.stack(
                [
                    torch.cat([x[n, (bi * k + ki) * s + bj * k + kj] for ki in range(k) for kj in range(k)])
                    for bi in range(s // k)
                    for bj in range(s // k)
                ]
            )
            for n in range(2)
        ]
    )
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


class LoopFeaturesVLM(VisionLanguageModel):
    """A VisionLanguageModel whose image features drop `vision_skip_tokens` leading tokens and merge k x k
    patches, written as loops over patch coordinates (the brute-force reference for the export)."""

    def encode_images(self, pixel_values):
        out = self.vision(pixel_values=pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[self.vision_feature_layer][:, self.vision_skip_tokens :]
        k = self.pixel_shuffle
        s = int(hidden.shape[1] ** 0.5)
        rows = []
        for n in range(hidden.shape[0]):
            tokens = []
            for bi in range(s // k):
                for bj in range(s // k):
                    patches = [
                        hidden[n, (bi * k + ki) * s + (bj * k + kj)] for ki in range(k) for kj in range(k)
                    ]
                    tokens.append(torch.cat(patches))
            rows.append(torch.stack(tokens))
        merged = torch.stack(rows)
        return self.projector.linear_2(self.projector.act(self.projector.linear_1(merged)))


def tower(family: str):
    from transformers import AutoModel, CLIPVisionConfig, Dinov2WithRegistersConfig

    torch.manual_seed(1)
    if family == "dinov2_with_registers":  # CLS + 4 registers + 16 patches
        cfg = Dinov2WithRegistersConfig(**TINY_VISION, num_register_tokens=4)
    else:  # CLS + 16 patches
        cfg = CLIPVisionConfig(**TINY_VISION)
    return AutoModel.from_config(cfg).eval()


@pytest.mark.parametrize(
    ("family", "skip", "k", "fmt", "mask"),
    [
        ("dinov2_with_registers", 5, 2, "auto", "prefix"),
        ("clip", 1, 2, "vlmtrain", "causal"),
        ("clip", 1, 1, "llava", "causal"),  # stock LLaVA's "default" strategy drops the CLS token
    ],
)
def test_export_takes_skipped_tokens_and_pixel_shuffle(family, skip, k, fmt, mask, tokenizer, tmp_path):
    vision = tower(family)
    language_cfg = tiny_language_config(len(tokenizer))
    from vlmtrain.models.language import load_language_model

    language = load_language_model(None, language_cfg, "sdpa")
    d = vision.config.hidden_size
    model = LoopFeaturesVLM(vision, Projector(d, 64, pixel_shuffle=k), language, image_token_id(tokenizer))
    # the tower family decides what is dropped; the brute force above reads it back
    assert (model.vision_skip_tokens, model.pixel_shuffle) == (skip, k)
    assert model.num_image_tokens == (TINY_VISION["image_size"] // TINY_VISION["patch_size"] // k) ** 2
    model.eval()
    export_model(model, tokenizer, tmp_path / "hf", fmt, trained=mask)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == ("llava" if fmt == "llava" else "vlmtrain_llava")
    hf, processor = load_export(tmp_path / "hf")
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    text = processor.apply_chat_template(chat(QUESTIONS[1]), add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens
    with torch.no_grad():
        theirs = hf(**inputs).logits
    torch.testing.assert_close(theirs, vlmtrain_logits(model, inputs, mask), atol=1e-5, rtol=1e-5)
    if fmt != "llava" and k > 1:
        with pytest.raises(ValueError, match="cannot express"):
            export_model(model, tokenizer, tmp_path / "stock", "llava", trained=mask)


@pytest.mark.parametrize("sliding", [False, True])
def test_prefix_mask_matches_vlmtrain_masks_with_padding_and_sliding_layers(sliding):
    """The remote class's prefill mask on left-padded rows: full-attention layers get vlmtrain's prefix mask
    (models.masks.attention_allowed); sliding-window layers get the window's causal mask or the image block."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from vlmtrain.hf_remote.modeling_vlmtrain_llava import VlmtrainLlavaConfig, VlmtrainLlavaModel
    from vlmtrain.models.masks import attention_allowed

    text = dict(tiny_language_config(64), use_sliding_window=sliding, sliding_window=3, max_window_layers=1)
    config = VlmtrainLlavaConfig(
        vision_config=SiglipVisionConfig(**TINY_VISION).to_dict(),
        text_config=Qwen2Config(**text).to_dict(),
        image_token_id=5,
    )
    model = VlmtrainLlavaModel(config).eval()
    ids = torch.tensor([[0, 0, 5, 5, 5, 9, 9, 9], [5, 5, 5, 9, 9, 9, 9, 9], [0, 9, 9, 9, 9, 9, 9, 9]])
    padding = (ids != 0).long()
    flags = ids == 5
    mask = model.prefix_mask(ids, padding, None, None)
    full = mask["full_attention"] if sliding else mask
    expected = attention_allowed("prefix", padding, flags)  # sample id 1 on real tokens, 0 on padding
    real = padding.bool()
    # rows of padding queries are not read; real query rows must agree exactly
    assert torch.equal(full[:, 0][real], expected[real])
    if sliding:
        assert set(mask) == {"full_attention", "sliding_attention"}
        q = torch.arange(8)[:, None]
        k = torch.arange(8)[None, :]
        window = (k <= q) & (q - k < 3)
        block = flags[:, :, None] & flags[:, None, :]
        brute = (window[None] | block) & real[:, None, :]
        assert torch.equal(mask["sliding_attention"][:, 0][real], brute[real])


@pytest.mark.parametrize("edge", [None, 40])
def test_export_processor_equals_the_checkpoints_image_transform(tiny_model, tokenizer, tmp_path, edge):
    """vlm_config.json's `image_preprocessing` (the tower family's transform) sets the exported processor: square
    resize (SigLIP) or shorter side then center crop (CLIP, DINOv2), mean and std; its pixels equal vlmtrain's."""
    tiny_model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(str(tmp_path / "ckpt"))
    cfg_path = tmp_path / "ckpt" / "vlm_config.json"
    cfg = json.loads(cfg_path.read_text())
    transform = ImageTransform(32, (0.48, 0.45, 0.4), (0.27, 0.26, 0.28), resize_shortest_edge=edge)
    cfg_path.write_text(json.dumps({**cfg, "image_preprocessing": transform.to_dict()}))
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, transform(image)[None], atol=1e-5, rtol=0)
    assert not torch.allclose(pixels, ImageTransform(32)(image)[None], atol=1e-2)
