"""Resumable checkpoints: safetensors + JSON only, written to a temp folder and renamed when every rank is done.

Layout of `<stage dir>/checkpoints/step-00000100/` (`train.checkpoint_format`):
  sharded (default): every rank writes its own part of the fp32 state, in parallel (vlmtrain.train.shards)
    rank-00000-of-00004.safetensors  this rank's flat fragments `param.<name>`, `exp_avg.<name>`, `exp_avg_sq.<name>`
    rank-00000-of-00004.json         where each fragment sits in its flattened full parameter
  gathered: rank 0 gathers the full state and writes it alone
    model.safetensors        trainable parameters, fp32 master copies (full tensors)
    optimizer.safetensors    AdamW moments `exp_avg.<name>` / `exp_avg_sq.<name>`
  both:
    rng-rank00000.safetensors  per-rank torch RNG states
    trainer_state.json       step, counters, scheduler and reader position, world size, format
    COMPLETE                 written last; a folder without it is a half-written checkpoint and is ignored

Either format resumes on any world size and either engine: each rank reads only the ranges it holds
(`StateReader`); a sharded checkpoint missing a rank file is refused by name.

Durability: every rank fsyncs the files it wrote before the barrier, rank 0 then fsyncs the folder before it
writes COMPLETE, and fsyncs the checkpoints root after the rename and after rewriting `latest`
(vlmtrain.durable), so a crash can never leave COMPLETE next to tensors still in the page cache.

Asynchronous saves (`train.checkpoint_async`, sharded only): each rank copies its part to host memory (1/world of
the state), a background thread writes and fsyncs it, and training goes on. After each step the trainer polls
(one all-reduce, only while a save is pending) whether every rank's thread has finished; then, or at the
latest at the next save or the end of the stage, every rank agrees that all writes succeeded (one all-reduce)
before rank 0 writes COMPLETE.
"""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from vlmtrain.dist import DistContext, any_rank, barrier
from vlmtrain.durable import fsync_dir, fsync_file, replace_durably, write_text_durably
from vlmtrain.train.engines.base import Engine, EngineState
from vlmtrain.train.shards import (
    GATHERED_MOMENTS,
    GATHERED_WEIGHTS,
    GatheredReader,
    Piece,
    ShardedReader,
    StateReader,
    write_rank_files,
)

PREFIX = "step-"
PARTIAL = ".partial"
COMPLETE = "COMPLETE"
Format = Literal["sharded", "gathered"]


@dataclass
class Checkpoint:
    path: Path
    state: StateReader  # the fp32 weights and moments, read by range (either format)
    optimizer_steps: int
    scheduler_steps: int
    trainer: dict[str, Any]
    rng: dict[str, torch.Tensor] | None


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def host_copy(pieces: dict[str, Piece]) -> dict[str, Piece]:
    """The pieces copied to host memory (pinned for device tensors), so training may change the originals.

    Synchronous saves copy too: the pieces are views into the engine's flat buffers (DeepSpeed's partition),
    which safetensors refuses to write as tensors sharing memory. The copy is 1/world of the state.
    """
    out = {}
    for name, piece in pieces.items():
        copies = {}
        for kind, t in piece.tensors.items():
            t = t.detach()
            if t.device.type == "cpu":
                copies[kind] = t.clone()
            else:
                copies[kind] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
                    t, non_blocking=True
                )
        out[name] = Piece(piece.shape, piece.start, piece.numel, copies)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies have landed
    return out


@dataclass
class _Pending:
    """An asynchronous save whose rank files are still being written."""

    step: int
    tmp: Path
    thread: threading.Thread
    written: list[Path]
    error: BaseException | None = None


class CheckpointWriter:
    """Writes a stage's checkpoints (collective calls: every rank calls `save` and `finish` alike)."""

    def __init__(
        self, root: Path, ctx: DistContext, keep: int, fmt: Format = "sharded", asynchronous: bool = False
    ) -> None:
        if asynchronous and fmt != "sharded":
            raise ValueError("train.checkpoint_async needs train.checkpoint_format: sharded")
        self.root, self.ctx, self.keep, self.fmt, self.asynchronous = root, ctx, keep, fmt, asynchronous
        self._pending: _Pending | None = None

    def save(self, step: int, engine: Engine, trainer_state: dict[str, Any], wait: bool = True) -> Path:
        """Collective. Returns the final path; only complete checkpoints ever carry a step-* name. With
        `asynchronous` and `wait=False` the rank files are still being written on return, and the checkpoint
        becomes complete when `poll` finds every rank done, or at the next `save` or `finish`."""
        self.finish()
        if self.fmt == "gathered":
            return self.save_gathered(step, engine.gather_state(), trainer_state)
        tmp, written = self._begin(step, engine.counts(), trainer_state, "sharded")
        pieces = host_copy(engine.local_pieces())
        if self.asynchronous and not wait:
            pending = _Pending(step, tmp, threading.Thread(), written)
            pending.thread = threading.Thread(
                target=self._write_in_background, args=(pending, pieces), name=f"checkpoint-{step}"
            )
            pending.thread.start()
            self._pending = pending
            return self.root / checkpoint_name(step)
        written += write_rank_files(tmp, self.ctx.rank, self.ctx.world_size, pieces)
        return self._fsync_and_commit(step, tmp, written)

    def save_gathered(self, step: int, state: EngineState, trainer_state: dict[str, Any]) -> Path:
        """Collective: a gathered checkpoint of `state`, whose tensors rank 0 holds (`Engine.gather_state`)."""
        self.finish()
        counts = (state.optimizer_steps, state.scheduler_steps)
        tmp, written = self._begin(step, counts, trainer_state, "gathered")
        if self.ctx.is_main:
            written += [tmp / GATHERED_WEIGHTS, tmp / GATHERED_MOMENTS]
            save_file(state.params, str(written[-2]), metadata={"step": str(step)})
            moments = {f"exp_avg.{k}": v for k, v in state.exp_avg.items()}
            moments.update({f"exp_avg_sq.{k}": v for k, v in state.exp_avg_sq.items()})
            save_file(moments, str(written[-1]))
        return self._fsync_and_commit(step, tmp, written)

    def _begin(
        self, step: int, counts: tuple[int, int], trainer_state: dict[str, Any], fmt: Format
    ) -> tuple[Path, list[Path]]:
        """Collective: a fresh temp folder holding every rank's RNG file and rank 0's trainer_state.json."""
        ctx = self.ctx
        tmp = self.root / (checkpoint_name(step) + PARTIAL)
        if ctx.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        written = [tmp / f"rng-rank{ctx.rank:05d}.safetensors"]
        save_file(_rng_state(), str(written[0]))
        if ctx.is_main:
            meta = dict(trainer_state)
            meta.update(
                step=step,
                world_size=ctx.world_size,
                optimizer_steps=counts[0],
                scheduler_steps=counts[1],
                format=fmt,
            )
            write_text_durably(tmp / "trainer_state.json", json.dumps(meta, indent=2))
        return tmp, written

    def _fsync_and_commit(self, step: int, tmp: Path, written: list[Path]) -> Path:
        for path in written:  # the writer fsyncs: on a shared filesystem only its node holds the dirty pages
            fsync_file(path)
        return self._commit(step, tmp)

    def poll(self) -> Path | None:
        """Collective (one all-reduce while an asynchronous save is pending, nothing otherwise): complete the
        pending save once every rank's thread has finished; returns its path then."""
        if self._pending is None:
            return None
        if any_rank(self._pending.thread.is_alive(), self.ctx.device):
            return None
        return self.finish()

    def finish(self) -> Path | None:
        """Collective: complete the pending asynchronous save, if any (a no-op otherwise)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        pending.thread.join()
        if any_rank(pending.error is not None, self.ctx.device):
            if pending.error is not None:
                raise RuntimeError(f"writing checkpoint {pending.tmp} failed on this rank") from pending.error
            raise RuntimeError(f"writing checkpoint {pending.tmp} failed on another rank (see its log)")
        return self._commit(pending.step, pending.tmp)

    def _write_in_background(self, pending: _Pending, pieces: dict[str, Piece]) -> None:
        try:  # file I/O only: collectives stay on the main thread
            pending.written += write_rank_files(pending.tmp, self.ctx.rank, self.ctx.world_size, pieces)
            for path in pending.written:
                fsync_file(path)
        except BaseException as exc:  # reported to every rank by `finish`
            pending.error = exc

    def _commit(self, step: int, tmp: Path) -> Path:
        final = self.root / checkpoint_name(step)
        barrier()  # every rank has written and fsynced its files
        if self.ctx.is_main:
            fsync_dir(tmp)  # the files' directory entries, before COMPLETE vouches for them
            write_text_durably(tmp / COMPLETE, f"{step}\n")
            if final.exists():
                shutil.rmtree(final)
            replace_durably(tmp, final)
            write_text_durably(self.root / "latest", final.name + "\n")
            prune_checkpoints(self.root, self.keep)
        barrier()
        return final


def save_checkpoint(
    root: Path, step: int, state: EngineState, trainer_state: dict[str, Any], ctx: DistContext, keep: int
) -> Path:
    """Collective: a gathered checkpoint of a state already gathered on rank 0 (tools and tests)."""
    return CheckpointWriter(root, ctx, keep, fmt="gathered").save_gathered(step, state, trainer_state)


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
    """Open a complete checkpoint of either format; tensors are read later, each rank its own ranges."""
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    trainer = json.loads((path / "trainer_state.json").read_text())
    state = open_state(path, trainer)
    rng_path = path / f"rng-rank{ctx.rank:05d}.safetensors"
    rng = load_file(str(rng_path)) if rng_path.is_file() and trainer["world_size"] == ctx.world_size else None
    return Checkpoint(
        path, state, int(trainer["optimizer_steps"]), int(trainer["scheduler_steps"]), trainer, rng
    )


def open_state(path: Path, trainer: dict[str, Any] | None = None) -> StateReader:
    """The fp32 state of a checkpoint folder, in whichever format it was written."""
    if trainer is None:
        trainer = json.loads((path / "trainer_state.json").read_text())
    fmt = trainer.get("format", "gathered")  # checkpoints from before sharded saves are gathered
    if fmt == "sharded":
        return ShardedReader(path, int(trainer["world_size"]))
    if fmt == "gathered":
        return GatheredReader(path)
    raise ValueError(
        f"{path / 'trainer_state.json'}: unknown checkpoint format {fmt!r} (sharded or gathered)"
    )


def restore_rng(rng: dict[str, torch.Tensor] | None) -> None:
    if rng is None:
        return
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
