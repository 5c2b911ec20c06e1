"""DINOv2 towers, with and without register tokens (model_type `dinov2`, `dinov2_with_registers`).

The hidden states start with CLS (and the register tokens, for the registers variant): dropped. They are taken
before the final `layernorm`, and `embeddings.mask_token` serves only masked-image pretraining: no forward
reaches either. DINOv2 interpolates its position embeddings, so the image size is the preprocessing's (224 for the
released checkpoints, whose config says 518), any multiple of the patch size. Preprocessing: shorter side to
256/224 of the crop, center crop, ImageNet mean and std (transformers' BitImageProcessor).
"""

from __future__ import annotations

from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PretrainedConfig,
)

from vlmtrain.data.image_transform import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from vlmtrain.models.backbones.vision.base import TowerShape, VisionFamily, register

RESIZE_RATIO = (256, 224)
"""Shorter side : crop of DINOv2's released preprocessing (shortest_edge 256, crop 224)."""


class Dinov2Family(VisionFamily):
    name = "dinov2"
    model_types = ("dinov2",)
    config_class = Dinov2Config
    model_class = Dinov2Model
    default_feature_layer = -1
    unused_modules = ("layernorm", "embeddings.mask_token")
    layers_path = "encoder.layer"

    def default_transform(self, config: PretrainedConfig) -> ImageTransform:
        size = config.image_size
        edge = size * RESIZE_RATIO[0] // RESIZE_RATIO[1]
        return ImageTransform(size, IMAGENET_MEAN, IMAGENET_STD, resize_shortest_edge=edge)

    def check_image_size(self, config: PretrainedConfig, image_size: int) -> None:
        pass  # position embeddings are interpolated to any size

    def skip_tokens(self, config: PretrainedConfig) -> int:
        return 1  # CLS

    def tower_shape(self, config: PretrainedConfig) -> TowerShape:
        hidden = config.hidden_size
        mlp = int(hidden * config.mlp_ratio)
        if config.use_swiglu_ffn:  # Dinov2SwiGLUFFN: weights_in -> 2 x h, weights_out h -> hidden
            mlp = (int(mlp * 2 / 3) + 7) // 8 * 8
        return TowerShape(
            hidden,
            mlp,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.use_swiglu_ffn,
            layer_scale=True,
        )


class Dinov2RegistersFamily(Dinov2Family):
    name = "dinov2_with_registers"
    model_types = ("dinov2_with_registers",)
    config_class = Dinov2WithRegistersConfig
    model_class = Dinov2WithRegistersModel

    def skip_tokens(self, config: PretrainedConfig) -> int:
        return 1 + config.num_register_tokens  # CLS, then the registers


DINOV2 = register(Dinov2Family())
DINOV2_REGISTERS = register(Dinov2RegistersFamily())
