"""The training hot path needs no device-to-host sync but the step sync (one per optimizer step).

On the `meta` device every operation whose result would have to be read back on the host (`.item()`,
`nonzero`, a boolean index: anything data-dependent) raises, so a forward and backward that run there make
no such sync on a GPU either. The engines' own update paths are counted in tests/test_step_sync.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from numerics_fixtures import collate, make_samples

from vlmtrain.config.load import shipped_stage_path, stage_config_from_dict
from vlmtrain.data.collate import MODEL_KEYS
from vlmtrain.dist import DistContext
from vlmtrain.models.freeze import apply_trainability
from vlmtrain.models.loss import supervised_index
from vlmtrain.train import trainer as trainer_module
from vlmtrain.train.engines.base import StepResult
from vlmtrain.train.trainer import Trainer

META = torch.device("meta")


def meta_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(META) for k in MODEL_KEYS if k in batch}


@pytest.mark.parametrize("layout", ["pad", "pack"])
@pytest.mark.parametrize("mode", ["bidirectional", "prefix"])
def test_forward_backward_with_cpu_positions_run_on_meta(tiny_model, layout, mode):
    model = tiny_model.train()
    samples = make_samples(model, 5)
    batch = collate(samples, layout, max(len(s) for s in samples) + 8, model.vision.config.image_size)
    index = supervised_index(batch["labels"], batch["sample_ids"])
    model = model.to(META)
    out = model(**meta_inputs(batch), mask_mode=mode, supervised_index=index.to(META))
    out.loss_sum.backward()
    assert out.num_label_tokens == len(index) > 0
    assert all(p.grad is not None for p in model.projector.parameters())


def test_without_cpu_positions_the_model_would_sync(tiny_model):
    """The meta check can fail: finding the supervised positions on the device is data-dependent."""
    model = tiny_model.train()
    batch = collate(make_samples(model, 2), "pad", 0, model.vision.config.image_size)
    model = model.to(META)
    with pytest.raises(NotImplementedError, match="nonzero"):
        model(**meta_inputs(batch), mask_mode="prefix")


class MetaEngine:
    """The engine interface the trainer drives, over a plain model on the meta device."""

    accumulation_steps = 2

    def __init__(self, model) -> None:
        self.model, self.micro = model, 0

    def begin_step(self, n_micro: int) -> None:
        self.accumulation_steps, self.micro = n_micro, 0

    def forward(self, batch, mask_mode):
        return self.model(**batch, mask_mode=mask_mode)

    def backward(self, loss_sum, step_tokens):
        (loss_sum / step_tokens).backward()

    def step(self) -> StepResult:
        self.micro += 1
        boundary = self.micro % self.accumulation_steps == 0
        return StepResult(boundary=boundary, norm=torch.ones((), device=META) if boundary else None)


@pytest.mark.parametrize("stage_index", [0, 2])
def test_a_training_step_reads_the_device_once(tmp_path, tokenizer, tiny_model, monkeypatch, stage_index):
    """Stage 0 (bidirectional, CPU-side noise) and stage 2 (prefix, all trains): a step's only read is its step
    sync before the first forward, which also carries the previous step's loss and norm (left on the device)."""
    stage = stage_config_from_dict(json.loads(shipped_stage_path(stage_index).read_text()))
    model = tiny_model.train()
    apply_trainability(model, stage.modules)
    size = model.vision.config.image_size
    raws = []
    for i in range(4):
        batch = collate(make_samples(model, 3, seed=i), "pad", 0, size)
        raws.append({**batch, "num_tokens": torch.tensor(int((batch["sample_ids"] > 0).sum()))})
    model.to(META)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=META)
    trainer = Trainer(stage, tmp_path, ctx, model, tokenizer, lambda state: [], total_steps=2)
    syncs: list[torch.Tensor | None] = []

    def world_of_one_sync(host, carried):  # what step_sync returns in a world of one, without reading META
        syncs.append(carried)
        return list(host) + [0.0] * (0 if carried is None else carried.numel())

    monkeypatch.setattr(trainer_module, "step_sync", world_of_one_sync)
    engine, batches = MetaEngine(model), iter(raws)
    first = trainer.open_step(engine, batches, step=0)
    carried = trainer.run_step(engine, first, step=0)  # on META: any host read in it would raise
    assert syncs == [None] and carried.device == META and carried.shape == (2,)
    second = trainer.open_step(engine, batches, step=1, carried=carried)
    assert len(syncs) == 2 and syncs[1] is carried and len(second.previous) == 2
    n = sum(len(supervised_index(r["labels"], r["sample_ids"])) for r in raws[:2])
    assert first.label_tokens == n and first.samples == 6 and first.n_micro == 2
