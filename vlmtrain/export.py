"""Export a trained vlmtrain model to a folder transformers loads with LlavaForConditionalGeneration + processor.

The folder is drop-in for transformers' standard idioms: `AutoProcessor.apply_chat_template` on multimodal
messages ({"type": "image"} / {"type": "text"} items, or plain strings) renders exactly the training layout (the
image placeholder first; `vlmtrain.data.prompt.multimodal_chat_template`), `generate()` stops at the turn end
(the generation config's eos ids are the tokens `vlmtrain caption` stops at), and
`pipeline("image-text-to-text", model=FOLDER)` works.

transformers' LLaVA runs the whole sequence causally; a model trained with the prefix mask (image tokens
attending to each other bidirectionally) is therefore evaluated under a different mask there. `vlmtrain eval
--mask causal` measures that gap on a test set (docs/evaluation.md), and `vlmtrain caption --mask causal` gives
the captions the export generates.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from vlmtrain.data.prompt import multimodal_chat_template, stop_token_ids
from vlmtrain.data.tokenizer import IM_END, IMAGE_TOKEN
from vlmtrain.eval.run import trained_mask
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


def generation_config(llava: LlavaForConditionalGeneration, tokenizer) -> GenerationConfig:
    """Greedy by default, stopping at every token `vlmtrain caption` stops at (<|im_end|> first)."""
    stops = sorted(stop_token_ids(tokenizer))
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    stops = [im_end] + [i for i in stops if i != im_end]  # the turn end is the eos that ends answers
    config = GenerationConfig.from_model_config(llava.config)
    config.eos_token_id = stops
    config.pad_token_id = tokenizer.pad_token_id
    config.do_sample = False
    return config


README = """Exported by vlmtrain. Load with `LlavaForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` (or `pipeline("image-text-to-text", model=THIS_FOLDER)`).

    messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe it."}}]}}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=64)

The chat template renders the layout the model was trained with: the image first ({image_token}, which the
processor expands to {n} image tokens), then the conversation; one image per conversation. Generation stops at
<|im_end|> (generation_config.json). transformers runs LLaVA with a causal mask; this model was trained with the
{mask} mask (`vlmtrain caption --mask causal` gives the captions this export generates).
"""


def export_hf(checkpoint: Path, out: Path) -> Path:
    """Write LLaVA weights (safetensors), config, generation config, tokenizer and processor into `out`."""
    from transformers import AutoTokenizer, SiglipImageProcessorPil

    model = VisionLanguageModel.from_pretrained(checkpoint, attn_backend="sdpa")
    if model.vision_family.name != "siglip" or model.pixel_shuffle != 1:
        # LLaVA's stock classes keep every token of the tower and have no pixel shuffle (issue 25 item 5)
        raise ValueError(
            f"{checkpoint}: the LLaVA export supports SigLIP towers without pixel shuffle for now; this model has "
            f"a {model.vision_family.name} tower and pixel_shuffle={model.pixel_shuffle}"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    llava = LlavaForConditionalGeneration(llava_config(model))
    missing, unexpected = llava.load_state_dict(to_llava_state_dict(model), strict=False)
    tied = {"lm_head.weight"} if model.language.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"export mapping is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    llava.generation_config = generation_config(llava, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(str(out))
    # One template for tokenizer and processor (they share chat_template.jinja): string content renders as
    # the tokenizer's own template did in training, multimodal content as well, with the image first.
    template = multimodal_chat_template(tokenizer.chat_template)
    tokenizer.chat_template = template
    size, transform = model.image_size, model.image_transform
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(
            size={"height": size, "width": size},
            image_mean=list(transform.mean),
            image_std=list(transform.std),
            resample=int(transform.resample),
        ),
        tokenizer=tokenizer,
        patch_size=model.vision.config.patch_size,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        chat_template=template,
    )
    processor.save_pretrained(str(out))
    (out / "README.md").write_text(
        README.format(image_token=IMAGE_TOKEN, n=model.num_image_tokens, mask=trained_mask(checkpoint))
    )
    return out
