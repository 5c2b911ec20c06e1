"""Training with a token budget end to end: micro-batch counts vary per step, padding is recorded, and a
SIGTERM-preempted run resumes bitwise (same topology) onto the uninterrupted run."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from test_train_resume import assert_same_run
from train_fixtures import (
    TrainData,
    TrainProcess,
    read_metrics,
    reference_run,
    run_training,
    standalone,
    tiny_stage_config,
    train_data,
)

from vlmtrain.train.trainer import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

STEPS = 10
ROW = 256  # train_fixtures.MAX_LENGTH: the row length (no pack_length)


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory: pytest.TempPathFactory):
    data: TrainData = train_data(tmp_path_factory.getbasetemp())
    cfg = standalone(
        tiny_stage_config(3, data, max_steps=STEPS, save_every=3, global_batch_size=8, num_workers=2)
    )
    cfg["data"]["token_budget"] = 2 * ROW  # two packed rows per micro-batch
    return reference_run(tmp_path_factory.getbasetemp(), "budget_reference", cfg, 1)


def test_budget_run_records_varying_micro_batches_and_padding(budget_run):
    records = read_metrics(budget_run.stage_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["samples"] == 8 for r in records), "every step trains on the whole global batch"
    counts = {r["micro_batches"] for r in records}
    assert len(counts) > 1, f"the instruction data's lengths should vary the count, got {counts}"
    for r in records:
        # Row positions: 2 rows per micro-batch (the last 1 or 2), each at most ROW wide and a multiple of 64.
        positions = round(r["tokens"] / (1.0 - r["padding_fraction"]))
        assert r["tokens"] < positions <= 2 * r["micro_batches"] * ROW, r
        assert positions % 64 == 0, r


def test_budget_run_preempted_and_resumed_matches_uninterrupted(tmp_path: Path, budget_run):
    run = tmp_path / "run"
    job = TrainProcess.start([budget_run.config], run)
    job.wait_for_step(run / budget_run.stage_dir.name / "metrics.jsonl", 4)
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait() == PREEMPTED_EXIT_CODE, job.describe()
    reached = max(r["step"] for r in read_metrics(run / budget_run.stage_dir.name / "metrics.jsonl"))
    assert reached < STEPS
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    run_training([budget_run.config], copy, resume=True)
    assert_same_run(copy / budget_run.stage_dir.name, budget_run.stage_dir, resumed_at=reached)
