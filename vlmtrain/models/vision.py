"""SigLIP vision tower: load or build it, and select the hidden state that feeds the projector."""

from __future__ import annotations

from typing import Any

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from vlmtrain.precision import LOAD_DTYPE


def load_vision_tower(name_or_path: str | None, config: dict[str, Any] | None = None) -> SiglipVisionModel:
    """A SigLIP vision tower from a hub id / local dir (a full SigLIP checkpoint works) or a config dict.

    The attention-pooling head is dropped (`vision_use_head=False`): the VLM consumes all patch tokens.
    """
    if config is not None:
        cfg = SiglipVisionConfig(**{**config, "vision_use_head": False})
        cfg._attn_implementation = "sdpa"
        return SiglipVisionModel(cfg).to(LOAD_DTYPE)
    if name_or_path is None:
        raise ValueError("give a SigLIP checkpoint (hub id or directory) or a vision_config")
    # fp32 whatever the checkpoint's dtype: the precision policy's load dtype.
    return SiglipVisionModel.from_pretrained(
        name_or_path, vision_use_head=False, attn_implementation="sdpa", dtype=LOAD_DTYPE
    )


def num_patches(config: SiglipVisionConfig) -> int:
    """Image tokens per image: (image_size / patch_size)^2 (256 for so400m at 224 px, patch 14)."""
    side = config.image_size // config.patch_size
    return side * side


def select_features(tower: SiglipVisionModel, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """Patch features [N, P, d_vision] from hidden state `layer` (LLaVA's `vision_feature_layer`)."""
    out = tower(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[layer]
