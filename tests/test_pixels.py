"""uint8 pixels from the data workers, normalized on the device by the model (issue 26 item 6).

References: the host-side float32 transform as it was before (x * scale + offset in numpy, then cast), the
float64 formula (x / 255 - mean) / std, and the model's output on pixels normalized on the host.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtrain.data.image_transform import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageTransform,
    to_rgb,
)

TRANSFORMS = {
    "siglip": ImageTransform(32),
    "clip": ImageTransform(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize_shortest_edge=36),
    "dinov2": ImageTransform(32, IMAGENET_MEAN, IMAGENET_STD, resize_shortest_edge=40),
}


def random_image(seed: int, size: tuple[int, int] = (45, 61), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return img if mode == "RGBA" else img.convert(mode)


def host_float_path(t: ImageTransform, img: Image.Image) -> np.ndarray:
    """The float32 pixels the data workers produced before uint8: one numpy multiply-add from the 8-bit image."""
    chw = np.asarray(t.resized(to_rgb(img))).transpose(2, 0, 1)
    std = np.asarray(t.std, dtype=np.float32)
    scale = (np.float32(1) / (np.float32(255) * std)).reshape(3, 1, 1)
    offset = (-np.asarray(t.mean, dtype=np.float32) / std).reshape(3, 1, 1)
    out = np.empty(chw.shape, dtype=np.float32)
    np.multiply(chw, scale, out=out)
    out += offset
    return out


@pytest.mark.parametrize("family", list(TRANSFORMS))
def test_device_normalization_equals_the_float_path(family: str) -> None:
    t = TRANSFORMS[family]
    imgs = [random_image(s, mode=mode) for s, mode in ((0, "RGB"), (1, "RGBA"), (2, "L"))]
    pixels = torch.stack([t.pixels(img) for img in imgs])  # [3 images, 3, 32, 32]
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 32, 32)
    for img, p in zip(imgs, pixels, strict=True):  # the 8-bit pixels are the resized image itself
        np.testing.assert_array_equal(p.numpy(), np.asarray(t.resized(to_rgb(img))).transpose(2, 0, 1))
    old = torch.from_numpy(np.stack([host_float_path(t, img) for img in imgs]))
    # fp32: bit for bit the old host path; bf16 (the model's dtype): the old path cast once
    assert torch.equal(t.normalize(pixels), old)
    assert torch.equal(t.normalize(pixels, torch.bfloat16), old.to(torch.bfloat16))
    assert torch.equal(torch.stack([t(img) for img in imgs]), old)  # __call__: HF's float pixel values
    # and the float64 formula within float32 rounding (|values| <= 2.7: a few ulp)
    x = pixels.double()
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (t.mean, t.std))
    torch.testing.assert_close(t.normalize(pixels).double(), (x / 255 - mean) / std, rtol=0, atol=1e-6)


def test_every_byte_value_and_bad_input() -> None:
    t = TRANSFORMS["clip"]
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 4, 256).contiguous()
    ref = (values.double() / 255 - torch.tensor(t.mean, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
        t.std, dtype=torch.float64
    ).view(3, 1, 1)
    torch.testing.assert_close(t.normalize(values).double(), ref, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        t.normalize(values.float())
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        t.normalize(values[:2])


def test_model_normalizes_uint8_pixels(tiny_model) -> None:
    """The model's image path on uint8 pixels equals it on host-normalized float pixels, in fp32 and bf16."""
    t = tiny_model.image_transform
    imgs = [random_image(s, (t.image_size + 7, t.image_size + 3)) for s in range(3)]
    u8 = torch.stack([t.pixels(img) for img in imgs])
    floats = torch.stack([t(img) for img in imgs])
    assert torch.equal(tiny_model.tower_pixels(u8), floats)
    with torch.no_grad():
        assert torch.equal(tiny_model.encode_images(u8), tiny_model.encode_images(floats))
        half = tiny_model.to(torch.bfloat16)
        assert torch.equal(half.tower_pixels(u8), floats.to(torch.bfloat16))
        assert torch.equal(half.encode_images(u8), half.encode_images(floats))
    with pytest.raises(TypeError, match="uint8 pixels"):
        tiny_model.encode_images(u8.long())
