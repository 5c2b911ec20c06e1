"""FSDPEngine in a gloo world of one, in process: updates against plain AdamW, frozen groups, non-finite
steps, state round trips, and the blank-image row that keeps a sharded vision tower in step."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from train_fixtures import free_port

from vlmtrain.config.load import shipped_stage_path, stage_config_from_dict
from vlmtrain.config.schema import StageConfig
from vlmtrain.data.process import IGNORE_INDEX
from vlmtrain.dist import DistContext
from vlmtrain.models.freeze import apply_trainability
from vlmtrain.models.loss import count_supervised
from vlmtrain.models.vlm import VisionLanguageModel
from vlmtrain.train.engines.base import with_blank_image
from vlmtrain.train.engines.fsdp import FSDPEngine
from vlmtrain.train.optim import build_param_groups, make_optimizer, make_scheduler

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module", autouse=True)
def world_of_one() -> Iterator[None]:
    """A gloo process group of one rank for this module (FSDP needs one even on a single process)."""
    if dist.is_initialized():
        yield
        return
    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def stage_config(
    stage: int, model_cfg: Any, optim: dict[str, Any] | None = None, **train: Any
) -> StageConfig:
    """A shipped stage with the tiny model, a global batch of 4 in micro-batches of 2 (2 accumulation steps)."""
    cfg = json.loads(shipped_stage_path(stage).read_text())
    cfg["init_from"] = None
    cfg["model"] = {
        "vision": None,
        "vision_config": model_cfg.vision_config,
        "language": None,
        "language_config": model_cfg.language_config,
    }
    cfg["batch"] = {"global_batch_size": 4, "micro_batch_size": 2}
    cfg["optim"].update(warmup_ratio=0.0, **(optim or {}))
    cfg["train"].update(max_steps=4, **train)
    return stage_config_from_dict(cfg)


def build(stage: StageConfig, tokenizer: Any, model_cfg: Any, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    model = VisionLanguageModel.from_config(model_cfg, tokenizer)
    apply_trainability(model, stage.modules)
    return model.train()


def make_engine(stage: StageConfig, model: VisionLanguageModel, total_steps: int = 4) -> FSDPEngine:
    specs = build_param_groups(model, model.module_groups(), stage)
    return FSDPEngine(model, stage, specs, total_steps, CPU)


def sample_batch(
    model: VisionLanguageModel, gen: torch.Generator, images: bool = True
) -> dict[str, torch.Tensor]:
    """Two padded rows: an image prefix (if `images`), then text whose first two tokens are unsupervised."""
    p = model.num_image_tokens if images else 0
    lengths = [p + 9, p + 6]
    width = max(lengths)
    vocab = model.language.get_input_embeddings().num_embeddings
    batch = {
        "input_ids": torch.zeros(2, width, dtype=torch.long),
        "labels": torch.full((2, width), IGNORE_INDEX),
        "image_flags": torch.zeros(2, width, dtype=torch.bool),
        "sample_ids": torch.zeros(2, width, dtype=torch.long),
        "position_ids": torch.zeros(2, width, dtype=torch.long),
    }
    for r, n in enumerate(lengths):
        text = torch.randint(10, vocab - 10, (n - p,), generator=gen)
        batch["input_ids"][r, :n] = torch.cat([torch.full((p,), model.image_token_id), text])
        batch["labels"][r, p + 2 : n] = text[2:]
        batch["image_flags"][r, :p] = True
        batch["sample_ids"][r, :n] = 1
        batch["position_ids"][r, :n] = torch.arange(n)
    size = model.vision.config.image_size
    batch["pixel_values"] = torch.randn(2 if images else 0, 3, size, size, generator=gen)
    return batch


def batches(model: VisionLanguageModel, n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [sample_batch(model, gen) for _ in range(n)]


def window_tokens(micro: list[dict[str, torch.Tensor]], accum: int) -> list[int]:
    """Per micro-batch, the supervised tokens of its accumulation window (the token-weighted loss's divisor)."""
    counts = [count_supervised(b["labels"], b["sample_ids"]) for b in micro]
    return [sum(counts[i - i % accum : i - i % accum + accum]) for i in range(len(micro))]


def run_engine(engine: FSDPEngine, micro: list[dict[str, torch.Tensor]], mode: str) -> list[Any]:
    results = []
    for batch, n in zip(micro, window_tokens(micro, engine.accumulation_steps), strict=True):
        engine.backward(engine.forward(batch, mode).loss_sum, n)
        results.append(engine.step())
    return results


def reference_steps(
    model: VisionLanguageModel, stage: StageConfig, micro: list[dict[str, torch.Tensor]], total_steps: int
) -> list[float]:
    """What the engine should do, written out with plain PyTorch: token-mean gradient, clip, AdamW, schedule."""
    specs = build_param_groups(model, model.module_groups(), stage)
    optimizer = make_optimizer(specs, stage.optim)
    scheduler = make_scheduler(optimizer, specs, total_steps, stage.optim)
    params = [p for s in specs for p in s.params]
    accum = stage.batch.accumulation_steps(1)
    norms = []
    for i, (batch, n) in enumerate(zip(micro, window_tokens(micro, accum), strict=True)):
        (model(**batch, mask_mode=stage.mask.mode).loss_sum / n).backward()
        if (i + 1) % accum == 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, stage.optim.grad_clip)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return norms


@pytest.mark.slow
def test_fp32_updates_equal_plain_adamw(tokenizer, tiny_model_config):
    # Stage 2 trains every group with its own LR; a small clip makes clipping engage on every step.
    stage = stage_config(2, tiny_model_config, optim={"grad_clip": 0.05}, precision="fp32")
    model = build(stage, tokenizer, tiny_model_config)
    reference = copy.deepcopy(model)
    micro = batches(model, 4)
    engine = make_engine(stage, model)
    results = run_engine(engine, micro, stage.mask.mode)
    norms = reference_steps(reference, stage, micro, total_steps=4)

    assert [r.boundary for r in results] == [False, True, False, True]
    assert all(not r.skipped for r in results if r.boundary)
    got_norms = [r.grad_norm for r in results if r.boundary]
    assert got_norms == pytest.approx(norms, rel=1e-5)
    assert min(norms) > 0.05, "the clip must engage for this test to check clipping"
    state = engine.gather_state()
    expected = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    assert state.params.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(state.params[name], value, rtol=1e-5, atol=1e-7, msg=name)
    assert state.optimizer_steps == 2 and state.scheduler_steps == 2
    ref_lrs = {g: stage.modules[g.split(".")[0]].lr for g in engine.group_lrs()}
    assert engine.group_lrs().keys() == ref_lrs.keys()


def test_bf16_layout_frozen_replicated_trainable_sharded_fp32(tokenizer, tiny_model_config):
    stage = stage_config(0, tiny_model_config)  # projector only
    model = build(stage, tokenizer, tiny_model_config)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    engine = make_engine(stage, model)
    in_optimizer = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    for name, p in engine.module.named_parameters():
        if name.startswith("projector."):
            assert isinstance(p, DTensor) and p.dtype == torch.float32, name  # sharded fp32 master
            assert id(p) in in_optimizer, name
        else:
            assert not isinstance(p, DTensor) and p.dtype == torch.bfloat16, name  # replicated compute copy
            assert id(p) not in in_optimizer and not p.requires_grad, name
    run_engine(engine, batches(model, 2), stage.mask.mode)
    for name, p in engine.module.named_parameters():
        if name in frozen_before:
            assert p.grad is None, name
            torch.testing.assert_close(p, frozen_before[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)
    assert set(engine.group_lrs()) == {"projector", "projector.no_decay"}


def test_nonfinite_window_is_skipped_on_optimizer_and_schedule(tokenizer, tiny_model_config):
    stage = stage_config(2, tiny_model_config)
    model = build(stage, tokenizer, tiny_model_config)
    engine = make_engine(stage, model)
    micro = batches(model, 6)
    before = engine.gather_state()
    lrs = engine.group_lrs()
    first = engine.forward(micro[0], stage.mask.mode).loss_sum
    engine.backward(first * float("nan"), 10)  # one bad micro-batch poisons the window
    assert not engine.step().boundary
    run = run_engine(engine, micro[1:2], stage.mask.mode)[0]
    assert run.boundary and run.skipped and run.grad_norm is None
    # The skip was decided on the device (no host read); the trainer tells the engine once it has read the
    # norm, and the host-side counters go back.
    engine.settle(run.skipped)
    after = engine.gather_state()
    for name in before.params:
        assert torch.equal(before.params[name], after.params[name]), name
    assert engine.scheduler.last_epoch == 0 and engine.group_lrs() == lrs
    # AdamW's state exists now, as it is before any step: step 0, zero moments (what a fresh state holds).
    assert after.optimizer_steps == 0 and all(p.grad is None for p in engine.module.parameters())
    for state in engine.optimizer.state.values():
        assert float(state["step"]) == 0
        assert not state["exp_avg"].to_local().any() and not state["exp_avg_sq"].to_local().any()
    good = run_engine(engine, micro[2:4], stage.mask.mode)[-1]
    assert good.boundary and not good.skipped and good.grad_norm > 0
    engine.settle(good.skipped)
    applied = engine.gather_state()
    assert applied.optimizer_steps == 1 and engine.scheduler.last_epoch == 1
    # A skip after an applied step: weights and both moments bitwise as they were, the counts wound back.
    lrs = engine.group_lrs()
    engine.backward(engine.forward(micro[4], stage.mask.mode).loss_sum * float("inf"), 10)
    assert not engine.step().boundary
    bad = run_engine(engine, micro[5:6], stage.mask.mode)[0]
    engine.settle(bad.skipped)
    assert bad.skipped and engine.scheduler.last_epoch == 1 and engine.group_lrs() == lrs
    again = engine.gather_state()
    assert again.optimizer_steps == 1
    for field in ("params", "exp_avg", "exp_avg_sq"):
        for name, value in getattr(applied, field).items():
            assert torch.equal(getattr(again, field)[name], value), (field, name)


@pytest.mark.slow
def test_state_round_trip_then_identical_next_step(tokenizer, tiny_model_config):
    stage = stage_config(2, tiny_model_config)
    model = build(stage, tokenizer, tiny_model_config)
    micro = batches(model, 6)
    engine = make_engine(stage, model)
    run_engine(engine, micro[:4], stage.mask.mode)
    saved = engine.gather_state()
    assert saved.optimizer_steps == 2 and saved.exp_avg.keys() == saved.params.keys()

    other = make_engine(stage, build(stage, tokenizer, tiny_model_config, seed=7))  # different weights
    other.load_state(saved)
    reloaded = other.gather_state()
    for field in ("params", "exp_avg", "exp_avg_sq"):
        for name, value in getattr(saved, field).items():
            assert torch.equal(getattr(reloaded, field)[name], value), (field, name)
    assert (reloaded.optimizer_steps, reloaded.scheduler_steps) == (2, 2)
    assert other.group_lrs() == engine.group_lrs()

    a = run_engine(engine, micro[4:], stage.mask.mode)[-1]
    b = run_engine(other, micro[4:], stage.mask.mode)[-1]
    assert a.grad_norm == b.grad_norm
    next_a, next_b = engine.gather_state(), other.gather_state()
    for name in next_a.params:
        assert torch.equal(next_a.params[name], next_b.params[name]), name
        assert not torch.equal(next_a.params[name], saved.params[name]) or "norm" in name or "bias" in name


@pytest.mark.parametrize("fmt", ["sharded", "gathered"])
def test_checkpoint_round_trip_equals_gathered_state(tmp_path, tokenizer, tiny_model_config, fmt):
    """Save (sharded: the rank file of a world of one; gathered: the format of older checkpoints) and
    `load_pieces` into an engine with other weights: the files hold FSDP's own full state dict, and the
    reloaded engine gathers it bitwise."""
    from vlmtrain.train import checkpoint as ckpt
    from vlmtrain.train.shards import KINDS

    stage = stage_config(0, tiny_model_config)
    engine = make_engine(stage, build(stage, tokenizer, tiny_model_config))
    run_engine(engine, batches(engine.module, 2), stage.mask.mode)
    saved = engine.gather_state()  # the reference: torch.distributed.checkpoint's full state dict
    path = ckpt.CheckpointWriter(tmp_path, CPU, keep=1, fmt=fmt).save(1, engine, {"step": 1})
    loaded = ckpt.load_checkpoint(path, CPU)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if fmt == "sharded":
        assert files == ["rank-00000-of-00001.safetensors", "rng-rank00000.safetensors"]
    else:
        assert files == ["model.safetensors", "optimizer.safetensors", "rng-rank00000.safetensors"]
    expected = dict(zip(KINDS, (saved.params, saved.exp_avg, saved.exp_avg_sq), strict=True))
    for kind, tensors in expected.items():
        for name, value in tensors.items():
            assert torch.equal(loaded.state.full(kind, name), value), (kind, name)

    other = make_engine(stage, build(stage, tokenizer, tiny_model_config, seed=7))
    other.load_pieces(loaded.state, loaded.optimizer_steps, loaded.scheduler_steps)
    reloaded = other.gather_state()
    for field in ("params", "exp_avg", "exp_avg_sq"):
        for name, value in getattr(saved, field).items():
            assert torch.equal(getattr(reloaded, field)[name], value), (field, name)
    assert (reloaded.optimizer_steps, reloaded.scheduler_steps) == (1, 1)
    assert other.group_lrs() == engine.group_lrs()


def test_load_rejects_state_without_moments(tokenizer, tiny_model_config):
    stage = stage_config(0, tiny_model_config)
    engine = make_engine(stage, build(stage, tokenizer, tiny_model_config))
    run_engine(engine, batches(engine.module, 2), stage.mask.mode)
    state = engine.gather_state()
    state.exp_avg.pop("projector.linear_1.weight")
    with pytest.raises(
        KeyError, match=r"lacks AdamW moments of 1 parameter\(s\), e.g. \['projector.linear_1.weight'\]"
    ):
        make_engine(stage, build(stage, tokenizer, tiny_model_config)).load_state(state)


def test_blank_image_row_changes_neither_loss_nor_gradients(tokenizer, tiny_model_config):
    stage = stage_config(3, tiny_model_config, precision="fp32")  # every group trains
    model = build(stage, tokenizer, tiny_model_config)
    text_only = sample_batch(model, torch.Generator().manual_seed(3), images=False)
    padded = with_blank_image(
        text_only, model.image_token_id, model.num_image_tokens, model.vision.config.image_size
    )
    assert padded["input_ids"].shape == (3, max(text_only["input_ids"].shape[1], model.num_image_tokens))
    assert int(padded["image_flags"].sum()) == model.num_image_tokens

    def loss_and_grads(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(**batch, mask_mode=stage.mask.mode)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads

    loss_a, grads_a = loss_and_grads(text_only)  # the image path does not run: no gradient there at all
    loss_b, grads_b = loss_and_grads(padded)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    image_path = {n for n in grads_b if n.startswith(("vision.", "projector."))}
    assert image_path and not image_path & grads_a.keys()
    assert grads_b.keys() == grads_a.keys() | image_path
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name in image_path:
        assert not grads_b[name].any(), f"{name}: the blank row must contribute exactly zero gradient"


def test_text_only_micro_batch_trains_with_sharded_vision(tokenizer, tiny_model_config):
    # Summing sharded parameters (the model's own fallback) would fail; the engine adds a blank image.
    stage = stage_config(3, tiny_model_config)
    model = build(stage, tokenizer, tiny_model_config)
    engine = make_engine(stage, model)
    gen = torch.Generator().manual_seed(5)
    micro = [sample_batch(model, gen, images=False), sample_batch(model, gen)]
    result = run_engine(engine, micro, stage.mask.mode)[-1]
    assert result.boundary and not result.skipped and result.grad_norm > 0
