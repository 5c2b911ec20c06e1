"""Where an optimizer step's time goes (data wait, forward+backward, optimizer, communication), with no host sync."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PHASES = ("data", "fwd_bwd", "optim", "comm")
"""The record's `time/<phase>_s` keys: data = waiting on the loader for the step's CPU micro-batches; fwd_bwd = every
micro-batch's forward and backward (with the gradient reductions the engine overlaps with backward: ZeRO's
buckets, FSDP's reduce-scatters, ZeRO-1's boundary reduce); optim = the boundary `engine.step()` (norm, clip,
update, ZeRO's parameter all-gather); comm = the trainer's own per-step collective (vlmtrain.dist.step_sync)."""


class StepTimer:
    """Spans of one step's phases. Data wait is host time (wall clock). On CUDA the other phases are CUDA events
    on the current stream, read only by `seconds()` when the step's record is written, which the trainer does
    after its next blocking read (the device is past these events by then): timing adds no sync. Elsewhere
    (CPU) every phase is wall clock.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._wall: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def span(self, phase: str) -> Iterator[None]:
        if phase not in self._wall:
            raise KeyError(f"unknown step phase {phase!r}; one of {PHASES}")
        if self.cuda and phase != "data":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((phase, start, end))
            return
        t0 = time.perf_counter()
        yield
        self._wall[phase] += time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        """`time/<phase>_s` of the step. On CUDA call only once the device has passed the step (no waiting then)."""
        out = dict(self._wall)
        for phase, start, end in self._events:
            out[phase] += start.elapsed_time(end) / 1e3
        return {f"time/{phase}_s": value for phase, value in out.items()}


def peak_memory_gib(device: torch.device) -> float | None:
    """The device's peak allocated memory so far (an allocator counter: no sync); None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
