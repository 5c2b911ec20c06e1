"""Rank-0 logging: a rich console, the step-metric sinks of a stage (a JSONL file, optional TensorBoard and
Weights & Biases), loss-curve plots."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import string
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from rich.console import Console, ConsoleDimensions
from rich.rule import Rule
from rich.text import Text

from vlmtrain.config.load import ConfigError
from vlmtrain.config.schema import WandbConfig

WANDB_ID_FILE = "wandb_run_id"  # in the stage folder: a resumed stage continues the same W&B run


LOG_WIDTH = 100_000
"""Columns of a console that writes to a file or pipe: rich would fold tables to 80 there (`stag…`); tables are
never wider than their widest cells need, so this only lifts the limit."""
LOG_RULE_WIDTH = 80
"""Width of a `console.rule()` in a file or pipe (a rule fills the console's width, which there is LOG_WIDTH)."""


class _Console(Console):
    """rich's Console, except that off a terminal (and without COLUMNS) it is LOG_WIDTH wide.

    Decided at each write, not at construction: a console made at import writes to whatever `sys.stdout` is then
    (a pipe under SLURM, a CliRunner buffer in tests)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # rich reads COLUMNS once, here; an explicit COLUMNS is the width wherever the output goes.
        self._full_width_off_terminal = not os.environ.get("COLUMNS", "").isdigit()

    def _full_width(self) -> bool:
        return self._full_width_off_terminal and not self.is_terminal

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        return ConsoleDimensions(LOG_WIDTH, size.height) if self._full_width() else size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._full_width_off_terminal = False
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    @property
    def width(self) -> int:
        return self.size.width

    @width.setter
    def width(self, width: int) -> None:
        self._full_width_off_terminal = False
        Console.width.fset(self, width)  # type: ignore[attr-defined]

    def rule(self, title: str | Text = "", **kwargs: Any) -> None:
        if self._full_width():
            self.print(Rule(title, **kwargs), width=LOG_RULE_WIDTH)  # not a line of LOG_WIDTH characters
        else:
            super().rule(title, **kwargs)


def make_console(quiet: bool = False, file: IO[str] | None = None) -> Console:
    """The console every table and message of vlmtrain goes through (stdout unless `file`).

    On a terminal it is rich's own (terminal width, colours). Written to a file or pipe (`vlmtrain plan > plan.txt`,
    SLURM output) it is LOG_WIDTH columns wide, so no table cell is cut to `…` or folded, and, as rich does off a
    terminal, without ANSI codes. COLUMNS, when set, is the width everywhere."""
    return _Console(quiet=quiet, file=file)


def console_for(is_main: bool) -> Console:
    """Rank 0 prints; other ranks get a console that writes nowhere, so call sites need no rank checks."""
    return make_console(quiet=not is_main)


class WandbMissing(ConfigError):
    """`train.wandb` is set but the optional `wandb` package is not installed."""


def wandb_missing_message(path: str = "train.wandb") -> str | None:
    """The error for a W&B section without the package, or None when `wandb` can be imported (not imported here)."""
    if importlib.util.find_spec("wandb") is not None:
        return None
    return (
        f"{path} is set but the wandb package is not installed: pip install 'vlmtrain[wandb]' "
        f"(or set {path} to null)"
    )


class WandbSink:
    """One Weights & Biases run per stage (rank 0): step metrics as history, tables and read-backs in the summary.

    wandb is imported here, only when a stage sets `train.wandb`, so vlmtrain runs without it. The run's
    files go to `WANDB_DIR` when set, else to the stage folder (`<stage>/wandb/`); `WANDB_MODE=offline`
    keeps them there for a later `wandb sync`.
    """

    def __init__(self, run: Any) -> None:
        self.run = run

    @classmethod
    def open(
        cls, cfg: WandbConfig, stage_dir: Path, stage_name: str, config: dict[str, Any], resume: bool
    ) -> WandbSink:
        """Start (or, with `resume`, continue: same id) the stage's run; `config` becomes `wandb.config`."""
        missing = wandb_missing_message()
        if missing is not None:
            raise WandbMissing(missing)
        import wandb

        stage_dir.mkdir(parents=True, exist_ok=True)
        id_file = stage_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else _new_run_id()
        id_file.write_text(run_id + "\n")
        run_dir = stage_dir.resolve().parent.name
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or f"{run_dir}/{stage_name}",
            group=cfg.group or run_dir,
            tags=[*cfg.tags, stage_name],
            config=config,
            id=run_id,
            resume="allow",  # the same id after a restart: W&B keeps the steps it already has
            dir=None if os.environ.get("WANDB_DIR") else str(stage_dir),
        )
        return cls(run)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """One history row at `step` (W&B ignores a step lower than one it holds: see docs/training.md)."""
        self.run.log(values, step=step)

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        import wandb

        self.run.summary[key] = wandb.Table(columns=list(columns), data=[list(r) for r in rows])

    def close(self) -> None:
        self.run.finish()


def _new_run_id() -> str:
    """A W&B run id as wandb makes them: 8 random lowercase letters and digits."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class MetricsWriter:
    """The one place a stage's step metrics go (rank 0): one JSON object per logged optimizer step appended to
    `metrics.jsonl`, the same record as scalars to TensorBoard and as a history row to W&B when enabled."""

    def __init__(
        self,
        path: Path,
        enabled: bool,
        tensorboard_dir: Path | None = None,
        wandb: WandbSink | None = None,
    ) -> None:
        self.path = path
        self.enabled = enabled
        self._tb = None
        self._wandb = wandb if enabled else None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = _finite_or_null(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self._tb is None and self._wandb is None:
            return
        step = int(record["step"])
        flat = {k: v for k, v in _flatten(clean).items() if k != "step"}
        if self._tb is not None:
            for key, value in flat.items():
                if isinstance(value, int | float) and math.isfinite(value):  # None (non-finite) skipped too
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(step, flat)

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table printed at the start of a stage (module groups, LR read-back): to W&B's summary when on."""
        if self._wandb is not None:
            self._wandb.table(key, columns, rows)

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
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


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
    # Records without a loss (lmms-eval scores written between steps) are not training steps.
    return [(r["step"], r["loss"]) for r in read_metrics(path) if "loss" in r and not r["skipped"]]


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
