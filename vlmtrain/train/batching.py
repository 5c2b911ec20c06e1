"""How a stage's global batch splits over the ranks: `micro_batch_size: auto` and the LR rule of a changed batch.

A pure module (no model, no device): `vlmtrain plan` and the stage runner both resolve `auto` here, the plan
with its memory estimate for the GPU it names, the runner with the same estimate for the device it has.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from vlmtrain.config.schema import StageConfig, ValidationError

AUTO = "auto"
AUTO_MEMORY_FRACTION = 0.85
"""Share of a device's memory `auto` plans for: the rest is the CUDA context, NCCL buffers and allocator slack."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def per_rank_samples(stage: StageConfig, world_size: int) -> int:
    """Samples each rank contributes to an optimizer step; an error naming the options when the split fails."""
    batch, optim = stage.batch, stage.optim
    global_batch = batch.global_batch_size
    if global_batch % world_size == 0:
        return global_batch // world_size
    fewer = [d for d in _divisors(global_batch) if d < world_size][-3:]
    larger = world_size * math.ceil(global_batch / world_size)
    what = (
        f"fewer than one sample per rank ({global_batch} samples over {world_size} ranks)"
        if global_batch < world_size
        else f"not a whole number of samples per rank ({global_batch} / {world_size})"
    )
    raise ValidationError(
        "batch.global_batch_size",
        f"{global_batch} gives {what}. Options: run on a world size that divides it "
        f"(e.g. {', '.join(map(str, fewer))} GPUs), or set batch.global_batch_size to a multiple of {world_size} "
        f"(e.g. {larger}) and say how the learning rates follow it with optim.lr_scaling "
        f"(none | linear | sqrt against optim.lr_reference_batch = {optim.lr_reference_batch}; now "
        f"{optim.lr_scaling!r})",
    )


def auto_micro_batch(per_rank: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor of `per_rank` for which `fits(micro)`; ValueError when not even 1 fits."""
    for micro in reversed(_divisors(per_rank)):
        if fits(micro):
            return micro
    raise ValueError("not even a micro-batch of 1 sample fits")


def resolve_micro_batch(
    stage: StageConfig,
    world_size: int,
    memory_bytes: int | None,
    estimate: Callable[[int], int] | None = None,
) -> StageConfig:
    """`stage` with an integer micro-batch: `auto` becomes the largest micro-batch that divides the rank's share
    of the global batch and whose estimated bytes per GPU (`estimate(micro)`, vlmtrain.train.plan's memory model)
    fit AUTO_MEMORY_FRACTION of `memory_bytes`; without a memory bound (None: CPU, or unknown) the whole share.

    An integer micro-batch is only checked against the world size.
    """
    per_rank = per_rank_samples(stage, world_size)
    if stage.batch.micro_batch_size != AUTO:
        stage.batch.accumulation_steps(world_size)
        return stage
    budget = None if memory_bytes is None else int(memory_bytes * AUTO_MEMORY_FRACTION)
    if budget is None or estimate is None:
        micro = per_rank
    else:
        try:
            micro = auto_micro_batch(per_rank, lambda m: estimate(m) <= budget)
        except ValueError:
            raise ValidationError(
                "batch.micro_batch_size",
                f"auto: even 1 sample per micro-batch needs {estimate(1) / 2**30:.1f} GiB per GPU, more than "
                f"{AUTO_MEMORY_FRACTION:.0%} of {memory_bytes / 2**30:.1f} GiB; use more GPUs (ZeRO shards the "
                "optimizer state), a shorter data.max_length, or gradient checkpointing",
            ) from None
    return dataclasses.replace(stage, batch=dataclasses.replace(stage.batch, micro_batch_size=micro))


def lr_scale(stage: StageConfig) -> float:
    """Factor on every group's `lr` for a global batch other than `optim.lr_reference_batch`."""
    rule = stage.optim.lr_scaling
    ratio = stage.batch.global_batch_size / stage.optim.lr_reference_batch
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    return 1.0


def describe_batch(stage: StageConfig, world_size: int) -> str:
    """One line for the log: the split of the global batch and the LR rule, as resolved."""
    micro = stage.batch.micro_batch_size
    line = (
        f"batch: {stage.batch.global_batch_size} samples per step = {world_size} rank(s) x "
        f"{stage.batch.global_batch_size // world_size} = micro-batch {micro} x "
        f"{stage.batch.accumulation_steps(world_size)} accumulation"
    )
    scale = lr_scale(stage)
    if stage.optim.lr_scaling != "none":
        line += (
            f"; learning rates x{scale:.4g} ({stage.optim.lr_scaling}: {stage.batch.global_batch_size} / "
            f"{stage.optim.lr_reference_batch})"
        )
    return line
