"""SigLIP and fixed-resolution SigLIP2 towers (model_type `siglip`, `siglip_vision_model`).

Every token is a patch (no CLS). The attention-pooling head is dropped (`vision_use_head=False`); the hidden
states are taken before `post_layernorm`, which therefore no forward reaches. Preprocessing: an exact resize to
the config's image size, mean and std 0.5 (the [-1, 1] scale).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, SiglipVisionConfig, SiglipVisionModel

from vlmtrain.data.image_transform import SIGLIP_MEAN, SIGLIP_STD, ImageTransform
from vlmtrain.models.backbones.vision.base import TowerShape, VisionFamily, register


class SiglipFamily(VisionFamily):
    name = "siglip"
    model_types = ("siglip", "siglip_vision_model")
    config_class = SiglipVisionConfig
    model_class = SiglipVisionModel
    default_feature_layer = -1
    # a full SigLIP checkpoint: its text tower, the contrastive scale and bias, the dropped pooling head
    ignored_checkpoint_keys = (r"^text_model\.", r"^logit_(scale|bias)$", r"(^|\.)head\.")
    unused_modules = ("post_layernorm", "head")
    layers_path = "encoder.layers"

    def config_overrides(self) -> dict[str, Any]:
        return {"vision_use_head": False}

    def default_transform(self, config: PretrainedConfig) -> ImageTransform:
        return ImageTransform(config.image_size, SIGLIP_MEAN, SIGLIP_STD)

    def tower_shape(self, config: PretrainedConfig) -> TowerShape:
        return TowerShape(
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            False,
        )


SIGLIP = register(SiglipFamily())
