"""Tables written to a file or pipe are printed whole (vlmtrain.logging.make_console); on a terminal rich decides.

References: the shipped presets read straight from vlmtrain/stages/*.json (not through the config loader), the
column headers as docs/plan.md lists them, and, for the terminal case, rich's own Console at the same width.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from rich.console import Console

import vlmtrain.cli as cli
from vlmtrain.eval.report import metrics_table
from vlmtrain.logging import LOG_RULE_WIDTH, console_for, make_console

ROOT = Path(__file__).resolve().parents[1]
PRESETS = [json.loads(p.read_text()) for p in sorted((ROOT / "vlmtrain" / "stages").glob("stage*.json"))]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PLAN_HEADERS = [
    [
        "stage",
        "data",
        "samples",
        "steps",
        "tokens",
        "model FLOPs",
        "6PT all",
        "6PT trainable",
        "GPU-h",
        "wall h",
    ],
    ["stage", "params (trainable)", "bf16 weights", "fp32 grads", "optimizer", "activations", "total"],
    [
        "stage",
        "samples/GPU",
        "micro x accum",
        "reduce-scatter GB",
        "all-gather GB",
        "sent/GPU GB",
        "comm s",
        "compute s",
        "bound by",
    ],
    ["stage", "config", "reduce GB", "all-gather GB", "sent/GPU GB", "comm s", "bound by"],
]
STAGES_HEADERS = ["stage", "vision", "projector", "language", "mask", "noise", "data", "init_from"]


@pytest.fixture(autouse=True)
def _no_width_settings(monkeypatch):
    """The in-process consoles too see no COLUMNS or forced terminal from the environment the tests run in."""
    for name in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that sets rich's width or terminal detection."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")
    }
    env.pop("NO_COLOR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _vlmtrain(args: list[str], cwd: Path, **env: str) -> str:
    """`vlmtrain ARGS` with stdout to a pipe and stdin from /dev/null (no terminal anywhere)."""
    out = subprocess.run(
        [sys.executable, "-c", "from vlmtrain.cli import app; app()", *args],
        cwd=cwd,
        env=_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def _cells(line: str) -> list[str]:
    """The cells of one rendered table row (header or body), stripped."""
    return [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]


def _rows(text: str) -> list[list[str]]:
    return [_cells(line) for line in text.splitlines() if line.startswith(("│", "┃"))]


def _stages_row(preset: dict) -> list[str]:
    """What `vlmtrain stages` should print for one preset, from its JSON."""
    lr = {g: (f"{m['lr']:g}" if m["trainable"] else "frozen") for g, m in preset["modules"].items()}
    return [
        preset["name"],
        lr["vision"],
        lr["projector"],
        lr["language"],
        preset["mask"]["mode"],
        f"{preset['mask']['noise_ratio']:g}",
        preset["data"]["dataset"],
        str(preset["init_from"]),
    ]


def _assert_plain(text: str) -> None:
    assert "…" not in text, "a cell was cut"
    assert "\x1b" not in text, "ANSI escape codes in a file or pipe"


@pytest.mark.slow  # one `vlmtrain plan` subprocess builds the meta-device model (~5 s)
def test_plan_to_a_pipe_prints_every_cell_whole(tmp_path):
    out = _vlmtrain(["plan", "--gpus", "8"], cwd=tmp_path)  # a folder without shards: the paper's sizes
    _assert_plain(out)
    assert "vlmtrain plan: 8 x A800 (312 dense bf16 TFLOP/s each) at 40% MFU" in out
    assert "memory per GPU (GiB), ZeRO-2 over 8 GPU(s), one micro-batch at its longest rows" in out
    rows = _rows(out)
    headers = [r for r in rows if r[0] == "stage"]
    assert headers == PLAN_HEADERS  # one header line per table: no header folded onto a second line
    names = [p["name"] for p in PRESETS]
    assert names == ["stage0", "stage1", "stage2", "stage3"]
    body = [r for r in rows if r[0] != "stage"]
    # compute table: one line per stage + total; memory and per-step tables: one line per stage; traffic by
    # engine config: one line per stage and config; nothing folded
    by_config = [name for name in names for _ in ("zero2", "zero1", "fsdp")]
    assert [r[0] for r in body] == [*names, "total", *names, *names, *by_config]
    assert [r[1] for r in body[-12:]] == ["zero2 (this stage's)", "zero1", "fsdp"] * 4
    for row, preset in zip(body[:4], PRESETS, strict=True):
        assert row[1] == preset["data"]["dataset"]
        assert re.fullmatch(r"[\d,]+ \(paper\)", row[2]), row[2]  # not `118,…`
    widths = [len(PLAN_HEADERS[0])] * 5 + [len(PLAN_HEADERS[1])] * 4 + [len(PLAN_HEADERS[2])] * 4
    widths += [len(PLAN_HEADERS[3])] * 12
    assert [len(r) for r in body] == widths


def test_stages_to_a_pipe_prints_every_cell_whole(tmp_path):
    out = _vlmtrain(["stages"], cwd=tmp_path)
    _assert_plain(out)
    assert "Shipped stage configs (vlmtrain/stages/*.json)" in out
    assert _rows(out) == [STAGES_HEADERS, *(_stages_row(p) for p in PRESETS)]


def test_columns_is_the_width_in_a_pipe(tmp_path):
    """An explicit COLUMNS wins: rich folds to it, as it always has."""
    out = _vlmtrain(["stages"], cwd=tmp_path, COLUMNS="60")
    lines = out.splitlines()
    assert max(len(line) for line in lines) == 60
    assert "…" in out  # the 8 columns do not fit in 60: rich cuts them, which is what COLUMNS=60 asks for


def _run_in_terminal(args: list[str], cwd: Path, columns: int) -> str:
    """`vlmtrain ARGS` on a pseudo-terminal `columns` wide (stdin, stdout and stderr), its output as bytes read."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", "from vlmtrain.cli import app; app()", *args],
        cwd=cwd,
        env=_env(TERM="xterm-256color"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_on_a_terminal_of_80_columns_rich_behaves_as_always(tmp_path, monkeypatch):
    raw = _run_in_terminal(["stages"], tmp_path, 80)
    assert ANSI.search(raw), "no colours on a terminal"
    text = ANSI.sub("", raw)
    assert max(len(line) for line in text.splitlines()) == 80
    assert "…" in text  # 8 columns at 80: rich cuts cells, as before
    # the same table from rich's own console at 80 columns (no vlmtrain console involved)
    reference = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(cli, "console", reference)
    cli.stages()
    assert text == reference.file.getvalue()


def test_a_long_cell_is_whole_in_a_file():
    """The eval report's table with a 500-character model name, to a file (not a terminal): one unbroken row."""
    name = "run-" + "x" * 496
    console = make_console(file=io.StringIO())
    console.print(metrics_table([(name, {"CIDEr": 1.0})], "captions"))
    text = console.file.getvalue()
    _assert_plain(text)
    assert [r[0] for r in _rows(text)][1:] == [name]


def test_the_width_follows_stdout_at_each_write():
    """A console made before stdout is redirected (the CLI's, made at import) is full width in the redirect."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with contextlib.redirect_stdout(Terminal()):
        console = make_console()  # made while stdout is a terminal
        assert console.is_terminal and console.width < 1000
    name = "run-" + "y" * 196
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        console.print(metrics_table([(name, {"CIDEr": 1.0})], "captions"))
    assert [r[0] for r in _rows(buffer.getvalue())][1:] == [name]


def test_a_rule_in_a_file_keeps_a_terminal_width():
    console = make_console(file=io.StringIO())
    console.rule("stage0")
    (line,) = console.file.getvalue().splitlines()
    assert len(line) == LOG_RULE_WIDTH and " stage0 " in line


def test_rank_0_prints_and_other_ranks_print_nothing(capsys):
    console_for(is_main=False).print("from rank 1")
    console_for(is_main=True).print("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"
