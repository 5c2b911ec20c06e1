"""Fast unit tests of the training engine's pure parts: parameter groups, the LR schedule, checkpoint
bookkeeping (complete / half-written folders, pruning, round trip) and batch accumulation arithmetic."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from vlmtrain.config.load import ConfigError, load_stage_config, shipped_stage_path, stage_config_from_dict
from vlmtrain.config.schema import BatchConfig, ValidationError
from vlmtrain.dist import DistContext
from vlmtrain.models.freeze import apply_trainability
from vlmtrain.train import checkpoint as ckpt
from vlmtrain.train.engines.base import EngineState
from vlmtrain.train.optim import build_param_groups, lr_at, make_optimizer, make_scheduler, warmup_steps_for

WORLD_OF_ONE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


# ---- parameter groups ---------------------------------------------------------------------------


def reference_no_decay(model: nn.Module) -> set[int]:
    """Parameters exempt from weight decay, found by what owns them: biases and any normalisation layer's
    parameters (SigLIP's LayerNorm, Qwen2's RMSNorm), not by the engine's name/shape rule."""
    out = set()
    for module in model.modules():
        is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        for leaf, p in module.named_parameters(recurse=False):
            if is_norm or leaf == "bias":
                out.add(id(p))
    return out


@pytest.mark.parametrize("stage", [0, 2])
def test_param_groups_split_decay_and_keep_frozen_out(tiny_model, stage):
    cfg = load_stage_config(stage=stage)
    apply_trainability(tiny_model, cfg.modules)
    specs = build_param_groups(tiny_model, tiny_model.module_groups(), cfg)

    trainable = [g for g in ("vision", "projector", "language") if cfg.modules[g].trainable]
    assert [s.name for s in specs] == [n for g in trainable for n in (g, f"{g}.no_decay")]
    no_decay = reference_no_decay(tiny_model)
    seen: list[int] = []
    for spec in specs:
        assert spec.lr == cfg.modules[spec.module_group].lr
        assert spec.weight_decay == (0.0 if spec.name.endswith(".no_decay") else cfg.optim.weight_decay)
        for name, p in zip(spec.param_names, spec.params, strict=True):
            assert tiny_model.get_parameter(name) is p, name
            assert name.split(".")[0] == spec.module_group
            assert (id(p) in no_decay) == spec.name.endswith(".no_decay"), name
            seen.append(id(p))
    # Every trainable parameter exactly once (the tied LM head is the embedding, counted once); no frozen one.
    assert len(seen) == len(set(seen))
    expected = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    assert set(seen) == expected
    assert id(tiny_model.vision.post_layernorm.weight) not in seen  # never reached by the forward pass


def test_param_groups_refuse_a_stage_with_nothing_to_train(tiny_model):
    cfg = load_stage_config(stage=0)
    apply_trainability(tiny_model, cfg.modules)
    tiny_model.projector.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(tiny_model, tiny_model.module_groups(), cfg)


def test_optimizer_and_scheduler_give_each_group_its_own_schedule(tiny_model):
    cfg = load_stage_config(stage=2)
    apply_trainability(tiny_model, cfg.modules)
    specs = build_param_groups(tiny_model, tiny_model.module_groups(), cfg)
    opt = make_optimizer(specs, cfg.optim)
    assert [g["name"] for g in opt.param_groups] == [s.name for s in specs]
    assert [g["weight_decay"] for g in opt.param_groups] == [s.weight_decay for s in specs]
    assert opt.defaults["betas"] == tuple(cfg.optim.betas) and opt.defaults["eps"] == cfg.optim.eps
    total = 40
    sched = make_scheduler(opt, specs, total, cfg.optim)
    warmup = round(cfg.optim.warmup_ratio * total)
    assert warmup == 1
    refs = [torch_reference_lrs(total, warmup, spec.lr, cfg.optim.min_lr) for spec in specs]
    for step in range(total):
        for group, spec, ref in zip(opt.param_groups, specs, refs, strict=True):
            assert group["lr"] == pytest.approx(ref[step], rel=1e-12), (step, spec.name)
        opt.step()
        sched.step()


# ---- LR schedule ---------------------------------------------------------------------------------


def torch_reference_lrs(total: int, warmup: int, peak: float, min_lr: float) -> list[float]:
    """The LR of each step from torch's own schedulers: LinearLR ramping peak/warmup -> peak over the
    warmup, then CosineAnnealingLR from peak to min_lr over the remaining steps."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr)
    sched: torch.optim.lr_scheduler.LRScheduler = cosine
    if warmup > 0:
        linear = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1)
        )
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[warmup])
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's internal step(epoch) deprecation notice
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


@pytest.mark.parametrize(("total", "warmup"), [(5, 0), (5, 1), (60, 2), (100, 3), (1000, 30)])
def test_lr_at_equals_torch_linear_then_cosine(total, warmup):
    peak, min_lr = 1e-3, 1e-8
    ref = torch_reference_lrs(total, warmup, peak, min_lr)
    ours = [lr_at(s, total, warmup, peak, min_lr) for s in range(total)]
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a == pytest.approx(b, rel=1e-12), step


def test_lr_at_hand_checked_points():
    peak, min_lr = 2e-3, 1e-8
    # 3 warmup steps: a third, two thirds, the peak; the cosine then starts from the peak again.
    assert [lr_at(s, 103, 3, peak, min_lr) for s in range(4)] == pytest.approx(
        [peak / 3, 2 * peak / 3, peak, peak]
    )
    assert lr_at(3 + 50, 103, 3, peak, min_lr) == pytest.approx(
        (peak + min_lr) / 2
    )  # half-way through the cosine
    assert lr_at(103, 103, 3, peak, min_lr) == pytest.approx(min_lr)  # reached at total_steps
    assert lr_at(10**6, 103, 3, peak, min_lr) == pytest.approx(min_lr)  # and held past it
    assert lr_at(0, 10, 0, peak, min_lr) == peak  # no warmup: the first step runs at the peak
    assert lr_at(4, 10, 2, 0.0, min_lr) == 0.0  # a frozen group's peak of 0 stays 0 (never min_lr)
    assert all(lr_at(s, 10, 2, peak, min_lr) > min_lr for s in range(10))


@pytest.mark.parametrize(("total", "expected"), [(4, 0), (16, 0), (17, 1), (50, 2), (60, 2), (1000, 30)])
def test_warmup_steps_round_the_ratio(total, expected):
    assert warmup_steps_for(total, 0.03) == expected


# ---- checkpoints ---------------------------------------------------------------------------------


def _fake_checkpoint(root: Path, name: str, complete: bool) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        (path / ckpt.COMPLETE).write_text("1\n")
    return path


def test_half_written_checkpoints_are_skipped_with_a_warning(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 10):
        _fake_checkpoint(root, ckpt.checkpoint_name(step), complete=True)
    _fake_checkpoint(root, ckpt.checkpoint_name(12), complete=False)  # files written, marker not yet
    _fake_checkpoint(root, ckpt.checkpoint_name(14) + ckpt.PARTIAL, complete=True)  # never renamed
    (root / ckpt.checkpoint_name(16)).write_text("not a folder")
    (root / "latest").write_text(ckpt.checkpoint_name(12) + "\n")  # the pointer is not trusted

    with pytest.warns(UserWarning, match="half-written") as record:
        complete = ckpt.list_complete(root)
    assert [p.name for p in complete] == [ckpt.checkpoint_name(s) for s in (2, 4, 10)]  # numeric order
    warned = " ".join(str(w.message) for w in record)
    assert ckpt.checkpoint_name(12) in warned and ckpt.checkpoint_name(14) + ckpt.PARTIAL in warned
    with pytest.warns(UserWarning):
        assert ckpt.find_latest(root) == root / ckpt.checkpoint_name(10)
    with pytest.warns(UserWarning):
        ckpt.prune_checkpoints(root, keep=2)
    remaining = sorted(p.name for p in root.iterdir())
    # The oldest complete one goes; half-written folders are not the pruner's to judge.
    assert ckpt.checkpoint_name(2) not in remaining
    assert {ckpt.checkpoint_name(s) for s in (4, 10, 12)} <= set(remaining)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(root / ckpt.checkpoint_name(12), WORLD_OF_ONE)


def test_no_checkpoint_folder_means_nothing_to_resume(tmp_path):
    assert ckpt.list_complete(tmp_path / "absent") == []
    assert ckpt.find_latest(tmp_path / "absent") is None


def _engine_state(seed: int) -> EngineState:
    g = torch.Generator().manual_seed(seed)
    names = {"projector.linear_1.weight": (4, 3), "projector.linear_1.bias": (4,)}
    return EngineState(
        params={n: torch.randn(s, generator=g) for n, s in names.items()},
        exp_avg={n: torch.randn(s, generator=g) for n, s in names.items()},
        exp_avg_sq={n: torch.rand(s, generator=g) for n, s in names.items()},
        optimizer_steps=7 + seed,
        scheduler_steps=7 + seed,
    )


def test_save_load_round_trip_and_keep_last_n(tmp_path):
    root = tmp_path / "checkpoints"
    trainer_state = {"stage": "stage0", "reader": {"any": "json"}, "counters": {"skipped_nonfinite": 1}}
    saved = {}
    for step in (3, 6, 9):
        saved[step] = _engine_state(step)
        path = ckpt.save_checkpoint(root, step, saved[step], trainer_state, WORLD_OF_ONE, keep=2)
        assert path == root / ckpt.checkpoint_name(step) and (path / ckpt.COMPLETE).is_file()
    assert [p.name for p in ckpt.list_complete(root)] == [ckpt.checkpoint_name(6), ckpt.checkpoint_name(9)]
    assert (root / "latest").read_text().strip() == ckpt.checkpoint_name(9)
    assert not list(root.glob("*" + ckpt.PARTIAL)), "temporary folder left behind"

    torch.manual_seed(123)
    expected_draw = torch.rand(5)
    torch.manual_seed(123)
    ckpt.save_checkpoint(root, 12, saved[9], trainer_state, WORLD_OF_ONE, keep=2)
    loaded = ckpt.load_checkpoint(root / ckpt.checkpoint_name(12), WORLD_OF_ONE)
    for kind, field in (("param", "params"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
        want = getattr(saved[9], field)
        assert sorted(loaded.state.names()) == sorted(want), field
        assert all(torch.equal(loaded.state.full(kind, k), want[k]) for k in want), field
    assert (loaded.optimizer_steps, loaded.scheduler_steps) == (16, 16)
    assert loaded.trainer["format"] == "gathered"
    assert loaded.trainer["step"] == 12 and loaded.trainer["world_size"] == 1
    assert {k: loaded.trainer[k] for k in trainer_state} == trainer_state
    torch.rand(3)  # move the generator on; restoring must bring it back
    ckpt.restore_rng(loaded.rng)
    assert torch.equal(torch.rand(5), expected_draw)
    json.loads((root / ckpt.checkpoint_name(12) / "trainer_state.json").read_text())  # plain JSON


def test_rng_is_not_restored_across_world_sizes(tmp_path):
    root = tmp_path / "checkpoints"
    path = ckpt.save_checkpoint(root, 1, _engine_state(0), {"reader": {}}, WORLD_OF_ONE, keep=1)
    two_ranks = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    assert ckpt.load_checkpoint(path, two_ranks).rng is None


# ---- batch arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "expected"), [(1, 4), (2, 2), (4, 1)])
def test_accumulation_steps(world, expected):
    assert BatchConfig(global_batch_size=8, micro_batch_size=2).accumulation_steps(world) == expected


@pytest.mark.parametrize("world", [3, 8])
def test_accumulation_steps_reject_an_uneven_split(world):
    with pytest.raises(
        ValidationError, match=rf"batch\.global_batch_size: .*micro_batch_size x world size = {2 * world}"
    ):
        BatchConfig(global_batch_size=8, micro_batch_size=2).accumulation_steps(world)


def test_global_batch_must_be_a_multiple_of_the_micro_batch():
    data = json.loads(shipped_stage_path(0).read_text())
    data["batch"] = {"global_batch_size": 10, "micro_batch_size": 4}
    with pytest.raises(
        ConfigError, match=r"batch\.global_batch_size: 10 is not divisible by micro_batch_size 4"
    ):
        stage_config_from_dict(data, source="stage0.json")


def test_deepspeed_config_carries_the_stage_batch_and_numerics():
    from vlmtrain.train.engines.deepspeed import resolve_ds_config

    stage = load_stage_config(stage=1, overrides=["batch.global_batch_size=32", "batch.micro_batch_size=4"])
    cfg = resolve_ds_config(stage, world_size=2)
    assert (
        cfg["train_batch_size"],
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
    ) == (32, 4, 4)
    assert (
        cfg["train_batch_size"]
        == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 2
    )
    assert cfg["gradient_clipping"] == stage.optim.grad_clip
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert cfg["zero_optimization"]["stage"] == 2
    assert "optimizer" not in cfg and "scheduler" not in cfg  # ours: per-group LRs, no decay on norms
    with pytest.raises(ValidationError, match="micro_batch_size x world size = 12"):
        resolve_ds_config(stage, world_size=3)
