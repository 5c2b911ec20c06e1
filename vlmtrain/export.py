"""Export a trained vlmtrain model to a folder transformers loads with LlavaForConditionalGeneration + processor.

transformers' LLaVA runs the whole sequence causally; a model trained with the prefix mask (image tokens
attending to each other bidirectionally) is therefore evaluated under a different mask there. `vlmtrain eval
--mask causal` measures that gap on a test set (docs/evaluation.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from vlmtrain.data.tokenizer import IMAGE_TOKEN
from vlmtrain.models.vlm import VisionLanguageModel

# vlmtrain parameter prefix -> LlavaForConditionalGeneration parameter prefix
PREFIXES = (
    ("vision.", "model.vision_tower."),
    ("projector.", "model.multi_modal_projector."),
    ("language.model.", "model.language_model."),
    ("language.lm_head.", "lm_head."),
)


def llava_config(model: VisionLanguageModel) -> LlavaConfig:
    text_cfg = model.language.config.to_dict()
    text_cfg.pop("dtype", None)
    return LlavaConfig(
        vision_config=model.vision.config.to_dict(),
        text_config=text_cfg,
        image_token_id=model.image_token_id,
        projector_hidden_act=model.projector.act_name,
        vision_feature_select_strategy="full",
        vision_feature_layer=model.vision_feature_layer,
        multimodal_projector_bias=True,
        image_seq_length=model.num_image_tokens,
        tie_word_embeddings=model.language.config.tie_word_embeddings,
    )


def to_llava_state_dict(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        for ours, theirs in PREFIXES:
            if name.startswith(ours):
                out[theirs + name[len(ours) :]] = tensor
                break
        else:
            raise KeyError(f"no LLaVA name for parameter {name}")
    return out


def export_hf(checkpoint: Path, out: Path) -> Path:
    """Write LLaVA weights (safetensors), config, tokenizer and processor into `out`."""
    from transformers import AutoTokenizer, SiglipImageProcessorPil

    model = VisionLanguageModel.from_pretrained(checkpoint, attn_backend="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    llava = LlavaForConditionalGeneration(llava_config(model))
    missing, unexpected = llava.load_state_dict(to_llava_state_dict(model), strict=False)
    tied = {"lm_head.weight"} if model.language.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"export mapping is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    out.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(str(out))
    size = model.vision.config.image_size
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tokenizer,
        patch_size=model.vision.config.patch_size,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(str(out))
    (out / "README.md").write_text(
        "Exported by vlmtrain. Load with `LlavaForConditionalGeneration.from_pretrained` and "
        "`AutoProcessor.from_pretrained`.\nPrompt layout used in training: the image first, then the chat "
        f"template:\n\n    text = '{IMAGE_TOKEN}' + tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
        "tokenize=False)\n\nThe processor expands the single image token to the model's image tokens. transformers "
        "runs LLaVA with a causal mask; this model may have been trained with the prefix mask (see vlmtrain docs).\n"
    )
    return out
