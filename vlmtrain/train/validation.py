"""Validation during training: held-out loss over all ranks and, optionally, CIDEr of greedy captions on rank 0."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlmtrain.config.schema import StageConfig
from vlmtrain.data.collate import MODEL_KEYS
from vlmtrain.dist import DistContext, barrier, sum_over_ranks
from vlmtrain.models.vlm import VisionLanguageModel

LoaderFactory = Callable[[], Any]  # () -> finite, unshuffled iterable of this rank's batches


class Validator:
    """Runs at the steps `validation.every` names and at the end; writes `validation.jsonl` (rank 0)."""

    def __init__(
        self, stage: StageConfig, ctx: DistContext, tokenizer: Any, make_loader: LoaderFactory, path: Path
    ) -> None:
        self.cfg = stage.validation
        self.mask_mode = stage.mask.mode
        self.ctx, self.tokenizer, self.make_loader, self.path = ctx, tokenizer, make_loader, path
        if self.cfg.cider:
            from vlmtrain.eval.java import require_java

            require_java()  # fail at the start of the stage, not at the first validation

    def due(self, step: int, total: int) -> bool:
        return self.cfg.data is not None and (
            step == total or (self.cfg.every > 0 and step % self.cfg.every == 0)
        )

    @torch.no_grad()
    def held_out_loss(self, model: VisionLanguageModel) -> float:
        loss_sum, tokens, seen = 0.0, 0, 0
        budget = -(-self.cfg.max_samples // self.ctx.world_size)  # this rank's share, rounded up
        for batch in self.make_loader():
            if seen >= budget:
                break
            inputs = {k: batch[k].to(self.ctx.device) for k in MODEL_KEYS}
            out = model(**inputs, mask_mode=self.mask_mode)
            loss_sum += float(out.token_loss.sum())
            tokens += out.num_label_tokens
            seen += int(batch["num_samples"])
        total_loss, total_tokens = sum_over_ranks([loss_sum, float(tokens)], self.ctx.device)
        return total_loss / total_tokens if total_tokens else float("nan")

    @torch.no_grad()
    def cider(self, model: VisionLanguageModel) -> float:
        from pycocoevalcap.cider.cider import Cider

        from vlmtrain.data.process import ImageTransform
        from vlmtrain.data.shard import DEFAULT_CAPTION_PROMPT
        from vlmtrain.eval.caption_metrics import ptb_tokenize
        from vlmtrain.eval.generate import GenerationConfig, Generator
        from vlmtrain.eval.run import answer_batch, iter_eval_samples

        mode = "causal" if self.mask_mode == "causal" else "prefix"
        gen = Generator(
            model, self.tokenizer, GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, mask_mode=mode)
        )
        transform = ImageTransform(image_size=model.vision.config.image_size)
        preds: dict[str, list[str]] = {}
        refs: dict[str, list[str]] = {}
        for s in iter_eval_samples(self.cfg.data, transform, self.cfg.max_samples):
            if not s.meta.get("references") or s.image is None:
                continue
            question = (s.meta.get("conversations") or [{"value": DEFAULT_CAPTION_PROMPT}])[0]["value"]
            preds[s.key] = answer_batch(gen, [s], [question], model.num_image_tokens)
            refs[s.key] = list(s.meta["references"])
        if not preds:
            raise ValueError(
                f"validation.cider: {self.cfg.data} has no caption samples with references and images"
            )
        score, _ = Cider().compute_score(ptb_tokenize(refs), ptb_tokenize(preds))
        return float(score)

    def run(self, model: VisionLanguageModel, step: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        record: dict[str, Any] = {"step": step, "val_loss": self.held_out_loss(model)}
        if self.cfg.cider:
            if self.ctx.is_main:
                record["val_cider"] = self.cider(model)
            barrier()
        if was_training:
            model.train()
        if self.ctx.is_main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record
