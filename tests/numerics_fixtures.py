"""Jobs for the numerics tests: engines driven exactly as the trainer drives them, their accumulated gradients
written out for the test to compare with brute-force references computed in the test process.

Run as a script, plainly (a world of one) or under torchrun:
    python tests/numerics_fixtures.py SPEC.json
SPEC: {"model_dir": a saved VisionLanguageModel + tokenizer, "jobs": [job, ...]}; a job is
{"engine", "precision", "global", "micro", "layout" ("pad" | "pack"), "samples", "out"}: its ranks read the
global batch's samples rank by rank in consecutive micro-batches, run forward / token-weighted backward /
step, and rank 0 saves `Engine.full_gradients()` (taken before the last `step`) to `out`.
Layout "budget" (with "budget": rows per micro-batch) runs the trainer's own `Trainer.train_step` on one step
group per rank (collate.budget_collate); rank 0 takes the longest samples, so the ranks' micro-batch counts
differ, and `out` also holds every rank's count (`micro_counts`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlmtrain.config.load import shipped_stage_path, stage_config_from_dict
from vlmtrain.config.schema import StageConfig
from vlmtrain.data.collate import MODEL_KEYS, Batch, budget_collate, pack_collate, pad_collate
from vlmtrain.data.process import IGNORE_INDEX, ProcessedSample
from vlmtrain.models.freeze import apply_trainability
from vlmtrain.models.loss import count_supervised
from vlmtrain.models.vlm import VisionLanguageModel

# Answer lengths 10x apart (as in LLaVA-NeXT's mix of one-word and paragraph answers): under a per-micro-batch
# mean a token of a short-answer micro-batch would weigh several times one of a long-answer micro-batch.
ANSWER_LENGTHS = (2, 24, 3, 30, 4, 20, 2, 18, 5, 26, 3, 22, 2, 28, 4, 16)
PROMPT_LENGTH = 4


def make_samples(model: VisionLanguageModel, n: int, seed: int = 0) -> list[ProcessedSample]:
    """`n` samples: an image prefix (none for every 5th sample), a prompt, then a supervised answer."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.language.get_input_embeddings().num_embeddings
    p, size = model.num_image_tokens, model.vision.config.image_size
    out = []
    for i in range(n):
        answer = ANSWER_LENGTHS[i % len(ANSWER_LENGTHS)]
        image = i % 5 != 4
        prefix = p if image else 0
        text = torch.randint(10, vocab - 10, (PROMPT_LENGTH + answer,), generator=gen)
        ids = torch.cat([torch.full((prefix,), model.image_token_id), text])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[prefix + PROMPT_LENGTH :] = text[PROMPT_LENGTH:]
        flags = torch.zeros_like(ids, dtype=torch.bool)
        flags[:prefix] = True
        pixels = torch.randn(3, size, size, generator=gen) if image else None
        out.append(ProcessedSample(ids, labels, flags, pixels, f"s{i}", "synthetic", i))
    return out


def collate(samples: list[ProcessedSample], layout: str, row_length: int, image_size: int) -> Batch:
    if layout == "pad":
        return pad_collate(samples, pad_token_id=0, image_size=image_size)
    return pack_collate(samples, row_length=row_length, pad_token_id=0, image_size=image_size)


def stage_for(
    engine: str, precision: str, global_batch: int, micro: int, data: dict[str, Any] | None = None
) -> StageConfig:
    """Stage 2 (every group trains) with the given engine, precision, batch layout and data overrides."""
    cfg = json.loads(shipped_stage_path(2).read_text())
    cfg["data"].update(data or {})
    cfg["init_from"] = None
    cfg["model"] = {"vision": None, "vision_config": {}, "language": None, "language_config": {}}
    cfg["batch"] = {"global_batch_size": global_batch, "micro_batch_size": micro}
    cfg["train"].update(engine=engine, precision=precision, max_steps=1)
    cfg["optim"].update(warmup_ratio=0.0)
    return stage_config_from_dict(cfg)


def row_length_for(samples: list[ProcessedSample]) -> int:
    """Packed rows fit the longest sample, so most rows hold two or three samples."""
    return max(len(s) for s in samples) + 8


def accumulated_gradients(job: dict[str, Any], model_dir: Path, ctx: Any) -> dict[str, torch.Tensor]:
    """Build the job's engine over a fresh copy of the saved model and run one step's micro-batches."""
    from vlmtrain.dist import sum_over_ranks
    from vlmtrain.train.engines import make_engine
    from vlmtrain.train.optim import build_param_groups

    if job["layout"] == "budget":
        return budget_step_gradients(job, model_dir, ctx)
    stage = stage_for(job["engine"], job["precision"], job["global"], job["micro"])
    model = VisionLanguageModel.from_pretrained(model_dir)
    apply_trainability(model, stage.modules)
    model.train().to(ctx.device)
    samples = make_samples(model, job["samples"])
    per_rank = job["global"] // ctx.world_size
    mine = samples[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]
    size, row = model.vision.config.image_size, row_length_for(samples)
    micro = [
        collate(mine[i : i + job["micro"]], job["layout"], row, size)
        for i in range(0, per_rank, job["micro"])
    ]
    specs = build_param_groups(model, model.module_groups(), stage)
    engine = make_engine(stage.train.engine, model=model, stage=stage, specs=specs, total_steps=1, ctx=ctx)
    if len(micro) != engine.accumulation_steps:
        raise AssertionError(f"{len(micro)} micro-batches for accumulation {engine.accumulation_steps}")
    (step_tokens,) = sum_over_ranks(
        [float(sum(count_supervised(b["labels"], b["sample_ids"]) for b in micro))]
    )
    grads: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro):
        inputs = {k: batch[k].to(ctx.device) for k in MODEL_KEYS if k in batch}
        out = engine.forward(inputs, stage.mask.mode)
        engine.backward(out.loss_sum, int(step_tokens))
        if i == len(micro) - 1:
            grads = engine.full_gradients()
        result = engine.step()
    if not result.boundary:
        raise AssertionError("the last micro-batch did not end the accumulation window")
    return grads


def budget_step_gradients(job: dict[str, Any], model_dir: Path, ctx: Any) -> dict[str, torch.Tensor]:
    """One token-budget step through Trainer.train_step: the accumulated gradients and each rank's count."""
    from transformers import AutoTokenizer

    from vlmtrain.dist import gather_objects
    from vlmtrain.train.engines import make_engine
    from vlmtrain.train.optim import build_param_groups
    from vlmtrain.train.trainer import Trainer

    model = VisionLanguageModel.from_pretrained(model_dir)
    samples = make_samples(model, job["samples"])
    row = row_length_for(samples)
    data = {"max_length": row, "token_budget": job["budget"] * row}
    stage = stage_for(job["engine"], job["precision"], job["global"], job["micro"], data)
    apply_trainability(model, stage.modules)
    model.train().to(ctx.device)
    per_rank = job["global"] // ctx.world_size
    longest_first = sorted(samples, key=len, reverse=True)
    mine = longest_first[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]
    group = budget_collate(mine, row, job["budget"] * row, 0, image_size=model.vision.config.image_size)
    specs = build_param_groups(model, model.module_groups(), stage)
    engine = make_engine(stage.train.engine, model=model, stage=stage, specs=specs, total_steps=1, ctx=ctx)
    grads: dict[str, torch.Tensor] = {}
    step = engine.step

    def step_keeping_gradients() -> Any:
        if engine._micro + 1 == engine._window:  # the window's last micro-batch: gradients before the update
            grads.update(engine.full_gradients())
        return step()

    engine.step = step_keeping_gradients  # type: ignore[method-assign]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trainer = Trainer(stage, Path("/nonexistent"), ctx, model, tokenizer, lambda s: None, total_steps=1)
    info = trainer.train_step(engine, iter([group]), 0)
    counts = gather_objects(len(group["micro_batches"]))
    if info["micro_batches"] != max(counts) or (ctx.is_main and not grads):
        raise AssertionError(f"step ran {info['micro_batches']} micro-batches for counts {counts}")
    return {**grads, "micro_counts": torch.tensor(counts)} if ctx.is_main else {}


def masters_of(job: dict[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
    """Load a stage whose components are bf16 checkpoints, build its engine, take one step; rank 0 returns the
    parameters as loaded (`loaded.*`), the engine's master weights before (`before.*`) and after (`after.*`)."""
    from vlmtrain.config.load import stage_config_from_dict
    from vlmtrain.train.engines import make_engine
    from vlmtrain.train.optim import build_param_groups
    from vlmtrain.train.run import load_model_and_tokenizer

    stage = stage_config_from_dict(job["stage"])
    model, _ = load_model_and_tokenizer(stage, Path("/nonexistent"))
    loaded = {f"loaded.{n}": p.detach().clone() for n, p in model.named_parameters()}
    apply_trainability(model, stage.modules)
    model.train().to(ctx.device)
    specs = build_param_groups(model, model.module_groups(), stage)
    engine = make_engine(stage.train.engine, model=model, stage=stage, specs=specs, total_steps=4, ctx=ctx)
    before = engine.gather_state().params
    samples = make_samples(model, stage.batch.micro_batch_size)
    batch = collate(samples, "pad", 0, model.vision.config.image_size)
    out = engine.forward({k: batch[k] for k in MODEL_KEYS if k in batch}, stage.mask.mode)
    engine.backward(out.loss_sum, count_supervised(batch["labels"], batch["sample_ids"]))
    if not engine.step().boundary:
        raise AssertionError("one micro-batch should make the step")
    after = engine.gather_state().params
    return {
        **loaded,
        **{f"before.{n}": t for n, t in before.items()},
        **{f"after.{n}": t for n, t in after.items()},
    }


def main(spec_path: Path) -> None:
    from vlmtrain.dist import barrier, init_distributed

    spec = json.loads(spec_path.read_text())
    ctx = init_distributed()
    torch.manual_seed(0)
    for job in spec["jobs"]:
        if job.get("kind") == "masters":
            tensors = masters_of(job, ctx)
        else:
            tensors = accumulated_gradients(job, Path(spec["model_dir"]), ctx)
        if ctx.is_main:
            save_file({k: v.contiguous() for k, v in tensors.items()}, job["out"])
        barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
