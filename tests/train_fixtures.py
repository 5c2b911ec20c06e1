"""Helpers for the training-engine tests: tiny corpus, shards and tokenizer; stage configs derived from the
shipped presets; training commands run as watched subprocesses; an in-process NaN-injection entry point.

Run as a script (`python tests/train_fixtures.py faults SPEC.json`) it trains stages in-process with
injected non-finite losses, so the pytest process itself never initialises torch.distributed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from conftest import TINY_VISION, tiny_language_config
from safetensors.torch import load_file

from vlmtrain.config.load import shipped_stage_path
from vlmtrain.logging import read_metrics  # noqa: F401  (re-exported to the tests)

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "train.py"
PYTHON = sys.executable

N_TRAIN_IMAGES = 32  # 4 shards of 8: enough reader slots for 2 ranks x 2 workers
SHARD_SIZE = 8
IMAGE_SIZE = 32  # TINY_VISION: 32 px / patch 8 -> 16 image tokens
TOKENIZER_VOCAB = 400
MAX_LENGTH = 256  # 16 image tokens + the longest recap or conversation of the tiny corpus fit
RUN_TIMEOUT_S = 150  # per training command (each takes 5-25 s): a hang fails the test instead of stalling CI

# The single-process run: stage 2 (full model) long enough for warmup (round(0.03 x 60) = 2 steps) and for
# the loss to fall. The shipped language LR (2e-5) is tuned for fine-tuning pretrained Qwen2.5 over ~10^4
# steps; a random-init LM barely moves at it (measured over 40 steps: 6.02 -> 5.88), so this run raises it.
SINGLE_STEPS = 60
SINGLE_SAVE_EVERY = 20
SINGLE_LANGUAGE_LR = 1e-3
# The 2-rank run shared by the SIGKILL and SIGTERM tests: stage 2 at the shipped LRs.
PAIR_STEPS = 12
PAIR_SAVE_EVERY = 4


@dataclass(frozen=True)
class TrainData:
    """Everything a tiny training run reads."""

    root: Path
    """Folder holding the corpus, shards and tokenizer."""
    recap: Path
    """Manifest of the recap caption shards (stages 0-2)."""
    instruct: Path
    """Manifest of the multi-turn instruction shards (stage 3)."""
    tokenizer: Path
    """Saved tokenizer directory (byte-level BPE trained on the corpus text, Qwen special tokens)."""
    vocab_size: int
    """len(tokenizer): the tiny LM's vocabulary."""


def session_cache(base: Path, name: str, make: Callable[[Path], object]) -> Path:
    """`base/name`, built by `make` once per test session however many test modules ask for it.

    A session-scoped fixture outside conftest.py is instantiated once per module; a finished-marker
    next to the folder lets the e2e and resume modules share the data and the reference runs.
    """
    out = base / name
    done = base / f"{name}.done"
    if not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        make(out)
        done.write_text("ok\n")
    return out


def train_data(base: Path) -> TrainData:
    """The session's tiny corpus, shards and tokenizer (written on first use)."""
    return data_paths(session_cache(base, "train_data", make_train_data))


def make_train_data(root: Path) -> None:
    """Write the demo corpus, shard its recap and instruction sets, build and save a tokenizer."""
    from vlmtrain.data.shard import shard
    from vlmtrain.data.tokenizer import build_tokenizer
    from vlmtrain.demo.corpus import write_corpus

    corpus = write_corpus(root / "corpus", N_TRAIN_IMAGES, 2, image_size=IMAGE_SIZE, seed=0)
    for name, source in (("recap", corpus.recap_train), ("instruct", corpus.instruct_train)):
        shard(source, "llava", corpus.images, root / "shards" / name, shard_size=SHARD_SIZE, progress=False)
    texts = [
        turn["value"].replace("<image>\n", "")
        for path in (corpus.recap_train, corpus.instruct_train)
        for record in json.loads(path.read_text())
        for turn in record["conversations"]
    ]
    build_tokenizer(texts, vocab_size=TOKENIZER_VOCAB).save_pretrained(str(root / "tokenizer"))


def data_paths(root: Path) -> TrainData:
    from transformers import AutoTokenizer

    tokenizer = root / "tokenizer"
    return TrainData(
        root,
        root / "shards" / "recap" / "manifest.json",
        root / "shards" / "instruct" / "manifest.json",
        tokenizer,
        len(AutoTokenizer.from_pretrained(str(tokenizer))),
    )


# ---- stage configs ------------------------------------------------------------------------------


def tiny_model_section(data: TrainData) -> dict[str, Any]:
    """The `model` section of a random-init tiny SigLIP + Qwen2 VLM (conftest's TINY_VISION / tiny LM)."""
    return {
        "vision": None,
        "vision_config": TINY_VISION,
        "language": None,
        "language_config": tiny_language_config(data.vocab_size),
        "tokenizer": str(data.tokenizer),
        "attn_backend": "sdpa",
    }


def tiny_stage_config(
    stage: int,
    data: TrainData,
    *,
    max_steps: int,
    save_every: int,
    global_batch_size: int = 8,
    micro_batch_size: int = 2,
    num_workers: int = 1,
    train: dict[str, Any] | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The shipped `stage{stage}.json` with only size-related keys and the compute precision replaced.

    Modules, LRs, mask, noise, optimizer, engine, DeepSpeed config and init_from stay as shipped. Compute is fp32
    unless a test is about bf16: CPU runners without native bf16 (AVX2 only) emulate it about 20x slower
    (vlmtrain.precision.cpu_bf16_warning); the chain of the shipped presets and the engine-agreement tests
    pass precision="bf16".
    The model becomes the tiny one (used by stage 0; later stages load the previous stage's output), data
    points at the test shards (stage 3: instruction data; stages 0-2: recaps), and the run is a few steps.
    """
    cfg = json.loads(shipped_stage_path(stage).read_text())
    cfg["model"] = tiny_model_section(data)
    cfg["data"].update(
        train=str(data.instruct if stage == 3 else data.recap), max_length=MAX_LENGTH, num_workers=num_workers
    )
    cfg["batch"] = {"global_batch_size": global_batch_size, "micro_batch_size": micro_batch_size}
    cfg["train"].update(
        {"precision": precision, "max_steps": max_steps, "save_every": save_every, **(train or {})}
    )
    return cfg


def standalone(cfg: dict[str, Any]) -> dict[str, Any]:
    """A later stage run on its own: built from `model` instead of loading the previous stage's output."""
    return {**cfg, "init_from": None}


def single_process_config(data: TrainData) -> dict[str, Any]:
    """Stage 2 for one process (accumulation 2), 2 reader workers, the LM LR raised (see SINGLE_LANGUAGE_LR)."""
    cfg = standalone(
        tiny_stage_config(
            2,
            data,
            max_steps=SINGLE_STEPS,
            save_every=SINGLE_SAVE_EVERY,
            micro_batch_size=4,
            num_workers=2,
        )
    )
    cfg["modules"]["language"]["lr"] = SINGLE_LANGUAGE_LR
    # Held-out loss during training (here on the training shards: the check is the wiring, not generalisation).
    cfg["validation"] = {"data": str(data.recap), "every": SINGLE_SAVE_EVERY, "max_samples": 16}
    return cfg


def two_rank_config(data: TrainData) -> dict[str, Any]:
    """Stage 2 as shipped (LRs included) for 2 ranks x accumulation 2, 2 reader workers per rank."""
    return standalone(
        tiny_stage_config(2, data, max_steps=PAIR_STEPS, save_every=PAIR_SAVE_EVERY, num_workers=2)
    )


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return path


# ZeRO-3 parameters below DeepSpeed's persistence threshold stay whole on every rank. The shipped 1e5 keeps
# only norms and biases whole at real size (every 0.9B matrix is larger) but would keep every tensor of the
# tiny model whole (the largest has 25,600 elements), so nothing would be partitioned; 1000 restores the
# real-size split (matrices and embeddings partitioned, norms and biases whole).
TINY_PERSISTENCE_THRESHOLD = 1000


def shipped_ds_config(name: str) -> dict[str, Any]:
    """A DeepSpeed config of ds_configs/ as a dict."""
    return json.loads((REPO / "ds_configs" / f"{name}.json").read_text())


def tiny_ds_config(name: str, out: Path) -> Path:
    """The shipped DeepSpeed config `name` as a file in `out`, ZeRO-3's persistence threshold scaled to the
    tiny model (TINY_PERSISTENCE_THRESHOLD)."""
    cfg = shipped_ds_config(name)
    if cfg["zero_optimization"]["stage"] == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = TINY_PERSISTENCE_THRESHOLD
    out.mkdir(parents=True, exist_ok=True)
    return write_config(cfg, out / f"{name}.json")


@dataclass(frozen=True)
class ReferenceRun:
    """An uninterrupted training run other tests compare against."""

    config: Path
    """The stage config it ran (reuse it for the interrupted run)."""
    run_dir: Path
    """--run-dir of the run."""
    stage_dir: Path
    """run_dir / stage name."""


def reference_run(base: Path, name: str, cfg: dict[str, Any], ranks: int) -> ReferenceRun:
    """Run `cfg` to completion once per session (cached under `base/name`)."""

    def make(out: Path) -> None:
        run_training([write_config(cfg, out / "config.json")], out / "run", ranks=ranks)

    out = session_cache(base, name, make)
    return ReferenceRun(out / "config.json", out / "run", out / "run" / cfg["name"])


# ---- running training ---------------------------------------------------------------------------


def train_env() -> dict[str, str]:
    """Environment of a CPU training subprocess: DeepSpeed's CPU accelerator, one thread per rank."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",  # SIGABRT on a timeout dumps every thread's stack into the log
        COLUMNS="160",
        # A world of one otherwise derives its rendezvous port from its pid, which can clash with another
        # job's; torchrun sets its own for its ranks.
        MASTER_PORT=str(free_port()),
    )
    return env


def train_command(
    configs: Sequence[Path], run_dir: Path, *, ranks: int = 1, resume: bool = False
) -> list[str]:
    """`python launch/train.py ...` for one rank, `torchrun --standalone --nproc_per_node N ...` for more."""
    args = [str(LAUNCH)]
    for c in configs:
        args += ["--config", str(c)]
    args += ["--run-dir", str(run_dir)]
    if resume:
        args += ["--resume", "auto"]
    if ranks == 1:
        return [PYTHON, *args]
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]


class TrainProcess:
    """A training command in a session of its own (signals sent here never reach pytest), output in a log."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.cmd, self.log = cmd, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=train_env(), stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started = time.monotonic()

    @classmethod
    def start(
        cls, configs: Sequence[Path], run_dir: Path, *, ranks: int = 1, resume: bool = False
    ) -> TrainProcess:
        log = run_dir.parent / "logs" / f"{run_dir.name}-{'resume' if resume else 'run'}-{time.time_ns()}.log"
        return cls(train_command(configs, run_dir, ranks=ranks, resume=resume), log)

    def output(self, tail: int | None = None) -> str:
        text = self.log.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def describe(self) -> str:
        return (
            f"command: {' '.join(self.cmd)}\nexit code: {self.proc.returncode}\n"
            f"{extension_locks()}--- output (tail) ---\n{self.output(8000)}"
        )

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            code = self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.abort_all()
            raise AssertionError(f"training timed out after {timeout:.0f} s\n{self.describe()}") from None
        finally:
            self._out.close()
        return code

    def processes(self) -> list[psutil.Process]:
        """The launcher and every process below it (ranks, data-loader workers), as of now.

        torchrun starts each rank in a session of its own, so signalling the launcher's process group
        would miss the ranks; the tree is walked instead.
        """
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal_all(self, sig: signal.Signals) -> list[psutil.Process]:
        """Signal every process of the job; returns the processes signalled."""
        procs = self.processes()
        _send(procs, sig)
        return procs

    def kill_all(self) -> None:
        """SIGKILL the whole job and wait until none of its processes is left running."""
        self._kill(self.signal_all(signal.SIGKILL))

    def abort_all(self) -> None:
        """A hung job: SIGABRT makes each Python process dump its threads' stacks into the log
        (PYTHONFAULTHANDLER), then SIGKILL whatever is left."""
        procs = self.signal_all(signal.SIGABRT)
        psutil.wait_procs([p for p in procs if p.pid != self.proc.pid], timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        _send(procs, signal.SIGKILL)
        self._kill(procs)

    def _kill(self, procs: list[psutil.Process]) -> None:
        self.proc.wait(timeout=30)  # reap the launcher through Popen, so its exit status stays readable
        _, alive = psutil.wait_procs([p for p in procs if p.pid != self.proc.pid], timeout=30)
        survivors = [p for p in alive if _running(p)]  # a zombie awaiting its reaper is dead already
        assert not survivors, f"processes survived SIGKILL: {survivors}"

    def rank_processes(self, expected: int) -> list[psutil.Process]:
        """The rank processes torchrun started (its direct children), sorted by RANK."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            children = psutil.Process(self.proc.pid).children(recursive=False)
            if len(children) == expected:
                return sorted(children, key=lambda p: int(p.environ().get("RANK", "0")))
            time.sleep(0.05)
        raise AssertionError(f"expected {expected} rank processes under torchrun\n{self.describe()}")

    def wait_for_step(self, metrics: Path, step: int, timeout: float = RUN_TIMEOUT_S) -> int:
        """Block until `metrics` records an optimizer step >= `step`; return the newest step seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            newest = last_step(metrics)
            if newest >= step:
                return newest
            if self.proc.poll() is not None:
                raise AssertionError(f"training ended before step {step}\n{self.describe()}")
            time.sleep(0.01)
        self.abort_all()
        raise AssertionError(f"no step {step} within {timeout:.0f} s\n{self.describe()}")


def extension_locks() -> str:
    """torch JIT-extension lock files present now (a line each), for hang diagnostics.

    DeepSpeed on CPU loads its shm op through torch.utils.cpp_extension, which holds
    `<torch_extensions>/<build>/<op>/lock` while it checks the build; a process killed in that window
    leaves the file behind and every later DeepSpeed start on the machine waits for it forever.
    """
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    now = time.time()
    return "".join(
        f"torch extension lock present: {lock} (age {now - lock.stat().st_mtime:.0f} s)\n"
        for lock in root.glob("**/lock")
    )


def _send(procs: Sequence[psutil.Process], sig: signal.Signals) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # exited meanwhile
            p.send_signal(sig)


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_training(
    configs: Sequence[Path], run_dir: Path, *, ranks: int = 1, resume: bool = False, expect: int = 0
) -> TrainProcess:
    """Run a training command to its end and check its exit code (the output is shown on failure)."""
    job = TrainProcess.start(configs, run_dir, ranks=ranks, resume=resume)
    code = job.wait()
    assert code == expect, f"expected exit code {expect}\n{job.describe()}"
    return job


# ---- reading results ----------------------------------------------------------------------------


def last_step(metrics: Path) -> int:
    """The newest step in a metrics file that may be half-written right now (0 if none)."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            continue  # the writer is mid-line
    return 0


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def checkpoint_tensors(path: Path, kind: str = "param") -> dict[str, torch.Tensor]:
    """A checkpoint's full fp32 tensors of one kind (param, exp_avg, exp_avg_sq), sharded or gathered."""
    from vlmtrain.train.checkpoint import open_state

    state = open_state(path)
    return {name: state.full(kind, name) for name in state.names()}


def checkpoint_dir(stage_dir: Path, step: int) -> Path:
    return stage_dir / "checkpoints" / f"step-{step:08d}"


def complete_checkpoints(stage_dir: Path) -> list[int]:
    """Steps of the checkpoints that carry the COMPLETE marker."""
    root = stage_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "COMPLETE").is_file())


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """Bitwise equality of two state dicts, naming the first tensor that differs."""
    assert a.keys() == b.keys(), f"{what}: different tensor names {sorted(a.keys() ^ b.keys())[:5]}"
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{what}: {name} dtype {a[name].dtype} vs {b[name].dtype}"
        if not torch.equal(a[name], b[name]):
            diff = (a[name].float() - b[name].float()).abs().max().item()
            raise AssertionError(f"{what}: {name} differs (max abs difference {diff:.3g})")


def reference_lr(
    completed_steps: int, total_steps: int, warmup_ratio: float, peak: float, min_lr: float
) -> float:
    """The LR of the optimizer step that follows `completed_steps` applied steps, written from the spec:

    warmup: round(warmup_ratio x total) steps; the k-th of them (k = 1..warmup) uses peak x k / warmup;
    then half a cosine period from `peak` (first step after warmup) towards `min_lr` (reached at `total`).
    """
    warmup = round(warmup_ratio * total_steps)
    if completed_steps < warmup:
        return peak * (completed_steps + 1) / warmup
    fraction = (completed_steps - warmup) / max(1, total_steps - warmup)
    return peak - (peak - min_lr) * (1.0 - math.cos(math.pi * fraction)) / 2.0


# ---- in-process fault injection: `python tests/train_fixtures.py faults SPEC.json` ---------------


def nan_fault(bad_steps: set[int], micro: int | None) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
    """A Trainer `fault`: the loss becomes NaN (keeping its graph, so every gradient is NaN) at the given
    0-based step indices, on one micro-batch (`micro`) or on all of them (None)."""

    def fault(step: int, m: int, loss: torch.Tensor) -> torch.Tensor:
        if step in bad_steps and (micro is None or m == micro):
            return loss * float("nan")
        return loss

    return fault


def run_fault_jobs(spec: Path) -> None:
    """Run each job of `spec` ({config, run_dir, bad_steps, micro}) with run_stage in this process (a
    world of one) and write each outcome, or the TooManyBadSteps message, to the spec's `result` file."""
    from vlmtrain.config.load import load_stage_config
    from vlmtrain.dist import init_distributed
    from vlmtrain.train.run import run_stage
    from vlmtrain.train.trainer import TooManyBadSteps

    jobs = json.loads(spec.read_text())
    ctx = init_distributed()
    outcomes: list[dict[str, Any]] = []
    for job in jobs["jobs"]:
        stage = load_stage_config(config=job["config"])
        fault = nan_fault(set(job["bad_steps"]), job.get("micro"))
        try:
            result = run_stage(stage, Path(job["run_dir"]), ctx, fault=fault)
            outcomes.append({"error": None, "steps": result.steps, "skipped": result.skipped_nonfinite})
        except TooManyBadSteps as err:
            outcomes.append({"error": type(err).__name__, "message": str(err)})
    Path(jobs["result"]).write_text(json.dumps(outcomes, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="test helper: run_stage with injected NaN losses")
    parser.add_argument("command", choices=["faults"])
    parser.add_argument("spec", type=Path)
    run_fault_jobs(parser.parse_args().spec)
