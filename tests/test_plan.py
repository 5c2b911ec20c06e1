"""`vlmtrain plan` (vlmtrain/train/plan.py) against hand counts for the shipped presets.

The hand counts are independent of the FLOP model: steps from the docs' figures (floor(samples / 128)), tokens
from the stated per-sample estimate, FLOPs from the weight sizes of every nn.Linear / Conv2d of the (meta-device)
model times the tokens that go through it, memory from the precision policy's bytes per parameter.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from vlmtrain.cli import app
from vlmtrain.config.load import load_stage_config
from vlmtrain.train.plan import (
    PAPER_DATASETS,
    meta_model,
    parse_text_tokens,
    plan_stages,
    plan_warnings,
    words_to_tokens,
)

PRESETS = [load_stage_config(stage=i) for i in range(4)]  # micro_batch_size: auto
# The hand counts below are for micro-batches of 8 (the 8 x 16 reference on one GPU): the presets pinned to it.
STAGES = [dataclasses.replace(s, batch=dataclasses.replace(s.batch, micro_batch_size=8)) for s in PRESETS]
DOCS_STEPS = {"stage0": 924, "stage1": 924, "stage2": 4360, "stage3": 6088}  # docs/training.md, The recipe
P = 256  # image tokens of so400m at 224 px, patch 14


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """The four presets on one A800 at 40% MFU, from a folder without shards (the paper's sizes)."""
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("no_shards"))
    try:
        return plan_stages(STAGES, 1, "A800", 0.4)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def vlm():
    return meta_model(STAGES[0].model)


def test_samples_steps_and_tokens_are_the_hand_count(plans):
    result, gpu, peak = plans
    assert (gpu, peak) == ("A800", 312.0)
    for plan, stage in zip(result, STAGES, strict=True):
        data = PAPER_DATASETS[stage.data.dataset]
        assert (plan.samples, plan.samples_source) == (data.samples, "paper")
        assert plan.steps == DOCS_STEPS[stage.name] == math.floor(data.samples * 1 / 128)
        assert plan.accumulation == 16  # 128 / (8 x 1 GPU)
    # per sample: 256 image tokens + system (20) + image newline (1) + 9 per turn + words x 1.3 (half up)
    coco = 256 + 20 + 1 + 9 + 7 + (94 + 1)  # prompt `Describe the image in detail.`: 5 words; caption 72
    blip = 256 + 20 + 1 + 9 + 7 + (91 + 1)  # caption 70 words
    nxt = 256 + 20 + 1 + 27 + 44 + (40 + 3)  # 3 turns, 34 question and 31 answer words
    assert [p.sample_tokens for p in result] == [coco, coco, blip, nxt]
    for plan in result:
        assert plan.tokens == plan.steps * 128 * plan.sample_tokens
    assert words_to_tokens(5) == 7 and words_to_tokens(72) == 94


def _linear_params(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def hand_flops(vlm, stage, sample_tokens: int, supervised: int, samples: int) -> int:
    """2 x weight size x tokens per matmul weight, x (1 + input grad + weight grad), plus the attention pairs."""
    trains = {g: stage.modules[g].trainable for g in ("vision", "projector", "language")}
    vis, proj, lm = vlm.vision, vlm.projector, vlm.language
    v_cfg, l_cfg = vis.config, lm.config
    # vision: encoder linears on 256 tokens; patch conv on 256 patches; every layer forward, backward if trained
    vis_w = _linear_params(vis.encoder)
    patch_w = vis.embeddings.patch_embedding.weight.numel()
    vis_pairs = 4 * v_cfg.hidden_size * P * P * v_cfg.num_hidden_layers
    vision = 2 * vis_w * P + 2 * patch_w * P + vis_pairs
    if trains["vision"]:
        vision += 2 * (2 * vis_w * P + vis_pairs) + 2 * patch_w * P  # pixels need no gradient
    w1, w2 = proj.linear_1.weight.numel(), proj.linear_2.weight.numel()
    projector = 2 * (w1 + w2) * P
    projector += 2 * (w1 + w2) * P * trains["projector"] + 2 * w2 * P + 2 * w1 * P * trains["vision"]
    # language: decoder linears on every token; head on supervised ones; prefix mask pairs
    lm_w = _linear_params(lm.model)
    text = sample_tokens - P
    pairs = {"bidirectional": sample_tokens**2, "prefix": P * sample_tokens + text * (text + 1) // 2}
    lm_pairs = 4 * l_cfg.hidden_size * pairs[stage.mask.mode] * l_cfg.num_hidden_layers
    head_w = lm.lm_head.weight.numel()
    passes = 2 + trains["language"]  # forward + input grads (+ weight grads)
    language = passes * 2 * lm_w * sample_tokens + 3 * lm_pairs + passes * 2 * head_w * supervised
    return (vision + projector + language) * samples


def test_flops_are_the_hand_count_from_weight_sizes(plans, vlm):
    for plan, stage in zip(plans[0], STAGES, strict=True):
        expected = hand_flops(vlm, stage, plan.sample_tokens, plan.supervised_per_sample, plan.steps * 128)
        assert plan.flops.model == expected, stage.name
        assert plan.gpu_hours == pytest.approx(expected / (0.4 * 312e12) / 3600)
        assert plan.wall_hours == plan.gpu_hours


def test_six_pt_brackets_the_model_flops(plans):
    """6·P·T with every parameter overstates a frozen stage (stages 0-1: the LM and tower get no weight
    gradients; 0.3-0.5x), 6·P·T with the trainable ones (the projector) understates it by 100x+; with everything
    training (stages 2-3) the model is 0.6-1.0x 6·P·T: the tower sees only the 256 image tokens, the embedding
    matrix costs no matmul and the head runs at the supervised positions only."""
    for plan in plans[0]:
        ratio = plan.flops.model / plan.six_pt_all
        if plan.name in ("stage0", "stage1"):
            assert plan.trainable == 1_836_800  # the projector (docs/architecture.md)
            assert 0.3 < ratio < 0.5
            assert plan.flops.model > 100 * plan.six_pt_trainable
        else:
            assert 0.6 < ratio < 1.0
        assert plan.params == 412_442_352 + 1_836_800 + 494_032_768  # docs/architecture.md


def test_memory_is_the_precision_policy_per_gpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one, _, _ = plan_stages(STAGES, 1, "H100", 0.4)
    eight, _, _ = plan_stages(STAGES, 8, "H100", 0.4)
    for a, b in zip(one, eight, strict=True):
        assert a.memory.weights == b.memory.weights == 2 * a.params  # bf16 copies everywhere
        assert a.memory.gradients == 4 * a.trainable and b.memory.gradients == 4 * a.trainable // 8
        assert a.memory.optimizer == 12 * a.trainable and b.memory.optimizer == 12 * a.trainable // 8
        assert a.memory.activations == b.memory.activations
    # stage 0 activations by hand: `auto` recomputes nothing there (only the projector trains), so the LM keeps
    # every layer's full set on 8 rows x 768; the chunked loss adds the unit hidden gradient of the supervised
    # share of those tokens and one chunk's fp32 logits plus their bf16 cast; the frozen tower keeps nothing
    tokens = 8 * 768
    per_token_layer = 4 * 896 + 896 + 2 * 128 + 896 + 4 * 4864
    lm = 24 * per_token_layer * 2 * tokens
    supervised = int(tokens * (95 / 388))
    assert one[0].memory.activations == lm + supervised * 896 * 2 + 256 * 2**20 * 3 // 2
    # stage 2 trains the head: its fp32 weight-gradient accumulator comes on top
    assert one[2].memory.activations > 151_936 * 896 * 4


def test_samples_come_from_the_manifest_when_shards_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "shards" / "coco_recap118k"
    folder.mkdir(parents=True)
    from vlmtrain.data.shard import FORMAT_VERSION

    shards = [
        {"name": f"train-{i:05d}.tar", "samples": 700, "bytes": 1, "sha256": "0" * 64} for i in range(2)
    ]
    manifest = {
        "format_version": FORMAT_VERSION,
        "samples": 1400,
        "skipped": {},
        "shards": shards,
        "source": {},
        "options": {},
        "vlmtrain_version": "test",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    plans, _, _ = plan_stages(STAGES[:1], 1, "A800", 0.4)
    assert (plans[0].samples, plans[0].samples_source, plans[0].steps) == (1400, "manifest", 10)


def test_text_token_override_and_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_text_tokens(["3=100,300", "stage0=10,20"]) == {"stage3": (100, 300), "stage0": (10, 20)}
    plans, _, _ = plan_stages(STAGES, 1, "A800", 0.4, parse_text_tokens(["3=100,300"]))
    assert plans[3].sample_tokens == 256 + 400 and plans[3].supervised_per_sample == 300
    with pytest.raises(ValueError, match="STAGE=PROMPT,ANSWER"):
        parse_text_tokens(["stage3=100"])
    with pytest.raises(ValueError, match="not in the table"):
        plan_stages(STAGES, 1, "Voodoo 3", 0.4)
    assert plan_stages(STAGES[:1], 1, "Voodoo 3", 0.4, peak_tflops=100.0)[2] == 100.0
    with pytest.raises(ValueError, match="not a whole number of samples per rank"):
        plan_stages(STAGES, 3, "A800", 0.4)  # 128 / 3 samples per GPU
    with pytest.raises(ValueError, match="divisible by micro_batch_size x world size = 256"):
        plan_stages(STAGES, 32, "A800", 0.4)  # 4 samples per GPU: a pinned micro-batch of 8 cannot be


def test_cli_help_and_a_run_without_shards(tmp_path, monkeypatch):
    runner = CliRunner()
    assert runner.invoke(app, ["plan", "--help"]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "220")
    result = runner.invoke(app, ["plan", "--stage", "0-3", "--gpus", "8", "--gpu", "H100"])
    assert result.exit_code == 0, result.output
    for text in ("8 x H100 SXM", "118,287 (paper)", "4,360", "6,088", "memory per GPU"):
        assert text in result.output
    bad = runner.invoke(app, ["plan", "--gpu", "Voodoo 3"])
    assert bad.exit_code == 1 and "not in the table" in bad.output


def test_every_preset_plans_on_64_gpus_with_auto_and_the_communication_is_the_hand_count(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert all(s.batch.micro_batch_size == "auto" for s in PRESETS)
    plans, _, _ = plan_stages(PRESETS, 64, "H100", 0.4, interconnect="ib-ndr")
    vlm = meta_model(PRESETS[2].model)
    everything = sum(p.numel() for p in vlm.parameters())
    for plan in plans:
        # 128 samples over 64 GPUs: 2 each, one micro-batch of 2 (no accumulation)
        assert (plan.samples_per_gpu, plan.micro_batch, plan.accumulation) == (2, 2, 1)
        c = plan.communication
        # hand count: fp32 gradients of every trainable parameter reduce-scattered once per micro-batch, bf16
        # parameters all-gathered once; a ring sends 63/64 of each; one 400 Gb/s NDR adapter (50 GB/s) per GPU
        assert c.reduce_bytes == 4 * plan.trainable * 1 and c.gather_bytes == 2 * plan.trainable
        assert c.wire_bytes == (6 * plan.trainable) * 63 // 64
        assert c.seconds == pytest.approx(c.wire_bytes / 50e9)
    # stages 2-3 train all 908M parameters (less the tower's unused ones): 3.6 GB reduced, 1.8 GB gathered
    assert plans[2].trainable > 0.99 * everything
    assert plans[2].communication.reduce_bytes / 1e9 == pytest.approx(3.63, abs=0.01)
    assert plans[2].communication.gather_bytes / 1e9 == pytest.approx(1.82, abs=0.01)
    # at 2 samples per GPU a step is a few ms of compute against ~0.1 s of traffic: bound by communication
    assert plans[2].communication_bound and plans[3].communication_bound
    assert not plans[0].communication_bound  # stage 0 trains the projector only (1.8M parameters)
    warnings = plan_warnings(plans)
    assert [w.split(":")[0] for w in warnings] == ["stage2", "stage3"]
    assert "bound by communication" in warnings[0] and "InfiniBand NDR" in warnings[0]
    # within one node the link is NVLink whatever --interconnect says; on one GPU nothing is sent
    eight, _, _ = plan_stages(PRESETS[2:3], 8, "H100", 0.4, interconnect="100gbe")
    assert eight[0].communication.link == "NVLink 4"
    one, _, _ = plan_stages(PRESETS[2:3], 1, "H100", 0.4)
    assert one[0].communication.wire_bytes == 0 and not one[0].communication_bound


def test_auto_picks_the_largest_divisor_that_fits_the_memory_estimate(tmp_path, monkeypatch):
    from vlmtrain.train.batching import AUTO_MEMORY_FRACTION
    from vlmtrain.train.plan import memory_per_gpu, stage_shapes

    monkeypatch.chdir(tmp_path)
    stage = PRESETS[3]
    shapes = stage_shapes(stage, stage.model)
    for gib in (24, 32, 40, 80):
        plans, _, _ = plan_stages([stage], 1, "H100", 0.4, memory_gib=gib)
        micro = plans[0].micro_batch
        budget = gib * 2**30 * AUTO_MEMORY_FRACTION
        # brute force over every micro-batch size that divides 128: the largest whose estimate fits
        fitting = [
            m for m in range(1, 129) if 128 % m == 0 and memory_per_gpu(stage, shapes, 1, m).total <= budget
        ]
        assert micro == max(fitting), gib
    with pytest.raises(ValueError, match="even 1 sample per micro-batch needs"):
        plan_stages([stage], 1, "H100", 0.4, memory_gib=16)


def test_global_batch_smaller_than_the_world_names_the_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as caught:
        plan_stages(PRESETS[:1], 256, "H100", 0.4)
    message = str(caught.value)
    assert "fewer than one sample per rank (128 samples over 256 ranks)" in message
    assert "128 GPUs" in message and "e.g. 256" in message and "optim.lr_scaling" in message


def test_lr_scaling_rules():
    from vlmtrain.train.batching import describe_batch, lr_scale

    base = dataclasses.replace(PRESETS[2], batch=dataclasses.replace(PRESETS[2].batch, global_batch_size=512))
    for rule, factor in (("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)):
        stage = dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr_scaling=rule))
        assert lr_scale(stage) == factor
    stage = dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr_scaling="linear"))
    pinned = dataclasses.replace(stage, batch=dataclasses.replace(stage.batch, micro_batch_size=4))
    assert describe_batch(pinned, 64) == (
        "batch: 512 samples per step = 64 rank(s) x 8 = micro-batch 4 x 2 accumulation; learning rates x4 "
        "(linear: 512 / 128)"
    )


def test_training_resolves_auto_as_the_plan_does(tmp_path, monkeypatch):
    """run_stage's memory bound (train.device_memory_gib) gives the plan's micro-batch; the LRs follow lr_scaling."""
    import torch
    from torch import nn

    from vlmtrain.dist import DistContext
    from vlmtrain.train.batching import resolve_micro_batch
    from vlmtrain.train.optim import build_param_groups
    from vlmtrain.train.run import _memory_bound

    monkeypatch.chdir(tmp_path)
    stage = dataclasses.replace(
        PRESETS[3], train=dataclasses.replace(PRESETS[3].train, device_memory_gib=24.0)
    )
    ctx = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    trained = resolve_micro_batch(stage, 2, *_memory_bound(stage, ctx))
    planned, _, _ = plan_stages([stage], 2, "H100", 0.4, memory_gib=24.0)
    assert trained.batch.micro_batch_size == planned[0].micro_batch
    no_bound = dataclasses.replace(stage, train=dataclasses.replace(stage.train, device_memory_gib=None))
    assert resolve_micro_batch(no_bound, 2, *_memory_bound(no_bound, ctx)).batch.micro_batch_size == 64  # CPU

    model = nn.ModuleDict({"projector": nn.Linear(2, 2)})
    one = load_stage_config(stage=0, overrides=["batch.global_batch_size=512", "optim.lr_scaling=sqrt"])
    (spec, *_) = build_param_groups(model, {"projector": model["projector"]}, one)
    assert spec.lr == pytest.approx(one.modules["projector"].lr * 2.0)


# ---- the towers of every family at real size ---------------------------------------------------------------
def vit_layer(h: int, i: int, layer_scale: bool) -> int:
    """One pre-norm ViT layer: q, k, v, o with biases, fc1, fc2, two LayerNorms (+ two layer scales)."""
    return 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h + (2 * h if layer_scale else 0)


# id: (patches the LM sees, leading tokens dropped, hand-counted tower parameters, unused parameters)
REAL_TOWERS = {
    # SigLIP: patch conv with bias, 256 position embeddings, 27 layers, post_layernorm (unused)
    "google/siglip2-so400m-patch14-224": (
        256,
        0,
        3 * 14 * 14 * 1152 + 1152 + 256 * 1152 + 27 * vit_layer(1152, 4304, False) + 2 * 1152,
        2 * 1152,
    ),
    # CLIP: class embedding, conv without bias, 577 positions, pre/post LayerNorm; -2: the last layer unused
    "openai/clip-vit-large-patch14-336": (
        576,
        1,
        1024 + 3 * 14 * 14 * 1024 + 577 * 1024 + 4 * 1024 + 24 * vit_layer(1024, 4096, False),
        2 * 1024 + vit_layer(1024, 4096, False),
    ),
    # DINOv2: CLS and mask token, conv with bias, 1 + 37^2 positions (518 px config, interpolated to 224 px
    # crops), final LayerNorm; unused: the LayerNorm and the mask token
    "facebook/dinov2-large": (
        256,
        1,
        2 * 1024 + 3 * 14 * 14 * 1024 + 1024 + 1370 * 1024 + 24 * vit_layer(1024, 4096, True) + 2 * 1024,
        3 * 1024,
    ),
    "facebook/dinov2-with-registers-large": (
        256,
        5,
        6 * 1024 + 3 * 14 * 14 * 1024 + 1024 + 1370 * 1024 + 24 * vit_layer(1024, 4096, True) + 2 * 1024,
        3 * 1024,
    ),
}


@pytest.mark.parametrize("vision", list(REAL_TOWERS))
@pytest.mark.parametrize("k", [1, 2])
def test_real_towers_of_every_family_are_the_hand_count(vision, k):
    import dataclasses

    from vlmtrain.train.flops import ModelShape

    patches, skip, params, unused = REAL_TOWERS[vision]
    model = dataclasses.replace(STAGES[2].model, vision=vision, pixel_shuffle=k)
    vlm = meta_model(model)
    shape = ModelShape.from_model(vlm)
    assert (vlm.num_image_tokens, shape.vision_tokens) == (patches // (k * k), patches + skip)
    assert sum(p.numel() for p in vlm.vision.parameters()) == params
    assert sum(p.numel() for p in vlm.unused_parameters()) == unused
    assert vlm.projector.linear_1.in_features == vlm.vision.config.hidden_size * k * k
    stage = dataclasses.replace(STAGES[2], model=model, init_from=None)  # the model block, not stage 1's
    plan = plan_stages([stage], 8, "H100", 0.4)[0][0]
    assert plan.sample_tokens == patches // (k * k) + sum(PAPER_DATASETS[stage.data.dataset].text_tokens())
