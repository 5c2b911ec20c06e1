"""Vision towers by family: the entry points that build or load a tower and read its preprocessing.

The family comes from the checkpoint's config.json `model_type` (or `model.vision_config["model_type"]`, default
`siglip`); see base.py for the interface and siglip.py, clip.py, dinov2.py for the families.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

from vlmtrain.data.image_transform import ImageTransform
from vlmtrain.models.backbones.vision.base import (
    DEFAULT_MODEL_TYPE,
    PREPROCESSOR_CONFIG,
    TowerShape,
    VisionFamily,
    family_by_name,
    family_for_model_type,
    supported_families,
)
from vlmtrain.models.strict_load import checkpoint_config

__all__ = [
    "TowerShape",
    "TowerSpec",
    "VisionFamily",
    "build_tower",
    "family_by_name",
    "family_for_model_type",
    "family_of_config",
    "load_tower",
    "spec_from_checkpoint",
    "spec_from_dict",
    "supported_families",
]


@dataclass(frozen=True)
class TowerSpec:
    """What a tower is, without its weights: family, transformers config, image preprocessing."""

    family: VisionFamily
    config: PretrainedConfig
    transform: ImageTransform


def family_of_config(config: PretrainedConfig) -> VisionFamily:
    """The family of a built tower's config (its model_type)."""
    return family_for_model_type(config.model_type, f"{type(config).__name__}")


def spec_from_dict(data: Mapping[str, Any], transform: ImageTransform | None = None) -> TowerSpec:
    """From a config dict (`model.vision_config` or a saved `vision_config`); `model_type` defaults to siglip."""
    model_type = data.get("model_type", DEFAULT_MODEL_TYPE)
    family = family_for_model_type(model_type, "model.vision_config")
    config = family.config_from_dict(data)
    return TowerSpec(family, config, transform or family.default_transform(config))


def spec_from_checkpoint(source: str) -> TowerSpec:
    """From a checkpoint's config.json and preprocessor_config.json (the family's default without one)."""
    model_type = checkpoint_config(source).get("model_type")
    family = family_for_model_type(str(model_type), f"{source} (config.json)")
    config = family.config_from_checkpoint(source)
    default = family.default_transform(config)
    processor = _preprocessor_config(source)
    transform = (
        default
        if processor is None
        else ImageTransform.from_preprocessor_config(processor, f"{source}/{PREPROCESSOR_CONFIG}", default)
    )
    return TowerSpec(family, config, transform)


def _preprocessor_config(source: str) -> dict[str, Any] | None:
    local = Path(str(source))
    if local.is_dir():
        path = local / PREPROCESSOR_CONFIG
        return json.loads(path.read_text()) if path.is_file() else None
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        data, _ = ImageProcessingMixin.get_image_processor_dict(str(source))
    except OSError:  # a hub checkpoint without one: the family's default applies
        return None
    return data


def build_tower(
    data: Mapping[str, Any], transform: ImageTransform | None = None
) -> tuple[TowerSpec, PreTrainedModel]:
    """A randomly initialised tower from a config dict."""
    spec = spec_from_dict(data, transform)
    return spec, spec.family.build(spec.config)


def load_tower(source: str) -> tuple[TowerSpec, PreTrainedModel]:
    """A tower from a hub id / directory: the family from its model_type, every weight loaded (strict)."""
    spec = spec_from_checkpoint(source)
    model_type = str(checkpoint_config(source).get("model_type"))
    tower = spec.family.load(source, model_type)
    return TowerSpec(spec.family, tower.config, spec.transform), tower
