"""Activation recompute policy (`train.gradient_checkpointing`), applied per tower by the trainer.

Which transformer layers recompute is read back from the layers themselves, and that they really recompute
is seen by counting their forward calls during backward; losses and gradients are compared with recompute
off.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from vlmtrain.config import ConfigError, load_stage_config
from vlmtrain.dist import DistContext
from vlmtrain.models.freeze import apply_trainability
from vlmtrain.train.trainer import Trainer

WORLD_OF_ONE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def layers(tower: torch.nn.Module) -> list[GradientCheckpointingLayer]:
    return [m for m in tower.modules() if isinstance(m, GradientCheckpointingLayer)]


def recompute_flags(model) -> dict[str, list[bool]]:
    return {
        name: [layer.gradient_checkpointing for layer in layers(getattr(model, name))]
        for name in ("language", "vision")
    }


def apply_policy(model, tokenizer, tmp_path, stage_no: int, policy=None, every: int = 1):
    stage = load_stage_config(stage=stage_no)
    if policy is not None:
        stage = replace(
            stage, train=replace(stage.train, gradient_checkpointing=policy, checkpoint_every_n_layers=every)
        )
    apply_trainability(model, stage.modules)
    trainer = Trainer(
        stage, tmp_path / stage.name, WORLD_OF_ONE, model, tokenizer, lambda s: None, total_steps=1
    )
    return trainer._enable_checkpointing()


# (stage, policy) -> towers that recompute; None is the preset's own setting (auto).
EXPECTED = {
    (0, None): set(),  # LM and vision frozen: only the projector trains
    (1, None): set(),
    (2, None): {"language", "vision"},
    (3, None): {"language", "vision"},
    (0, True): {"language"},  # true: the frozen LM that backward passes through recomputes too
    (1, True): {"language"},
    (2, True): {"language", "vision"},
    (3, True): {"language", "vision"},
    (1, False): set(),
    (2, False): set(),
}


@pytest.mark.parametrize("stage_no, policy", list(EXPECTED), ids=[f"stage{s}-{p}" for s, p in EXPECTED])
def test_policy_per_tower(tiny_model, tokenizer, tmp_path, stage_no, policy):
    if policy is None:
        assert load_stage_config(stage=stage_no).train.gradient_checkpointing == "auto"
    plan = apply_policy(tiny_model, tokenizer, tmp_path, stage_no, policy)
    expected = EXPECTED[(stage_no, policy)]
    assert {name for name, on in plan.items() if on} == expected
    flags = recompute_flags(tiny_model)
    assert all(len(v) == 2 for v in flags.values())  # the tiny towers' two layers each
    for name, per_layer in flags.items():
        assert per_layer == [name in expected] * len(per_layer), name


def test_every_n_layers_and_switching_off(tiny_model, tokenizer, tmp_path):
    apply_policy(tiny_model, tokenizer, tmp_path, 2, "auto", every=2)
    assert recompute_flags(tiny_model) == {"language": [True, False], "vision": [True, False]}
    apply_policy(tiny_model, tokenizer, tmp_path, 1, "auto")  # a later policy replaces the earlier one
    assert recompute_flags(tiny_model) == {"language": [False, False], "vision": [False, False]}


def batch_of(model):
    from tests.test_model import make_sample, pack

    gen = torch.Generator().manual_seed(7)
    samples = [make_sample(model, gen, n, img) for n, img in ((10, True), (6, False), (12, True))]
    return pack(samples, [[0, 1], [2]], length=40)


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, int]]:
    """Loss, gradients, and how often each tower's first layer ran forward during backward (recompute).

    The hook sits before the layer's MLP: transformers checkpoints a layer's `forward`, so hooks on the layer
    itself stay outside the recompute, and the recompute stops once it has every saved tensor (inside the
    MLP's last matmul), so a hook after the MLP would not see it.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    calls = {"language": 0, "vision": 0}
    in_backward = [False]
    hooks = [
        layers(getattr(model, name))[0].mlp.register_forward_pre_hook(
            lambda *_, n=name: calls.__setitem__(n, calls[n] + in_backward[0])
        )
        for name in calls
    ]
    out = model(**batch, mask_mode="prefix")
    in_backward[0] = True
    out.loss_sum.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_sum.detach(), grads, calls


@pytest.mark.parametrize("stage_no", [1, 2])
def test_same_loss_and_gradients_with_and_without_recompute(tiny_model, tokenizer, tmp_path, stage_no):
    batch = batch_of(tiny_model)
    results = {}
    for policy in (False, True):
        apply_policy(tiny_model, tokenizer, tmp_path, stage_no, policy)
        results[policy] = loss_and_grads(tiny_model, batch)
    (loss_off, grads_off, calls_off), (loss_on, grads_on, calls_on) = results[False], results[True]
    assert calls_off == {"language": 0, "vision": 0}
    # With recompute the LM's layers run again in backward; the vision tower only where it trains.
    assert calls_on == {"language": 1, "vision": int(stage_no == 2)}
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-6)
    assert grads_on.keys() == grads_off.keys() and any(n.startswith("projector") for n in grads_on)
    assert any(n.startswith("language") for n in grads_on) == (stage_no == 2)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-6, atol=1e-6, msg=name)


def test_config_accepts_auto_true_false_only():
    from vlmtrain.config import stage_config_from_dict
    from vlmtrain.config.load import read_json, shipped_stage_path

    data = read_json(shipped_stage_path(2))
    for value in ("auto", True, False):
        data["train"]["gradient_checkpointing"] = value
        assert stage_config_from_dict(data).train.gradient_checkpointing == value
    for value in ("full", 1, None):
        data["train"]["gradient_checkpointing"] = value
        with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing"):
            stage_config_from_dict(data)
    data["train"]["gradient_checkpointing"] = "auto"
    data["train"]["checkpoint_every_n_layers"] = 0
    with pytest.raises(ValueError, match=r"train\.checkpoint_every_n_layers: must be >= 1"):
        stage_config_from_dict(data)


def test_auto_recomputes_only_what_the_memory_plan_needs(tiny_model, tiny_model_config, tokenizer, tmp_path):
    """`auto` against `train.device_memory_gib` on both sides of each estimate; the estimates are computed here
    from plan's memory model on the meta model of the same config (stage 2: vision and LM train)."""
    from vlmtrain.train import plan
    from vlmtrain.train.batching import AUTO_MEMORY_FRACTION, per_rank_samples

    base = load_stage_config(stage=2)
    off = replace(base, model=tiny_model_config, train=replace(base.train, gradient_checkpointing=False))
    shapes = plan.stage_shapes(off, tiny_model_config)  # nothing recomputed
    micro = per_rank_samples(base, 1)  # micro_batch_size auto, not yet resolved: the rank's whole share

    def estimate(vision: bool, language: bool) -> int:
        setup = replace(
            shapes.setup,
            vision_checkpointed=shapes.shape.vision_layers_used if vision else 0,
            language_checkpointed=shapes.shape.language.layers if language else 0,
        )
        return plan.memory_per_gpu(base, replace(shapes, setup=setup), 1, micro).total

    none, both = estimate(False, False), estimate(True, True)
    singles = sorted([(estimate(True, False), "vision"), (estimate(False, True), "language")])
    (best, first), (worst, _) = singles
    assert both < best <= worst < none
    cases = [  # (planned bytes, towers that recompute)
        (none * 1.0001, set()),
        (none * 0.9999, {first}),
        (best * 1.0001, {first}),
        (best * 0.9999, {"vision", "language"}),
        (both * 1.0001, {"vision", "language"}),
        (both * 0.9999, {"vision", "language"}),  # nothing fits: every trained tower, and the log says so
    ]
    apply_trainability(tiny_model, base.modules)
    for planned, expected in cases:
        gib = planned / AUTO_MEMORY_FRACTION / 2**30
        stage = replace(base, train=replace(base.train, device_memory_gib=gib))
        trainer = Trainer(stage, tmp_path / "s", WORLD_OF_ONE, tiny_model, tokenizer, lambda s: None, 1)
        with trainer.console.capture() as log:
            decided = trainer._enable_checkpointing()
        assert {name for name, on in decided.items() if on} == expected, (planned, log.get())
        assert {n for n, f in recompute_flags(tiny_model).items() if all(f)} == expected
        assert not any(f for n, fl in recompute_flags(tiny_model).items() if n not in expected for f in fl)
        line = " ".join(log.get().split())
        assert (
            line.startswith("recompute (auto): ") and f"none {none / 2**20:.1f} MiB" in line
        )  # tiny: < 1 GiB
        assert ("nothing fits" in line) == (planned < both)
