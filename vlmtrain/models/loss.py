"""Next-token loss as pure functions: which positions are supervised, and their per-token cross-entropy.

The trainer counts a step's supervised tokens with `supervised_mask` on the CPU batches before any forward, and
the model scores exactly those positions, so the count that normalises the step's loss and the tokens summed
into it cannot disagree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.data.process import IGNORE_INDEX


def supervised_mask(labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: position t predicts the supervised token t+1 of the same (real) sample.

    Never across a packed-row boundary, never into padding (sample id 0).
    """
    target = labels[:, 1:]
    same_sample = sample_ids[:, 1:] == sample_ids[:, :-1]
    return (target != IGNORE_INDEX) & same_sample & (sample_ids[:, 1:] > 0)


def count_supervised(labels: torch.Tensor, sample_ids: torch.Tensor) -> int:
    """Supervised tokens of a batch (read from CPU tensors by the trainer: no device sync)."""
    return int(supervised_mask(labels, sample_ids).sum())


def token_losses(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, sample_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cross-entropy of every supervised position [N] and the [B, T-1] mask that picked them.

    Only supervised positions go through the LM head: vocab x tokens is the largest tensor of a step.
    """
    valid = supervised_mask(labels, sample_ids)
    logits = head(hidden[:, :-1][valid])  # [N, V]
    return F.cross_entropy(logits.float(), labels[:, 1:][valid], reduction="none"), valid
