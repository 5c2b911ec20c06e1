"""Freezing from the stage config: after one backward exactly the trainable groups have gradients."""

from __future__ import annotations

import pytest
import torch

from tests.test_model import make_sample, pack
from vlmtrain.config import load_stage_config
from vlmtrain.models.freeze import apply_trainability, trainability_rows, trainability_table


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_exactly_trainable_groups_get_gradients(tiny_model, stage):
    cfg = load_stage_config(stage)
    apply_trainability(tiny_model, cfg.modules)
    gen = torch.Generator().manual_seed(0)
    samples = [make_sample(tiny_model, gen, 8, True), make_sample(tiny_model, gen, 6, False)]
    batch = pack(samples, [[0], [1]], length=30)
    tiny_model.train()
    tiny_model(**batch, mask_mode=cfg.mask.mode).loss.backward()
    unused = {id(p) for p in tiny_model.unused_parameters()}
    for group, module in tiny_model.module_groups().items():
        for name, p in module.named_parameters():
            if id(p) in unused:
                assert not p.requires_grad and p.grad is None, (
                    f"{group}.{name} is never used and must stay frozen"
                )
            elif cfg.modules[group].trainable:
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, f"{group}.{name}"
            else:
                assert not p.requires_grad and p.grad is None, f"{group}.{name}"


def test_table_counts_parameters(tiny_model):
    cfg = load_stage_config(0)
    apply_trainability(tiny_model, cfg.modules)
    rows = {r[0]: r for r in trainability_rows(tiny_model, cfg.modules)}
    assert (
        rows["projector"][1] == "TRAINABLE"
        and rows["vision"][1] == "Frozen"
        and rows["language"][1] == "Frozen"
    )
    assert (
        rows["projector"][2]
        == rows["projector"][3]
        == sum(p.numel() for p in tiny_model.projector.parameters())
    )
    assert rows["language"][2] == sum(p.numel() for p in tiny_model.language.parameters())
    assert trainability_table(tiny_model, cfg.modules, "stage0").row_count == 3


def test_undeclared_group_is_an_error(tiny_model):
    cfg = load_stage_config(0)
    modules = dict(cfg.modules)
    del modules["vision"]
    with pytest.raises(ValueError, match=r"not declared"):
        apply_trainability(tiny_model, modules)
