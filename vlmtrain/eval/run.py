"""Evaluation runs: load a trained model, read evaluation shards, generate, score, write the result files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import AutoTokenizer

from vlmtrain.config.load import STAGE_CONFIG_NAME
from vlmtrain.data.process import IMAGE_EXTENSIONS, ImageTransform, decode_image
from vlmtrain.data.prompt import CAPTION_PROMPT, question_messages
from vlmtrain.data.shard_reader import read_shard
from vlmtrain.data.sources import load_source
from vlmtrain.eval.generate import GenerationConfig, Generator
from vlmtrain.logging import make_console
from vlmtrain.models.vlm import CONFIG_NAME, VisionLanguageModel


@dataclass
class EvalSample:
    """One evaluation item read from a shard."""

    key: str
    meta: dict[str, Any]
    image: torch.Tensor | None


def load_trained(
    checkpoint: Path, device: str | torch.device = "cpu"
) -> tuple[VisionLanguageModel, Any, str]:
    """A stage output (or exported vlmtrain model dir): model on `device`, tokenizer, and the mask to prefill with."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{checkpoint}: no {CONFIG_NAME}; pass a stage output such as runs/<name>/stage3/final"
        )
    model = VisionLanguageModel.from_pretrained(checkpoint, attn_backend="sdpa").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    # A stage-0 (bidirectional) model is prefilled with the prefix mask: generation is causal anyway.
    mode = "causal" if trained_mask(checkpoint) == "causal" else "prefix"
    return model, tokenizer, mode


def trained_mask(checkpoint: Path) -> str:
    """The mask mode the stage that wrote `checkpoint` trained with (its stage_config.json; default prefix)."""
    stage_cfg = Path(checkpoint) / STAGE_CONFIG_NAME
    if not stage_cfg.is_file():
        return "prefix"
    return str(json.loads(stage_cfg.read_text()).get("mask", {}).get("mode", "prefix"))


def iter_eval_samples(
    source: str | Path, transform: ImageTransform, limit: int | None = None
) -> Iterator[EvalSample]:
    """Samples in shard order (no shuffling); an undecodable image is an error naming the shard and key."""
    n = 0
    for shard in load_source(source):
        samples = read_shard(shard.path, shard.sha256)
        if samples.damage is not None:  # training skips and counts these; a score needs the whole test set
            raise ValueError(f"{shard.path}: {samples.damage}; re-copy or re-write the evaluation shards")
        for key, members in zip(samples.keys, samples.members, strict=True):
            if limit is not None and n >= limit:
                return
            if "json" not in members:
                raise ValueError(f"{shard.path}: sample {key} has no json member")
            meta = json.loads(bytes(members["json"]).decode("utf-8"))
            present = sorted(e for e in members if e in IMAGE_EXTENSIONS)
            if len(present) > 1:  # training skips these (multiple_images); a score needs every sample
                raise ValueError(f"{shard.path}: sample {key} has several images {present}; keep one")
            ext = present[0] if present else None
            image = None
            if ext is not None:
                try:
                    image = transform.pixels(decode_image(members[ext], ext))  # uint8
                except Exception as err:
                    raise ValueError(
                        f"{shard.path}: sample {key}: cannot decode its {ext} image: {err}"
                    ) from err
            yield EvalSample(key, meta, image)
            n += 1


def _batches(items: Iterator[EvalSample], size: int) -> Iterator[list[EvalSample]]:
    batch: list[EvalSample] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_samples(source: str | Path, limit: int | None) -> int | None:
    counts = [s.samples for s in load_source(source)]
    if any(c is None for c in counts):
        return limit
    total = sum(counts)  # type: ignore[arg-type]
    return min(total, limit) if limit is not None else total


def answer_batch(
    generator: Generator, batch: list[EvalSample], questions: list[str], num_image_tokens: int
) -> list[str]:
    prompts = [
        generator.renderer.build_prompt(question_messages(q), s.image is not None, num_image_tokens)
        for s, q in zip(batch, questions, strict=True)
    ]
    images = [s.image for s in batch if s.image is not None]
    pixels = torch.stack(images) if images else None
    return [generator.decode(ids) for ids in generator.generate(prompts, pixels)]


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def image_key(meta: dict[str, Any], key: str) -> Any:
    return meta.get("image_id", meta.get("id", key))


def generate_answers(
    checkpoint: Path,
    data: str,
    question_of: Any,
    gen_cfg: GenerationConfig,
    batch_size: int,
    limit: int | None,
    console: Console,
    device: str,
    title: str,
    mask: str | None = None,
) -> tuple[list[EvalSample], list[str], VisionLanguageModel]:
    """Answer `question_of(sample)` for every sample; returns samples and answers in order.

    `mask` overrides the prefill mask the model was trained with (e.g. `causal`, as transformers' LLaVA runs).
    """
    model, tokenizer, mode = load_trained(checkpoint, device)
    gen_cfg = GenerationConfig(**{**asdict(gen_cfg), "mask_mode": mask or mode})
    generator = Generator(model, tokenizer, gen_cfg)
    transform = model.image_transform
    samples, answers = [], []
    with progress_bar(console) as progress:
        task = progress.add_task(title, total=count_samples(data, limit))
        for batch in _batches(iter_eval_samples(data, transform, limit), batch_size):
            answers += answer_batch(generator, batch, [question_of(s) for s in batch], model.num_image_tokens)
            samples += batch
            progress.advance(task, len(batch))
    return samples, answers, model


def _meta(
    checkpoint: Path, data: str, gen_cfg: GenerationConfig, mode_prompt: dict[str, Any]
) -> dict[str, Any]:
    return {"checkpoint": str(checkpoint), "data": str(data), "generation": asdict(gen_cfg), **mode_prompt}


def eval_caption(
    checkpoint: Path,
    data: str,
    out: Path,
    prompt: str | None,
    gen_cfg: GenerationConfig,
    batch_size: int = 16,
    limit: int | None = None,
    spice: bool = False,
    device: str = "cpu",
    console: Console | None = None,
    mask: str | None = None,
) -> dict[str, float]:
    """Caption every image of `data`, score against all its references, write the COCO-format files."""
    from vlmtrain.eval.caption_metrics import (
        compute_caption_metrics,
        write_coco_predictions,
        write_coco_references,
        write_metrics,
    )
    from vlmtrain.eval.java import require_java
    from vlmtrain.eval.report import metrics_table

    console = console or make_console()
    require_java()  # fail before generating for an hour

    def question(s: EvalSample) -> str:
        if prompt is not None:
            return prompt
        conv = s.meta.get("conversations") or []
        return conv[0]["value"] if conv else CAPTION_PROMPT

    samples, answers, _ = generate_answers(
        checkpoint, data, question, gen_cfg, batch_size, limit, console, device, "captioning", mask
    )
    predictions, references = {}, {}
    for s, answer in zip(samples, answers, strict=True):
        refs = s.meta.get("references")
        if not refs:
            raise ValueError(
                f"{data}: sample {s.key} has no `references`; shard a caption format (coco, karpathy)"
            )
        image_id = image_key(s.meta, s.key)
        predictions[image_id] = answer
        references[image_id] = list(refs)
    metrics = compute_caption_metrics(predictions, references, spice=spice)
    out.mkdir(parents=True, exist_ok=True)
    write_coco_predictions(out / "predictions.json", predictions)
    write_coco_references(out / "references.json", references)
    meta = _meta(
        checkpoint,
        data,
        gen_cfg,
        {"prompt": prompt or "per-sample prompt", "images": len(samples), "mask": mask or "trained"},
    )
    write_metrics(out / "metrics.json", metrics, meta)
    console.print(
        metrics_table([(checkpoint.name, metrics)], f"Captioning on {data} ({len(samples)} images)")
    )
    return metrics


def eval_vqa(
    checkpoint: Path,
    data: str,
    out: Path,
    gen_cfg: GenerationConfig,
    batch_size: int = 16,
    limit: int | None = None,
    device: str = "cpu",
    console: Console | None = None,
    mask: str | None = None,
) -> dict[str, float]:
    """Answer every question of `data` (its first human turn) and score PathVQA-style metrics."""
    from vlmtrain.data.answers import infer_answer_type
    from vlmtrain.eval.caption_metrics import atomic_write_json, write_metrics
    from vlmtrain.eval.report import vqa_table
    from vlmtrain.eval.vqa_metrics import pathvqa_metrics

    console = console or make_console()

    def question(s: EvalSample) -> str:
        conv = s.meta.get("conversations") or []
        if len(conv) < 2:
            raise ValueError(f"{data}: sample {s.key} has no question/answer conversation")
        return conv[0]["value"]

    samples, answers, _ = generate_answers(
        checkpoint, data, question, gen_cfg, batch_size, limit, console, device, "answering", mask
    )
    preds, golds, types, rows = {}, {}, {}, []
    for s, answer in zip(samples, answers, strict=True):
        qid = s.meta.get("id", s.key)
        gold = s.meta["conversations"][1]["value"]
        preds[qid], golds[qid] = answer, gold
        types[qid] = s.meta.get("answer_type") or infer_answer_type(gold)
        rows.append(
            {
                "question_id": qid,
                "question": question(s),
                "answer": answer,
                "gold": gold,
                "answer_type": types[qid],
            }
        )
    metrics = pathvqa_metrics(preds, golds, types)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "predictions.json", rows)
    atomic_write_json(
        out / "references.json",
        [{"question_id": q, "answer": golds[q], "answer_type": types[q]} for q in golds],
    )
    write_metrics(
        out / "metrics.json",
        metrics,
        _meta(checkpoint, data, gen_cfg, {"questions": len(samples), "mask": mask or "trained"}),
    )
    console.print(vqa_table([(checkpoint.name, metrics)], f"VQA on {data} ({len(samples)} questions)"))
    return metrics
