"""VisionLanguageModel: vision tower -> projector -> causal LM with image features as the sequence prefix.

Input embedding as in the paper: I = [p_1 .. p_P, L_1 .. L_n]. A batch carries the image as P placeholder
tokens (`image_flags`) whose embeddings are replaced by the projected patch features, so text-only samples,
padding and packed rows share one layout (see vlmtrain.data.collate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlmtrain import __version__
from vlmtrain.config.schema import ModelConfig
from vlmtrain.data.image_transform import ImageTransform
from vlmtrain.data.tokenizer import image_token_id
from vlmtrain.durable import fsync_file, replace_durably, write_text_durably
from vlmtrain.models.backbones.vision import (
    VisionFamily,
    build_tower,
    family_by_name,
    family_for_model_type,
    family_of_config,
    load_tower,
)
from vlmtrain.models.language import language_config_from_dict, load_language_model, resolve_attn_backend
from vlmtrain.models.loss import supervised_index as find_supervised
from vlmtrain.models.loss import token_losses
from vlmtrain.models.masks import attention_windows, position_ids_from_sample_ids, prepare_mask
from vlmtrain.models.projector import Projector

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "vlm_config.json"


@dataclass
class VLMOutput:
    """Loss over the supervised tokens; `token_loss` is aligned with the label positions (zero elsewhere).

    Training backpropagates `loss_sum` weighted by the whole optimizer step's token count (Engine.backward), so
    every supervised token of a step weighs the same whichever micro-batch or rank it lands in; `loss` (the
    micro-batch's token mean) is for evaluation and reports.
    """

    loss: torch.Tensor
    loss_sum: torch.Tensor  # sum of the per-token losses (fp32)
    token_loss: torch.Tensor  # [B, T] float32, loss of predicting labels[:, t] (0 where unsupervised)
    num_label_tokens: int
    logits: torch.Tensor | None = None  # [B, T, V] only when asked for


class VisionLanguageModel(nn.Module):
    """The paper's VLM. Module groups `vision`, `projector`, `language` are what stage configs name."""

    GROUPS = ("vision", "projector", "language")

    def __init__(
        self,
        vision: PreTrainedModel,
        projector: Projector,
        language: PreTrainedModel,
        image_token_id: int,
        vision_feature_layer: int | None = None,
        attn_backend: str = "sdpa",
        image_transform: ImageTransform | None = None,
        vision_family: VisionFamily | None = None,
    ) -> None:
        """`vision` is a tower of a registered family (read from its config's model_type unless given);
        `vision_feature_layer` None is the family's default; `image_transform` None is its default preprocessing."""
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.language = language
        self.image_token_id = image_token_id
        self.attn_backend = attn_backend
        family = vision_family or family_of_config(vision.config)
        self.vision_family = family
        self.vision_feature_layer = (
            family.default_feature_layer if vision_feature_layer is None else vision_feature_layer
        )
        family.used_layers(vision.config, self.vision_feature_layer)  # validates the index
        self.image_transform = image_transform or family.default_transform(vision.config)
        self.vision_skip_tokens = family.skip_tokens(vision.config)
        self.pixel_shuffle = projector.pixel_shuffle
        self.compiled_loss = False  # the loss chunks under torch.compile (train.compile; models/compile.py)
        side = family.grid_side(vision.config, self.image_transform.image_size)
        if side % self.pixel_shuffle:
            raise ValueError(
                f"model.pixel_shuffle={self.pixel_shuffle} does not divide the {side} x {side} patch grid of "
                f"{self.image_size} px images (patch {vision.config.patch_size}); choose a divisor of {side}"
            )
        self.num_patches = side * side  # tokens the tower gives per image, after dropping CLS / registers
        self.num_image_tokens = self.num_patches // self.pixel_shuffle**2  # tokens the LM sees per image
        # Sliding-window layers (Gemma 3) get the stage mask intersected with their window, per layer type.
        self.attn_windows = attention_windows(language.config)

    @property
    def image_size(self) -> int:
        """Side of the square images the tower reads (the preprocessing's output)."""
        return self.image_transform.image_size

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> VisionLanguageModel:
        """Load or build every component as `cfg` says; the tokenizer provides the image token."""
        spec, vision = load_tower(cfg.vision) if cfg.vision is not None else build_tower(cfg.vision_config)
        language = load_language_model(cfg.language, cfg.language_config, cfg.attn_backend)
        img_id = image_token_id(tokenizer)
        if len(tokenizer) > language.get_input_embeddings().num_embeddings:
            language.resize_token_embeddings(len(tokenizer))
        projector = Projector(
            spec.family.hidden_size(vision.config),
            language.config.hidden_size,
            cfg.projector_hidden_act,
            cfg.pixel_shuffle,
        )
        backend = resolve_attn_backend(cfg.attn_backend)
        return cls(
            vision,
            projector,
            language,
            img_id,
            cfg.vision_feature_layer,
            backend,
            spec.transform,
            spec.family,
        )

    def module_groups(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "projector": self.projector, "language": self.language}

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters no forward pass reaches: they must stay frozen (they would never get gradients).

        The family says which (vlmtrain.models.backbones.vision): modules after the hidden states (SigLIP's and
        CLIP's post_layernorm, DINOv2's final layernorm and mask token) and the layers past the feature layer.
        """
        params = dict(self.vision.named_parameters())
        return [
            params[n]
            for n in self.vision_family.unused_parameter_names(self.vision, self.vision_feature_layer)
        ]

    # ---- forward ------------------------------------------------------------------------------------
    def tower_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's input [N, 3, H, W] in its dtype, normalized on the pixels' device.

        uint8 pixels (what the data workers, evaluation and `vlmtrain caption` / `ask` give: resized, not
        rescaled) are normalized here by the model's own transform (ImageTransform.normalize), the one place it
        happens. Floating pixels are taken as already normalized: transformers' `pixel_values` contract, which
        the exported model's processor follows. Any other dtype is an error.
        """
        if pixel_values.dtype == torch.uint8:
            return self.image_transform.normalize(pixel_values, self.vision.dtype)
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values of dtype {pixel_values.dtype}: pass uint8 pixels (ImageTransform.pixels) or "
                "normalized floating pixel values (ImageTransform.__call__)"
            )
        return pixel_values.to(self.vision.dtype)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image tokens [N, P, d_text] from uint8 or normalized pixels (`tower_pixels`); a frozen
        tower runs without autograd."""
        tower_trains = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            feats = self.vision_family.features(  # [N, P, d_vision], CLS / registers dropped
                self.vision, self.tower_pixels(pixel_values), self.vision_feature_layer
            )
        return self.projector(feats.to(self.projector.linear_1.weight.dtype))  # [N, P / k^2, d_text]

    def check_image_slots(self, image_flags: torch.Tensor, n_images: int) -> None:
        """The batch holds exactly `num_image_tokens` placeholder positions per image (read on the host)."""
        n_slots = int(image_flags.sum())
        if n_slots != n_images * self.num_image_tokens:
            raise ValueError(
                f"batch has {n_slots} image-token positions but {n_images} images x {self.num_image_tokens} "
                "tokens each; the collator and the model disagree on tokens per image"
            )

    def embed(
        self, input_ids: torch.Tensor, image_flags: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with the image placeholder positions replaced by projected image tokens."""
        embeds = self.language.get_input_embeddings()(input_ids)  # [B, T, D]
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if image_flags.device.type == "cpu":  # on a GPU the trainer checks the CPU batch (no host sync here)
            self.check_image_slots(image_flags, n_images)
        if n_images == 0:
            return embeds
        image_tokens = self.encode_images(pixel_values).to(embeds.dtype)  # [N, P, D]
        return embeds.masked_scatter(
            image_flags[..., None].to(embeds.device), image_tokens.reshape(-1, embeds.shape[-1])
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        sample_ids: torch.Tensor,
        image_flags: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mask_mode: str = "prefix",
        return_logits: bool = False,
        supervised_index: torch.Tensor | None = None,
        **_: Any,
    ) -> VLMOutput:
        """Loss of predicting `labels` (HF convention, shifted here) under the stage's attention mask.

        `supervised_index` (models.loss.supervised_index of the CPU batch) lets a training step run without
        any device-to-host sync; without it the positions are found here.
        """
        image_flags = image_flags.bool()
        embeds = self.embed(input_ids, image_flags, pixel_values)
        if position_ids is None:
            position_ids = position_ids_from_sample_ids(sample_ids)
        mask = prepare_mask(
            self.attn_backend, mask_mode, sample_ids, image_flags, embeds.dtype, self.attn_windows
        )
        hidden = self.language.get_decoder()(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # [B, T, D]
        head = self.language.get_output_embeddings()
        logits = head(hidden) if return_logits else None
        if labels is None:
            zero = hidden.new_zeros((), dtype=torch.float32)
            return VLMOutput(zero, zero, torch.zeros_like(input_ids, dtype=torch.float32), 0, logits)

        if logits is not None:
            index = supervised_index if supervised_index is not None else find_supervised(labels, sample_ids)
            rows, cols = index.unbind(1)
            losses = F.cross_entropy(logits[rows, cols].float(), labels[rows, cols + 1], reduction="none")
        else:
            losses, index = token_losses(
                hidden, head, labels, sample_ids, supervised_index, compiled=self.compiled_loss
            )
            rows, cols = index.unbind(1)
        token_loss = torch.zeros_like(labels, dtype=torch.float32)
        token_loss[rows, cols + 1] = losses  # aligned with the label positions
        n = index.shape[0]  # host-side shape: no sync
        loss_sum = losses.sum()
        return VLMOutput(loss_sum / max(n, 1), loss_sum, token_loss, n, logits)

    # ---- persistence --------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "vlmtrain_version": __version__,
            "vision_family": self.vision_family.name,
            "vision_config": self.vision.config.to_dict(),
            "vision_skip_tokens": self.vision_skip_tokens,
            "image_preprocessing": self.image_transform.to_dict(),
            "pixel_shuffle": self.pixel_shuffle,
            "language_config": self.language.config.to_dict(),
            "projector": {
                "vision_dim": self.projector.vision_dim,
                "text_dim": self.projector.text_dim,
                "act": self.projector.act_name,
                "pixel_shuffle": self.projector.pixel_shuffle,
            },
            "image_token_id": self.image_token_id,
            "vision_feature_layer": self.vision_feature_layer,
            "num_image_tokens": self.num_image_tokens,
            "attn_backend": self.attn_backend,
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `model.safetensors` and `vlm_config.json` (each atomically and fsynced) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{WEIGHTS_NAME}.tmp"
        # save_model de-duplicates tied tensors (Qwen ties its input and output embeddings).
        save_model(self, str(tmp), metadata={"format": "pt", "vlmtrain_version": __version__})
        fsync_file(tmp)  # the weights are on disk before their name (and then the config) can exist
        replace_durably(tmp, directory / WEIGHTS_NAME)
        write_text_durably(directory / CONFIG_NAME, json.dumps(self.config_dict(), indent=2, default=str))

    @classmethod
    def from_pretrained(cls, directory: str | Path, attn_backend: str | None = None) -> VisionLanguageModel:
        """Load a model saved by `save_pretrained`; only safetensors weights are read.

        A LoRA stage output (adapters, no frozen base) loads as its base with the adapters merged
        (vlmtrain.models.lora.load_lora_checkpoint).
        """
        directory = Path(directory)
        from vlmtrain.models import lora  # lora builds on this module

        if lora.is_lora_checkpoint(directory):
            return lora.load_lora_checkpoint(directory, attn_backend)
        cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (cfg_path, weights):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: {directory} is not a vlmtrain model directory")
        cfg = json.loads(cfg_path.read_text())
        backend = resolve_attn_backend(attn_backend or cfg.get("attn_backend", "sdpa"))
        where = str(cfg_path)
        vision_cfg = cfg["vision_config"]
        if "vision_family" in cfg:
            family = family_by_name(cfg["vision_family"], where)
        else:  # written before families: a SigLIP tower
            family = family_for_model_type(vision_cfg.get("model_type", "siglip"), where)
        transform = (
            ImageTransform.from_dict(cfg["image_preprocessing"]) if "image_preprocessing" in cfg else None
        )
        vision = family.build(family.config_from_dict(vision_cfg))
        language = load_language_model(None, _strip_config(cfg["language_config"]), backend)
        p = cfg["projector"]
        model = cls(
            vision,
            Projector(p["vision_dim"], p["text_dim"], p["act"], p.get("pixel_shuffle", 1)),
            language,
            cfg["image_token_id"],
            cfg["vision_feature_layer"],
            backend,
            transform,
            family,
        )
        for key in ("num_image_tokens", "vision_skip_tokens"):
            if key in cfg and cfg[key] != getattr(model, key):
                raise ValueError(
                    f"{where}: {key} is {cfg[key]} but the model it describes has {getattr(model, key)}"
                )
        missing, unexpected = load_model(model, str(weights), strict=True)
        if missing or unexpected:
            raise ValueError(f"{weights}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model


def _strip_config(config: dict[str, Any]) -> dict[str, Any]:
    """Config dict without keys that describe a saved file rather than the architecture."""
    drop = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"}
    out = {k: v for k, v in config.items() if k not in drop}
    language_config_from_dict(out)  # fail here, naming the config, rather than deep inside from_config
    return out
