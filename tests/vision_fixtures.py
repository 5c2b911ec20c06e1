"""Tiny random-init vision towers of every family, saved as checkpoint directories with an image processor.

Each is the real transformers class (SiglipVisionModel, CLIPVisionModel, a full CLIPModel / SiglipModel with a
text tower, Dinov2Model, Dinov2WithRegistersModel), hidden 32, 2 layers, patch 8, saved with
`save_pretrained` next to its family's transformers image processor (PIL backend) `save_pretrained` output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from conftest import TINY_VISION

from vlmtrain.data.image_transform import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class TowerCase:
    """One tiny checkpoint and what a reader must find in it, written by hand."""

    name: str
    family: str  # the family it must load as
    model_class: str  # the transformers class of the loaded tower
    skip: int  # leading non-patch tokens: CLS, registers
    image_size: int  # the preprocessing's output side
    default_layer: int
    processor_class: str

    @property
    def patches(self) -> int:
        return (self.image_size // 8) ** 2


DINO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2, "image_size": 32}

CASES = {
    "siglip": TowerCase("siglip", "siglip", "SiglipVisionModel", 0, 32, -1, "SiglipImageProcessorPil"),
    "siglip_full": TowerCase(
        "siglip_full", "siglip", "SiglipVisionModel", 0, 32, -1, "SiglipImageProcessorPil"
    ),
    "clip": TowerCase("clip", "clip", "CLIPVisionModel", 1, 32, -2, "CLIPImageProcessorPil"),
    "clip_full": TowerCase("clip_full", "clip", "CLIPVisionModel", 1, 32, -2, "CLIPImageProcessorPil"),
    "dinov2": TowerCase("dinov2", "dinov2", "Dinov2Model", 1, 32, -1, "BitImageProcessorPil"),
    # 2 registers, and 48 px crops of a 32 px config: DINOv2 interpolates its position embeddings
    "dinov2_reg": TowerCase(
        "dinov2_reg", "dinov2_with_registers", "Dinov2WithRegistersModel", 3, 48, -1, "BitImageProcessorPil"
    ),
}


def build_model(name: str) -> Any:
    """The tiny transformers model of a case (random init, seeded)."""
    import transformers as tf

    torch.manual_seed(sum(map(ord, name)))
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    if name == "siglip":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY_VISION, vision_use_head=False))
    if name == "siglip_full":  # with its text tower and attention-pooling head: both ignored on load
        return tf.SiglipModel(
            tf.SiglipConfig(text_config={**text, "vocab_size": 64}, vision_config=TINY_VISION)
        )
    if name == "clip":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(**TINY_VISION))
    if name == "clip_full":
        return tf.CLIPModel(
            tf.CLIPConfig(
                text_config={**text, "vocab_size": 64}, vision_config=TINY_VISION, projection_dim=16
            )
        )
    if name == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(**DINO, patch_size=8))
    if name == "dinov2_reg":
        return tf.Dinov2WithRegistersModel(
            tf.Dinov2WithRegistersConfig(**DINO, patch_size=8, num_register_tokens=2)
        )
    raise KeyError(name)


def build_processor(name: str) -> Any:
    import transformers as tf

    case = CASES[name]
    if case.family == "siglip":
        return tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    if case.family == "clip":
        return tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    edge = case.image_size * 256 // 224 + 1  # not the family default's ratio: the file must win
    return tf.BitImageProcessorPil(
        size={"shortest_edge": edge},
        crop_size={"height": case.image_size, "width": case.image_size},
        do_center_crop=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        resample=3,
    )


def save_tower(name: str, directory: Path) -> Path:
    """`directory` with the case's config.json, model.safetensors and preprocessor_config.json."""
    build_model(name).save_pretrained(str(directory))
    build_processor(name).save_pretrained(str(directory))
    return directory


def vision_part(model: Any) -> Any:
    """The vision tower inside a full SigLIP / CLIP model (or the model itself)."""
    return getattr(model, "vision_model", model)
