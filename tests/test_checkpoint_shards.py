"""Sharded checkpoint files (vlmtrain.train.shards): reassembly of flat fragments written at one world size and
layout, read back at another, against the original full tensors (exact equality); partial checkpoints refused."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlmtrain.dist import DistContext
from vlmtrain.train.shards import (
    KINDS,
    GatheredReader,
    Piece,
    ShardedReader,
    Span,
    plan_reads,
    rank_stem,
    write_rank_files,
)

CPU_CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SHAPES = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (3, 4, 2), "c.weight": (1, 9), "d.bias": (2,)}


def full_state(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {k: {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()} for k in KINDS}


def zero_layout(world: int) -> dict[int, dict[str, tuple[int, int]]]:
    """DeepSpeed ZeRO-1/2's layout: the parameters concatenated into one flat buffer, padded to a multiple of
    the world size, split into equal partitions; a parameter's part on a rank is its overlap with the partition."""
    total = sum(math.prod(s) for s in SHAPES.values())
    part = -(-total // world)
    out: dict[int, dict[str, tuple[int, int]]] = {r: {} for r in range(world)}
    offset = 0
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        for r in range(world):
            lo, hi = max(offset, r * part), min(offset + n, (r + 1) * part)
            if hi > lo:
                out[r][name] = (lo - offset, hi - lo)
        offset += n
    return out


def fsdp_layout(world: int, replicas: int = 1) -> dict[int, dict[str, tuple[int, int]]]:
    """FSDP2's layout: dim 0 in torch.chunk pieces of ceil(rows / shards) rows; HSDP replicas hold the same."""
    shards = world // replicas
    out: dict[int, dict[str, tuple[int, int]]] = {r: {} for r in range(world)}
    for name, shape in SHAPES.items():
        rows, row = shape[0], math.prod(shape[1:])
        chunk = -(-rows // shards)
        for r in range(world):
            s = r % shards
            lo, hi = min(s * chunk, rows), min((s + 1) * chunk, rows)
            out[r][name] = (lo * row, (hi - lo) * row)
    return out


def random_layout(world: int, rng: random.Random) -> dict[int, dict[str, tuple[int, int]]]:
    """Each parameter cut at random points into `world` consecutive (possibly empty) ranges."""
    out: dict[int, dict[str, tuple[int, int]]] = {r: {} for r in range(world)}
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        cuts = sorted(rng.randint(0, n) for _ in range(world - 1))
        bounds = [0, *cuts, n]
        for r in range(world):
            out[r][name] = (bounds[r], bounds[r + 1] - bounds[r])
    return out


def write_layout(
    directory: Path, state: dict[str, dict[str, torch.Tensor]], layout: dict[int, dict[str, tuple[int, int]]]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    world = len(layout)
    for rank, ranges in layout.items():
        pieces = {
            n: Piece(SHAPES[n], s, c, {k: state[k][n].reshape(-1)[s : s + c] for k in KINDS})
            for n, (s, c) in ranges.items()
        }
        write_rank_files(directory, rank, world, pieces)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8, 16, 64])
def test_any_layout_reads_back_exactly_under_any_other(tmp_path, world):
    rng = random.Random(world)
    state = full_state(world)
    writers = {
        "zero": zero_layout(world),
        "fsdp": fsdp_layout(world),
        "random": random_layout(world, rng),
    }
    if world % 2 == 0:
        writers["hsdp"] = fsdp_layout(world, replicas=2)
    for wname, layout in writers.items():
        directory = tmp_path / wname
        write_layout(directory, state, layout)
        reader = ShardedReader(directory, world)
        assert sorted(reader.names()) == sorted(SHAPES)
        for kind in KINDS:
            for name, value in state[kind].items():
                assert torch.equal(reader.full(kind, name), value), (wname, kind, name)
        # Read under other layouts (another world size and engine): each range equals the slice of the original.
        target_world = rng.choice([1, 2, 3, 4, 5, 64])
        targets = [zero_layout(target_world), fsdp_layout(target_world), random_layout(target_world, rng)]
        for target in targets:
            for ranges in target.values():
                for name, (s, c) in ranges.items():
                    for kind in KINDS:
                        got = reader.read(kind, name, s, c)
                        assert torch.equal(got, state[kind][name].reshape(-1)[s : s + c]), (wname, name, s, c)


def test_plan_reads_reads_overlaps_once_and_names_gaps():
    spans = [Span(0, 0, 4), Span(1, 0, 4), Span(2, 4, 3), Span(3, 9, 2)]  # rank 1 replicates rank 0
    reads = plan_reads(spans, 2, 5, "w")
    assert [(r.owner, r.src, r.dst, r.count) for r in reads] == [(0, 2, 0, 2), (2, 0, 2, 3)]
    assert sum(r.count for r in reads) == 5
    with pytest.raises(ValueError, match=r"w: elements \[7, 9\) are in no rank file"):
        plan_reads(spans, 0, 11, "w")
    with pytest.raises(ValueError, match=r"elements \[11, 12\)"):
        plan_reads(spans, 9, 3, "w")
    assert plan_reads(spans, 5, 0, "w") == []


def test_missing_rank_file_is_refused_by_name(tmp_path):
    state = full_state(0)
    write_layout(tmp_path, state, fsdp_layout(4))
    (tmp_path / f"{rank_stem(2, 4)}.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"lacks rank-00002-of-00004\.safetensors; rank 2 did not finish"
    ):
        ShardedReader(tmp_path, 4)
    (tmp_path / f"{rank_stem(3, 4)}.json").unlink()
    with pytest.raises(FileNotFoundError, match="rank-00002-of-00004"):
        ShardedReader(tmp_path, 4)


def test_index_without_some_fragment_fails_on_read(tmp_path):
    """An index that leaves a range of a parameter uncovered (a corrupt checkpoint) fails, naming it."""
    state = full_state(1)
    write_layout(tmp_path, state, zero_layout(3))
    path = tmp_path / f"{rank_stem(1, 3)}.json"
    meta = json.loads(path.read_text())
    victim = next(iter(meta["params"]))
    del meta["params"][victim]
    path.write_text(json.dumps(meta))
    reader = ShardedReader(tmp_path, 3)
    with pytest.raises(ValueError, match=rf"param\.{victim}: elements \[\d+, \d+\) are in no rank file"):
        reader.full("param", victim)


def test_check_covers_names_missing_and_misshaped_parameters(tmp_path):
    write_layout(tmp_path, full_state(2), fsdp_layout(2))
    reader = ShardedReader(tmp_path, 2)
    wanted = dict(SHAPES)
    reader.check_covers(wanted, moments=True)
    with pytest.raises(KeyError, match=r"lacks 1 trainable parameter\(s\), e.g. \['e.weight'\]"):
        reader.check_covers({**wanted, "e.weight": (2, 2)}, moments=False)
    with pytest.raises(ValueError, match=r"a.bias has shape \(7,\) in the checkpoint, \(8,\) in the model"):
        reader.check_covers({**wanted, "a.bias": (8,)}, moments=False)


def test_gathered_reader_reads_row_ranges_exactly(tmp_path):
    """The old format, read by range: the same values as slicing the full tensors."""
    state = full_state(3)
    save_file(state["param"], str(tmp_path / "model.safetensors"))
    moments = {f"{k}.{n}": v for k in KINDS[1:] for n, v in state[k].items()}
    save_file(moments, str(tmp_path / "optimizer.safetensors"))
    reader = GatheredReader(tmp_path)
    assert reader.has("exp_avg") and reader.has("exp_avg_sq")
    rng = random.Random(0)
    for _ in range(200):
        name = rng.choice(list(SHAPES))
        n = math.prod(SHAPES[name])
        s = rng.randint(0, n)
        c = rng.randint(0, n - s)
        for kind in KINDS:
            assert torch.equal(reader.read(kind, name, s, c), state[kind][name].reshape(-1)[s : s + c])


# ---- CheckpointWriter: a world of one (no process group), an engine that hands out its pieces ------------


class PieceEngine:
    """The two Engine entries the writer uses: its step counts and its live local pieces."""

    def __init__(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.state = state

    def counts(self) -> tuple[int, int]:
        return 3, 3

    def local_pieces(self) -> dict[str, Piece]:
        return {
            n: Piece(SHAPES[n], 0, math.prod(SHAPES[n]), {k: self.state[k][n].view(-1) for k in KINDS})
            for n in SHAPES
        }


@pytest.mark.filterwarnings("ignore:ignoring half-written checkpoint")
def test_async_save_completes_at_finish_with_the_values_of_the_save_call(tmp_path):
    from vlmtrain.train import checkpoint as ckpt
    from vlmtrain.train.checkpoint import CheckpointWriter, open_state

    state = full_state(4)
    expected = {k: {n: v.clone() for n, v in d.items()} for k, d in state.items()}
    writer = CheckpointWriter(tmp_path, CPU_CTX, keep=2, fmt="sharded", asynchronous=True)
    path = writer.save(5, PieceEngine(state), {"stage": "t"}, wait=False)
    for d in state.values():  # training goes on and changes the live tensors
        for v in d.values():
            v.add_(1.0)
    writer._pending.thread.join()
    assert not (path / "COMPLETE").exists() and ckpt.find_latest(tmp_path) is None, "complete before commit"
    assert writer.poll() == path and writer.poll() is None
    assert (path / "COMPLETE").is_file() and ckpt.find_latest(tmp_path) == path
    meta = json.loads((path / "trainer_state.json").read_text())
    assert (meta["format"], meta["world_size"], meta["optimizer_steps"], meta["step"]) == ("sharded", 1, 3, 5)
    reader = open_state(path)
    for kind in KINDS:
        for name, value in expected[kind].items():
            assert torch.equal(reader.full(kind, name), value), (kind, name)


@pytest.mark.filterwarnings("ignore:ignoring half-written checkpoint")
def test_async_write_failure_is_raised_at_finish_and_nothing_is_complete(tmp_path, monkeypatch):
    from vlmtrain.train import checkpoint as ckpt

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_rank_files", fail)
    writer = ckpt.CheckpointWriter(tmp_path, CPU_CTX, keep=2, fmt="sharded", asynchronous=True)
    writer.save(7, PieceEngine(full_state(5)), {}, wait=False)
    with pytest.raises(
        RuntimeError, match=r"writing checkpoint .*step-00000007\.partial failed on this rank"
    ):
        writer.finish()
    assert ckpt.find_latest(tmp_path) is None


def test_gathered_format_cannot_be_asynchronous(tmp_path):
    from vlmtrain.train.checkpoint import CheckpointWriter

    with pytest.raises(ValueError, match=r"checkpoint_async needs train\.checkpoint_format: sharded"):
        CheckpointWriter(tmp_path, CPU_CTX, keep=1, fmt="gathered", asynchronous=True)


def test_config_refuses_async_gathered_checkpoints_and_unknown_formats():
    from vlmtrain.config import ConfigError, stage_config_from_dict
    from vlmtrain.config.load import shipped_stage_path

    cfg = json.loads(shipped_stage_path(2).read_text())
    assert stage_config_from_dict(cfg).train.checkpoint_format == "sharded"
    cfg["train"].update(checkpoint_format="gathered", checkpoint_async=True)
    with pytest.raises(ConfigError, match=r"train\.checkpoint_async: needs checkpoint_format: \"sharded\""):
        stage_config_from_dict(cfg, source="s.json")
    cfg["train"].update(checkpoint_format="zarr", checkpoint_async=False)
    with pytest.raises(ConfigError, match=r"train\.checkpoint_format: 'zarr' is not one of"):
        stage_config_from_dict(cfg, source="s.json")
