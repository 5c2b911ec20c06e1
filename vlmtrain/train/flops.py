"""FLOP model of a training step, and the achieved TFLOP/s and MFU the trainer logs from it.

Pure functions over the model's shapes (read from its configs), what trains, what is recomputed, and the layout
of each micro-batch (read from the CPU batch: `sample_ids`, `image_flags`, `labels`, `pixel_values`).

Conventions (the usual ones of MFU reports, e.g. PaLM's appendix B and Megatron-LM's):
- Only matrix multiplications count, at 2 FLOPs per multiply-add (norms, activations, softmax and the embedding
  lookup are left out); the vision tower's patch embedding is the convolution it is.
- A matmul's backward costs one forward for the input gradient and one for the weight gradient, each only where
  it is computed: frozen weights get no weight gradient, and a tensor nothing upstream of it trains needs no
  input gradient (the patch embedding's pixels; the projector's input when the tower is frozen). A frozen vision
  tower runs without autograd (forward only); a frozen LM still costs its input gradients (~1x forward) whenever
  anything before it trains, since the projector's gradient flows through it.
- Attention costs 4 x heads x head_dim per (query, key) pair per layer forward (QK^T and PV) and twice that in
  backward, over the pairs the stage's mask lets attend (vlmtrain.models.masks), never the masked ones.
- The LM head runs only at supervised positions (models/loss.py), so it is counted there.
- **Model FLOPs** count real tokens only (padding is waste, so packing raises MFU) and no recompute;
  **hardware FLOPs** add the forward that gradient checkpointing repeats in backward (each checkpointed layer but
  its MLP output projection: see StackShape.recompute_flops_per_token). MFU uses model FLOPs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmtrain.models.loss import count_supervised

PARTS = ("vision", "vision_attention", "projector", "language", "language_attention", "head")
"""The components a FlopCount splits into; `*_attention` is the QK^T / PV part, the rest are weight matmuls."""


# ---- shapes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StackShape:
    """Matmul shapes of one transformer stack (a vision tower's encoder, Qwen2's decoder)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool  # SwiGLU (gate, up, down; DINOv2-giant's fused gate+up) rather than fc1, fc2
    layer_scale: bool = (
        False  # a learned scale multiplies the MLP output (DINOv2): backward saves that output
    )

    def linear_flops_per_token(self) -> int:
        """Forward FLOPs of one layer's weight matmuls for one token: q, k, v, o and the MLP."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = 2 * self.hidden * (q + 2 * kv) + 2 * q * self.hidden
        mlp = (3 if self.gated_mlp else 2) * 2 * self.hidden * self.intermediate
        return attention + mlp

    def recompute_flops_per_token(self) -> int:
        """Weight-matmul FLOPs per token that checkpointing repeats for one layer in backward.

        The whole forward but the MLP's output projection: torch's non-reentrant checkpoint (what the trainer
        enables) stops recomputing once the last tensor backward saved is rebuilt (`early stop`, on by default),
        and nothing of the layer's after the down/fc2 projection is saved. With a layer scale after it (DINOv2) the
        projection's output is saved for the scale's gradient, so the whole forward is recomputed.
        """
        if self.layer_scale:
            return self.linear_flops_per_token()
        return self.linear_flops_per_token() - 2 * self.intermediate * self.hidden

    def attention_flops_per_pair(self) -> int:
        """Forward FLOPs of one layer for one attended (query, key) pair: q.k and p.v over every query head."""
        return 4 * self.heads * self.head_dim


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP model needs to know about a VisionLanguageModel."""

    vision: StackShape
    vision_layers_used: int  # layers below the feature layer: backward (and recompute) stop there
    vision_tokens: int  # the tower's sequence per image: patches + leading CLS / register tokens
    image_tokens: int  # LM tokens per image: patches / pixel_shuffle^2
    patch_flops: int  # patch-embedding convolution, forward FLOPs per image
    projector_in: int  # pixel_shuffle^2 x the tower's width
    projector_out: int
    language: StackShape
    vocab: int  # rows of the LM head

    @classmethod
    def from_parts(
        cls,
        family: Any,
        vision_config: Any,
        image_size: int,
        vision_feature_layer: int,
        language_config: Any,
        pixel_shuffle: int = 1,
        vocab: int | None = None,
    ) -> ModelShape:
        """From the tower's family and config (vlmtrain.models.backbones.vision), the square input size, and a
        Qwen2-style LM config; `vocab` defaults to the config's vocab_size."""
        v, lm = vision_config, language_config
        side = family.grid_side(v, image_size)
        patches = side * side
        tower = family.tower_shape(v)
        head_dim = getattr(lm, "head_dim", None) or lm.hidden_size // lm.num_attention_heads
        vision = StackShape(
            tower.hidden,
            tower.intermediate,
            tower.layers,
            tower.heads,
            tower.heads,
            tower.hidden // tower.heads,
            gated_mlp=tower.gated_mlp,
            layer_scale=tower.layer_scale,
        )
        language = StackShape(
            lm.hidden_size,
            lm.intermediate_size,
            lm.num_hidden_layers,
            lm.num_attention_heads,
            getattr(lm, "num_key_value_heads", None) or lm.num_attention_heads,
            head_dim,
            gated_mlp=True,
        )
        return cls(
            vision=vision,
            vision_layers_used=family.used_layers(v, vision_feature_layer),
            vision_tokens=patches + family.skip_tokens(v),
            image_tokens=patches // (pixel_shuffle * pixel_shuffle),
            patch_flops=2 * patches * v.num_channels * v.patch_size * v.patch_size * tower.hidden,
            projector_in=tower.hidden * pixel_shuffle * pixel_shuffle,
            projector_out=lm.hidden_size,
            language=language,
            vocab=vocab or lm.vocab_size,
        )

    @classmethod
    def from_model(cls, model: Any) -> ModelShape:
        """From a VisionLanguageModel (its head's real row count: the embedding may have been resized)."""
        head = model.language.get_output_embeddings()
        return cls.from_parts(
            model.vision_family,
            model.vision.config,
            model.image_size,
            model.vision_feature_layer,
            model.language.config,
            model.pixel_shuffle,
            head.weight.shape[0],
        )


@dataclass(frozen=True)
class StepSetup:
    """What trains and what is recomputed in a stage's steps, and its attention mask."""

    mask_mode: str
    vision_trains: bool
    projector_trains: bool
    language_trains: bool
    vision_checkpointed: int = 0  # checkpointed vision layers among the used ones
    language_checkpointed: int = 0  # checkpointed decoder layers

    @classmethod
    def from_model(cls, model: Any, mask_mode: str) -> StepSetup:
        """Read from the model as it trains: `requires_grad` per group, checkpointing per layer.

        Checkpointing is read off transformers' per-layer flag (`GradientCheckpointingLayer.gradient_checkpointing`,
        which `gradient_checkpointing_enable(every_n_layers=...)` sets), not from the stage config, so whatever
        policy enabled it, the count is what will actually be recomputed.
        """
        trains = {
            name: any(p.requires_grad for p in module.parameters())
            for name, module in model.module_groups().items()
        }
        used = ModelShape.from_model(model).vision_layers_used
        return cls(
            mask_mode=mask_mode,
            vision_trains=trains["vision"],
            projector_trains=trains["projector"],
            language_trains=trains["language"],
            vision_checkpointed=sum(checkpointed_layers(model.vision)[:used]),
            language_checkpointed=sum(checkpointed_layers(model.language)),
        )


def checkpointed_layers(module: torch.nn.Module) -> list[bool]:
    """Per repeated layer (in order), whether transformers will recompute it in backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    # transformers checkpoints a layer only in training mode (GradientCheckpointingLayer.forward)
    return [
        bool(m.gradient_checkpointing and m.training)
        for m in module.modules()
        if isinstance(m, GradientCheckpointingLayer)
    ]


# ---- batch layout ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchLayout:
    """A micro-batch as the FLOP model sees it: (tokens, image tokens) per real sample, images, supervised tokens."""

    samples: tuple[tuple[int, int], ...]
    images: int
    supervised: int

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any]) -> BatchLayout:
        """From a collated CPU batch (padded or packed rows; vlmtrain.data.collate's layout). No device sync."""
        sids = batch["sample_ids"]
        flags = batch["image_flags"].bool()
        # one key per (row, sample id), padding included and dropped after: cheaper than boolean indexing
        width = int(sids.max()) + 1 if sids.numel() else 1
        key = (torch.arange(sids.shape[0])[:, None] * width + sids).flatten()
        uniq, inverse, lengths = torch.unique(key, return_inverse=True, return_counts=True)
        image = torch.bincount(inverse, weights=flags.flatten().double(), minlength=uniq.numel()).long()
        real = uniq % width != 0
        lengths, image = lengths[real], image[real]
        pixels = batch.get("pixel_values")
        return cls(
            samples=tuple(zip(lengths.tolist(), image.tolist(), strict=True)),
            images=0 if pixels is None else int(pixels.shape[0]),
            supervised=count_supervised(batch["labels"], sids),
        )

    @property
    def tokens(self) -> int:
        return sum(n for n, _ in self.samples)


def attended_pairs(mode: str, length: int, image_tokens: int) -> int:
    """(query, key) pairs one sample of `length` tokens, `image_tokens` of them image, attends under `mode`.

    bidirectional: every pair of the sample. causal: key at or before the query. prefix: an image key is seen by
    every query of the sample, a text key by the text queries at or after it (image never sees text), so
    n_img x L + n_txt (n_txt + 1) / 2 wherever the image sits.
    """
    if mode == "bidirectional":
        return length * length
    if mode == "causal":
        return length * (length + 1) // 2
    if mode == "prefix":
        text = length - image_tokens
        return image_tokens * length + text * (text + 1) // 2
    raise ValueError(f"unknown mask mode {mode!r}; expected bidirectional, prefix or causal")


# ---- counts ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flops:
    """Forward, backward and checkpointing-recompute FLOPs of one component."""

    forward: int = 0
    backward: int = 0
    recompute: int = 0

    def __add__(self, other: Flops) -> Flops:
        return Flops(
            self.forward + other.forward, self.backward + other.backward, self.recompute + other.recompute
        )

    @property
    def model(self) -> int:
        return self.forward + self.backward

    @property
    def hardware(self) -> int:
        return self.model + self.recompute


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per component (PARTS); `model` for MFU, `hardware` with the recompute included."""

    parts: Mapping[str, Flops] = field(default_factory=lambda: {p: Flops() for p in PARTS})

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount({p: self.parts[p] + other.parts[p] for p in PARTS})

    @property
    def model(self) -> int:
        return sum(f.model for f in self.parts.values())

    @property
    def hardware(self) -> int:
        return sum(f.hardware for f in self.parts.values())

    def total(self, parts: Iterable[str], kind: str = "model") -> int:
        """`kind` (forward, backward, recompute, model, hardware) summed over `parts`."""
        return sum(getattr(self.parts[p], kind) for p in parts)


def micro_batch_flops(shape: ModelShape, setup: StepSetup, layout: BatchLayout) -> FlopCount:
    """FLOPs of one micro-batch's forward and backward (and recompute) under `setup`."""
    v, lm = shape.vision, shape.language
    any_trains = setup.vision_trains or setup.projector_trains or setup.language_trains
    # ---- vision tower: every layer runs forward; backward and recompute reach only the used ones. Its sequence
    # includes the CLS / register tokens the projector never sees.
    tower_tokens = layout.images * shape.vision_tokens
    vis_linear = tower_tokens * v.linear_flops_per_token()
    vis_recompute = tower_tokens * v.recompute_flops_per_token() * setup.vision_checkpointed
    vis_pairs = layout.images * shape.vision_tokens * shape.vision_tokens * v.attention_flops_per_pair()
    patch = layout.images * shape.patch_flops
    vision = Flops(forward=patch + vis_linear * v.layers)
    vision_attn = Flops(forward=vis_pairs * v.layers)
    if setup.vision_trains:
        # the patch embedding's input (pixels) needs no gradient: its weight gradient only
        vision += Flops(backward=patch + 2 * vis_linear * shape.vision_layers_used)
        vision += Flops(recompute=vis_recompute)
        vision_attn += Flops(
            backward=2 * vis_pairs * shape.vision_layers_used,
            recompute=vis_pairs * setup.vision_checkpointed,
        )
    # ---- projector: [pixel shuffle] Linear(k^2 d_v, d_t) -> GELU -> Linear(d_t, d_t) on the image tokens
    vis_tokens = layout.images * shape.image_tokens
    first = 2 * vis_tokens * shape.projector_in * shape.projector_out
    second = 2 * vis_tokens * shape.projector_out * shape.projector_out
    projector_backward = 0
    if setup.projector_trains:
        projector_backward += first + second  # weight gradients
    if setup.projector_trains or setup.vision_trains:
        projector_backward += second  # input gradient of linear_2
    if setup.vision_trains:
        projector_backward += first  # input gradient of linear_1, into the tower
    projector = Flops(forward=first + second, backward=projector_backward)
    # ---- language model: real tokens, attended pairs of the stage's mask
    tokens = layout.tokens
    lm_linear = tokens * lm.linear_flops_per_token()
    lm_pairs = (
        sum(attended_pairs(setup.mask_mode, n, i) for n, i in layout.samples) * lm.attention_flops_per_pair()
    )
    head = 2 * layout.supervised * lm.hidden * shape.vocab
    # any training group puts the LM's hidden states on the gradient path (embeddings or image tokens)
    grads = int(any_trains) + int(setup.language_trains)  # input gradients + weight gradients
    recompute = setup.language_checkpointed if any_trains else 0
    lm_recompute = tokens * lm.recompute_flops_per_token() * recompute
    language = Flops(lm_linear * lm.layers, grads * lm_linear * lm.layers, lm_recompute)
    language_attn = Flops(
        lm_pairs * lm.layers, 2 * lm_pairs * lm.layers if any_trains else 0, lm_pairs * recompute
    )
    return FlopCount(
        {
            "vision": vision,
            "vision_attention": vision_attn,
            "projector": projector,
            "language": language,
            "language_attention": language_attn,
            "head": Flops(head, grads * head),
        }
    )


def step_flops(shape: ModelShape, setup: StepSetup, layouts: Iterable[BatchLayout]) -> FlopCount:
    """FLOPs of one optimizer step on one rank: its micro-batches summed."""
    total = FlopCount()
    for layout in layouts:
        total = total + micro_batch_flops(shape, setup, layout)
    return total


class StepFlopModel:
    """The trainer's FLOP model: built from the model as it trains, applied to each step's CPU batches."""

    def __init__(self, shape: ModelShape, setup: StepSetup) -> None:
        self.shape, self.setup = shape, setup

    @classmethod
    def from_model(cls, model: Any, mask_mode: str) -> StepFlopModel:
        return cls(ModelShape.from_model(model), StepSetup.from_model(model, mask_mode))

    def __call__(self, batches: Sequence[Mapping[str, Any]]) -> FlopCount:
        return step_flops(self.shape, self.setup, (BatchLayout.from_batch(b) for b in batches))


# ---- GPU peaks and MFU ----------------------------------------------------------------------------------
GPU_PEAK_TFLOPS: tuple[tuple[str, str, float], ...] = (
    # (regex on the lower-cased torch.cuda.get_device_name, GPU, dense bf16 tensor-core TFLOP/s). From NVIDIA's
    # datasheets, which headline the 2:4-sparsity figure: these are half of it. First match wins.
    (r"h100.*pcie", "H100 PCIe", 756.0),
    (r"h100.*nvl", "H100 NVL", 835.0),
    (r"h100", "H100 SXM", 989.0),
    (r"h800.*pcie", "H800 PCIe", 756.0),
    (r"h800", "H800 SXM", 989.0),
    (r"h200.*nvl", "H200 NVL", 835.0),
    (r"h200", "H200", 989.0),  # also GH200
    (r"b200", "B200", 2250.0),  # also GB200
    (r"a100", "A100 (SXM or PCIe)", 312.0),
    (r"a800", "A800", 312.0),
    (r"l40s", "L40S", 362.0),
    (r"\bl40\b", "L40", 181.0),
    (r"\bl4\b", "L4", 121.0),
    (r"\ba40\b", "A40", 150.0),
    (r"\ba10\b", "A10", 125.0),
    (r"rtx a6000", "RTX A6000", 155.0),
    (r"rtx 4090", "RTX 4090", 165.0),  # bf16 with fp32 accumulation (Ada whitepaper)
    (r"rtx 3090", "RTX 3090", 71.0),  # bf16 with fp32 accumulation (Ampere GA102 whitepaper)
)


GPU_MEMORY_GIB: dict[str, float] = {
    "H100 PCIe": 80,
    "H100 NVL": 94,
    "H100 SXM": 80,
    "H800 PCIe": 80,
    "H800 SXM": 80,
    "H200 NVL": 141,
    "H200": 141,
    "B200": 180,
    "A100 (SXM or PCIe)": 80,  # the 80 GB model; the 40 GB one needs --gpu-memory-gib 40
    "A800": 80,
    "L40S": 48,
    "L40": 48,
    "L4": 24,
    "A40": 48,
    "A10": 24,
    "RTX A6000": 48,
    "RTX 4090": 24,
    "RTX 3090": 24,
}
"""Memory of each GPU of GPU_PEAK_TFLOPS (NVIDIA's datasheets), GiB as `vlmtrain plan` plans `micro_batch_size: auto`."""


def gpu_peak_tflops(name: str) -> tuple[str, float] | None:
    """(GPU, dense bf16 TFLOP/s) for a device name such as `NVIDIA H100 80GB HBM3`, or None if not in the table."""
    low = name.lower()
    for pattern, gpu, peak in GPU_PEAK_TFLOPS:
        if re.search(pattern, low):
            return gpu, peak
    return None


def resolve_peak_tflops(
    configured: float | None, device: torch.device, precision: str
) -> tuple[float | None, str]:
    """The per-GPU peak MFU divides by, and where it came from (printed when a stage starts).

    `train.peak_tflops` wins; else the table, for bf16 on CUDA. Nothing else guesses: on CPU, an unknown GPU or
    fp32 compute (the table holds bf16 peaks) MFU is logged as null and TFLOP/s alone is reported.
    """
    if configured is not None:
        return configured, f"{configured:g} TFLOP/s per GPU (train.peak_tflops)"
    if device.type != "cuda":
        return None, f"no peak for {device.type}: MFU is null (set train.peak_tflops to compare)"
    name = torch.cuda.get_device_name(device)
    found = gpu_peak_tflops(name)
    if found is None:
        return None, f"{name!r} is not in the GPU table: MFU is null (set train.peak_tflops)"
    if precision != "bf16":
        return None, f"the table holds bf16 peaks and this stage computes in {precision}: MFU is null"
    gpu, peak = found
    return peak, f"{peak:g} TFLOP/s per GPU ({name}: {gpu}, dense bf16)"


def throughput(
    model_flops: float, hardware_flops: float, seconds: float, world_size: int, peak_tflops: float | None
) -> dict[str, float | None]:
    """The per-step record entries. FLOPs are the step's over all ranks; per-GPU figures divide by world size."""
    per_gpu = model_flops / (seconds * world_size) / 1e12
    hw_per_gpu = hardware_flops / (seconds * world_size) / 1e12
    return {
        "model_flops": model_flops,
        "hardware_flops": hardware_flops,
        "tflops_per_gpu": per_gpu,  # achieved model TFLOP/s per GPU
        "mfu": per_gpu / peak_tflops if peak_tflops else None,
        "hfu": hw_per_gpu / peak_tflops if peak_tflops else None,
    }
