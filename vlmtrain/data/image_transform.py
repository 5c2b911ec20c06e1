"""Image preprocessing of a vision tower: RGB, resize (exact or shorter side), center crop, rescale, normalize.

One frozen dataclass, `ImageTransform`, describes and applies it. A vision-tower family supplies its default
(vlmtrain.models.backbones.vision); a checkpoint's `preprocessor_config.json` (transformers' image-processor
file) overrides it (`ImageTransform.from_preprocessor_config`); the VLM saves the chosen one in its
vlm_config.json (`to_dict` / `from_dict`), so training, evaluation, captioning and export all use one transform.
The data layer owns it (it never imports the models).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image

# transformers' defaults: the SigLIP ([-1, 1]) scale, OpenAI CLIP's statistics and ImageNet's (DINOv2).
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded image to 8-bit RGB.

    Transparency (alpha band, or a palette/RGB ``transparency`` entry) is composited on WHITE, as
    transformers' ``convert_to_rgb`` does for SigLIP: dark logos and text on transparent backgrounds stay
    visible, and training matches what the Hugging Face processor shows the model at inference.
    16-bit greyscale (``I;16*``, and ``I`` as 16-bit PNGs may open) is scaled to 8 bits by round(v / 257)
    rather than clipped at 255 as a plain PIL ``convert`` would (which turns most such images white).
    """
    if img.mode == "RGB" and img.info.get("transparency") is None:
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode == "F":
        raise ValueError(
            "32-bit float images (mode F) have no defined 8-bit range; convert them when sharding"
        )
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """RGB, resize, optional center crop, rescale by 1/255, normalize: a square [3, image_size, image_size] image.

    Two resize styles, those of transformers' image processors (PIL backend), whose PIL calls are made here
    too, so the 8-bit pixels are identical:
    - `resize_shortest_edge` None (SigLIP): resize to exactly image_size x image_size;
    - `resize_shortest_edge` = s (CLIP, DINOv2): scale the shorter side to s, the longer to
      int(s x long / short) (transformers' truncation), then center-crop image_size x image_size, top-left
      corner at ((h - image_size) // 2, (w - image_size) // 2).
    Rescale and normalize are folded into one float32 multiply-add, which differs from transformers'
    float64-rescale-then-float32 arithmetic only in the last bits (~1e-7). The data workers stop at the 8-bit
    pixels (`pixels`); the model applies `normalize` on the device.
    """

    image_size: int = 224
    """Output height and width in pixels: the crop size, or the exact resize size without a crop."""
    mean: tuple[float, float, float] = SIGLIP_MEAN
    """Per-channel mean subtracted after rescaling to [0, 1]."""
    std: tuple[float, float, float] = SIGLIP_STD
    """Per-channel standard deviation divided by after subtracting the mean."""
    resample: Image.Resampling = Image.Resampling.BICUBIC
    """PIL resampling filter for the resize."""
    resize_shortest_edge: int | None = None
    """Resize the shorter side to this and center-crop `image_size` (None: resize to exactly image_size)."""

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channels, got mean={self.mean} std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        edge = self.resize_shortest_edge
        if edge is not None and edge < self.image_size:
            raise ValueError(
                f"resize_shortest_edge={edge} is below the crop size {self.image_size}: the crop would need "
                "padding; use a shortest edge >= the crop size"
            )
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "resample", Image.Resampling(self.resample))

    @property
    def decode_size(self) -> int:
        """The smallest side a draft JPEG decode may shrink an image to without losing resize input."""
        return self.resize_shortest_edge or self.image_size

    @cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """[3, 1, 1] float32 scale and offset: (x / 255 - mean) / std == x * scale + offset."""
        std = np.asarray(self.std, dtype=np.float32)
        scale = np.float32(1) / (np.float32(255) * std)
        offset = -np.asarray(self.mean, dtype=np.float32) / std
        return scale.reshape(3, 1, 1), offset.reshape(3, 1, 1)

    def resized(self, rgb: Image.Image) -> Image.Image:
        """The resized (and cropped) 8-bit RGB image."""
        size = self.image_size
        if self.resize_shortest_edge is None:
            return rgb if rgb.size == (size, size) else rgb.resize((size, size), resample=self.resample)
        width, height = rgb.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.resize_shortest_edge, int(self.resize_shortest_edge * long / short)
        target = (new_short, new_long) if width <= height else (new_long, new_short)
        if rgb.size != target:
            rgb = rgb.resize(target, resample=self.resample)
        top, left = (target[1] - size) // 2, (target[0] - size) // 2
        return rgb.crop((left, top, left + size, top + size))

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """[3, image_size, image_size] uint8: RGB, resized and cropped, not yet rescaled or normalized.

        What the data workers hand to the trainer (a quarter of float32's bytes through /dev/shm, pinned memory
        and the host-to-device copy); `normalize` finishes the transform on the device.
        """
        hwc = np.asarray(self.resized(to_rgb(img)))  # [H, W, 3] uint8
        return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[..., 3, H, W] uint8 pixels -> (x / 255 - mean) / std in `dtype`, on the pixels' device.

        The one place the rescale and normalization happen, for training, validation, evaluation and
        generation (VisionLanguageModel.encode_images) and for `__call__`. Computed in float32 as x * scale +
        offset per channel, with the scale and offset as Python scalars (float32 values) so no device tensor is
        built or copied per call, then cast once to `dtype`: the same float32 operations as a host-side
        transform, so on the device the pixels equal the host's bit for bit (a compiled kernel may fuse the
        multiply-add, within 1 float32 ulp).
        """
        if pixels.dtype != torch.uint8:
            raise TypeError(f"normalize takes uint8 pixels (ImageTransform.pixels), got {pixels.dtype}")
        if pixels.ndim < 3 or pixels.shape[-3] != 3:
            raise ValueError(f"normalize takes [..., 3, H, W] pixels, got shape {tuple(pixels.shape)}")
        scale, offset = self._affine
        out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
        for c in range(3):  # per channel: scalars, no [3, 1, 1] tensor to move to the device
            torch.mul(pixels[..., c, :, :], float(scale[c, 0, 0]), out=out[..., c, :, :])
            out[..., c, :, :].add_(float(offset[c, 0, 0]))
        return out if dtype == torch.float32 else out.to(dtype)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """[3, image_size, image_size] float32 pixel values, as transformers' image processor gives them (the
        exported model's contract, and what a vision tower called directly takes)."""
        return self.normalize(self.pixels(img))

    # ---- persistence (vlm_config.json `image_preprocessing`) --------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["resample"] = int(self.resample)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageTransform:
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})

    @classmethod
    def from_preprocessor_config(
        cls, data: Mapping[str, Any], source: str, default: ImageTransform
    ) -> ImageTransform:
        """From a transformers `preprocessor_config.json` (SigLIP, CLIP, Bit / DINOv2 image processors).

        Entries it leaves out keep `default`'s value (the family's). `size` as {"height", "width"} is an exact
        resize, {"shortest_edge"} a shorter-side resize; a bare integer is a shorter side when the file
        center-crops (CLIP's old files) and a square otherwise (transformers' per-class default). Square
        outputs and a 1/255 rescale only: anything else is an error naming `source`.
        """

        def fail(what: str) -> ValueError:
            return ValueError(f"{source}: {what}; vlmtrain supports square outputs with a 1/255 rescale")

        def square(entry: Any, key: str) -> int:
            if isinstance(entry, int):
                return entry
            if isinstance(entry, Mapping) and entry.get("height") == entry.get("width") is not None:
                return int(entry["height"])
            raise fail(f"`{key}` {entry!r} is not square")

        if data.get("do_resize", True) is False:
            raise fail("do_resize is false (images of any size would reach the tower)")
        if data.get("do_rescale", True) is False or not math.isclose(
            data.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-6
        ):
            raise fail(f"rescale {data.get('do_rescale')} / {data.get('rescale_factor')} is not 1/255")
        crop = bool(data.get("do_center_crop", False))
        size = data.get("size")
        fields: dict[str, Any] = {}
        if size is None:
            fields["image_size"] = default.image_size
            fields["resize_shortest_edge"] = default.resize_shortest_edge
        elif (isinstance(size, int) and crop) or (isinstance(size, Mapping) and "shortest_edge" in size):
            edge = int(size if isinstance(size, int) else size["shortest_edge"])
            if not crop:
                raise fail("a shortest-edge resize without do_center_crop gives non-square images")
            fields["resize_shortest_edge"] = edge
            fields["image_size"] = square(data["crop_size"], "crop_size") if "crop_size" in data else edge
        else:
            fields["image_size"] = square(size, "size")
            fields["resize_shortest_edge"] = None
            if (
                crop
                and "crop_size" in data
                and square(data["crop_size"], "crop_size") != fields["image_size"]
            ):
                raise fail("an exact resize followed by a smaller crop is not supported")
        if data.get("do_normalize", True) is False:
            fields["mean"], fields["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            fields["mean"] = _three(data.get("image_mean", default.mean))
            fields["std"] = _three(data.get("image_std", default.std))
        fields["resample"] = data.get("resample", default.resample)
        return cls(**fields)


def _three(value: Any) -> tuple[float, float, float]:
    """A per-channel statistic; a scalar applies to all three channels (as transformers broadcasts it)."""
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)  # type: ignore[return-value]
