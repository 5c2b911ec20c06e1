"""Helpers for the FSDP engine's end-to-end tests: a training entry point that records which samples each
rank consumed and can dump the engine state right after loading a checkpoint.

Run as a script under torchrun or plain python:
    python tests/fsdp_fixtures.py record SPEC.json
SPEC: {"config": stage JSON, "run_dir": dir, "resume": bool, "keys": JSONL path (one file per rank:
"<keys>.rank<N>"), "state_out": optional dir}. With `state_out`, the engine of the config is built, loads the
newest checkpoint and writes what its `gather_state` returns (before any training), so a test can check
that a checkpoint survives a change of engine or world size bitwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlmtrain.config.schema import StageConfig
from vlmtrain.dist import DistContext
from vlmtrain.train.engines.base import EngineState


class RecordingLoader:
    """A rank's loader that appends the sample keys of every batch it hands out to a JSONL file."""

    def __init__(self, inner: Any, path: Path, rank: int) -> None:
        self.inner, self.path, self.rank = inner, path, rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with open(self.path, "a", encoding="utf-8") as out:
            for batch in self.inner:
                out.write(json.dumps({"rank": self.rank, "keys": list(batch["keys"])}) + "\n")
                out.flush()
                yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def skip_counts(self) -> dict[str, int]:
        return self.inner.skip_counts()

    def data_faults(self) -> dict[str, Any]:
        return self.inner.data_faults()  # the trainer logs every rank's skips and corrupt shards


def read_keys(path: Path) -> list[str]:
    """Every sample key a run's ranks consumed, over all `<path>.rank*` files, in file order."""
    keys: list[str] = []
    for part in sorted(path.parent.glob(f"{path.name}.rank*")):
        for line in part.read_text().splitlines():
            keys += json.loads(line)["keys"]
    return keys


def keys_by_rank(path: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for part in sorted(path.parent.glob(f"{path.name}.rank*")):
        for line in part.read_text().splitlines():
            record = json.loads(line)
            out.setdefault(int(record["rank"]), []).extend(record["keys"])
    return out


def initial_model_state(cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Stage 0's input as a run builds it (seed, then the model from its config and tokenizer), in fp32."""
    from transformers import AutoTokenizer

    from vlmtrain.config.schema import ModelConfig
    from vlmtrain.models.vlm import VisionLanguageModel

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"]["tokenizer"])
    torch.manual_seed(cfg["train"]["seed"])
    model = VisionLanguageModel.from_config(ModelConfig(**cfg["model"]), tokenizer)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@dataclass(frozen=True)
class PlainRun:
    """What a data-parallel run must reproduce, computed in one process with plain PyTorch."""

    losses: list[float]
    """Per optimizer step: the mean micro-batch loss over all ranks (what the trainer logs)."""
    grad_norms: list[float]
    """Per optimizer step: the global gradient norm before clipping."""
    weights: dict[str, torch.Tensor]
    """Every parameter after the last step."""
    keys: dict[int, list[str]]
    """Sample keys each rank's loader handed out, in order."""


def plain_reference(cfg: dict[str, Any], ranks: int, steps: int) -> PlainRun:
    """Replay `steps` optimizer steps of a `ranks`-rank run of `cfg` in this process, without any engine.

    Each rank's micro-batches come from its own loader, exactly as the rank would read them; the gradient
    of a step is that of the token-mean loss over all ranks' micro-batches, then clipping, AdamW and the schedule
    (vlmtrain.train.optim) apply. No noise: stages whose config adds input noise are not supported here.
    """
    import dataclasses

    from vlmtrain.config.load import stage_config_from_dict
    from vlmtrain.data.collate import MODEL_KEYS
    from vlmtrain.models.freeze import apply_trainability
    from vlmtrain.models.loss import count_supervised
    from vlmtrain.train.optim import build_param_groups, make_optimizer, make_scheduler
    from vlmtrain.train.run import load_model_and_tokenizer, make_loader_factory

    stage = stage_config_from_dict(cfg)
    if stage.mask.noise_ratio > 0:
        raise ValueError("plain_reference does not replay input noise; use a stage without it")
    stage = dataclasses.replace(stage, data=dataclasses.replace(stage.data, num_workers=0))  # same slots
    model, tokenizer = load_model_and_tokenizer(stage, Path("/nonexistent"))
    apply_trainability(model, stage.modules)
    model.train()
    specs = build_param_groups(model, model.module_groups(), stage)
    optimizer = make_optimizer(specs, stage.optim)
    scheduler = make_scheduler(optimizer, specs, steps, stage.optim)
    params = [p for s in specs for p in s.params]
    accum = stage.batch.accumulation_steps(ranks)
    loaders = [
        iter(
            make_loader_factory(stage, model, tokenizer, DistContext(r, ranks, r, torch.device("cpu")))(None)
        )
        for r in range(ranks)
    ]
    run = PlainRun([], [], {}, {r: [] for r in range(ranks)})
    for _ in range(steps):
        # The whole global batch's token mean: every supervised token of the step weighs the same.
        step_batches = []
        for r, loader in enumerate(loaders):
            for _ in range(accum):
                batch = next(loader)
                run.keys[r] += batch["keys"]
                step_batches.append(batch)
        n_tokens = sum(count_supervised(b["labels"], b["sample_ids"]) for b in step_batches)
        loss_sum = 0.0
        for batch in step_batches:
            out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, mask_mode=stage.mask.mode)
            (out.loss_sum / n_tokens).backward()
            loss_sum += float(out.loss_sum.detach())
        run.losses.append(loss_sum / n_tokens)
        run.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, stage.optim.grad_clip)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    run.weights.update({n: p.detach().clone() for n, p in model.named_parameters()})
    return run


def record_command(spec: Path, ranks: int) -> list[str]:
    """This module's `record` entry point for one process, or under torchrun for several."""
    script = [str(Path(__file__).resolve()), "record", str(spec)]
    if ranks == 1:
        return [sys.executable, *script]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        *script,
    ]


def save_engine_state(state: EngineState, out: Path) -> None:
    """The state in the checkpoint's own layout (model.safetensors, optimizer.safetensors, counts)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(state.params, str(out / "model.safetensors"))
    moments = {f"exp_avg.{k}": v for k, v in state.exp_avg.items()}
    moments.update({f"exp_avg_sq.{k}": v for k, v in state.exp_avg_sq.items()})
    save_file(moments, str(out / "optimizer.safetensors"))
    counts = {"optimizer_steps": state.optimizer_steps, "scheduler_steps": state.scheduler_steps}
    (out / "counts.json").write_text(json.dumps(counts))


def dump_loaded_state(stage: StageConfig, run_dir: Path, ctx: DistContext, out: Path) -> None:
    """Build the stage's engine, load the newest checkpoint, and write back what the engine gathers."""
    from vlmtrain.models.freeze import apply_trainability
    from vlmtrain.train import checkpoint as ckpt
    from vlmtrain.train.engines import make_engine
    from vlmtrain.train.optim import build_param_groups
    from vlmtrain.train.run import load_model_and_tokenizer

    latest = ckpt.find_latest(run_dir / stage.name / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir / stage.name}")
    model, _ = load_model_and_tokenizer(stage, run_dir)
    apply_trainability(model, stage.modules)
    model.to(ctx.device)
    specs = build_param_groups(model, model.module_groups(), stage)
    engine = make_engine(stage.train.engine, model=model, stage=stage, specs=specs, total_steps=1, ctx=ctx)
    loaded = ckpt.load_checkpoint(latest, ctx)
    engine.load_pieces(loaded.state, loaded.optimizer_steps, loaded.scheduler_steps)
    state = engine.gather_state()
    if ctx.is_main:
        save_engine_state(state, out)


def train_recorded(stage: StageConfig, run_dir: Path, ctx: DistContext, resume: bool, keys: Path) -> None:
    """`run_stage`, with each rank's loader recording the samples it hands to the trainer."""
    from vlmtrain.models.freeze import apply_trainability
    from vlmtrain.train.run import load_model_and_tokenizer, make_loader_factory
    from vlmtrain.train.steps import total_steps_for
    from vlmtrain.train.trainer import Trainer

    model, tokenizer = load_model_and_tokenizer(stage, run_dir)
    apply_trainability(model, stage.modules)
    model.to(ctx.device)
    factory = make_loader_factory(stage, model, tokenizer, ctx)
    path = keys.with_name(f"{keys.name}.rank{ctx.rank}")

    def recording_factory(state: dict[str, Any] | None) -> RecordingLoader:
        return RecordingLoader(factory(state), path, ctx.rank)

    trainer = Trainer(
        stage, run_dir / stage.name, ctx, model, tokenizer, recording_factory, total_steps_for(stage)
    )
    trainer.fit(resume=resume)


def run_record(spec_path: Path) -> None:
    from vlmtrain.config.load import load_stage_config
    from vlmtrain.dist import barrier, init_distributed

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(1)
    ctx = init_distributed()
    stage = load_stage_config(config=spec["config"])
    run_dir = Path(spec["run_dir"])
    if spec.get("state_out"):
        dump_loaded_state(stage, run_dir, ctx, Path(spec["state_out"]))
        barrier()
    train_recorded(stage, run_dir, ctx, bool(spec["resume"]), Path(spec["keys"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="test helper: train while recording consumed sample keys")
    parser.add_argument("command", choices=["record"])
    parser.add_argument("spec", type=Path)
    run_record(parser.parse_args().spec)
