"""Rank-0 logging: a rich console, a JSONL metrics file per stage, optional TensorBoard, loss-curve plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console


def console_for(is_main: bool) -> Console:
    """Rank 0 prints; other ranks get a console that writes nowhere, so call sites need no rank checks."""
    return Console(stderr=False) if is_main else Console(quiet=True)


class MetricsWriter:
    """Appends one JSON object per optimizer step to `metrics.jsonl` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self._tb = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")
        if self._tb is not None:
            step = int(record["step"])
            for key, value in _flatten(record).items():
                if (
                    isinstance(value, int | float) and key != "step" and math.isfinite(value)
                ):  # None skipped too
                    self._tb.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run rewrites the steps after its checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _finite_or_null(value: Any) -> Any:
    """NaN/Inf (a skipped step's loss) become null: the file stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(path: Path) -> list[tuple[int, float]]:
    """(step, loss) of the applied steps in a metrics.jsonl (skipped, non-finite steps left out)."""
    return [(r["step"], r["loss"]) for r in read_metrics(path) if not r["skipped"]]


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], out: Path, title: str) -> Path:
    """One PNG with a loss curve per label (e.g. per stage, or prefix vs causal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=label, linewidth=1.4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
