"""Export to transformers: the exported folder loads with LLaVA's own classes and gives equal logits (causal)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlmtrain.data.process import ImageTransform
from vlmtrain.data.tokenizer import IMAGE_TOKEN
from vlmtrain.export import export_hf


def test_export_loads_in_transformers_with_equal_logits(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(str(tmp_path / "ckpt"))
    export_hf(tmp_path / "ckpt", tmp_path / "hf")

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
