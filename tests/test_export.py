"""`--format llava` export: the folder loads with LLaVA's own classes and gives equal logits (causal)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlmtrain.data.process import ImageTransform
from vlmtrain.data.tokenizer import IMAGE_TOKEN
from vlmtrain.export import export_hf


def write_stage_config(checkpoint, mode: str) -> None:
    """The stage_config.json a stage trained with mask `mode` leaves in its output (stage 3's, mask replaced)."""
    import dataclasses
    import json

    from vlmtrain.config.load import STAGE_CONFIG_NAME, load_stage_config, stage_config_to_dict

    cfg = load_stage_config(3)
    cfg = dataclasses.replace(cfg, mask=dataclasses.replace(cfg.mask, mode=mode, noise_ratio=0.0))
    (checkpoint / STAGE_CONFIG_NAME).write_text(json.dumps(stage_config_to_dict(cfg), indent=2))


def test_export_loads_in_transformers_with_equal_logits(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(str(tmp_path / "ckpt"))
    export_hf(tmp_path / "ckpt", tmp_path / "hf", "llava")
    assert "trust_remote_code | not needed" in (tmp_path / "hf" / "README.md").read_text()

    llava = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What color is the square?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(images=image, text=IMAGE_TOKEN + chat, return_tensors="pt")

    ids = inputs["input_ids"]
    flags = ids == tiny_model.image_token_id
    assert int(flags.sum()) == tiny_model.num_image_tokens and bool(
        flags[0, : tiny_model.num_image_tokens].all()
    )
    ours_pixels = ImageTransform(image_size=tiny_model.vision.config.image_size)(image)[None]
    torch.testing.assert_close(inputs["pixel_values"], ours_pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        theirs = llava(**inputs).logits
        ours = tiny_model(
            ids, torch.ones_like(ids), flags, pixel_values=ours_pixels, mask_mode="causal", return_logits=True
        ).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- drop-in: the standard transformers idioms on an export of a trained tiny checkpoint ------------------

CAPTIONS = [
    "a red circle on the left",
    "two blue squares at the top",
    "a small green triangle in the center",
    "The image shows a yellow star on a white background.",
    "yes no left right",
    "a red circle",
    "two blue squares at the top left",
    "a small green triangle",
]
MAX_NEW = 40  # the longest caption is 31 tokens


def caption_images(folder) -> list:
    """One distinct image per caption: a different colour pattern each, saved as PNG."""
    rng = np.random.default_rng(7)
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(CAPTIONS)):
        base = rng.integers(0, 256, (1, 1, 3))
        pixels = np.clip(base + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        pixels[(i * 4) % 32 : (i * 4) % 32 + 8, :, :] = 255 - base[0, 0]  # a stripe at a different row
        path = folder / f"{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def train_tiny_captioner(model, tokenizer, paths, steps: int = 100, mask: str = "causal"):
    """Overfit the tiny model on (image, caption) through the training path (SampleProcessor + collate), with
    `mask` (causal: the mask transformers' LLaVA runs), so that greedy captions are real text ending in
    <|im_end|>."""
    import json

    from vlmtrain.data.collate import pad_collate
    from vlmtrain.data.process import ProcessorConfig, RawSample, SampleProcessor
    from vlmtrain.data.prompt import CAPTION_PROMPT

    size = model.vision.config.image_size
    proc = SampleProcessor(
        tokenizer,
        ProcessorConfig(max_length=128, num_image_tokens=model.num_image_tokens),
        ImageTransform(size),
    )
    samples = []
    for i, (path, caption) in enumerate(zip(paths, CAPTIONS, strict=True)):
        record = {
            "task": "caption",
            "conversations": [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": caption}],
            "references": [caption],
            "image": path.name,
        }
        raw = RawSample(
            f"{i:010d}", "t.tar", i, {"json": json.dumps(record).encode(), "png": path.read_bytes()}
        )
        samples.append(proc(raw))
    batch = pad_collate(samples, tokenizer.pad_token_id, image_size=size)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 125k-parameter model: more threads only contend on a shared CPU
    try:
        for _ in range(steps):
            out = model(**batch, mask_mode=mask)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), float(out.loss.detach())


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory, tokenizer, tiny_model_config):
    import json

    from vlmtrain.models.vlm import VisionLanguageModel

    root = tmp_path_factory.mktemp("dropin")
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_model_config, tokenizer)
    paths = caption_images(root / "images")
    model, loss = train_tiny_captioner(model, tokenizer, paths)
    model.save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(str(root / "ckpt"))
    write_stage_config(root / "ckpt", "causal")
    export_hf(root / "ckpt", root / "hf")  # auto: a causal-trained model gets the stock class
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["model_type"] == "llava" and "auto_map" not in config
    return root, paths, loss


def vlmtrain_captions(root, paths, monkeypatch) -> dict[str, str]:
    """`vlmtrain caption --mask causal` (the CLI itself), parsed from its output lines `PATH: CAPTION`."""
    from rich.console import Console
    from typer.testing import CliRunner

    from vlmtrain import cli

    monkeypatch.setattr(cli, "console", Console(width=10_000, color_system=None))
    args = ["caption", *map(str, paths), "--checkpoint", str(root / "ckpt"), "--mask", "causal"]
    r = CliRunner().invoke(cli.app, [*args, "--max-new-tokens", str(MAX_NEW)])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == len(paths), r.output
    out = {}
    for path, line in zip(paths, lines, strict=True):
        assert line.startswith(f"{path}: "), line
        out[str(path)] = line[len(f"{path}: ") :]
    return out


@pytest.mark.slow
def test_export_is_drop_in_for_generate_and_pipeline(trained_export, monkeypatch):
    """Greedy captions from transformers' generate() via the standard chat-template idiom, and from
    pipeline("image-text-to-text"), equal `vlmtrain caption --mask causal` on every image; they stop at
    <|im_end|> (the export's generation config), and the model really learned the captions."""
    from transformers import pipeline

    root, paths, loss = trained_export
    hf = root / "hf"
    ours = vlmtrain_captions(root, paths, monkeypatch)
    assert sum(ours[str(p)] == c for p, c in zip(paths, CAPTIONS, strict=True)) >= len(CAPTIONS) - 1, (
        ours,
        loss,
    )

    llava = LlavaForConditionalGeneration.from_pretrained(str(hf)).eval()
    processor = AutoProcessor.from_pretrained(str(hf))
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in llava.generation_config.eos_token_id
    from vlmtrain.data.prompt import CAPTION_PROMPT

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    pipe = pipeline("image-text-to-text", model=str(hf))
    for path in paths:
        image = Image.open(path)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            generated = llava.generate(**inputs, max_new_tokens=MAX_NEW)
        new = generated[0, inputs["input_ids"].shape[1] :].tolist()
        assert im_end in new and len(new) < MAX_NEW, f"{path}: generation did not stop at <|im_end|>: {new}"
        text = processor.decode(new, skip_special_tokens=True)
        assert text == ours[str(path)], path

        chat = [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": CAPTION_PROMPT}],
            }
        ]
        piped = pipe(text=chat, max_new_tokens=MAX_NEW)[0]["generated_text"][-1]
        assert piped == {"role": "assistant", "content": ours[str(path)]}, path
