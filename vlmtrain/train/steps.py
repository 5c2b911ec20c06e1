"""The step count of a stage: from `train.max_steps`, or from its manifest's sample counts.

Below both the preflight checks and the stage runner (they import it; it imports neither).
"""

from __future__ import annotations

import math

from vlmtrain.config.schema import StageConfig
from vlmtrain.data.sources import load_source


def total_steps_for(stage: StageConfig) -> int:
    """Optimizer steps of the stage: `max_steps`, or epochs x samples / global batch."""
    if stage.train.max_steps is not None:
        return stage.train.max_steps
    shards = load_source(stage.data.train)
    counts = [s.samples for s in shards]
    if any(c is None for c in counts):
        raise ValueError(
            f"stage {stage.name}: {stage.data.train} has no manifest with sample counts; set train.max_steps"
        )
    n = sum(counts)  # type: ignore[arg-type]
    steps = math.floor(stage.train.epochs * n / stage.batch.global_batch_size)
    if steps < 1:
        raise ValueError(
            f"stage {stage.name}: {n} samples x {stage.train.epochs} epochs is less than one global batch of "
            f"{stage.batch.global_batch_size}; lower batch.global_batch_size or add data"
        )
    return steps
