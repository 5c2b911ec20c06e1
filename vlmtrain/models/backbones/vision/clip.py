"""CLIP ViT towers (model_type `clip`, `clip_vision_model`).

The hidden states start with the CLS token (dropped: the VLM reads patches only), after `pre_layrnorm`;
`post_layernorm` only normalises the pooled CLS output, so no forward reaches it. LLaVA reads the second-to-last
layer (feature layer -2), whose successor layer then goes unused too. Preprocessing: shorter side to the image
size, center crop, OpenAI's mean and std.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, CLIPVisionModel, PretrainedConfig

from vlmtrain.data.image_transform import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from vlmtrain.models.backbones.vision.base import TowerShape, VisionFamily, register


class ClipFamily(VisionFamily):
    name = "clip"
    model_types = ("clip", "clip_vision_model")
    config_class = CLIPVisionConfig
    model_class = CLIPVisionModel
    default_feature_layer = -2
    # a full CLIP checkpoint: its text tower and the two contrastive projections
    ignored_checkpoint_keys = (r"^text_model\.", r"^(text|visual)_projection\.", r"^logit_scale$")
    unused_modules = ("post_layernorm",)
    layers_path = "encoder.layers"

    def default_transform(self, config: PretrainedConfig) -> ImageTransform:
        size = config.image_size
        return ImageTransform(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize_shortest_edge=size)

    def skip_tokens(self, config: PretrainedConfig) -> int:
        return 1  # CLS

    def tower_shape(self, config: PretrainedConfig) -> TowerShape:
        return TowerShape(
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            False,
        )


CLIP = register(ClipFamily())
