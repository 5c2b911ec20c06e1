"""Export a trained vlmtrain model to a folder that transformers loads (model, processor, chat template).

Two formats (`vlmtrain export --format`):
- `vlmtrain`: a small subclass of transformers' LLaVA shipped in the folder (vlmtrain/hf_remote/
  modeling_vlmtrain_llava.py, named by config.json's `auto_map`; load with `trust_remote_code=True`). Its image
  prefill runs under the mask the model was trained with (prefix: image tokens attend to each other both ways),
  and it takes any tower's features as vlmtrain does (leading tokens skipped, optional pixel shuffle), so
  transformers' logits and greedy generations equal vlmtrain's.
- `llava`: transformers' stock LlavaForConditionalGeneration, for consumers that need a stock class (vLLM,
  llama.cpp converters). LLaVA runs the whole sequence causally, so a prefix-trained model sees another mask
  there (`vlmtrain caption --mask causal` gives what it generates).
`auto` (the default) picks `llava` where it is exact (a causal-trained model whose features LLaVA can take) and
`vlmtrain` everywhere else.

Both render the training layout with `AutoProcessor.apply_chat_template` (`vlmtrain.data.prompt.
multimodal_chat_template`), stop at the tokens `vlmtrain caption` stops at (generation_config.json), and work
with `pipeline("image-text-to-text", ...)`. The folder's README.md says which format it is.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path
from typing import Literal

import torch
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from vlmtrain.data.chat_format import derive_chat_format
from vlmtrain.data.process import ImageTransform
from vlmtrain.data.prompt import multimodal_chat_template
from vlmtrain.data.tokenizer import IMAGE_TOKEN
from vlmtrain.durable import fsync_tree, replace_durably
from vlmtrain.eval.run import trained_mask
from vlmtrain.hf_remote import modeling_vlmtrain_llava as remote
from vlmtrain.models.lora import merge_lora
from vlmtrain.models.vlm import VisionLanguageModel

Format = Literal["auto", "vlmtrain", "llava"]
FORMATS: tuple[str, ...] = ("auto", "vlmtrain", "llava")
REMOTE_FILE = Path(remote.__file__).name  # copied into the folder; config.json's auto_map names it

# vlmtrain parameter prefix -> LlavaForConditionalGeneration parameter prefix (the subclass uses the same names)
PREFIXES = (
    ("vision.", "model.vision_tower."),
    ("projector.", "model.multi_modal_projector."),
    ("language.model.", "model.language_model."),
    ("language.lm_head.", "lm_head."),
)


def feature_layout(model: VisionLanguageModel) -> tuple[int, int]:
    """(leading tower tokens dropped, pixel-shuffle factor k) of the model's image features (its tower family's
    CLS / register tokens, `model.pixel_shuffle`)."""
    return model.vision_skip_tokens, model.pixel_shuffle


def prefill_mask(trained: str) -> str:
    """The mask the export's image prefill runs under: the trained one, where generation can use it.

    A stage-0 (bidirectional) model lets image tokens see the text after them, which no left-to-right decoder
    can do; it is prefilled with the prefix mask, as `vlmtrain caption` and `eval` prefill it (with a warning).
    """
    if trained == "bidirectional":
        warnings.warn(
            "this checkpoint trained with the bidirectional mask (stage 0), under which image tokens see the "
            "text; generation cannot, so the export prefills with the prefix mask, as `vlmtrain caption` does",
            stacklevel=2,
        )
        return "prefix"
    if trained not in ("prefix", "causal"):
        raise ValueError(f"unknown trained mask {trained!r}; expected bidirectional, prefix or causal")
    return trained


def choose_format(fmt: str, mask: str, skip: int, k: int) -> str:
    """`auto` -> `llava` where stock LLaVA is exact (causal mask, at most one leading token dropped, no shuffle)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
    stock_features = skip <= 1 and k == 1  # LLaVA's "default" strategy drops exactly one leading token
    if fmt == "llava" and not stock_features:
        raise ValueError(
            f"--format llava cannot express this model's image features (vision_skip_tokens={skip}, "
            f"pixel_shuffle={k}; stock LLaVA drops at most one leading token and has no pixel shuffle); "
            "use --format vlmtrain"
        )
    if fmt == "auto":
        return "llava" if mask == "causal" and stock_features else "vlmtrain"
    return fmt


def hf_config(model: VisionLanguageModel, fmt: str, mask: str) -> LlavaConfig:
    """LlavaConfig (`llava`) or the shipped subclass's config (`vlmtrain`) describing `model`."""
    text_cfg = model.language.config.to_dict()
    text_cfg.pop("dtype", None)
    skip, k = feature_layout(model)
    common = dict(
        vision_config=model.vision.config.to_dict(),
        text_config=text_cfg,
        image_token_id=model.image_token_id,
        projector_hidden_act=model.projector.act_name,
        vision_feature_layer=model.vision_feature_layer,
        multimodal_projector_bias=True,
        image_seq_length=model.num_image_tokens,
        tie_word_embeddings=model.language.config.tie_word_embeddings,
    )
    if fmt == "llava":
        return LlavaConfig(**common, vision_feature_select_strategy="default" if skip == 1 else "full")
    config = remote.VlmtrainLlavaConfig(
        **common,
        vision_feature_select_strategy="full",
        vision_skip_tokens=skip,
        pixel_shuffle=k,
        prefill_mask=mask,
    )
    module = REMOTE_FILE.removesuffix(".py")
    config.auto_map = {
        "AutoConfig": f"{module}.VlmtrainLlavaConfig",
        "AutoModelForImageTextToText": f"{module}.VlmtrainLlavaForConditionalGeneration",
    }
    return config


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
    """Greedy by default, stopping at every token `vlmtrain caption` stops at (the template's turn end first)."""
    fmt = derive_chat_format(tokenizer)
    config = GenerationConfig.from_model_config(llava.config)
    config.eos_token_id = list(fmt.stop_ids)  # the turn end is the eos that ends answers
    config.pad_token_id = fmt.pad_id
    config.do_sample = False
    return config


def build_processor(model: VisionLanguageModel, tokenizer, transform: ImageTransform) -> LlavaProcessor:
    """LlavaProcessor whose image processor equals `transform` and whose image-token count equals the model's."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    common = {
        "resample": int(transform.resample),
        "image_mean": list(transform.mean),
        "image_std": list(transform.std),
    }
    if transform.resize_shortest_edge is None:  # square resize, rescale, normalize (SigLIP)
        size = {"height": transform.image_size, "width": transform.image_size}
        image_processor = SiglipImageProcessorPil(size=size, **common)
    else:  # shorter side resized, center crop, rescale, normalize (CLIP, DINOv2): the same PIL calls
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": transform.resize_shortest_edge},
            crop_size={"height": transform.image_size, "width": transform.image_size},
            do_center_crop=True,
            **common,
        )
    _, k = feature_layout(model)
    # One image token per (patch_size * k)^2 pixels: LlavaProcessor's count then equals the model's.
    token_side = model.vision.config.patch_size * k
    if (transform.image_size // token_side) ** 2 != model.num_image_tokens:
        raise ValueError(
            f"{transform.image_size} px images give {(transform.image_size // token_side) ** 2} image tokens at "
            f"patch {model.vision.config.patch_size} x pixel shuffle {k}, but the model has "
            f"{model.num_image_tokens}; the checkpoint's preprocessing and tower disagree"
        )
    # One template for tokenizer and processor (they share chat_template.jinja): string content renders as
    # the tokenizer's own template did in training, multimodal content as well, with the image first.
    template = multimodal_chat_template(tokenizer.chat_template, derive_chat_format(tokenizer).answer_prefix)
    tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own template
    tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=token_side,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        chat_template=template,
    )


README = """# {title}

Exported by vlmtrain (`vlmtrain export --format {fmt}`) from a model trained with the **{trained}** mask.

| | |
|---|---|
| class | `{cls}` |
| trust_remote_code | {remote} |
| mask of the image + prompt prefill | **{mask}** ({mask_words}) |
| equals vlmtrain | {equals} |
| image | {size} px, {n} image tokens ({image_token} expanded by the processor) |

```python
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

model = AutoModelForImageTextToText.from_pretrained(THIS_FOLDER{kw})
processor = AutoProcessor.from_pretrained(THIS_FOLDER)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe it."}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=text, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64)
pipe = pipeline("image-text-to-text", model=THIS_FOLDER{kw})
```

The chat template renders the layout the model was trained with: the image first, then the conversation; one
image per conversation. Generation is greedy and stops at the turn end (generation_config.json).
{note}
"""

MASK_WORDS = {
    "prefix": "image tokens attend to each other both ways, text is causal and sees the image",
    "causal": "every token sees the tokens before it",
}


def readme(fmt: str, trained: str, mask: str, model: VisionLanguageModel, size: int) -> str:
    stock = fmt == "llava"
    if stock and trained != "causal":
        note = (
            "\nThis stock-class export runs causally, not under the mask the model was trained with: its outputs "
            "equal `vlmtrain caption --mask causal`, not vlmtrain's default. `vlmtrain export --format vlmtrain` "
            "keeps the trained mask.\n"
        )
    elif trained == "bidirectional":
        note = (
            "\nStage 0's bidirectional mask lets image tokens see the text, which generation cannot; the prefill "
            "uses the prefix mask, as `vlmtrain caption` and `vlmtrain eval` do for this checkpoint.\n"
        )
    else:
        note = ""
    return README.format(
        title="vlmtrain LLaVA export (stock class, causal)"
        if stock
        else "vlmtrain LLaVA export (trained mask)",
        fmt=fmt,
        trained=trained,
        cls="LlavaForConditionalGeneration"
        if stock
        else f"VlmtrainLlavaForConditionalGeneration ({REMOTE_FILE})",
        remote="not needed" if stock else "**needed** (`trust_remote_code=True`)",
        mask="causal" if stock else mask,
        mask_words=MASK_WORDS["causal" if stock else mask],
        equals="`vlmtrain caption --mask causal`" if stock else f"`vlmtrain caption` (mask {mask})",
        size=size,
        n=model.num_image_tokens,
        image_token=IMAGE_TOKEN,
        kw="" if stock else ", trust_remote_code=True",
        note=note,
    )


def export_model(
    model: VisionLanguageModel,
    tokenizer,
    out: Path,
    fmt: Format = "auto",
    trained: str = "prefix",
    transform: ImageTransform | None = None,
) -> Path:
    """Write `model` as an export of format `fmt` into the new folder `out` (built beside it, then renamed)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not an empty folder; choose a new --out folder or remove it"
        )
    mask = prefill_mask(trained)
    skip, k = feature_layout(model)
    fmt = choose_format(fmt, mask, skip, k)
    config = hf_config(model, fmt, mask)
    cls = LlavaForConditionalGeneration if fmt == "llava" else remote.VlmtrainLlavaForConditionalGeneration
    hf = cls(config)
    missing, unexpected = hf.load_state_dict(to_llava_state_dict(model), strict=False)
    tied = {"lm_head.weight"} if model.language.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"export mapping is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    hf.generation_config = generation_config(hf, tokenizer)
    transform = transform or model.image_transform
    processor = build_processor(model, tokenizer, transform)

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a previous export that died before its rename
    tmp.mkdir(parents=True)
    hf.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    if fmt == "vlmtrain":
        shutil.copyfile(remote.__file__, tmp / REMOTE_FILE)
    (tmp / "README.md").write_text(readme(fmt, trained, mask, model, transform.image_size))
    fsync_tree(tmp)
    if out.exists():
        out.rmdir()  # empty (checked above)
    replace_durably(tmp, out)
    return out


def export_hf(checkpoint: Path, out: Path, fmt: Format = "auto") -> Path:
    """Export the vlmtrain checkpoint directory `checkpoint` (a stage output) into `out`; see `export_model`."""
    from transformers import AutoTokenizer

    checkpoint = Path(checkpoint)
    model = merge_lora(VisionLanguageModel.from_pretrained(checkpoint, attn_backend="sdpa"))
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    return export_model(model, tokenizer, out, fmt, trained_mask(checkpoint))
