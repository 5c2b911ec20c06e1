"""The demo's ablations, each as a table and a plot: prefix vs causal mask, recap vs short captions, with vs
without the alignment stages 0-1.

Both compare variants trained from the same warm-started components, data order and steps, so every
difference in loss or score comes from the one setting that differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

Curve = list[tuple[int, float]]  # (optimizer step, training loss)

# (results key, metric key, row label)
SCORE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("caption", "CIDEr", "CIDEr x100"),
    ("caption", "Bleu_4", "BLEU-4 x100"),
    ("caption", "ROUGE_L", "ROUGE-L x100"),
    ("vqa", "accuracy", "VQA accuracy x100"),
    ("vqa", "yes_no_accuracy", "VQA yes/no x100"),
    ("vqa", "open_exact_match", "VQA open EM x100"),
)


@dataclass(frozen=True)
class Comparison:
    """Two or more variants that differ in one setting."""

    name: str
    """File stem and key in summary.json: `masks`, `captions` or `stages`."""
    title: str
    variants: tuple[str, ...]
    note: str
    """What differs and which stages see the same data (so whose losses compare like for like)."""


def window_mean(curve: Curve, start: float, end: float) -> float:
    """Mean loss over the steps in the fraction [start, end) of the run (at least one step)."""
    if not curve:
        raise ValueError("empty loss curve")
    n = len(curve)
    lo = min(int(start * n), n - 1)
    hi = max(lo + 1, int(end * n))
    losses = [loss for _, loss in curve[lo:hi]]
    return sum(losses) / len(losses)


def comparison_rows(
    comparison: Comparison,
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    curves: Mapping[str, Mapping[int, Curve]],
) -> list[tuple[str, list[float]]]:
    """(label, one value per variant): loss early and late in every stage, then the test-split scores."""
    rows: list[tuple[str, list[float]]] = []
    stages = sorted({s for v in comparison.variants for s in curves[v]})
    for stage in stages:
        for label, (start, end) in (("first 10%", (0.0, 0.1)), ("last 10%", (0.9, 1.0))):
            rows.append(
                (
                    f"stage {stage} train loss, {label} of steps",
                    [
                        window_mean(curves[v][stage], start, end) if stage in curves[v] else math.nan
                        for v in comparison.variants
                    ],
                )
            )
    for group, key, label in SCORE_ROWS:
        rows.append((label, [100 * results[v][group][key] for v in comparison.variants]))
    return rows


def comparison_table(comparison: Comparison, rows: Sequence[tuple[str, Sequence[float]]]) -> Table:
    """A rich table with one column per variant and, for two variants, their difference."""
    table = Table(title=comparison.title, caption=comparison.note)
    table.add_column("")
    for v in comparison.variants:
        table.add_column(v, justify="right")
    pair = len(comparison.variants) == 2
    if pair:
        table.add_column(f"{comparison.variants[1]} - {comparison.variants[0]}", justify="right")
    for label, values in rows:
        digits = 3 if "loss" in label else 1
        cells = ["-" if math.isnan(x) else f"{x:.{digits}f}" for x in values]
        if pair:
            diff = values[1] - values[0]
            cells.append("-" if math.isnan(diff) else f"{diff:+.{digits}f}")
        table.add_row(label, *cells)
    return table


def plot_comparison(comparison: Comparison, curves: Mapping[str, Mapping[int, Curve]], out: Path) -> Path:
    """One panel per stage, one line per variant (a moving average, so the trend is visible at a glance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({s for v in comparison.variants for s in curves[v]})
    fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.4), dpi=110, squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        for variant in comparison.variants:
            if stage not in curves[variant]:
                continue  # a variant without this stage (--compare-stages)
            steps, losses = zip(*curves[variant][stage], strict=True)
            ax.plot(steps, moving_average(losses, max(1, len(losses) // 20)), label=variant, linewidth=1.4)
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (moving average)")
    axes[0][-1].legend()
    fig.suptitle(comparison.title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def moving_average(values: Sequence[float], width: int) -> list[float]:
    """Trailing mean over up to `width` values (shorter at the start, so the length is kept)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def as_json(
    comparison: Comparison, rows: Sequence[tuple[str, Sequence[float]]], plot: Path
) -> dict[str, Any]:
    return {
        "variants": list(comparison.variants),
        "note": comparison.note,
        "rows": {
            label: {v: None if math.isnan(x) else x for v, x in zip(comparison.variants, values, strict=True)}
            for label, values in rows
        },
        "plot": str(plot),
    }
