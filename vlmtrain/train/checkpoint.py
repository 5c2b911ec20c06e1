"""Resumable checkpoints: safetensors + JSON only, written to a temp folder and renamed when every rank is done.

Layout of `<stage dir>/checkpoints/step-00000100/`:
  model.safetensors        trainable parameters, fp32 master copies (full tensors, any world size can load)
  optimizer.safetensors    AdamW moments `exp_avg.<name>` / `exp_avg_sq.<name>`
  rng-rank00000.safetensors  per-rank torch RNG states
  trainer_state.json       step, counters, scheduler and reader position, world size
  COMPLETE                 written last; a folder without it is a half-written checkpoint and is ignored

Durability: every rank fsyncs the files it wrote before the barrier, rank 0 then fsyncs the folder before it
writes COMPLETE, and fsyncs the checkpoints root after the rename and after rewriting `latest`
(vlmtrain.durable), so a crash can never leave COMPLETE next to tensors still in the page cache.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlmtrain.dist import DistContext, barrier
from vlmtrain.durable import fsync_dir, fsync_file, replace_durably, write_text_durably
from vlmtrain.train.engines.base import EngineState

PREFIX = "step-"
PARTIAL = ".partial"
COMPLETE = "COMPLETE"


@dataclass
class Checkpoint:
    path: Path
    engine: EngineState
    trainer: dict[str, Any]
    rng: dict[str, torch.Tensor] | None


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(
    root: Path,
    step: int,
    engine_state: EngineState,
    trainer_state: dict[str, Any],
    ctx: DistContext,
    keep: int,
) -> Path:
    """Collective. Returns the final path; only complete checkpoints ever carry a step-* name."""
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + PARTIAL)
    if ctx.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    written = [tmp / f"rng-rank{ctx.rank:05d}.safetensors"]
    save_file(_rng_state(), str(written[0]))
    if ctx.is_main:
        written += [tmp / "model.safetensors", tmp / "optimizer.safetensors"]
        save_file(engine_state.params, str(written[1]), metadata={"step": str(step)})
        moments = {f"exp_avg.{k}": v for k, v in engine_state.exp_avg.items()}
        moments.update({f"exp_avg_sq.{k}": v for k, v in engine_state.exp_avg_sq.items()})
        save_file(moments, str(written[2]))
        meta = dict(trainer_state)
        meta.update(
            step=step,
            world_size=ctx.world_size,
            optimizer_steps=engine_state.optimizer_steps,
            scheduler_steps=engine_state.scheduler_steps,
        )
        write_text_durably(tmp / "trainer_state.json", json.dumps(meta, indent=2))
    for path in written:  # the writer fsyncs: on a shared filesystem only its node holds the dirty pages
        fsync_file(path)
    barrier()  # every rank has written and fsynced its files
    if ctx.is_main:
        fsync_dir(tmp)  # the files' directory entries, before COMPLETE vouches for them
        write_text_durably(tmp / COMPLETE, f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        replace_durably(tmp, final)
        write_text_durably(root / "latest", final.name + "\n")
        prune_checkpoints(root, keep)
    barrier()
    return final


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones are reported and skipped."""
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.glob(f"{PREFIX}*")):
        if not path.is_dir():
            continue
        if path.name.endswith(PARTIAL) or not (path / COMPLETE).is_file():
            warnings.warn(f"ignoring half-written checkpoint {path} (no {COMPLETE} marker)", stacklevel=2)
            continue
        out.append(path)
    return out


def prune_checkpoints(root: Path, keep: int) -> None:
    complete = list_complete(root)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_latest(root: Path) -> Path | None:
    complete = list_complete(root)
    return complete[-1] if complete else None


def load_checkpoint(path: Path, ctx: DistContext) -> Checkpoint:
    """Read a complete checkpoint; tensors are loaded on rank 0 only (the engine scatters them)."""
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    trainer = json.loads((path / "trainer_state.json").read_text())
    engine = EngineState(
        optimizer_steps=trainer["optimizer_steps"], scheduler_steps=trainer["scheduler_steps"]
    )
    if ctx.is_main:
        engine.params = load_file(str(path / "model.safetensors"))
        moments = load_file(str(path / "optimizer.safetensors"))
        engine.exp_avg = {k[len("exp_avg.") :]: v for k, v in moments.items() if k.startswith("exp_avg.")}
        engine.exp_avg_sq = {
            k[len("exp_avg_sq.") :]: v for k, v in moments.items() if k.startswith("exp_avg_sq.")
        }
    rng_path = path / f"rng-rank{ctx.rank:05d}.safetensors"
    rng = load_file(str(rng_path)) if rng_path.is_file() and trainer["world_size"] == ctx.world_size else None
    return Checkpoint(path, engine, trainer, rng)


def restore_rng(rng: dict[str, torch.Tensor] | None) -> None:
    if rng is None:
        return
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
