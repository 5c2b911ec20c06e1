"""Every shipped DeepSpeed config trains the full model (stage 2) on 2 gloo ranks like its reference config,
writes the full trained weights, checkpoints and resumes exactly; configs vlmtrain has not verified are
refused before anything trains. (ZeRO-3 in fp32 against plain PyTorch: tests/test_fsdp_runs.py.)"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fsdp_fixtures import initial_model_state
from train_fixtures import (
    PAIR_STEPS,
    REPO,
    ReferenceRun,
    TrainData,
    assert_same_tensors,
    checkpoint_dir,
    load_weights,
    read_metrics,
    reference_run,
    run_training,
    session_cache,
    shipped_ds_config,
    tiny_ds_config,
    train_data,
    two_rank_config,
    write_config,
)

from vlmtrain.config import MODULE_GROUPS, ConfigError, load_stage_config
from vlmtrain.dist import DistContext

DEFAULT = "zero2_bf16"  # covered by test_train_e2e / test_train_resume
OTHERS = ("zero1_bf16", "zero2_offload_bf16", "zero3_bf16", "zero3_offload_bf16")
# The resumed run restarts from the last periodic checkpoint (step 8 of 12; the run keeps steps 8 and 12).
RESUME_FROM = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return train_data(tmp_path_factory.getbasetemp())


def pair_config(data: TrainData, ds_config: Path) -> dict[str, Any]:
    """test_train_resume's 2-rank stage 2 (12 steps, checkpoint every 4) under another DeepSpeed config."""
    cfg = two_rank_config(data)
    cfg["train"]["ds_config"] = str(ds_config)
    return cfg


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, data: TrainData) -> ReferenceRun:
    """The default config's uninterrupted run (shared with test_train_resume)."""
    return reference_run(tmp_path_factory.getbasetemp(), "pair_reference", two_rank_config(data), 2)


def uninterrupted(base: Path, data: TrainData, name: str) -> ReferenceRun:
    def make(out: Path) -> None:
        cfg = pair_config(data, tiny_ds_config(name, out))
        run_training([write_config(cfg, out / "config.json")], out / "run", ranks=2)

    out = session_cache(base, f"ds_config_{name}", make)
    return ReferenceRun(out / "config.json", out / "run", out / "run" / "stage2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data: TrainData):
    base = tmp_path_factory.getbasetemp()
    return lambda name: uninterrupted(base, data, name)


def metric_rows(stage_dir: Path) -> list[dict[str, Any]]:
    keys = ("step", "loss", "grad_norm", "lr", "tokens", "samples", "skipped")
    return [{k: r[k] for k in keys} for r in read_metrics(stage_dir / "metrics.jsonl")]


def final_weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_weights(stage_dir / "final" / "model.safetensors")


# ---- resume -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_resume_from_checkpoint_reproduces_the_uninterrupted_run_bitwise(tmp_path, runs, name):
    """Stop at step 8 (its checkpoint and metrics, as a stopped run leaves them), resume to step 12."""
    ref = runs(name)
    run = tmp_path / "run"
    stage_dir = run / "stage2"
    (stage_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint_dir(ref.stage_dir, RESUME_FROM), checkpoint_dir(stage_dir, RESUME_FROM))
    (stage_dir / "metrics.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in read_metrics(ref.stage_dir / "metrics.jsonl")
            if r["step"] <= RESUME_FROM
        )
    )
    job = run_training([ref.config], run, ranks=2, resume=True)
    assert f"at step {RESUME_FROM}" in job.output()
    ours, theirs = metric_rows(stage_dir), metric_rows(ref.stage_dir)
    assert [r["step"] for r in ours] == list(range(1, PAIR_STEPS + 1))
    for a, b in zip(ours, theirs, strict=True):
        assert a == b, f"{name}: step {a['step']} after resuming at {RESUME_FROM}: {a} != uninterrupted {b}"
    assert_same_tensors(
        final_weights(stage_dir), final_weights(ref.stage_dir), f"{name}: resumed vs uninterrupted"
    )


# ---- what the uninterrupted runs train ----------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How closely a config's uninterrupted run must follow its reference run (see REFERENCE)."""

    loss_rtol: float
    grad_norm_rtol: float
    weight_atol: float | None  # elementwise bound on the final weights
    weight_move_ratio: float | None  # bound on |w - w_ref| / |w_ref - w_start| per module group


# Offload on the CPU accelerator keeps the optimizer state where it already is; only the gradient-norm
# summation order differs. Measured over 12 steps: losses bitwise equal, grad norms within 7.1e-8
# relative, final fp32 weights within 3.0e-8 (one ulp through the clip coefficient).
OFFLOAD = Agreement(loss_rtol=1e-6, grad_norm_rtol=1e-6, weight_atol=1e-6, weight_move_ratio=None)
# ZeRO-3 against ZeRO-2: same weights and data, but ZeRO-3 multiplies gathered copies held in other
# buffers (CPU bf16 matmuls round by layout: one bf16 ulp in some activations, so step 1 differs by 6e-7)
# and reduces gradients in another order. Measured over 12 steps: losses within 2.0e-5 relative, grad
# norms within 4.3e-4; Adam's early sign-like updates flip on near-zero gradients, so weights are compared
# by distance (measured 0.6-2.3% of how far each group moved). A forward on stale weights (a resume bug
# found while writing this) moved the loss by 7e-3 relative; a gradient summed over ranks doubles the norm.
# (Both bounds were measured when these runs computed in bf16; they compute in fp32 now (tiny_stage_config),
# where the layouts round less, so the bounds hold with room while a summed-not-averaged gradient still
# fails them by 2x.)
ZERO3 = Agreement(loss_rtol=1e-3, grad_norm_rtol=1e-2, weight_atol=None, weight_move_ratio=0.1)
# ZeRO-1 against ZeRO-2: the same fp32 gradient sum, taken in another order (ZeRO-2 reduces each micro-batch's
# gradient and adds the reduced ones; ZeRO-1 adds them on each rank and reduces the sum once).
ZERO1 = Agreement(loss_rtol=1e-6, grad_norm_rtol=1e-6, weight_atol=1e-6, weight_move_ratio=None)
REFERENCE = {
    "zero1_bf16": (DEFAULT, ZERO1),
    "zero2_offload_bf16": (DEFAULT, OFFLOAD),
    "zero3_offload_bf16": ("zero3_bf16", OFFLOAD),
    "zero3_bf16": (DEFAULT, ZERO3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_trains_like_its_reference_config_and_writes_full_weights(runs, pair, name):
    reference, agree = REFERENCE[name]
    ref = pair if reference == DEFAULT else runs(reference)
    ours, theirs = metric_rows(runs(name).stage_dir), metric_rows(ref.stage_dir)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, PAIR_STEPS + 1))
    for a, b in zip(ours, theirs, strict=True):
        what = f"{name} vs {reference}, step {a['step']}"
        assert a["loss"] == pytest.approx(b["loss"], rel=agree.loss_rtol), f"{what}: loss"
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=agree.grad_norm_rtol), f"{what}: grad norm"
        assert (a["lr"], a["samples"], a["tokens"]) == (b["lr"], b["samples"], b["tokens"]), what
    weights, ref_weights = final_weights(runs(name).stage_dir), final_weights(ref.stage_dir)
    # Every parameter at full shape in fp32 (a partition or ZeRO-3's empty placeholder would differ).
    assert {n: (w.shape, w.dtype) for n, w in weights.items()} == {
        n: (w.shape, w.dtype) for n, w in ref_weights.items()
    }
    if agree.weight_atol is not None:
        for n, w in ref_weights.items():
            torch.testing.assert_close(weights[n], w, rtol=0, atol=agree.weight_atol, msg=f"{name}: {n}")
    if agree.weight_move_ratio is not None:
        start = initial_model_state(json.loads(ref.config.read_text()))
        for group in MODULE_GROUPS:
            names = [n for n in start if n.startswith(group + ".")]
            moved = torch.cat([(ref_weights[n] - start[n]).flatten() for n in names]).norm()
            apart = torch.cat([(weights[n] - ref_weights[n]).flatten() for n in names]).norm()
            assert moved > 0, f"{reference}: {group} did not train"
            assert apart <= agree.weight_move_ratio * moved, (
                f"{name}: {group} ended {apart:.3g} from {reference}'s weights, which moved {moved:.3g}"
            )


# ---- refused configs (fast) ---------------------------------------------------------------------


def test_every_shipped_config_is_one_this_module_verifies():
    shipped = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))
    assert shipped == sorted([DEFAULT, *OTHERS]), "a shipped DeepSpeed config without a test here"


def stage_with(tmp_path: Path, ds: dict[str, Any] | str, *overrides: str):
    if isinstance(ds, dict):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        ds = str(path)
    return load_stage_config(
        stage=2, overrides=[f"train.ds_config={ds}", "batch.micro_batch_size=8", *overrides]
    )


@pytest.mark.parametrize("name", [DEFAULT, *OTHERS])
def test_shipped_configs_resolve(name):
    from vlmtrain.train.engines.deepspeed import resolve_ds_config

    pinned = [
        f"train.ds_config={name}",
        "batch.micro_batch_size=8",
    ]  # the presets say auto: pin the 8 x 8 split
    cfg = resolve_ds_config(load_stage_config(stage=2, overrides=pinned), world_size=2)
    assert cfg["zero_optimization"] == shipped_ds_config(name)["zero_optimization"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stage": 0}, r"zero_optimization\.stage=0 is not supported .* zero2_bf16 \(default\)"),
        (
            {"offload_optimizer": {"device": "nvme", "nvme_path": "/local"}},
            r"zero_optimization\.offload_optimizer\.device='nvme' is not supported .* zero2_offload_bf16",
        ),
        (
            {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/local"}},
            r"zero_optimization\.offload_param\.device='nvme' is not supported .* zero3_offload_bf16",
        ),
    ],
)
def test_unverified_deepspeed_configs_are_refused_naming_the_file(tmp_path, change, message):
    from vlmtrain.train.engines.deepspeed import resolve_ds_config

    ds = shipped_ds_config(DEFAULT)
    ds["zero_optimization"].update(change)
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "ds.json")) + ": " + message):
        resolve_ds_config(stage_with(tmp_path, ds), world_size=2)


@pytest.mark.parametrize(("name", "world", "refused"), [("zero3_bf16", 2, True), ("zero3_offload_bf16", 4, True),
                                                        ("zero3_bf16", 1, False), ("zero2_bf16", 2, False)])  # fmt: skip
def test_rank0_cider_validation_is_refused_under_multi_rank_zero3(tmp_path, name, world, refused):
    """Rank-0-only captioning hangs under ZeRO-3: every module's forward all-gathers its partitions."""
    from vlmtrain.train.engines.deepspeed import resolve_ds_config

    stage = stage_with(tmp_path, name, "validation.data=held_out/manifest.json", "validation.cider=true")
    if refused:
        with pytest.raises(
            ConfigError, match=rf"stage stage2: validation\.cider .* ZeRO-3 .*{name}\.json.* {world} ranks"
        ):
            resolve_ds_config(stage, world_size=world)
    else:
        resolve_ds_config(stage, world_size=world)


def test_run_stages_refuses_an_unverified_config_before_any_stage_trains(tmp_path):
    """The second stage's config fails the run before the first stage loads a model."""
    from vlmtrain.train.run import run_stages

    ds = shipped_ds_config(DEFAULT)
    ds["zero_optimization"]["stage"] = 0
    good = load_stage_config(stage=0)
    bad = stage_with(tmp_path, ds)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage=0 is not supported"):
        run_stages([good, bad], tmp_path / "run", ctx)
    assert not (tmp_path / "run").exists()
