"""The interface every vision-tower family implements, and the registry keyed by config.json `model_type`.

A family (siglip.py, clip.py, dinov2.py) tells the rest of vlmtrain everything it needs about its towers: how to
build one from a config dict or load one strictly from a checkpoint, its default image preprocessing, how many
patches it gives and which leading tokens (CLS, registers) to drop, its default feature layer, and which
parameters no forward reaches. The VLM, the FLOP model, `plan` and the init check ask the family; nothing else
names a transformers vision class. Adding a family = adding one module to this package that calls `register`.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from vlmtrain.data.image_transform import ImageTransform
from vlmtrain.models.strict_load import load_strict
from vlmtrain.precision import LOAD_DTYPE

PREPROCESSOR_CONFIG = "preprocessor_config.json"
DEFAULT_MODEL_TYPE = "siglip"
"""`model.vision_config` without a `model_type` builds a SigLIP tower (configs written before families)."""


@dataclass(frozen=True)
class TowerShape:
    """The matmul shapes of a tower's encoder stack, for the FLOP model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    gated_mlp: bool  # SwiGLU-style (two input projections) rather than fc1, fc2
    layer_scale: bool = False  # a learned per-channel scale after the attention and MLP outputs (DINOv2)


class VisionFamily(ABC):
    """One family of vision towers (one transformers model class). Stateless: methods take the tower or config."""

    name: ClassVar[str]
    """The family's name, recorded in vlm_config.json as `vision_family`."""
    model_types: ClassVar[tuple[str, ...]]
    """config.json `model_type` values of its checkpoints (a full model's and the vision-only one's)."""
    config_class: ClassVar[type[PretrainedConfig]]
    model_class: ClassVar[type[PreTrainedModel]]
    default_feature_layer: ClassVar[int]
    """hidden_states index the projector reads when `model.vision_feature_layer` is null."""
    ignored_checkpoint_keys: ClassVar[tuple[str, ...]] = ()
    """Regexes of checkpoint keys the tower does not use by design (a full checkpoint's text tower, heads)."""
    unused_modules: ClassVar[tuple[str, ...]] = ()
    """Attribute paths of modules / parameters after (or beside) the hidden states: no forward reaches them."""
    layers_path: ClassVar[str]
    """Attribute path of the encoder's ModuleList of layers."""

    # ---- configs and construction --------------------------------------------------------------------
    def config_overrides(self) -> dict[str, Any]:
        """Config entries forced whatever the checkpoint says (SigLIP: no attention-pooling head)."""
        return {}

    def config_from_dict(self, data: Mapping[str, Any]) -> PretrainedConfig:
        """The tower's config from a plain dict (`model.vision_config`, vlm_config.json's `vision_config`)."""
        clean = {k: v for k, v in data.items() if k != "model_type"}
        return self.config_class.from_dict({**clean, **self.config_overrides()})

    def build(self, config: PretrainedConfig) -> PreTrainedModel:
        """A randomly initialised tower (fp32, SDPA attention)."""
        config._attn_implementation = "sdpa"
        return self.model_class(config).to(LOAD_DTYPE)

    def load(self, source: str, model_type: str) -> PreTrainedModel:
        """The tower of a checkpoint, every weight from the checkpoint (vlmtrain.models.strict_load)."""
        return load_strict(
            self.model_class,
            source,
            model_type=model_type,
            supported=supported_families(),
            ignored_unexpected=self.ignored_checkpoint_keys,
            attn_implementation="sdpa",
            dtype=LOAD_DTYPE,  # fp32 whatever the checkpoint's dtype: the precision policy's load dtype
            **self.config_overrides(),
        )

    def config_from_checkpoint(self, source: str) -> PretrainedConfig:
        """The tower's config of a checkpoint (the vision part of a full one), without the weights."""
        return self.config_class.from_pretrained(str(source), **self.config_overrides())

    # ---- preprocessing and tokens ------------------------------------------------------------------------
    @abstractmethod
    def default_transform(self, config: PretrainedConfig) -> ImageTransform:
        """Preprocessing when the checkpoint has no preprocessor_config.json (or the tower is built)."""

    def check_image_size(self, config: PretrainedConfig, image_size: int) -> None:
        """Fixed position embeddings (SigLIP, CLIP): the preprocessed image must be the config's size."""
        if image_size != config.image_size:
            raise ValueError(
                f"{self.name} tower: the image preprocessing gives {image_size} px images but the tower's "
                f"position embeddings are for {config.image_size} px; make preprocessor_config.json's size / "
                "crop_size equal the config's image_size"
            )

    def grid_side(self, config: PretrainedConfig, image_size: int) -> int:
        """Patches per side for a square `image_size` image."""
        self.check_image_size(config, image_size)
        side, rest = divmod(image_size, config.patch_size)
        if rest:
            raise ValueError(
                f"{self.name} tower: image size {image_size} is not a multiple of the patch size "
                f"{config.patch_size}"
            )
        return side

    def skip_tokens(self, config: PretrainedConfig) -> int:
        """Leading tokens of the hidden states that are not patches (CLS, registers): dropped."""
        return 0

    def hidden_size(self, config: PretrainedConfig) -> int:
        return config.hidden_size

    def num_layers(self, config: PretrainedConfig) -> int:
        return config.num_hidden_layers

    @abstractmethod
    def tower_shape(self, config: PretrainedConfig) -> TowerShape:
        """Encoder matmul shapes for the FLOP model."""

    # ---- forward and parameters ------------------------------------------------------------------------
    def features(self, tower: PreTrainedModel, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        """Patch features [N, P, D]: hidden state `layer` without the leading non-patch tokens."""
        out = tower(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[layer][:, self.skip_tokens(tower.config) :]

    def used_layers(self, config: PretrainedConfig, layer: int) -> int:
        """Encoder layers the feature layer depends on (hidden_states index 0 is the embeddings)."""
        n = self.num_layers(config)
        if not -(n + 1) <= layer <= n:
            raise ValueError(
                f"model.vision_feature_layer={layer} is outside the {self.name} tower's hidden states "
                f"(indices {-(n + 1)}..{n}: 0 is the embeddings, {n} or -1 the last layer)"
            )
        return layer % (n + 1)

    def unused_parameter_names(self, tower: nn.Module, layer: int) -> list[str]:
        """Names (in `tower`) of parameters no forward reaches: after-the-encoder modules and the layers past
        the feature layer."""
        used = self.used_layers(tower.config, layer)
        params = dict(tower.named_parameters())
        names = []
        for path in self.unused_modules:
            names += [n for n in params if n == path or n.startswith(path + ".")]
        for i in range(used, self.num_layers(tower.config)):
            names += [n for n in params if n.startswith(f"{self.layers_path}.{i}.")]
        return names

    def encoder_layers(self, tower: nn.Module) -> nn.ModuleList:
        return tower.get_submodule(self.layers_path)


# ---- registry -------------------------------------------------------------------------------------------
_REGISTRY: dict[str, VisionFamily] = {}
_FAMILIES: dict[str, VisionFamily] = {}


def register(family: VisionFamily) -> VisionFamily:
    """Make `family` known under its name and every model_type it claims (called by each family module)."""
    for key in family.model_types:
        if key in _REGISTRY and _REGISTRY[key] is not family:
            raise ValueError(
                f"model_type {key!r} is claimed by families {_REGISTRY[key].name} and {family.name}"
            )
        _REGISTRY[key] = family
    _FAMILIES[family.name] = family
    return family


def _discover() -> None:
    """Import every family module of this package (each registers itself)."""
    package = __name__.rsplit(".", 1)[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name != "base":
            importlib.import_module(f"{package}.{info.name}")


def supported_families() -> str:
    """`siglip (siglip, siglip_vision_model), clip (...)`, for messages."""
    _discover()
    return ", ".join(f"{f.name} (model_type {', '.join(f.model_types)})" for f in _FAMILIES.values())


def family_for_model_type(model_type: str, where: str) -> VisionFamily:
    """The family of a config.json `model_type`; an unknown one is an error naming `where` and the families."""
    _discover()
    if model_type not in _REGISTRY:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a supported vision tower; supported families: "
            f"{supported_families()}. Fix: name a checkpoint of one of them, or add a family module to "
            "vlmtrain/models/backbones/vision/"
        )
    return _REGISTRY[model_type]


def family_by_name(name: str, where: str) -> VisionFamily:
    _discover()
    if name not in _FAMILIES:
        raise ValueError(f"{where}: unknown vision family {name!r}; supported: {supported_families()}")
    return _FAMILIES[name]
