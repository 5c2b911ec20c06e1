"""Rich tables of caption and VQA scores, one row per model or baseline, scaled x100 with one decimal as in the paper's Table VI."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rich.table import Table

# (metric key, column header); the paper's Table VI lists Bleu_1..4, METEOR, ROUGE_L, CIDEr in this order.
CAPTION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Bleu_1", "B1"),
    ("Bleu_2", "B2"),
    ("Bleu_3", "B3"),
    ("Bleu_4", "B4"),
    ("METEOR", "METEOR"),
    ("ROUGE_L", "ROUGE-L"),
    ("CIDEr", "CIDEr"),
)
SPICE_COLUMN: tuple[str, str] = ("SPICE", "SPICE")
VQA_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("yes_no_accuracy", "Yes/No acc."),
    ("open_exact_match", "Open EM"),
    ("open_token_f1", "Open F1"),
)
VQA_COUNT_COLUMNS: tuple[tuple[str, str], ...] = (("n_yes_no", "N yes/no"), ("n_open", "N open"))
MISSING = "–"

Rows = Sequence[tuple[str, Mapping[str, float]]]


def format_score(value: float | None, scale: float = 100.0, decimals: int = 1) -> str:
    """`value * scale` with `decimals` decimals; MISSING for None or NaN (e.g. no items of a type)."""
    if value is None or math.isnan(value):
        return MISSING
    return f"{value * scale:.{decimals}f}"


def _check_rows(rows: Rows, columns: Sequence[tuple[str, str]]) -> None:
    known = {key for key, _ in columns}
    for name, metrics in rows:
        if not known & metrics.keys():
            raise ValueError(
                f"row {name!r} has none of the metrics {sorted(known)}; got keys {sorted(metrics)}"
            )


def metrics_table(rows: Rows, title: str, metrics_as_rows: bool = False) -> Table:
    """Caption scores: one row per (name, metrics) and one column per metric; SPICE only when some row has it.

    `metrics_as_rows=True` transposes it into the paper's Table VI layout (one row per metric, named as
    pycocoevalcap names it, one column per run).
    """
    columns = list(CAPTION_COLUMNS)
    if any(SPICE_COLUMN[0] in metrics for _, metrics in rows):
        columns.append(SPICE_COLUMN)
    _check_rows(rows, columns)
    table = Table(title=title)
    if metrics_as_rows:
        table.add_column("Metric")
        for name, _ in rows:
            table.add_column(name, justify="right")
        for key, _ in columns:
            table.add_row(key, *(format_score(metrics.get(key)) for _, metrics in rows))
        return table
    table.add_column("Model")
    for _, header in columns:
        table.add_column(header, justify="right")
    for name, metrics in rows:
        table.add_row(name, *(format_score(metrics.get(key)) for key, _ in columns))
    return table


def vqa_table(rows: Rows, title: str) -> Table:
    """VQA scores (x100) per model or baseline, with the number of yes/no and open items."""
    _check_rows(rows, VQA_COLUMNS)
    table = Table(title=title)
    table.add_column("Model")
    for _, header in (*VQA_COLUMNS, *VQA_COUNT_COLUMNS):
        table.add_column(header, justify="right")
    for name, metrics in rows:
        scores = [format_score(metrics.get(key)) for key, _ in VQA_COLUMNS]
        counts = [str(int(metrics[key])) if key in metrics else MISSING for key, _ in VQA_COUNT_COLUMNS]
        table.add_row(name, *scores, *counts)
    return table
