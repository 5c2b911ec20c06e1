"""lmms-eval's own virtual environment: where it is, how to build it, and the error when it is missing.

lmms-eval 0.7.3 cannot live beside vlmtrain: it pins wandb==0.25.0 (vlmtrain ships 0.31) and pulls ~100 more
packages (opencv, torchvision, datasets, evaluate, openai, yt-dlp, ...). It gets a venv of its own, with
vlmtrain's torch version installed first from the same place `make install` takes it (so no dependency pulls a
CUDA build), the torchvision of that torch, then lmms-eval under a constraints file that pins both.
`vlmtrain eval lmms` drives it as a subprocess (vlmtrain.eval.lmms); nothing of it is imported here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

LMMS_EVAL_VERSION = "0.7.3"
ENV_VAR = "VLMTRAIN_LMMS_ENV"  # overrides the default location of the venv
DEFAULT_ENV = Path.home() / ".cache" / "vlmtrain" / "lmms-venv"


class LmmsEnvError(RuntimeError):
    """lmms-eval's environment is missing or broken."""


def env_path(path: str | Path | None = None) -> Path:
    """The venv: `path`, else $VLMTRAIN_LMMS_ENV, else ~/.cache/vlmtrain/lmms-venv."""
    return Path(path or os.environ.get(ENV_VAR) or DEFAULT_ENV).expanduser()


def env_python(path: str | Path | None = None) -> Path:
    """The venv's python, after checking that lmms-eval is installed there (a clear error naming the fix)."""
    venv = env_path(path)
    python = venv / "bin" / "python"
    if not python.is_file() or not any((venv / "lib").glob("python3*/site-packages/lmms_eval/__init__.py")):
        raise LmmsEnvError(
            f"lmms-eval's environment {venv} is missing (lmms-eval {LMMS_EVAL_VERSION} needs one of its own: it "
            f"pins wandb==0.25.0). Build it once with `vlmtrain eval lmms --setup` or `make lmms-env` (about 2 GB, "
            f"a few minutes), or point ${ENV_VAR} at one"
        )
    return python


def torch_pins() -> tuple[str, str]:
    """(torch, torchvision) requirement pins matching the torch vlmtrain runs (torchvision 0.N+15 for 2.N)."""
    import torch

    version = torch.__version__.split("+")[0]
    major, minor = (int(x) for x in version.split(".")[:2])
    if major != 2:
        raise LmmsEnvError(
            f"no known torchvision for torch {version}; install lmms-eval's environment by hand"
        )
    return f"torch=={version}", f"torchvision==0.{minor + 15}.*"


def setup_commands(venv: Path, torch_index_url: str | None = None) -> list[list[str]]:
    """The commands that build the venv (shown and run by `setup_env`)."""
    torch_pin, vision_pin = torch_pins()
    pip = [str(venv / "bin" / "pip"), "install", "--quiet"]
    index = ["--index-url", torch_index_url] if torch_index_url else []
    constraints = venv / "constraints.txt"
    return [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, *index, torch_pin, vision_pin],  # together: torchvision resolves against this torch
        [*pip, "-c", str(constraints), f"lmms-eval=={LMMS_EVAL_VERSION}"],
    ]


def setup_env(path: str | Path | None = None, torch_index_url: str | None = None, log=print) -> Path:
    """Build lmms-eval's venv (replacing nothing: an existing one is an error) and report its size and time."""
    venv = env_path(path)
    if venv.exists() and any(venv.iterdir()):
        raise FileExistsError(f"{venv} exists; remove it first to rebuild lmms-eval's environment")
    start = time.perf_counter()
    for i, cmd in enumerate(setup_commands(venv, torch_index_url)):
        if (
            i == 2
        ):  # pin what step 2 installed, so lmms-eval's requirements cannot swap torch for a CUDA build
            pins = subprocess.run(
                [str(venv / "bin" / "pip"), "freeze"], check=True, capture_output=True, text=True
            ).stdout
            keep = [line for line in pins.splitlines() if line.split("==")[0] in ("torch", "torchvision")]
            # filelock 4 dropped `filelock._api`, which lmms-eval 0.7.3's evaluator imports.
            (venv / "constraints.txt").write_text("\n".join([*keep, "filelock<4"]) + "\n")
        log("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True)
    _drop_unloadable_torchvision(venv, log)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    log(
        f"lmms-eval {LMMS_EVAL_VERSION} environment at {venv}: {size / 2**30:.2f} GiB, built in {seconds:.0f} s"
    )
    env_python(venv)
    return venv


def _drop_unloadable_torchvision(venv: Path, log) -> None:
    """Without a CPU wheel index, pip takes PyPI's torchvision, a CUDA build whose kernels cannot load beside CPU
    torch; transformers imports any torchvision it finds, so a broken one breaks every lmms-eval import.
    lmms-eval's core and its image tasks do not need it: it is removed, and said so."""
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-I", "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode == 0:
        return
    reason = (probe.stderr.strip().splitlines() or ["?"])[-1]
    subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "-y", "torchvision"], check=True)
    log(
        f"removed torchvision from {venv}: it does not load beside this torch ({reason}); lmms-eval's image "
        "tasks run without it. For a working CPU torchvision, rebuild with --torch-index-url "
        "https://download.pytorch.org/whl/cpu"
    )


def client_script() -> Path:
    """The file the venv's python runs (vlmtrain.eval.lmms_client), read in place."""
    return Path(__file__).with_name("lmms_client.py")
