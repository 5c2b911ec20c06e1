"""Fault tolerance of the training loop: SIGKILL and resume, SIGTERM preemption (one process and 2 ranks),
half-written checkpoints, and injected non-finite steps. Interrupted runs must reproduce uninterrupted ones
exactly (bitwise weights, identical losses): gloo reductions, DeepSpeed's CPU ZeRO-2 and the reader are
deterministic, so any difference is a resume bug, not noise."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from train_fixtures import (
    PAIR_SAVE_EVERY,
    PAIR_STEPS,
    PYTHON,
    REPO,
    SINGLE_STEPS,
    ReferenceRun,
    TrainData,
    TrainProcess,
    assert_same_tensors,
    checkpoint_dir,
    checkpoint_tensors,
    complete_checkpoints,
    last_step,
    load_weights,
    read_metrics,
    reference_lr,
    reference_run,
    run_training,
    single_process_config,
    standalone,
    tiny_stage_config,
    train_data,
    train_env,
    two_rank_config,
    write_config,
)

from vlmtrain.train.trainer import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return train_data(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, data: TrainData) -> ReferenceRun:
    """Uninterrupted 2-rank stage-2 run (12 steps, checkpoint every 4, 2 reader workers per rank)."""
    return reference_run(tmp_path_factory.getbasetemp(), "pair_reference", two_rank_config(data), 2)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, data: TrainData) -> ReferenceRun:
    """Uninterrupted single-process stage-2 run (60 steps, 2 reader workers); shared with test_train_e2e."""
    return reference_run(tmp_path_factory.getbasetemp(), "single_reference", single_process_config(data), 1)


def assert_same_run(resumed: Path, reference: Path, resumed_at: int) -> None:
    """Same metrics at every step (each step recorded once) and bitwise-identical final weights."""
    ours, ref = read_metrics(resumed / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in ours] == [r["step"] for r in ref], "resumed run has missing or repeated steps"
    for a, b in zip(ours, ref, strict=True):
        when = "after" if a["step"] > resumed_at else "before"
        for key in ("loss", "grad_norm", "lr", "tokens", "samples"):
            assert a[key] == b[key], (
                f"step {a['step']} ({when} the resume at {resumed_at}): {key} {a[key]} != uninterrupted {b[key]}"
            )
    assert_same_tensors(
        load_weights(resumed / "final" / "model.safetensors"),
        load_weights(reference / "final" / "model.safetensors"),
        "final weights after resume vs uninterrupted run",
    )


def checkpoint_step(path: Path) -> int:
    return int(json.loads((path / "trainer_state.json").read_text())["step"])


# ---- SIGKILL ------------------------------------------------------------------------------------


def test_sigkill_both_ranks_then_resume_reproduces_uninterrupted_run(tmp_path, pair):
    run = tmp_path / "run"
    metrics = run / "stage2" / "metrics.jsonl"
    job = TrainProcess.start([pair.config], run, ranks=2)
    # Past the first periodic checkpoint (step 4) and into the next window.
    seen = job.wait_for_step(metrics, PAIR_SAVE_EVERY + 2)
    job.kill_all()
    assert job.wait() == -signal.SIGKILL
    complete = complete_checkpoints(run / "stage2")
    assert complete and complete[-1] < PAIR_STEPS, f"killed at step {seen}, checkpoints {complete}"
    resume_from = complete[-1]
    assert last_step(metrics) > resume_from, "the kill should land after the newest checkpoint"
    assert not (run / "stage2" / "final").exists()

    job = run_training([pair.config], run, ranks=2, resume=True)
    expected = f"resumed from {checkpoint_dir(run / 'stage2', resume_from)} at step {resume_from}"
    assert _flat(expected) in _flat(job.output())
    assert_same_run(run / "stage2", pair.stage_dir, resumed_at=resume_from)


# ---- SIGTERM ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preempted_single(tmp_path_factory: pytest.TempPathFactory, single: ReferenceRun) -> tuple[Path, int]:
    """A single-process run whose process (not its reader workers) gets SIGTERM mid-run."""
    run = tmp_path_factory.mktemp("sigterm_single") / "run"
    job = TrainProcess.start([single.config], run)
    job.wait_for_step(run / "stage2" / "metrics.jsonl", 10)
    job.proc.send_signal(signal.SIGTERM)
    code = job.wait()
    assert code == PREEMPTED_EXIT_CODE, f"expected exit {PREEMPTED_EXIT_CODE}\n{job.describe()}"
    assert "preempted" in job.output()
    return run, max(r["step"] for r in read_metrics(run / "stage2" / "metrics.jsonl"))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_stop_signal_to_every_process_checkpoints_and_exits_75(tmp_path, single, sig):
    """The SLURM scripts' group mode (and Slurm's own SIGTERM) signal every process: trainer and its reader
    workers. torch's loader workers die of a SIGTERM that is not from their parent, which would crash the
    trainer mid-step; the workers ignore stop signals so that only the trainer acts on them."""
    run = tmp_path / "run"
    job = TrainProcess.start([single.config], run)
    job.wait_for_step(run / "stage2" / "metrics.jsonl", 5)
    signalled = job.signal_all(sig)
    assert len(signalled) == 3, "expected the trainer and its 2 reader workers"
    assert job.wait() == PREEMPTED_EXIT_CODE, job.describe()
    reached = max(r["step"] for r in read_metrics(run / "stage2" / "metrics.jsonl"))
    assert complete_checkpoints(run / "stage2")[-1] == reached


def test_sigterm_single_process_checkpoints_at_reached_step(preempted_single):
    run, reached = preempted_single
    assert 10 <= reached < SINGLE_STEPS
    ckpt = checkpoint_dir(run / "stage2", reached)
    assert (ckpt / "COMPLETE").is_file(), f"no complete checkpoint at the step reached ({reached})"
    assert checkpoint_step(ckpt) == reached
    assert not (run / "stage2" / "final").exists()


def test_sigterm_single_process_resume_matches_uninterrupted(tmp_path, preempted_single, single):
    run, reached = preempted_single
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    job = run_training([single.config], copy, resume=True)
    assert _flat(f"at step {reached}") in _flat(job.output())
    assert_same_run(copy / "stage2", single.stage_dir, resumed_at=reached)


def test_half_written_newer_checkpoint_is_ignored_on_resume(tmp_path, preempted_single, single):
    """A save killed midway leaves a folder without COMPLETE (or a .partial one): resume must use the
    previous complete checkpoint, warn about the broken ones, and still reproduce the uninterrupted run."""
    run, reached = preempted_single
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    good = checkpoint_dir(copy / "stage2", reached)
    torn = checkpoint_dir(copy / "stage2", reached + 3)  # files written, COMPLETE marker not yet
    shutil.copytree(good, torn)
    (torn / "COMPLETE").unlink()
    state = json.loads((torn / "trainer_state.json").read_text())
    (torn / "trainer_state.json").write_text(json.dumps({**state, "step": reached + 3}))
    for part in torn.glob("rank-*.safetensors"):  # the sharded default: every rank file torn
        part.write_bytes(b"truncated")
    assert list(torn.glob("rank-*.safetensors")), "expected the sharded checkpoint format"
    partial = checkpoint_dir(copy / "stage2", reached + 5).with_name(f"step-{reached + 5:08d}.partial")
    shutil.copytree(good, partial)  # a temp folder that was never renamed, even with its marker inside
    (copy / "stage2" / "checkpoints" / "latest").write_text(torn.name + "\n")

    job = run_training([single.config], copy, resume=True)
    out = _flat(job.output())
    assert _flat(f"resumed from {good} at step {reached}") in out
    assert _flat("ignoring half-written checkpoint") in out and torn.name in out and partial.name in out
    assert_same_run(copy / "stage2", single.stage_dir, resumed_at=reached)


def test_sigterm_two_ranks_checkpoints_and_resume_matches_uninterrupted(tmp_path, pair):
    run = tmp_path / "run"
    metrics = run / "stage2" / "metrics.jsonl"
    job = TrainProcess.start([pair.config], run, ranks=2)
    ranks = job.rank_processes(2)
    job.wait_for_step(metrics, 3)
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    assert job.wait() != 0, "torchrun reports workers that exit with 75 as failed"
    # torchrun's failure summary: the first rank to exit (root cause) exited 75. torchrun then SIGTERMs the
    # ranks still running; one past its checkpoint but not yet exited may show -15 (hence the SLURM scripts
    # requeue on the root cause's status). The COMPLETE checkpoint below shows every rank finished saving.
    out = job.output()
    codes = re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", out)
    root_cause = re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", out.split("Root Cause", 1)[-1])
    assert len(codes) == 2 and root_cause[:1] == [str(PREEMPTED_EXIT_CODE)], job.describe()
    assert set(codes) <= {str(PREEMPTED_EXIT_CODE), str(-signal.SIGTERM)}, job.describe()
    reached = max(r["step"] for r in read_metrics(metrics))
    assert 3 <= reached < PAIR_STEPS
    ckpt = checkpoint_dir(run / "stage2", reached)
    assert (ckpt / "COMPLETE").is_file() and checkpoint_step(ckpt) == reached
    assert sorted(p.name for p in ckpt.glob("rng-rank*")) == [
        "rng-rank00000.safetensors",
        "rng-rank00001.safetensors",
    ]

    run_training([pair.config], run, ranks=2, resume=True)
    assert_same_run(run / "stage2", pair.stage_dir, resumed_at=reached)


def _flat(text: str) -> str:
    """Text without any whitespace: rich may wrap a long console line anywhere, even inside a path."""
    return "".join(text.split())


# ---- injected non-finite steps ------------------------------------------------------------------

NAN_STEPS = 10
ISOLATED_BAD = 2  # 0-based step index: record step 3 is skipped, on its last micro-batch only
STREAK_BAD = (5, 6, 7, 8)  # max_bad_steps - 1 in a row: tolerated
MAX_BAD = 5  # shipped train.max_bad_steps
RUNAWAY_FROM = 3  # every step from here on is bad: stops after MAX_BAD of them


@pytest.fixture(scope="module")
def fault_runs(
    tmp_path_factory: pytest.TempPathFactory, data: TrainData
) -> tuple[Path, list[dict[str, Any]]]:
    """Two in-process run_stage calls (one subprocess, world of one) with NaN losses injected."""
    root = tmp_path_factory.mktemp("faults")
    cfg = standalone(
        tiny_stage_config(
            2, data, max_steps=NAN_STEPS, save_every=1, global_batch_size=4, micro_batch_size=2,
            num_workers=1, train={"keep_checkpoints": 100},
        )
    )  # fmt: skip
    assert cfg["train"]["max_bad_steps"] == MAX_BAD
    config = write_config(cfg, root / "stage2.json")
    spec = {
        "result": str(root / "result.json"),
        "jobs": [
            {"config": str(config), "run_dir": str(root / "isolated"), "bad_steps": [ISOLATED_BAD, *STREAK_BAD], "micro": 1},
            {"config": str(config), "run_dir": str(root / "runaway"), "bad_steps": list(range(RUNAWAY_FROM, NAN_STEPS)), "micro": None},
        ],
    }  # fmt: skip
    (root / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [PYTHON, str(REPO / "tests" / "train_fixtures.py"), "faults", str(root / "spec.json")],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, f"fault script failed\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return root, json.loads((root / "result.json").read_text())


def test_nonfinite_step_leaves_weights_and_optimizer_unchanged(fault_runs):
    root, _ = fault_runs
    stage_dir = root / "isolated" / "stage2"
    before, after, next_good = (
        checkpoint_dir(stage_dir, s) for s in (ISOLATED_BAD, ISOLATED_BAD + 1, ISOLATED_BAD + 2)
    )
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        assert_same_tensors(
            checkpoint_tensors(before, kind), checkpoint_tensors(after, kind), f"{kind} across the NaN step"
        )
    state = [json.loads((p / "trainer_state.json").read_text()) for p in (before, after, next_good)]
    assert state[0]["optimizer_steps"] == state[1]["optimizer_steps"] == state[2]["optimizer_steps"] - 1
    assert state[0]["scheduler_steps"] == state[1]["scheduler_steps"]
    # The comparison can fail: the next (good) step does change the weights.
    with pytest.raises(AssertionError, match="differs"):
        assert_same_tensors(checkpoint_tensors(after), checkpoint_tensors(next_good), "")


def test_nonfinite_steps_are_counted_and_do_not_advance_the_schedule(fault_runs):
    root, outcomes = fault_runs
    bad_records = {s + 1 for s in (ISOLATED_BAD, *STREAK_BAD)}
    assert outcomes[0] == {"error": None, "steps": NAN_STEPS, "skipped": len(bad_records)}
    records = read_metrics(root / "isolated" / "stage2" / "metrics.jsonl")
    cfg = json.loads((root / "stage2.json").read_text())
    applied = 0
    for r in records:
        bad = r["step"] in bad_records
        assert r["skipped"] is bad, r
        assert r["skipped_nonfinite_total"] == sum(1 for s in bad_records if s <= r["step"])
        if bad:
            # One poisoned micro-batch spoils the step; its NaN loss is written as null (strict JSON).
            assert r["grad_norm"] is None and r["loss"] is None
        else:
            assert r["grad_norm"] > 0 and abs(r["loss"]) < 100
        # A skipped step is not an optimizer step: the schedule waits for the next applied one.
        for name, lr in r["lr"].items():
            peak = cfg["modules"][name.split(".")[0]]["lr"]
            ref = reference_lr(applied, NAN_STEPS, cfg["optim"]["warmup_ratio"], peak, cfg["optim"]["min_lr"])
            assert lr == pytest.approx(ref, rel=1e-12, abs=0), f"step {r['step']} {name}"
        applied += not bad


def test_consecutive_nonfinite_steps_stop_the_run(fault_runs):
    root, outcomes = fault_runs
    stop = RUNAWAY_FROM + MAX_BAD  # the MAX_BAD-th bad step in a row
    assert outcomes[1]["error"] == "TooManyBadSteps"
    assert "train.max_bad_steps=5" in outcomes[1]["message"]
    assert f"at step {stop}" in outcomes[1]["message"]
    records = read_metrics(root / "runaway" / "stage2" / "metrics.jsonl")
    assert records[-1]["step"] == stop and records[-1]["skipped_nonfinite_total"] == MAX_BAD
    assert not (root / "runaway" / "stage2" / "final").exists()
