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
- lmms-eval (`validation.lmms`): rank 0 runs lmms-eval in its own environment (vlmtrain.eval.lmms.run_lmms)
  and broadcasts each batch of questions it sends; every rank answers its chunks of the batch as for CIDEr
  (same lockstep generation, same prompt path as `vlmtrain eval lmms`), rank 0 gathers the answers and hands
  them back. A None broadcast ends the batches; then rank 0 broadcasts the scores (or its error). lmms-eval's
  files go to `<stage>/lmms/step<N>/`.
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
        if self.cfg.lmms is not None:
            from vlmtrain.eval.lmms_env import env_python

            env_python(self.cfg.lmms.env)  # a missing environment fails at the start of the stage
            if stage.model.attn_backend == "flex":
                raise ValueError(
                    f"stage {stage.name}: validation.lmms generates with a KV cache, which needs "
                    "model.attn_backend sdpa or eager; drop validation.lmms or change the backend"
                )
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
        """Something validates at `step`: the held-out set (validation.every) or lmms-eval (lmms.every)."""
        return self._loss_due(step, total) or self._lmms_due(step, total)

    def _loss_due(self, step: int, total: int) -> bool:
        return self.cfg.data is not None and _at(step, total, self.cfg.every)

    def _lmms_due(self, step: int, total: int) -> bool:
        return self.cfg.lmms is not None and _at(step, total, self.cfg.lmms.every)

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
        return self.answers(
            engine,
            len(samples),
            samples.__getitem__,
            lambda i: _question(samples[i]),
            self.cfg.max_new_tokens,
        )

    def answers(
        self,
        engine: Engine,
        n: int,
        sample_of: Callable[[int], Any],
        question_of: Callable[[int], str],
        max_new_tokens: int,
    ) -> dict[int, str]:
        """Collective: greedy answers to questions 0..n-1 (every rank names the same n), this rank's chunks only.

        Chunks of `micro_batch_size` go round-robin to the ranks, so the answers do not depend on the world size;
        a rank without a chunk in the last round answers a blank image and discards it. `sample_of(i)` (an
        EvalSample) is called only for this rank's questions.
        """
        from vlmtrain.data.shard import DEFAULT_CAPTION_PROMPT
        from vlmtrain.eval.generate import GenerationConfig
        from vlmtrain.eval.run import EvalSample, answer_batch

        model = engine.module
        mode = "causal" if self.mask_mode == "causal" else "prefix"
        config = GenerationConfig(max_new_tokens=max_new_tokens, mask_mode=mode)
        starts = list(range(0, n, self.chunk))
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
                idx = range(starts[k], min(starts[k] + self.chunk, n))
                chunk = [sample_of(i) for i in idx]
                answers = answer_batch(gen, chunk, [question_of(i) for i in idx], model.num_image_tokens)
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

    # ---- lmms-eval ------------------------------------------------------------------------------------
    def _answer_lmms_batch(self, engine: Engine, requests: list[Any]) -> list[str] | None:
        """Collective: answers to one batch of lmms-eval questions (every rank holds the batch); rank 0 gets
        them in order, the other ranks None."""
        from vlmtrain.eval.lmms import by_budget, decode_png
        from vlmtrain.eval.run import EvalSample

        transform = engine.module.image_transform

        def sample_of(j: int) -> Any:  # j: position in `requests`
            png = requests[j].image
            return EvalSample(str(j), {}, decode_png(png, transform) if png is not None else None)

        mine: dict[int, str] = {}
        for budget, idx in sorted(by_budget(requests).items()):  # the same order on every rank
            got = self.answers(
                engine,
                len(idx),
                lambda i, idx=idx: sample_of(idx[i]),
                lambda i, idx=idx: requests[idx[i]].text,
                budget,
            )
            mine.update({idx[i]: text for i, text in got.items()})
        parts = gather_objects(mine)
        if not self.ctx.is_main:
            return None
        merged = {i: text for part in parts for i, text in part.items()}
        return [merged[i] for i in range(len(requests))]

    def lmms(self, engine: Engine, step: int) -> dict[str, float]:
        """Collective: lmms-eval's scores (`task/metric`) of the engine's current weights, on every rank."""
        from vlmtrain.eval.lmms import flat_scores, run_lmms

        cfg = self.cfg.lmms
        assert cfg is not None
        result: tuple[dict[str, float] | None, str | None] = (None, None)
        if self.ctx.is_main:

            def answer(requests: list[Any]) -> list[str]:
                broadcast_object(requests)
                answers = self._answer_lmms_batch(engine, requests)
                assert answers is not None
                return answers

            out = self.path.parent / "lmms" / f"step{step:06d}"
            try:
                include = Path(cfg.include_path) if cfg.include_path else None
                results = run_lmms(answer, cfg.tasks, out, cfg.limit, cfg.batch_size, include, cfg.env)
                result = (flat_scores(results), None)
            except Exception as err:  # reported on every rank below, so none waits for the others
                result = (None, f"{type(err).__name__}: {err}")
            broadcast_object(None)  # no more batches
        else:
            while (requests := broadcast_object(None)) is not None:
                self._answer_lmms_batch(engine, requests)
        scores, error = broadcast_object(result)
        if error is not None:
            raise RuntimeError(f"validation.lmms at step {step}: {error}")
        return dict(scores)

    def run(self, engine: Engine, step: int, total: int | None = None) -> dict[str, Any]:
        """Collective: validate the engine's current weights; every rank returns the same record.

        `total` (the stage's steps) says which parts are due at `step`; None runs every configured part."""
        total = step if total is None else total
        record: dict[str, Any] = {"step": step}
        if self._loss_due(step, total):
            record["val_loss"] = self.held_out_loss(engine)
            if self.cfg.cider:
                record["val_cider"] = self.cider(engine)
        if self._lmms_due(step, total):
            record["lmms"] = self.lmms(engine, step)
        if self.ctx.is_main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record


def _at(step: int, total: int, every: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


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
