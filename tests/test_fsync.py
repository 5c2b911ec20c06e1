"""Durability order of everything vlmtrain marks complete: a checkpoint, a stage output, a saved model.

`os.fsync` and `os.replace` are wrapped to record, in call order, which inode each fsync flushed (and its
path, read from /proc/self/fd) and each rename. A rename preserves the inode, so the files found in the
finished folder can be matched to the fsyncs made under their temporary names. The asserted order: every
data file and then its folder are fsynced before the marker's rename makes the marker exist, and the parent
folder is fsynced after the folder's own rename (and, for checkpoints, after `latest` is rewritten).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vlmtrain.config.load import load_stage_config
from vlmtrain.dist import DistContext
from vlmtrain.models.freeze import apply_trainability
from vlmtrain.models.vlm import CONFIG_NAME, WEIGHTS_NAME
from vlmtrain.precision import PrecisionPolicy
from vlmtrain.train import checkpoint as ckpt
from vlmtrain.train.engines.base import EngineState
from vlmtrain.train.shards import Piece
from vlmtrain.train.trainer import DONE_MARKER, FINAL, PRECISION_NAME, Trainer

WORLD_OF_ONE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@dataclass(frozen=True)
class Event:
    kind: str  # "fsync" or "replace"
    inode: int  # fsync: the flushed inode; replace: the renamed inode
    path: str  # fsync: the fd's path at the time; replace: the destination
    src: str = ""


class Recorder:
    """The fsyncs and renames made while it is installed, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[Event] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            self.events.append(Event("fsync", os.fstat(fd).st_ino, path))
            real_fsync(fd)

        def replace(src, dst, **kwargs) -> None:
            inode = os.stat(src).st_ino
            real_replace(src, dst, **kwargs)
            self.events.append(Event("replace", inode, str(dst), str(src)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, kind: str, path: Path) -> int:
        """The last event of `kind` whose path is `path` (a rename: its destination)."""
        hits = [i for i, e in enumerate(self.events) if e.kind == kind and e.path == str(path)]
        assert hits, f"no {kind} of {path}; events: {self.events}"
        return hits[-1]

    def fsyncs_of(self, inode: int) -> list[int]:
        return [i for i, e in enumerate(self.events) if e.kind == "fsync" and e.inode == inode]

    def assert_fsynced_before(self, path: Path, before: int, after: int = -1) -> None:
        """`path`'s inode (as it is now) was fsynced between event `after` and event `before`."""
        hits = [i for i in self.fsyncs_of(path.stat().st_ino) if after < i < before]
        assert hits, (
            f"{path} not fsynced between events {after} and {before}: {self.fsyncs_of(path.stat().st_ino)}"
        )


def assert_folder_durable_before_marker(rec: Recorder, folder: Path, marker: str) -> int:
    """Every file of `folder` (the marker aside), then `folder` itself, fsynced before the marker existed."""
    partial = Path(rec.events[rec.index("replace", folder)].src)  # the folder's name while it was written
    marker_at = rec.index("replace", partial / marker)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != marker)
    assert files, f"{folder} holds no files"
    last_file = 0
    for path in files:
        rec.assert_fsynced_before(path, marker_at)
        last_file = max(last_file, max(i for i in rec.fsyncs_of(path.stat().st_ino) if i < marker_at))
    # The folder's entries are flushed after the last file's fsync: every name is there by then.
    rec.assert_fsynced_before(folder, marker_at, after=last_file)
    rec.assert_fsynced_before(folder / marker, marker_at)  # the marker's own bytes, before its name
    return marker_at


def test_checkpoint_files_and_folder_are_fsynced_before_complete(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    g = torch.Generator().manual_seed(0)
    state = EngineState(
        params={"projector.linear_1.weight": torch.randn(4, 3, generator=g)},
        exp_avg={"projector.linear_1.weight": torch.randn(4, 3, generator=g)},
        exp_avg_sq={"projector.linear_1.weight": torch.rand(4, 3, generator=g)},
        optimizer_steps=1,
        scheduler_steps=1,
    )
    rec = Recorder(monkeypatch)
    final = ckpt.save_checkpoint(root, 1, state, {"reader": {}}, WORLD_OF_ONE, keep=2)

    names = sorted(p.name for p in final.iterdir())
    assert names == sorted(
        [
            ckpt.COMPLETE,
            "model.safetensors",
            "optimizer.safetensors",
            "rng-rank00000.safetensors",
            "trainer_state.json",
        ]
    )
    assert_folder_durable_before_marker(rec, final, ckpt.COMPLETE)
    renamed = rec.index("replace", final)
    rec.assert_fsynced_before(root, len(rec.events), after=renamed)  # the step-* name survives a crash
    latest = rec.index("replace", root / "latest")
    assert latest > renamed
    rec.assert_fsynced_before(root / "latest", latest)
    rec.assert_fsynced_before(root, len(rec.events), after=latest)


class ShardedState:
    """What a sharded save reads of an engine: its step counts and its local pieces."""

    def __init__(self, state: EngineState) -> None:
        self.state = state

    def counts(self) -> tuple[int, int]:
        return self.state.optimizer_steps, self.state.scheduler_steps

    def local_pieces(self) -> dict[str, Piece]:
        s = self.state
        return {
            n: Piece(tuple(v.shape), 0, v.numel(), {"param": v.view(-1), "exp_avg": s.exp_avg[n].view(-1),
                                                   "exp_avg_sq": s.exp_avg_sq[n].view(-1)})
            for n, v in s.params.items()
        }  # fmt: skip


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_sharded_checkpoint_rank_files_and_folder_are_fsynced_before_complete(
    tmp_path, monkeypatch, asynchronous
):
    root = tmp_path / "checkpoints"
    g = torch.Generator().manual_seed(1)
    name = "projector.linear_1.weight"
    state = EngineState(
        params={name: torch.randn(4, 3, generator=g)}, exp_avg={name: torch.randn(4, 3, generator=g)},
        exp_avg_sq={name: torch.rand(4, 3, generator=g)}, optimizer_steps=1, scheduler_steps=1,
    )  # fmt: skip
    rec = Recorder(monkeypatch)
    writer = ckpt.CheckpointWriter(root, WORLD_OF_ONE, keep=2, fmt="sharded", asynchronous=asynchronous)
    final = writer.save(1, ShardedState(state), {"reader": {}}, wait=not asynchronous)
    writer.finish()
    names = sorted(p.name for p in final.iterdir())
    assert names == sorted([ckpt.COMPLETE, "rank-00000-of-00001.json", "rank-00000-of-00001.safetensors",
                            "rng-rank00000.safetensors", "trainer_state.json"])  # fmt: skip
    assert_folder_durable_before_marker(rec, final, ckpt.COMPLETE)
    renamed = rec.index("replace", final)
    rec.assert_fsynced_before(root, len(rec.events), after=renamed)


class GatheredState:
    """What `_write_output` reads of an engine: the trainable parameters as full fp32 tensors, and its policy."""

    precision = PrecisionPolicy.for_precision("bf16")

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def gather_state(self, moments: bool = True) -> EngineState:
        return EngineState(params=self.params)


def test_stage_output_files_and_folder_are_fsynced_before_the_marker(
    tmp_path, monkeypatch, tiny_model, tokenizer
):
    stage = load_stage_config(stage=0)  # projector trains; vision and language are frozen
    apply_trainability(tiny_model, stage.modules)
    stage_dir = tmp_path / stage.name
    trainer = Trainer(
        stage, stage_dir, WORLD_OF_ONE, tiny_model, tokenizer, lambda state: None, total_steps=1
    )
    frozen = {n: p.detach().float().clone() for n, p in tiny_model.named_parameters() if not p.requires_grad}
    rec = Recorder(monkeypatch)
    out = trainer._write_output(GatheredState(tiny_model), frozen)

    assert out == stage_dir / FINAL
    for name in (
        WEIGHTS_NAME,
        CONFIG_NAME,
        "stage_config.json",
        PRECISION_NAME,
        "tokenizer.json",
        DONE_MARKER,
    ):
        assert (out / name).is_file(), name
    assert_folder_durable_before_marker(rec, out, DONE_MARKER)
    renamed = rec.index("replace", out)
    rec.assert_fsynced_before(stage_dir, len(rec.events), after=renamed)


def test_save_pretrained_fsyncs_weights_config_and_folder(tmp_path, monkeypatch, tiny_model):
    rec = Recorder(monkeypatch)
    tiny_model.save_pretrained(tmp_path / "model")
    weights, config = tmp_path / "model" / WEIGHTS_NAME, tmp_path / "model" / CONFIG_NAME
    weights_at, config_at = rec.index("replace", weights), rec.index("replace", config)
    rec.assert_fsynced_before(weights, weights_at)  # the bytes before the name
    rec.assert_fsynced_before(config, config_at)
    rec.assert_fsynced_before(tmp_path / "model", config_at, after=weights_at)
    rec.assert_fsynced_before(tmp_path / "model", len(rec.events), after=config_at)
