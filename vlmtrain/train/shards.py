"""Checkpoint state as flat fragments: what each rank writes, and its reassembly for any world size or engine.

A trainable parameter's fp32 state (master weights, AdamW's `exp_avg` and `exp_avg_sq`) is addressed as its
flattened full tensor, and a rank holds one contiguous range `[start, start + numel)` of it: DeepSpeed ZeRO
partitions one flat buffer per parameter group (a parameter's part is its `_hp_mapping` fragment), and FSDP2
shards dim 0, i.e. a range of rows, which is a contiguous range of the flattened tensor. A sharded checkpoint
holds, per rank that wrote state:

  rank-XXXXX-of-YYYYY.safetensors   1-D fp32 tensors `<kind>.<name>`, kind in KINDS
  rank-XXXXX-of-YYYYY.json          {"rank", "world_size", "kinds", "params": {name: {"shape", "start", "numel"}}}

A loader asks for the range that it holds under its own layout (another engine, another world size);
`plan_reads` finds which files' fragments cover it, and only those slices are read (safetensors slices read
the bytes asked for, from a memory map), so no rank ever holds more than its own part. The gathered format
(one `model.safetensors` + `optimizer.safetensors` from rank 0) is read through the same interface, so old
checkpoints resume the same way. Only safetensors and JSON are read: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

KINDS = ("param", "exp_avg", "exp_avg_sq")  # fp32 master weights, AdamW's two moments
MOMENTS = KINDS[1:]
GATHERED_WEIGHTS = "model.safetensors"
GATHERED_MOMENTS = "optimizer.safetensors"


@dataclass(frozen=True)
class Piece:
    """One rank's contiguous part of one parameter's flattened state."""

    shape: tuple[int, ...]  # the full parameter's shape
    start: int  # offset of the part in the flattened full parameter
    numel: int
    tensors: dict[str, torch.Tensor]  # kind -> 1-D tensor of `numel` elements (a live view or a copy)


@dataclass(frozen=True)
class Span:
    """Where one rank file holds a fragment of a parameter: elements `[start, start + numel)`."""

    owner: int  # rank file index
    start: int
    numel: int


@dataclass(frozen=True)
class Read:
    """Copy `count` elements from offset `src` of `owner`'s fragment to offset `dst` of the requested range."""

    owner: int
    src: int
    dst: int
    count: int


def plan_reads(spans: Sequence[Span], start: int, numel: int, what: str) -> list[Read]:
    """The fragment slices that make up `[start, start + numel)`, in order.

    Fragments may overlap (replicas of a shard): each element is read once, from the first fragment that
    covers it. A gap, an element that no fragment holds, is an error naming the parameter and the range.
    """
    out: list[Read] = []
    pos, end = start, start + numel
    for span in sorted((s for s in spans if s.numel > 0), key=lambda s: (s.start, s.owner)):
        if pos >= end:
            break
        span_end = span.start + span.numel
        if span_end <= pos:
            continue
        if span.start > pos:
            break
        count = min(span_end, end) - pos
        out.append(Read(span.owner, pos - span.start, pos - start, count))
        pos += count
    if pos < end:
        gap_end = min([s.start for s in spans if s.numel > 0 and s.start > pos] + [end])
        raise ValueError(
            f"{what}: elements [{pos}, {gap_end}) are in no rank file of the checkpoint; the checkpoint is "
            "incomplete (resume from an older one)"
        )
    return out


def rank_stem(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}"


def write_rank_files(directory: Path, rank: int, world_size: int, pieces: dict[str, Piece]) -> list[Path]:
    """Write one rank's fragments and its index into `directory`; returns the paths (the caller fsyncs).

    Pieces without elements (an FSDP rank past the last row of a small parameter) are left out.
    """
    kinds = sorted({k for p in pieces.values() for k in p.tensors}, key=KINDS.index)
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {}
    for name, piece in pieces.items():
        if piece.numel == 0:
            continue
        if sorted(piece.tensors, key=KINDS.index) != kinds:
            raise ValueError(f"{name}: piece holds {sorted(piece.tensors)}, other pieces {kinds}")
        for kind, t in piece.tensors.items():
            if t.numel() != piece.numel or t.dim() != 1:
                raise ValueError(
                    f"{kind}.{name}: expected a 1-D tensor of {piece.numel}, got {tuple(t.shape)}"
                )
            tensors[f"{kind}.{name}"] = t.detach().contiguous()
        index[name] = {"shape": list(piece.shape), "start": piece.start, "numel": piece.numel}
    stem = rank_stem(rank, world_size)
    paths = [directory / f"{stem}.safetensors", directory / f"{stem}.json"]
    save_file(tensors, str(paths[0]))
    meta = {"rank": rank, "world_size": world_size, "kinds": kinds, "params": index}
    paths[1].write_text(json.dumps(meta, indent=1))
    return paths


class StateReader(ABC):
    """A checkpoint's fp32 state, readable by flat range: the loader's side of either on-disk format."""

    source: Path

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def has(self, kind: str) -> bool:
        """Whether the checkpoint holds `kind` (AdamW moments exist only after the first optimizer step)."""

    @abstractmethod
    def read(self, kind: str, name: str, start: int, numel: int) -> torch.Tensor:
        """Elements `[start, start + numel)` of the flattened full tensor, as a 1-D fp32 CPU tensor."""

    def check_covers(self, wanted: dict[str, tuple[int, ...]], moments: bool) -> None:
        """Fail (the same way on every rank: each reads the same index) on missing or mis-shaped parameters."""
        mine = set(self.names())
        missing = [n for n in wanted if n not in mine]
        if missing:
            raise KeyError(
                f"{self.source}: checkpoint lacks {len(missing)} trainable parameter(s), e.g. {missing[:3]}; "
                "was it written by a stage with other trainable groups?"
            )
        for name, shape in wanted.items():
            if tuple(self.shape(name)) != tuple(shape):
                raise ValueError(
                    f"{self.source}: {name} has shape {self.shape(name)} in the checkpoint, {tuple(shape)} in "
                    "the model; the checkpoint belongs to another model"
                )
        if moments:
            for kind in MOMENTS:
                if not self.has(kind):
                    raise KeyError(
                        f"{self.source}: the checkpoint took optimizer steps but holds no AdamW {kind}; it is "
                        "incomplete"
                    )

    def full(self, kind: str, name: str) -> torch.Tensor:
        """One whole tensor (tests, tools; training never reads a whole state on one rank)."""
        shape = self.shape(name)
        return self.read(kind, name, 0, math.prod(shape)).view(shape)


class ShardedReader(StateReader):
    """The rank files of a sharded checkpoint; refuses a checkpoint with any rank file missing."""

    def __init__(self, directory: Path, world_size: int) -> None:
        self.source = directory
        self._handles: dict[int, Any] = {}
        self.index: list[dict[str, Any]] = []
        for rank in range(world_size):
            stem = rank_stem(rank, world_size)
            for suffix in (".safetensors", ".json"):
                if not (directory / f"{stem}{suffix}").is_file():
                    raise FileNotFoundError(
                        f"{directory}: sharded checkpoint of {world_size} ranks lacks {stem}{suffix}; rank {rank} "
                        "did not finish its save (the checkpoint is partial): resume from an older checkpoint"
                    )
            meta = json.loads((directory / f"{stem}.json").read_text())
            if meta.get("rank") != rank or meta.get("world_size") != world_size:
                raise ValueError(
                    f"{directory / stem}.json: says rank {meta.get('rank')} of {meta.get('world_size')}"
                )
            self.index.append(meta)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._spans: dict[str, list[Span]] = {}
        for owner, meta in enumerate(self.index):
            for name, entry in meta["params"].items():
                shape = tuple(int(d) for d in entry["shape"])
                if self._shapes.setdefault(name, shape) != shape:
                    raise ValueError(
                        f"{directory}: {name} has shape {shape} in rank {owner}'s index, {self._shapes[name]} elsewhere"
                    )
                self._spans.setdefault(name, []).append(Span(owner, int(entry["start"]), int(entry["numel"])))
        self._kinds = (
            set.intersection(*(set(m["kinds"]) for m in self.index if m["params"])) if self._spans else set()
        )

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def has(self, kind: str) -> bool:
        return kind in self._kinds

    def _file(self, owner: int) -> Any:
        if owner not in self._handles:
            path = self.source / f"{rank_stem(owner, len(self.index))}.safetensors"
            self._handles[owner] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[owner]

    def read(self, kind: str, name: str, start: int, numel: int) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32)
        for r in plan_reads(self._spans.get(name, []), start, numel, f"{self.source}: {kind}.{name}"):
            part = self._file(r.owner).get_slice(f"{kind}.{name}")[r.src : r.src + r.count]
            out[r.dst : r.dst + r.count] = part
        return out


class GatheredReader(StateReader):
    """The gathered format: full tensors in `model.safetensors` and `exp_avg.`/`exp_avg_sq.` ones in
    `optimizer.safetensors`. A range is read as the rows that hold it (never the whole tensor)."""

    def __init__(self, directory: Path) -> None:
        self.source = directory
        self._weights = safe_open(str(directory / GATHERED_WEIGHTS), framework="pt", device="cpu")
        moments = directory / GATHERED_MOMENTS
        self._moments = safe_open(str(moments), framework="pt", device="cpu") if moments.is_file() else None
        self._moment_keys = set(self._moments.keys()) if self._moments is not None else set()

    def names(self) -> list[str]:
        return list(self._weights.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._weights.get_slice(name).get_shape())

    def has(self, kind: str) -> bool:
        return kind == "param" or any(k.startswith(f"{kind}.") for k in self._moment_keys)

    def read(self, kind: str, name: str, start: int, numel: int) -> torch.Tensor:
        handle, key = (self._weights, name) if kind == "param" else (self._moments, f"{kind}.{name}")
        if handle is None or (kind != "param" and key not in self._moment_keys):
            raise KeyError(f"{self.source}: {GATHERED_MOMENTS} lacks {key}")
        sl = handle.get_slice(key)
        shape = tuple(sl.get_shape())
        if len(shape) <= 1:
            rows = sl[start : start + numel] if shape else sl[:]
            return rows.reshape(-1).float()
        row = math.prod(shape[1:])
        first, last = start // row, -(-(start + numel) // row)
        rows = sl[first:last].reshape(-1)
        return rows[start - first * row : start - first * row + numel].float().clone()
