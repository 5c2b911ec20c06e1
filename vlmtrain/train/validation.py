"""Validation during training: held-out loss and, optionally, CIDEr of greedy captions, over all ranks.

Everything runs through the engine (`Engine.eval_forward`, `Engine.generator`), in lockstep on every rank,
because under FSDP a forward issues collectives (an all-gather per sharded block):
- Held-out loss: each rank reads its share of the validation shards (the training reader, unshuffled). Before
  each micro-batch the ranks agree whether any of them still has one (one all-reduce); a rank that has run
  out runs `Engine.blank_batch()` instead and discards the result. Text-only micro-batches get a blank image
  row where the image path trains (`eval_forward` applies training's rule), so all ranks run the same modules.
- CIDEr: every rank lists the same caption samples (the first `max_samples` of the validation shards that
  have an image and references), cut into chunks of `micro_batch_size` dealt round-robin to the ranks. The
  chunks do not depend on the world size, so neither do the greedy captions. A rank without a chunk in the
  last round captions a blank image and discards it; decoding stops when every rank's rows have stopped.
  Rank 0 gathers the captions, scores them, and broadcasts the score (or its error, raised on every rank).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlmtrain.config.schema import StageConfig
from vlmtrain.data.collate import MODEL_KEYS
from vlmtrain.dist import DistContext, any_rank, broadcast_object, gather_objects, sum_over_ranks
from vlmtrain.train.engines.base import Engine

LoaderFactory = Callable[[], Any]  # () -> finite, unshuffled iterable of this rank's batches


class Validator:
    """Runs at the steps `validation.every` names and at the end; writes `validation.jsonl` (rank 0)."""

    def __init__(
        self, stage: StageConfig, ctx: DistContext, tokenizer: Any, make_loader: LoaderFactory, path: Path
    ) -> None:
        self.cfg = stage.validation
        self.mask_mode = stage.mask.mode
        self.chunk = stage.batch.micro_batch_size  # captions generated together (memory as a micro-batch)
        self.ctx, self.tokenizer, self.make_loader, self.path = ctx, tokenizer, make_loader, path
        self.last_captions: dict[str, str] = {}  # rank 0: the latest CIDEr run's captions by sample key
        if self.cfg.cider:
            from vlmtrain.eval.java import require_java

            require_java()  # fail at the start of the stage, not at the first validation
            from vlmtrain.models.language import resolve_attn_backend

            # `auto` counts as what it resolves to here (flex on a CUDA machine whose torch passed the tests).
            if resolve_attn_backend(stage.model.attn_backend) == "flex":
                raise ValueError(
                    f"stage {stage.name}: validation.cider generates with a KV cache, which needs "
                    f"model.attn_backend sdpa or eager (it is {stage.model.attn_backend!r}, which is flex here); "
                    "set validation.cider=false or model.attn_backend: sdpa"
                )

    def due(self, step: int, total: int) -> bool:
        return self.cfg.data is not None and (
            step == total or (self.cfg.every > 0 and step % self.cfg.every == 0)
        )

    # ---- held-out loss --------------------------------------------------------------------------------
    def held_out_loss(self, engine: Engine) -> float:
        """Sum of token losses over sum of supervised tokens, over every rank's share of the held-out set.

        A rank's share is its first ceil(max_samples / world_size) samples, rounded up to whole
        micro-batches, so the set equals the 1-rank set when `max_samples` covers the validation shards.
        Host syncs: one all-reduce per micro-batch (is there more?) and one for the totals.
        """
        dev = self.ctx.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        tokens, seen = 0, 0
        budget = -(-self.cfg.max_samples // self.ctx.world_size)  # this rank's share, rounded up
        loader = iter(self.make_loader())
        with contextlib.closing(loader) if hasattr(loader, "close") else contextlib.nullcontext():
            while True:
                batch = next(loader, None) if seen < budget else None
                if not any_rank(batch is not None, dev):
                    break
                if batch is None:  # this rank is out of batches while another still has one
                    engine.eval_forward(engine.blank_batch(), self.mask_mode)
                    continue
                inputs = {k: batch[k].to(dev) for k in MODEL_KEYS if k in batch}
                out = engine.eval_forward(inputs, self.mask_mode)
                loss_sum += out.token_loss.sum().double()
                tokens += out.num_label_tokens
                seen += int(batch["num_samples"])
        total_loss, total_tokens = sum_over_ranks([float(loss_sum), float(tokens)], dev)
        return total_loss / total_tokens if total_tokens else float("nan")

    # ---- CIDEr ----------------------------------------------------------------------------------------
    def caption_samples(self, transform: Any) -> list[Any]:
        """The caption samples every rank lists alike: within the first `max_samples`, those with an image
        and references, in shard order."""
        from vlmtrain.eval.run import iter_eval_samples

        samples = [
            s
            for s in iter_eval_samples(self.cfg.data, transform, self.cfg.max_samples)
            if s.meta.get("references") and s.image is not None
        ]
        if not samples:
            raise ValueError(
                f"validation.cider: {self.cfg.data} has no caption samples with references and images"
            )
        return samples

    def captions(self, engine: Engine, samples: list[Any]) -> dict[int, str]:
        """Collective: greedy captions of this rank's chunks of `samples`, keyed by position in `samples`.

        Every rank makes ceil(chunks / world_size) `generate` calls; each decoding step ends with one
        all-reduce (does any rank still generate?), and reads its chosen tokens with one device-to-host copy.
        """
        from vlmtrain.data.shard import DEFAULT_CAPTION_PROMPT
        from vlmtrain.eval.generate import GenerationConfig
        from vlmtrain.eval.run import EvalSample, answer_batch

        model = engine.module
        mode = "causal" if self.mask_mode == "causal" else "prefix"
        config = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, mask_mode=mode)
        starts = list(range(0, len(samples), self.chunk))
        world, rank = self.ctx.world_size, self.ctx.rank
        rounds = -(-len(starts) // world)
        size = model.image_size
        blank = EvalSample("", {}, torch.zeros((3, size, size)))
        out: dict[int, str] = {}
        with engine.generator(self.tokenizer, config) as gen:
            for r in range(rounds):
                k = r * world + rank
                if k >= len(starts):
                    answer_batch(gen, [blank], [DEFAULT_CAPTION_PROMPT], model.num_image_tokens)
                    continue
                idx = range(starts[k], min(starts[k] + self.chunk, len(samples)))
                chunk = [samples[i] for i in idx]
                answers = answer_batch(gen, chunk, [_question(s) for s in chunk], model.num_image_tokens)
                out.update(zip(idx, answers, strict=True))
        return out

    def cider(self, engine: Engine) -> float:
        """Collective: CIDEr of the greedy captions of the caption samples, the same value on every rank."""
        samples = self.caption_samples(engine.module.image_transform)
        parts = gather_objects(self.captions(engine, samples))
        result: tuple[float | None, str | None] = (None, None)
        if self.ctx.is_main:
            captions = {i: c for part in parts for i, c in part.items()}
            self.last_captions = {samples[i].key: captions[i] for i in sorted(captions)}
            try:
                result = (_score_cider(samples, captions), None)
            except Exception as err:  # reported on every rank below, so none waits for the others
                result = (None, f"{type(err).__name__}: {err}")
        score, error = broadcast_object(result)
        if error is not None:
            raise RuntimeError(f"validation.cider: scoring on rank 0 failed: {error}")
        return float(score)

    def run(self, engine: Engine, step: int) -> dict[str, float]:
        """Collective: validate the engine's current weights; every rank returns the same record."""
        record: dict[str, Any] = {"step": step, "val_loss": self.held_out_loss(engine)}
        if self.cfg.cider:
            record["val_cider"] = self.cider(engine)
        if self.ctx.is_main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record


def _question(sample: Any) -> str:
    from vlmtrain.data.shard import DEFAULT_CAPTION_PROMPT

    return (sample.meta.get("conversations") or [{"value": DEFAULT_CAPTION_PROMPT}])[0]["value"]


def _score_cider(samples: list[Any], captions: dict[int, str]) -> float:
    from pycocoevalcap.cider.cider import Cider

    from vlmtrain.eval.caption_metrics import ptb_tokenize

    missing = [i for i in range(len(samples)) if i not in captions]
    if missing:
        raise RuntimeError(f"no caption was gathered for {len(missing)} sample(s), e.g. {missing[:3]}")
    preds = {str(i): [captions[i]] for i in range(len(samples))}
    refs = {str(i): list(s.meta["references"]) for i, s in enumerate(samples)}
    score, _ = Cider().compute_score(ptb_tokenize(refs), ptb_tokenize(preds))
    return float(score)
