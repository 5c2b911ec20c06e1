"""The FLOP model (vlmtrain/train/flops.py) against torch.utils.flop_counter.FlopCounterMode on the tiny VLM.

What is compared, and why it is exact:
- **Weight matmuls** (every `aten.mm`, `aten.addmm`, `aten.bmm`, `aten.convolution` and `aten.convolution_backward` the forward
  and backward dispatch): FlopCounterMode's own formulas, equal to the model's non-attention parts to the FLOP.
  Autograd skips the gradients nothing needs (frozen weights, pixels), so the reference sees exactly what runs.
- **Attention**: FlopCounterMode has no formula for the CPU SDPA kernel (`_scaled_dot_product_flash_attention_
  for_cpu`), and its CUDA formulas count a masked SDPA as if dense. The reference here registers one that takes
  torch's own dense formula (`sdpa_flop_count`, `sdpa_backward_flop_count`) and scales it by the share of
  (query, key) entries the mask tensor *the kernel received* allows, so it counts the attended pairs of the
  actual mask. Backward drops torch's recompute of QK^T (a fused-kernel detail, not model FLOPs): the four
  gradient matmuls, twice the forward.
- **Padding** runs but is waste, so model FLOPs leave it out: a padded batch's model count equals the reference
  summed over its rows run alone, trimmed to their real tokens (every term is additive over rows).
- Qwen2's rotary embedding tables (an outer product written as a matmul) are subtracted from the reference:
  they are not model FLOPs (B x T x head_dim per forward).
- **Recompute** (gradient checkpointing) is in the reference too: it is compared with the hardware FLOPs.
The attended-pair formula itself is checked against a brute-force count of the dense boolean mask (masks.py).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import TINY_VISION
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, sdpa_backward_flop_count, sdpa_flop_count

from vlmtrain.data.process import IGNORE_INDEX
from vlmtrain.models.masks import attention_allowed, position_ids_from_sample_ids
from vlmtrain.train.flops import (
    PARTS,
    BatchLayout,
    ModelShape,
    StepFlopModel,
    StepSetup,
    attended_pairs,
    gpu_peak_tflops,
    micro_batch_flops,
    resolve_peak_tflops,
    throughput,
)

# bmm/baddbmm too: a linear on a non-contiguous 3D input (the projector's, on the tower's hidden state) runs as one
MATMUL_OPS = {
    "aten.mm",
    "aten.addmm",
    "aten.bmm",
    "aten.baddbmm",
    "aten.convolution",
    "aten.convolution_backward",
}
ATTENTION_OPS = {
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_flash_attention_for_cpu_backward",
}
MATMUL_PARTS = ("vision", "projector", "language", "head")
ATTENTION_PARTS = ("vision_attention", "language_attention")
TINY_DINO = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mlp_ratio": 2,
    "image_size": 32,
    "patch_size": 8,
}


# ---- the reference: FlopCounterMode with a mask-aware formula for the CPU SDPA kernel ---------------------
def _allowed_share(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[int, int]:
    """(allowed, total) (query, key) entries over batch x query heads, from the mask the kernel was given."""
    b, h, sq, _ = query.shape
    total = b * h * sq * key.shape[2]
    if attn_mask is None:
        return total, total
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
    allowed = allowed.expand(b, allowed.shape[1], sq, key.shape[2])
    return int(allowed.sum()) * (h // allowed.shape[1]), total


def _sdpa_forward(query, key, value, *args, attn_mask=None, out_val=None, **kwargs) -> int:
    dense = sdpa_flop_count(query.shape, key.shape, value.shape)
    allowed, total = _allowed_share(query, key, attn_mask)
    assert dense * allowed % total == 0
    return dense * allowed // total


def _sdpa_backward(grad_out, query, key, value, *args, attn_mask=None, out_val=None, **kwargs) -> int:
    b, h, sq, d = query.shape
    recompute = bmm_flop((b * h, sq, d), (b * h, d, key.shape[2]))  # scores recomputed by the fused kernel
    dense = sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape) - recompute
    allowed, total = _allowed_share(query, key, attn_mask)
    assert dense * allowed % total == 0
    return dense * allowed // total


_sdpa_forward._get_raw = True  # type: ignore[attr-defined]
_sdpa_backward._get_raw = True  # type: ignore[attr-defined]
CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
}

MODEL_KEYS = ("input_ids", "labels", "image_flags", "sample_ids", "position_ids", "pixel_values")


def reference(model, batch: dict[str, Any], mode: str, backward: bool) -> dict[str, int]:
    """FlopCounterMode's count per op of the model's forward (and backward of the summed token loss)."""
    inputs = {k: batch[k] for k in MODEL_KEYS}
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        if backward:
            model(**inputs, mask_mode=mode).loss_sum.backward()
        else:
            with torch.no_grad():
                model(**inputs, mask_mode=mode)
    per_module = counter.get_flop_counts()
    counts = {str(op): n for op, n in per_module["Global"].items()}
    # Qwen2's rotary embedding builds its cos/sin tables with an outer product of positions and frequencies
    # written as a matmul ([B, d/2, 1] @ [B, 1, T]): not a model FLOP, and (without grad) a bmm; left out.
    for name, ops in per_module.items():
        if name.endswith("rotary_emb"):
            for op, n in ops.items():
                counts[str(op)] -= n
    counts = {op: n for op, n in counts.items() if n}
    assert set(counts) <= MATMUL_OPS | ATTENTION_OPS, f"ops the comparison does not know: {set(counts)}"
    model.zero_grad(set_to_none=True)
    return counts


def split(counts: dict[str, int]) -> tuple[int, int]:
    return sum(counts.get(op, 0) for op in MATMUL_OPS), sum(counts.get(op, 0) for op in ATTENTION_OPS)


# ---- batches ----------------------------------------------------------------------------------------------
def make_batch(
    rows: list[list[tuple[int, bool]]], width: int, image_tokens: int, vocab: int, seed: int = 0
) -> dict[str, Any]:
    """Rows of samples `(text tokens, has image)` (image tokens first), right-padded to `width`.

    About two thirds of the text positions are supervised, chosen at random, so the head's count is not
    simply the text length.
    """
    gen = torch.Generator().manual_seed(seed)
    n_rows = len(rows)
    input_ids = torch.randint(5, vocab - 1, (n_rows, width), generator=gen)
    labels = torch.full((n_rows, width), IGNORE_INDEX)
    flags = torch.zeros((n_rows, width), dtype=torch.bool)
    sids = torch.zeros((n_rows, width), dtype=torch.long)
    images = 0
    for r, row in enumerate(rows):
        start = 0
        for k, (text, has_image) in enumerate(row, start=1):
            n_img = image_tokens if has_image else 0
            end = start + n_img + text
            assert end <= width
            sids[r, start:end] = k
            flags[r, start : start + n_img] = True
            supervised = torch.rand(text, generator=gen) < 0.66
            span = slice(start + n_img, end)
            labels[r, span] = torch.where(supervised, input_ids[r, span], IGNORE_INDEX)
            images += int(has_image)
            start = end
    return {
        "input_ids": input_ids,
        "labels": labels,
        "image_flags": flags,
        "sample_ids": sids,
        "position_ids": position_ids_from_sample_ids(sids),
        "pixel_values": torch.randn(images, 3, 32, 32, generator=gen),
    }


def trimmed_rows(batch: dict[str, Any], image_tokens: int) -> list[dict[str, Any]]:
    """Each row alone, cut after its last real token, with its own images."""
    out, first_image = [], 0
    for r in range(batch["sample_ids"].shape[0]):
        length = int((batch["sample_ids"][r] > 0).nonzero().max()) + 1
        n_images = int(batch["image_flags"][r].sum()) // image_tokens
        row = {k: batch[k][r : r + 1, :length] for k in MODEL_KEYS if k != "pixel_values"}
        row["pixel_values"] = batch["pixel_values"][first_image : first_image + n_images]
        first_image += n_images
        out.append(row)
    return out


# (text tokens, has image) per sample; tiny images are 16 tokens
PACKED_FULL = [
    [(8, True), (6, True), (14, False)],
    [(20, True), (8, False), (16, False)],
]  # rows of exactly 60
PADDED = [[(25, True)], [(7, True)], [(12, False)], [(3, True)]]
PACKED_PADDED = [[(9, True), (5, True)], [(30, True)], [(2, False), (4, True), (1, True)]]

STAGE_GROUPS = {
    "projector only (stages 0-1)": ("projector",),
    "everything (stages 2-3)": ("vision", "projector", "language"),
    "vision only": ("vision",),
    "language only": ("language",),
    "vision and language, projector frozen": ("vision", "language"),
}


def set_trainable(model, groups: tuple[str, ...]) -> None:
    for name, module in model.module_groups().items():
        module.requires_grad_(name in groups)
    for p in model.unused_parameters():
        p.requires_grad_(False)


# ---- attended pairs vs the dense mask ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bidirectional", "prefix", "causal"])
@pytest.mark.parametrize("rows", [PACKED_FULL, PADDED, PACKED_PADDED], ids=["packed", "padded", "packed+pad"])
def test_attended_pairs_equal_a_brute_force_count_of_the_mask(mode, rows):
    batch = make_batch(rows, 60, 16, 100)
    layout = BatchLayout.from_batch(batch)
    allowed = attention_allowed(mode, batch["sample_ids"], batch["image_flags"])  # [B, T, T]
    real_query = (batch["sample_ids"] > 0)[:, :, None]
    brute = int((allowed & real_query).sum())
    assert sum(attended_pairs(mode, n, i) for n, i in layout.samples) == brute


def test_layout_reads_samples_images_and_supervised_tokens_from_the_batch():
    batch = make_batch(PACKED_PADDED, 60, 16, 100)
    layout = BatchLayout.from_batch(batch)
    expected = sorted((text + 16 * img, 16 * img) for row in PACKED_PADDED for text, img in row)
    assert sorted(layout.samples) == expected
    assert layout.images == sum(img for row in PACKED_PADDED for _, img in row)
    # supervised: labels set at t+1 within the same sample, counted by hand
    sids, labels = batch["sample_ids"], batch["labels"]
    hand = sum(
        1
        for b in range(sids.shape[0])
        for t in range(sids.shape[1] - 1)
        if labels[b, t + 1] != IGNORE_INDEX and sids[b, t + 1] == sids[b, t] and sids[b, t] > 0
    )
    assert layout.supervised == hand


# ---- FLOP model vs FlopCounterMode --------------------------------------------------------------------
def _model_counts(model, batch, setup) -> tuple[Any, int, int]:
    flops = micro_batch_flops(ModelShape.from_model(model), setup, BatchLayout.from_batch(batch))
    return flops, flops.total(MATMUL_PARTS, "hardware"), flops.total(ATTENTION_PARTS, "hardware")


def test_forward_only_matches_flop_counter(tiny_model):
    batch = make_batch(PACKED_FULL, 60, tiny_model.num_image_tokens, tiny_model.language.config.vocab_size)
    set_trainable(tiny_model, ())
    setup = StepSetup.from_model(tiny_model, "prefix")
    flops, matmul, attention = _model_counts(tiny_model, batch, setup)
    ref_matmul, ref_attention = split(reference(tiny_model, batch, "prefix", backward=False))
    assert (matmul, attention) == (ref_matmul, ref_attention)
    assert flops.model == flops.total(PARTS, "forward")  # nothing trains: no backward


@pytest.mark.parametrize("groups", list(STAGE_GROUPS.values()), ids=list(STAGE_GROUPS))
@pytest.mark.parametrize("mode", ["bidirectional", "prefix", "causal"])
def test_forward_backward_matches_flop_counter_per_trainable_groups(tiny_model, groups, mode):
    tiny_model.train()
    batch = make_batch(PACKED_FULL, 60, tiny_model.num_image_tokens, tiny_model.language.config.vocab_size)
    set_trainable(tiny_model, groups)
    setup = StepSetup.from_model(tiny_model, mode)
    flops, matmul, attention = _model_counts(tiny_model, batch, setup)
    ref_matmul, ref_attention = split(reference(tiny_model, batch, mode, backward=True))
    assert matmul == ref_matmul
    assert attention == ref_attention
    assert flops.hardware == flops.model  # no checkpointing here


@pytest.mark.parametrize("rows", [PADDED, PACKED_PADDED], ids=["padded", "packed+pad"])
def test_padding_is_not_counted_the_rows_alone_are(tiny_model, rows):
    """Model FLOPs of a padded batch = the reference over its rows without padding; the padded run costs more."""
    tiny_model.train()
    p = tiny_model.num_image_tokens
    batch = make_batch(rows, 62, p, tiny_model.language.config.vocab_size)
    set_trainable(tiny_model, ("vision", "projector", "language"))
    setup = StepSetup.from_model(tiny_model, "prefix")
    _, matmul, attention = _model_counts(tiny_model, batch, setup)
    per_row = [split(reference(tiny_model, row, "prefix", backward=True)) for row in trimmed_rows(batch, p)]
    assert matmul == sum(m for m, _ in per_row)
    assert attention == sum(a for _, a in per_row)
    padded_matmul, _ = split(reference(tiny_model, batch, "prefix", backward=True))
    assert padded_matmul > matmul  # the padding really ran, and was left out


def test_unused_vision_layers_get_no_backward(tokenizer, tiny_model_config):
    """vision_feature_layer -2: the last tower layer runs forward only (its output feeds nothing)."""
    import dataclasses

    from vlmtrain.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(
        dataclasses.replace(tiny_model_config, vision_feature_layer=-2), tokenizer
    ).train()
    batch = make_batch(PACKED_FULL, 60, model.num_image_tokens, model.language.config.vocab_size)
    set_trainable(model, ("vision", "projector", "language"))
    setup = StepSetup.from_model(model, "prefix")
    shape = ModelShape.from_model(model)
    assert shape.vision_layers_used == shape.vision.layers - 1
    _, matmul, attention = _model_counts(model, batch, setup)
    assert (matmul, attention) == split(reference(model, batch, "prefix", backward=True))


# Tiny towers of every family (hidden 32, 2 layers, patch 8); DINOv2 with registers reads 48 px crops of a 32 px
# config (interpolated position embeddings: 36 patches + CLS + 2 registers through the tower).
FAMILY_TOWERS = {
    "siglip": ({"model_type": "siglip", **TINY_VISION}, None),
    "clip": ({"model_type": "clip", **TINY_VISION}, None),
    "dinov2": ({"model_type": "dinov2", **TINY_DINO}, None),
    "dinov2_with_registers": (
        {"model_type": "dinov2_with_registers", **TINY_DINO, "num_register_tokens": 2},
        (48, 56),
    ),
}


def family_model(tiny_model, family: str, k: int, layer: int | None = None):
    """A VLM with a tiny tower of `family`, pixel shuffle `k`, and the tiny model's LM."""
    from vlmtrain.data.image_transform import ImageTransform
    from vlmtrain.models.backbones.vision import build_tower
    from vlmtrain.models.projector import Projector
    from vlmtrain.models.vlm import VisionLanguageModel

    config, crop = FAMILY_TOWERS[family]
    torch.manual_seed(0)
    transform = None if crop is None else ImageTransform(crop[0], resize_shortest_edge=crop[1])
    spec, tower = build_tower(config, transform)
    projector = Projector(32, tiny_model.language.config.hidden_size, "gelu", k)
    return VisionLanguageModel(
        tower, projector, tiny_model.language, tiny_model.image_token_id, layer, "sdpa", spec.transform
    ).train()


@pytest.mark.parametrize("family", list(FAMILY_TOWERS))
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize(
    "groups, checkpointed",
    [(("projector",), False), (("vision", "projector", "language"), True)],
    ids=["stage0-1", "stage2-3+recompute"],
)
def test_every_family_and_pixel_shuffle_match_flop_counter(tiny_model, family, k, groups, checkpointed):
    """The tower's sequence counts its CLS / register tokens (not the projector's, nor the LM's); pixel shuffle
    divides the LM's image tokens by k^2 and widens the projector's input by k^2."""
    model = family_model(tiny_model, family, k)
    p = model.num_image_tokens
    rows = [[(8, True), (6, True), (30, False)], [(20, True), (8, True), (16, False)]]  # full rows of 44 + 2p
    batch = make_batch(rows, 44 + 2 * p, p, model.language.config.vocab_size)
    batch["pixel_values"] = torch.randn(batch["pixel_values"].shape[0], 3, model.image_size, model.image_size)
    set_trainable(model, groups)
    if checkpointed:
        model.vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    setup = StepSetup.from_model(model, "prefix")
    shape = ModelShape.from_model(model)
    assert shape.vision_tokens == model.num_patches + model.vision_skip_tokens
    assert shape.image_tokens == model.num_patches // (k * k) and shape.projector_in == 32 * k * k
    flops, matmul, attention = _model_counts(model, batch, setup)
    assert (matmul, attention) == split(reference(model, batch, "prefix", backward=True))
    assert (flops.total(PARTS, "recompute") > 0) == checkpointed


@pytest.mark.parametrize("every_n", [1, 2])
@pytest.mark.parametrize(
    "groups", [("projector",), ("vision", "projector", "language")], ids=["stage0-1", "stage2-3"]
)
def test_checkpointing_recompute_is_the_hardware_minus_model_term(tiny_model, groups, every_n):
    tiny_model.train()
    batch = make_batch(PACKED_FULL, 60, tiny_model.num_image_tokens, tiny_model.language.config.vocab_size)
    set_trainable(tiny_model, groups)
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}, "every_n_layers": every_n}
    tiny_model.language.gradient_checkpointing_enable(**kwargs)
    if "vision" in groups:
        tiny_model.vision.gradient_checkpointing_enable(**kwargs)
    setup = StepSetup.from_model(tiny_model, "prefix")
    n_lm = tiny_model.language.config.num_hidden_layers
    assert setup.language_checkpointed == math.ceil(n_lm / every_n)
    flops, matmul, attention = _model_counts(tiny_model, batch, setup)
    assert (matmul, attention) == split(reference(tiny_model, batch, "prefix", backward=True))
    recompute = flops.total(PARTS, "recompute")
    assert recompute > 0 and flops.hardware == flops.model + recompute
    # the recompute is one forward of each checkpointed layer but its MLP output projection (torch's early stop)
    tokens = BatchLayout.from_batch(batch).tokens
    lm, v = tiny_model.language.config, tiny_model.vision.config
    lm_layer = (flops.parts["language"].forward + flops.parts["language_attention"].forward) // n_lm
    expected = setup.language_checkpointed * (lm_layer - 2 * tokens * lm.intermediate_size * lm.hidden_size)
    if "vision" in groups:
        image_tokens = BatchLayout.from_batch(batch).images * tiny_model.num_image_tokens
        patch = BatchLayout.from_batch(batch).images * ModelShape.from_model(tiny_model).patch_flops
        vis = flops.parts["vision"].forward - patch + flops.parts["vision_attention"].forward
        vis_layer = vis // v.num_hidden_layers
        expected += setup.vision_checkpointed * (
            vis_layer - 2 * image_tokens * v.intermediate_size * v.hidden_size
        )
    assert recompute == expected


def test_step_model_sums_micro_batches(tiny_model):
    set_trainable(tiny_model, ("projector",))
    vocab = tiny_model.language.config.vocab_size
    batches = [make_batch(PACKED_FULL, 60, 16, vocab, seed=1), make_batch(PADDED, 62, 16, vocab, seed=2)]
    step = StepFlopModel.from_model(tiny_model, "prefix")(batches)
    each = [StepFlopModel.from_model(tiny_model, "prefix")([b]) for b in batches]
    assert step.model == sum(f.model for f in each) and step.hardware == sum(f.hardware for f in each)


def test_train_step_reports_the_flops_flop_counter_sees(tiny_model, tokenizer, tmp_path):
    """Trainer.train_step returns the step's FLOPs; they equal FlopCounterMode's count of that very step."""
    from vlmtrain.config.load import load_stage_config
    from vlmtrain.dist import DistContext
    from vlmtrain.models.freeze import apply_trainability
    from vlmtrain.train.engines.base import StepResult
    from vlmtrain.train.trainer import Trainer

    stage = load_stage_config(stage=2)  # everything trains; the noise of stage 0 would not change FLOPs
    apply_trainability(tiny_model, stage.modules)
    tiny_model.train()
    vocab = tiny_model.language.config.vocab_size
    raws = [make_batch(PACKED_FULL, 60, 16, vocab, seed=s) for s in range(3)]
    for raw in raws:
        raw["num_tokens"] = int((raw["sample_ids"] > 0).sum())
        raw["num_samples"] = int(raw["sample_ids"].max(dim=1).values.sum())

    class Engine:  # the model itself, one optimizer step of len(raws) micro-batches
        accumulation_steps = len(raws)

        def __init__(self) -> None:
            self.micro = 0

        def begin_step(self, n_micro):
            assert n_micro == len(raws)

        def forward(self, batch, mode):
            return tiny_model(**batch, mask_mode=mode)

        def backward(self, loss_sum, step_tokens):
            (loss_sum / step_tokens).backward()

        def step(self):
            self.micro += 1
            boundary = self.micro == len(raws)
            return StepResult(boundary=boundary, norm=torch.ones(()) if boundary else None)

        def settle(self, skipped):
            assert not skipped

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(stage, tmp_path, ctx, tiny_model, tokenizer, lambda s: None, total_steps=1)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        info = trainer.train_step(Engine(), iter(raws), 0)
    counted = sum(counter.get_flop_counts()["Global"].values())
    assert info["hardware_flops"] == counted
    assert info["model_flops"] == counted  # stage 2 without checkpointing enabled: nothing recomputed


# ---- peaks and MFU ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "gpu"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GH200 480GB", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100 (SXM or PCIe)"),
        ("NVIDIA A100 80GB PCIe", "A100 (SXM or PCIe)"),
        ("NVIDIA A800-SXM4-80GB", "A800"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ],
)
def test_gpu_names_map_to_the_right_table_row(name, gpu):
    found = gpu_peak_tflops(name)
    assert found is not None and found[0] == gpu


def test_unknown_gpu_and_cpu_have_no_peak():
    assert gpu_peak_tflops("Tesla V100-SXM2-32GB") is None  # no bf16 tensor cores
    peak, why = resolve_peak_tflops(None, torch.device("cpu"), "bf16")
    assert peak is None and "null" in why
    assert resolve_peak_tflops(500.0, torch.device("cpu"), "bf16")[0] == 500.0


def test_mfu_divides_all_ranks_flops_by_ranks_time_and_peak():
    # 4 ranks ran 2.4e15 model FLOPs in total in 2 s: 0.3 PFLOP/s per GPU; against 1,000 TFLOP/s that is 30%
    out = throughput(2.4e15, 3.2e15, 2.0, 4, 1000.0)
    assert out["tflops_per_gpu"] == pytest.approx(300.0)
    assert out["mfu"] == pytest.approx(0.30)
    assert out["hfu"] == pytest.approx(0.40)
    assert throughput(2.4e15, 3.2e15, 2.0, 4, None)["mfu"] is None


# ---- in a real run ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_two_rank_run_logs_tflops_and_mfu_per_gpu(tmp_path_factory):
    """Stage 0 (LM checkpointed explicitly, gradient_checkpointing=true: hardware > model FLOPs) on 2 gloo ranks with train.peak_tflops set: every
    record's per-GPU TFLOP/s is the all-rank model FLOPs over (step time x 2), MFU that over the peak, and the
    progress bar and the start-up line show them."""
    from train_fixtures import read_metrics, run_training, tiny_stage_config, train_data, write_config

    base = tmp_path_factory.getbasetemp()
    data = train_data(base)
    root = tmp_path_factory.mktemp("mfu_run")
    cfg = tiny_stage_config(
        0, data, max_steps=3, save_every=0, global_batch_size=4, micro_batch_size=1,
        train={"engine": "fsdp", "peak_tflops": 0.5, "gradient_checkpointing": True},
    )  # fmt: skip
    job = run_training([write_config(cfg, root / "stage0.json")], root / "run", ranks=2)
    records = read_metrics(root / "run" / "stage0" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["hardware_flops"] > r["model_flops"] > 0
        assert r["tflops_per_gpu"] == pytest.approx(r["model_flops"] / (r["step_time_s"] * 2) / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 0.5)
        assert r["hfu"] == pytest.approx(r["hardware_flops"] / (r["step_time_s"] * 2) / 1e12 / 0.5)
    log = job.output()
    assert "MFU against 0.5 TFLOP/s per GPU (train.peak_tflops)" in log
    assert "TFLOP/s/GPU MFU" in log
