"""Collation: pad samples one per row, or pack whole samples into fixed-length rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlmtrain.data.process import IGNORE_INDEX, ProcessedSample

# The batch entries VisionLanguageModel.forward takes (the rest is accounting for the reader).
MODEL_KEYS = ("input_ids", "labels", "image_flags", "sample_ids", "position_ids", "pixel_values")

Batch = dict[str, Any]


def pad_collate(
    samples: Sequence[ProcessedSample],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    *,
    image_size: int = 224,
) -> Batch:
    """One sample per row, right-padded to the longest (rounded up to ``pad_to_multiple_of``).

    ``image_size`` only shapes the empty ``pixel_values`` of a batch without images.
    """
    if not samples:
        raise ValueError("pad_collate needs at least one sample")
    longest = max(len(s) for s in samples)
    if pad_to_multiple_of is not None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return _assemble([[s] for s in samples], longest, pad_token_id, image_size)


def pack_collate(
    samples: Sequence[ProcessedSample],
    row_length: int,
    pad_token_id: int,
    *,
    image_size: int = 224,
) -> Batch:
    """Pack whole samples into as few rows of ``row_length`` as first-fit decreasing finds.

    A sample is never split across rows; each row's samples get ids 1..k and positions restarting at 0.
    """
    if not samples:
        raise ValueError("pack_collate needs at least one sample")
    for s in samples:
        if len(s) > row_length:
            raise ValueError(
                f"sample {s.key!r} (shard {s.shard}) has {len(s)} tokens, more than the pack length "
                f"{row_length}; raise the pack length or lower max_length"
            )
    rows = [[samples[i] for i in row] for row in first_fit_decreasing([len(s) for s in samples], row_length)]
    return _assemble(rows, row_length, pad_token_id, image_size)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items by decreasing length (ties by index), each into the first bin it fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def _assemble(rows: list[list[ProcessedSample]], width: int, pad_token_id: int, image_size: int) -> Batch:
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    image_flags = torch.zeros((n_rows, width), dtype=torch.bool)
    sample_ids = torch.zeros((n_rows, width), dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    images: list[torch.Tensor] = []
    keys: list[str] = []
    for r, row in enumerate(rows):
        start = 0
        for k, s in enumerate(row, start=1):
            _check_sample(s)
            end = start + len(s)
            input_ids[r, start:end] = s.input_ids
            labels[r, start:end] = s.labels
            image_flags[r, start:end] = s.image_flags
            sample_ids[r, start:end] = k
            position_ids[r, start:end] = torch.arange(len(s))
            if s.pixel_values is not None:
                images.append(s.pixel_values)
            keys.append(s.key)
            start = end
    pixel_values = torch.stack(images) if images else torch.zeros((0, 3, image_size, image_size))
    return {
        "input_ids": input_ids,
        "labels": labels,
        "image_flags": image_flags,
        "sample_ids": sample_ids,
        "position_ids": position_ids,
        "pixel_values": pixel_values,
        "num_samples": len(keys),
        "num_tokens": int((sample_ids > 0).sum()),
        "keys": keys,
    }


def _check_sample(s: ProcessedSample) -> None:
    n = len(s)
    if s.labels.numel() != n or s.image_flags.numel() != n:
        raise ValueError(
            f"sample {s.key!r}: input_ids/labels/image_flags lengths differ "
            f"({n}, {s.labels.numel()}, {s.image_flags.numel()})"
        )
    if (s.pixel_values is None) != (not bool(s.image_flags.any())):
        raise ValueError(f"sample {s.key!r}: image placeholders and pixel_values disagree")
