"""Collation: pad samples one per row, pack whole samples into fixed-length rows, or lay a whole optimizer
step's samples into token-budget micro-batches of packed rows."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
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
    _check_fits("pack_collate", samples, row_length, "pack length")
    rows = [[samples[i] for i in row] for row in first_fit_decreasing([len(s) for s in samples], row_length)]
    return _assemble(rows, row_length, pad_token_id, image_size)


BUDGET_WIDTH_MULTIPLE = 64  # budget rows' width granularity: few distinct shapes, little rounding waste


def budget_collate(
    samples: Sequence[ProcessedSample],
    row_length: int,
    token_budget: int,
    pad_token_id: int,
    *,
    image_size: int = 224,
    width_multiple: int = BUDGET_WIDTH_MULTIPLE,
) -> Batch:
    """One optimizer step's samples (of one rank) as token-budget micro-batches: a "step group".

    The samples are packed whole into rows by first-fit decreasing (``first_fit_decreasing``, as
    ``pack_collate``) at the row width, among the multiples of ``width_multiple`` from the longest sample up
    to ``row_length``, that gives the fewest row positions (ties: the fewer micro-batches, then the
    narrower); rows are then grouped ``token_budget // width`` to a micro-batch, so no micro-batch holds more
    than ``token_budget`` positions. Fixed rows of ``row_length`` would waste most of a row whenever whole
    samples do not add up to it (two 350-token captions in 768) and the last row's slack (~15% of a
    16-sample share); the narrowest fitting width removes most of both. One width per step, a multiple of
    ``width_multiple``: few distinct shapes for kernels that compile per shape.
    Returns ``{"micro_batches": [...], "num_samples", "num_tokens", "keys"}``.
    """
    rows_per_micro = token_budget // row_length
    if rows_per_micro < 1:
        raise ValueError(
            f"token_budget={token_budget} is below the row length {row_length}: not even one row fits; "
            "raise data.token_budget or lower data.pack_length / data.max_length"
        )
    _check_fits("budget_collate", samples, row_length, "row length")
    width, bins = _tightest_rows([len(s) for s in samples], row_length, token_budget, width_multiple)
    rows = [[samples[i] for i in row] for row in bins]
    per_micro = token_budget // width
    micros = [
        _assemble(rows[i : i + per_micro], width, pad_token_id, image_size)
        for i in range(0, len(rows), per_micro)
    ]
    return {
        "micro_batches": micros,
        "num_samples": sum(m["num_samples"] for m in micros),
        "num_tokens": sum(m["num_tokens"] for m in micros),
        "keys": [k for m in micros for k in m["keys"]],
    }


def make_collate(
    *,
    pad_token_id: int,
    max_length: int,
    image_size: int,
    pack_length: int | None = None,
    token_budget: int | None = None,
    width_multiple: int | None = None,
) -> Callable[[list[ProcessedSample]], Batch]:
    """The collate function of a loader: token-budget step groups, packed rows, or padded rows.

    ``width_multiple`` (FlexAttention's 128-token tile when the LM attends with flex) makes every row width a
    multiple of it in each path: padded rows round the longest sample up, packed rows round ``pack_length``
    up, budget rows choose among multiples of it (and of ``BUDGET_WIDTH_MULTIPLE``) up to the rounded row
    length. A flex kernel then never sees a partial tile, and the row widths come from a short list.
    """
    if width_multiple is not None and width_multiple < 1:
        raise ValueError(f"width_multiple must be >= 1, got {width_multiple}")
    align = width_multiple or 1
    if token_budget is not None:
        row_length = pack_length if pack_length is not None else max_length
        if not max_length <= row_length <= token_budget:
            raise ValueError(
                f"token_budget={token_budget}, row length {row_length} (pack_length or max_length), "
                f"max_length={max_length}: need max_length <= row length <= token_budget so every sample fits a "
                "row and a row fits the budget"
            )
        aligned = _round_up(row_length, align)
        if aligned > token_budget:
            raise ValueError(
                f"data.token_budget={token_budget} is below the row length {row_length} rounded up to a multiple "
                f"of {align} (FlexAttention's tile) = {aligned}; raise data.token_budget to at least {aligned}"
            )
        return functools.partial(
            budget_collate,
            row_length=aligned,
            token_budget=token_budget,
            pad_token_id=pad_token_id,
            image_size=image_size,
            width_multiple=math.lcm(BUDGET_WIDTH_MULTIPLE, align),
        )
    if pack_length is None:
        return functools.partial(
            pad_collate, pad_token_id=pad_token_id, pad_to_multiple_of=width_multiple, image_size=image_size
        )
    if pack_length < max_length:
        raise ValueError(
            f"pack_length={pack_length} is below max_length={max_length}: a full-length sample could not be "
            "packed; raise the pack length or lower max_length"
        )
    return functools.partial(
        pack_collate,
        row_length=_round_up(pack_length, align),
        pad_token_id=pad_token_id,
        image_size=image_size,
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _tightest_rows(
    lengths: Sequence[int], row_length: int, token_budget: int, multiple: int
) -> tuple[int, list[list[int]]]:
    """The row width (a multiple of ``multiple`` or ``row_length``) whose first-fit-decreasing rows hold the
    fewest positions (ties: fewer micro-batches, then narrower), and those rows. Costs one first-fit
    decreasing per candidate width: at most ``row_length / multiple`` (32 at 2048)."""
    longest = max(lengths)
    widths = sorted({*range(-(-longest // multiple) * multiple, row_length, multiple), row_length})
    best: tuple[tuple[int, int, int], int, list[list[int]]] | None = None
    for width in widths:
        bins = first_fit_decreasing(lengths, width)
        cost = (len(bins) * width, -(-len(bins) // (token_budget // width)), width)
        if best is None or cost < best[0]:
            best = (cost, width, bins)
    assert best is not None
    return best[1], best[2]


def _check_fits(caller: str, samples: Sequence[ProcessedSample], row_length: int, what: str) -> None:
    if not samples:
        raise ValueError(f"{caller} needs at least one sample")
    for s in samples:
        if len(s) > row_length:
            raise ValueError(
                f"sample {s.key!r} (shard {s.shard}) has {len(s)} tokens, more than the {what} "
                f"{row_length}; raise the pack length or lower max_length"
            )


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
    # uint8 (ImageTransform.pixels): a quarter of float32's bytes through /dev/shm and the host-to-device copy
    empty = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
    pixel_values = torch.stack(images) if images else empty
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
