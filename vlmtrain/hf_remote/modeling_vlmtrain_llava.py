"""LLaVA with vlmtrain's prefix mask: the modeling file a `vlmtrain export` folder ships for trust_remote_code.

Self-contained (transformers and torch only): it is copied next to config.json, whose `auto_map` names it.
It changes two things of transformers' LlavaForConditionalGeneration, through public APIs only:
- image features: hidden_states[vision_feature_layer][:, vision_skip_tokens:] of any AutoModel tower, then an
  optional k x k pixel shuffle (k = pixel_shuffle), then the 2-layer projector;
- the mask of the forward that carries the image (the prefill): image tokens attend to each other both ways,
  everything else is causal (`prefill_mask="prefix"`, as stages 1-3 train). It reaches the LM as a prepared
  mask built by `masking_utils.create_causal_mask(block_sequence_ids=...)`, so sdpa, eager and flex all work.
  Decode steps carry no image and run transformers' own causal mask: a new text token sees every earlier one.
"""

import math
from typing import Literal

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.activations import ACT2FN
from transformers.masking_utils import (
    blockwise_overlay,
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaModel, LlavaPreTrainedModel


@strict
class VlmtrainLlavaConfig(LlavaConfig):
    """LlavaConfig plus how image features are taken and which mask the image prefill runs under."""

    model_type = "vlmtrain_llava"

    vision_skip_tokens: int = 0  # leading tower tokens dropped (CLS, registers)
    pixel_shuffle: int = 1  # k: k x k neighbouring patches merge into one image token
    prefill_mask: Literal["prefix", "causal"] = "prefix"  # the mask the model was trained with


def pixel_shuffle(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, s*s, D] -> [N, (s/k)^2, k*k*D]: each output token is a k x k block of patches, rows first."""
    n, p, d = x.shape
    s = math.isqrt(p)
    if s * s != p or s % k:
        raise ValueError(
            f"pixel_shuffle={k} needs a square patch grid with a side divisible by {k}, got {p} tokens"
        )
    x = x.reshape(n, s // k, k, s // k, k, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (s // k) ** 2, k * k * d)


class Projector(nn.Module):
    """LLaVA's projector (same parameter names) on k*k*d_vision inputs."""

    def __init__(self, config: VlmtrainLlavaConfig) -> None:
        super().__init__()
        d_in = config.vision_config.hidden_size * config.pixel_shuffle**2
        d_text = config.text_config.hidden_size
        self.linear_1 = nn.Linear(d_in, d_text, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(d_text, d_text, bias=config.multimodal_projector_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class VlmtrainLlavaModel(LlavaModel):
    """LlavaModel whose image features and image-prefill mask are vlmtrain's."""

    def __init__(self, config: VlmtrainLlavaConfig) -> None:
        super().__init__(config)
        if config.pixel_shuffle > 1:  # LLaVA's projector takes d_vision inputs; these are k*k*d_vision wide
            self.multi_modal_projector = Projector(config)

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        cfg = self.config
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[cfg.vision_feature_layer][:, cfg.vision_skip_tokens :]  # [N, P, D]
        if cfg.pixel_shuffle > 1:
            feats = pixel_shuffle(feats, cfg.pixel_shuffle)
        out.pooler_output = list(self.multi_modal_projector(feats))
        return out

    def forward(
        self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None, **kw
    ):
        has_image = pixel_values is not None or kw.get("mm_encoder_outputs") is not None
        if has_image and self.config.prefill_mask == "prefix":
            if input_ids is None:
                raise ValueError(
                    "pass input_ids with the image: the prefix mask is built from the image tokens"
                )
            if attention_mask is not None and not (
                isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2
            ):
                raise ValueError(
                    "the image prefill builds its own prefix mask from input_ids: pass a 2D padding mask or none "
                    "(generate with the default dynamic cache, not a static/compiled one)"
                )
            attention_mask = self.prefix_mask(input_ids, attention_mask, position_ids, cache)
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kw,
        )

    def prefix_mask(self, input_ids, padding_mask, position_ids, cache):
        """Causal, except that the image tokens of a row form one bidirectional block (block id 0; text -1)."""
        text_cfg = self.config.get_text_config()
        blocks = torch.where(input_ids == self.config.image_token_id, 0, -1)
        kwargs = {
            "config": text_cfg,
            # only its batch size, length, dtype and device are read
            "inputs_embeds": self.get_input_embeddings()(input_ids),
            "attention_mask": padding_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        full = create_causal_mask(**kwargs, block_sequence_ids=blocks)
        if "sliding_attention" not in (getattr(text_cfg, "layer_types", None) or ()):
            return full  # a prepared mask: every transformers LM takes it as is
        # Sliding-window layers (Gemma 3, Qwen2 with use_sliding_window): the window's causal mask or the image block.
        sliding = create_sliding_window_causal_mask(**kwargs, or_mask_function=blockwise_overlay(blocks))
        return {"full_attention": full, "sliding_attention": sliding}


class VlmtrainLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LlavaForConditionalGeneration on VlmtrainLlavaModel; generate() and pipelines work unchanged."""

    config_class = VlmtrainLlavaConfig
    _supports_flash_attn = False  # flash attention cannot take the bidirectional image block

    def __init__(self, config: VlmtrainLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = VlmtrainLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
