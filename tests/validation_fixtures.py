"""Helpers for the validation tests: a held-out set whose ranks get unequal and mixed (image / text-only)
micro-batches, and an entry point that validates a stage's input weights through its engine.

Run as a script under torchrun or plain python:
    python tests/validation_fixtures.py SPEC.json
SPEC: {"jobs": [{"kind": "validate" | "train", "config": stage JSON, "run_dir": dir, "out": JSON path}]}.
`validate` builds the stage's model and engine (no training step) and runs its Validator once at step 0;
rank 0 writes the record, the greedy captions, and every rank's held-out micro-batches (rank, samples,
whether it had an image) to `out`. `train` runs the stage with `run_stage` (validation at its steps).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlmtrain.config.schema import StageConfig
from vlmtrain.dist import DistContext


class BatchLog:
    """A validation loader that notes each micro-batch it hands out: samples and whether it has images."""

    def __init__(self, inner: Any, log: list[dict[str, Any]]) -> None:
        self.inner, self.log = inner, log

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.inner:
            self.log.append(
                {"samples": int(batch["num_samples"]), "images": int(batch["pixel_values"].shape[0])}
            )
            yield batch


def validate_stage_input(stage: StageConfig, run_dir: Path, ctx: DistContext, out: Path) -> None:
    """The stage's Validator at step 0, through the stage's engine, on the weights the stage starts from."""
    from vlmtrain.dist import gather_objects
    from vlmtrain.models.freeze import apply_trainability
    from vlmtrain.train.engines import make_engine
    from vlmtrain.train.optim import build_param_groups
    from vlmtrain.train.run import _validator, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(stage, run_dir)
    apply_trainability(model, stage.modules)
    model.to(ctx.device)
    (run_dir / stage.name).mkdir(parents=True, exist_ok=True)
    validator = _validator(stage, run_dir / stage.name, ctx, model, tokenizer)
    assert validator is not None, "the stage names no validation data"
    log: list[dict[str, Any]] = []
    inner = validator.make_loader
    validator.make_loader = lambda: BatchLog(inner(), log)
    specs = build_param_groups(model, model.module_groups(), stage)
    engine = make_engine(stage.train.engine, model=model, stage=stage, specs=specs, total_steps=1, ctx=ctx)
    record = validator.run(engine, 0)
    batches = gather_objects(log)
    if ctx.is_main:
        result = {"record": record, "captions": validator.last_captions, "batches": batches}
        out.write_text(json.dumps(result, indent=2))


def run_jobs(spec_path: Path) -> None:
    from vlmtrain.config.load import load_stage_config
    from vlmtrain.dist import barrier, init_distributed
    from vlmtrain.train.run import run_stage

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(1)
    ctx = init_distributed()
    for job in spec["jobs"]:
        stage = load_stage_config(config=job["config"])
        run_dir = Path(job["run_dir"])
        if job["kind"] == "validate":
            validate_stage_input(stage, run_dir, ctx, Path(job["out"]))
        else:
            run_stage(stage, run_dir, ctx)
        barrier()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="test helper: validate or train stages in this process")
    parser.add_argument("spec", type=Path)
    run_jobs(parser.parse_args().spec)
