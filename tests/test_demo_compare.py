"""The demo's ablation tables and plots: windows, smoothing, rows and the PNG."""

from __future__ import annotations

import random
import statistics

import pytest

from vlmtrain.demo.compare import (
    Comparison,
    as_json,
    comparison_rows,
    comparison_table,
    moving_average,
    plot_comparison,
    window_mean,
)


def _curve(n: int, seed: int) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    return [(i + 1, rng.uniform(0, 5)) for i in range(n)]


@pytest.mark.parametrize("n", [1, 7, 10, 400])
def test_window_mean_is_the_mean_of_the_steps_in_the_window(n):
    curve = _curve(n, n)
    losses = [loss for _, loss in curve]
    assert window_mean(curve, 0.0, 1.0) == pytest.approx(statistics.fmean(losses))
    first = [loss for step, loss in curve if step <= max(1, int(0.1 * n))]
    assert window_mean(curve, 0.0, 0.1) == pytest.approx(statistics.fmean(first))
    last = [loss for step, loss in curve if step > min(int(0.9 * n), n - 1)]
    assert window_mean(curve, 0.9, 1.0) == pytest.approx(statistics.fmean(last))
    with pytest.raises(ValueError, match="empty"):
        window_mean([], 0.0, 1.0)


@pytest.mark.parametrize("width", [1, 3, 50])
def test_moving_average_matches_brute_force(width):
    values = [v for _, v in _curve(37, width)]
    expected = [statistics.fmean(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]
    assert moving_average(values, width) == pytest.approx(expected)


def test_rows_table_json_and_plot(tmp_path):
    comp = Comparison("masks", "prefix vs causal", ("prefix", "causal"), "only the mask differs")
    curves = {v: {s: _curve(20, 10 * s + i) for s in range(4)} for i, v in enumerate(comp.variants)}
    results = {
        "prefix": {
            "caption": {"CIDEr": 1.2, "Bleu_4": 0.4, "ROUGE_L": 0.6},
            "vqa": {"accuracy": 0.7, "yes_no_accuracy": 0.8, "open_exact_match": 0.65},
        },
        "causal": {
            "caption": {"CIDEr": 1.0, "Bleu_4": 0.3, "ROUGE_L": 0.55},
            "vqa": {"accuracy": 0.6, "yes_no_accuracy": 0.7, "open_exact_match": 0.55},
        },
    }
    rows = dict(comparison_rows(comp, results, curves))
    assert len(rows) == 4 * 2 + 6
    assert rows["CIDEr x100"] == pytest.approx([120.0, 100.0])
    assert rows["VQA accuracy x100"] == pytest.approx([70.0, 60.0])
    last3 = [statistics.fmean(loss for _, loss in curves[v][3][18:]) for v in comp.variants]
    assert rows["stage 3 train loss, last 10% of steps"] == pytest.approx(last3)

    table = comparison_table(comp, list(rows.items()))
    assert [c.header for c in table.columns] == ["", "prefix", "causal", "causal - prefix"]
    cider = list(rows).index("CIDEr x100")
    assert [list(c.cells)[cider] for c in table.columns[1:]] == ["120.0", "100.0", "-20.0"]

    png = plot_comparison(comp, curves, tmp_path / "compare_masks.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = as_json(comp, list(rows.items()), png)
    assert data["rows"]["CIDEr x100"] == pytest.approx({"prefix": 120.0, "causal": 100.0})
