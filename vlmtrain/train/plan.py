"""`vlmtrain plan`: what stages cost before they run: samples, steps, tokens, FLOPs, GPU-hours, memory per GPU.

Nothing is downloaded or loaded: the model is built on the meta device from its configs (the shipped presets'
checkpoints have their config.json values here), FLOPs come from the trainer's own FLOP model
(vlmtrain.train.flops) on micro-batches of the dataset's average sample, and memory follows the precision
policy (vlmtrain.precision) under ZeRO-2. Every assumed number is a named constant with its source.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from vlmtrain.config.schema import ModelConfig, StageConfig
from vlmtrain.models.loss import CHUNK_BYTES
from vlmtrain.train.batching import AUTO_MEMORY_FRACTION, resolve_micro_batch
from vlmtrain.train.flops import (
    GPU_MEMORY_GIB,
    BatchLayout,
    FlopCount,
    Flops,
    ModelShape,
    StackShape,
    StepSetup,
    gpu_peak_tflops,
    step_flops,
)

# ---- the paper's data, as token counts -------------------------------------------------------------------
TOKENS_PER_WORD = 1.3
"""English words to BPE tokens: the common rule of thumb (about 0.75 words per token) for 100k+-vocabulary BPEs."""
SYSTEM_TOKENS = 20
"""Qwen2.5's chat template adds its default system turn, `<|im_start|>system\\nYou are Qwen, created by Alibaba
Cloud. You are a helpful assistant.<|im_end|>\\n`: 20 tokens."""
TURN_TOKENS = 9
"""Per question-answer turn: `<|im_start|>user\\n` (3), `<|im_end|>\\n` (2), `<|im_start|>assistant\\n` (3) and the
newline after the answer's `<|im_end|>` (1); that `<|im_end|>` itself is supervised and counted with the answer."""
IMAGE_NEWLINE_TOKENS = 1
"""The newline after the `<image>` placeholder in the first user turn."""


@dataclass(frozen=True)
class DatasetEstimate:
    """A dataset's size and its average sample in words, with where each number comes from."""

    samples: int
    question_words: float  # per sample, all turns
    answer_words: float  # per sample, all turns (the supervised text)
    turns: int
    source: str

    def text_tokens(self) -> tuple[int, int]:
        """(unsupervised, supervised) text tokens of the average sample, chat template included."""
        prompt = (
            SYSTEM_TOKENS
            + IMAGE_NEWLINE_TOKENS
            + self.turns * TURN_TOKENS
            + words_to_tokens(self.question_words)
        )
        return prompt, words_to_tokens(self.answer_words) + self.turns


def words_to_tokens(words: float) -> int:
    """words x TOKENS_PER_WORD, rounded half up."""
    return math.floor(words * TOKENS_PER_WORD + 0.5)


PAPER_DATASETS: dict[str, DatasetEstimate] = {
    "COCO-118k-Recap": DatasetEstimate(
        118_287,
        5,
        72,
        1,
        "samples: COCO train2017 / LLaVA-ReCap-118K (data_prep/README.md); caption: the 72-word example of the "
        "paper's Table III; prompt: `Describe the image in detail.`",
    ),
    "BLIP558k-Recap": DatasetEstimate(
        558_128,
        5,
        70,
        1,
        "samples: LLaVA-ReCap-558K (data_prep/README.md); caption: the 70-word example of the paper's Table III",
    ),
    "LLaVA-Next-790k": DatasetEstimate(
        779_289,
        34,
        31,
        3,
        "samples: LLaVA-NeXT-Data records (data_prep/README.md); turns and words: the paper's Table III example "
        "(3 turns, 34 question and 31 answer words)",
    ),
}
"""The paper's datasets (Section III-C, Table III). Table III's examples are excerpts, so the text lengths are
likely low: `--text-tokens` replaces them (docs/plan.md says what twice the text would cost)."""

# ---- the shipped presets' checkpoints, as their config.json files give them --------------------------------
KNOWN_VISION: dict[str, dict[str, Any]] = {
    # `config`: the tower's config.json entries (the vision_config of a full checkpoint), `model_type` naming the
    # family; `preprocessor`: its preprocessor_config.json entries that set the input size. The hub files were
    # not reachable here; the values agree with these public copies (read through a code search):
    # - SigLIP2 so400m/14: SigLIP's so400m shapes (kvmm's SigLIP2So400mP14: width 1152, 27 layers, 16 heads, MLP
    #   4304, patch 14); fixed-resolution SigLIP2 checkpoints are SiglipModel (model_type siglip), 224 px;
    # - CLIP-L/14-336: width 1024, 24 layers, 16 heads, MLP 4096, 336 px, patch 14 (timm's
    #   vit_large_patch14_clip_336 and a CLIPVisionConfig written for this checkpoint); its old-style
    #   preprocessor_config.json (CLIPFeatureExtractor): size 336, crop_size 336, resample 3, OpenAI mean / std;
    # - DINOv2-L (with registers): width 1024, 24 layers, 16 heads, mlp_ratio 4, 518 px, patch 14, layerscale 1.0,
    #   no SwiGLU, 4 registers (transformers-style configs copied from facebook/dinov2-* and timm's
    #   vit_large_patch14_[reg4_]dinov2); BitImageProcessor: shortest_edge 256, crop 224, resample 3, ImageNet.
    "google/siglip-so400m-patch14-224": {
        "config": {
            "model_type": "siglip",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
        "preprocessor": {"size": {"height": 224, "width": 224}},
    },
    "openai/clip-vit-large-patch14-336": {
        "config": {
            "model_type": "clip",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": 768,
        },
        "preprocessor": {"size": 336, "crop_size": 336, "do_center_crop": True},
    },
    "facebook/dinov2-large": {
        "config": {
            "model_type": "dinov2",
            "hidden_size": 1024,
            "mlp_ratio": 4,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 518,
            "patch_size": 14,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
            "layerscale_value": 1.0,
            "use_swiglu_ffn": False,
        },
        "preprocessor": {
            "size": {"shortest_edge": 256},
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
        },
    },
}

# DINOv2-L with registers: DINOv2-L's shapes and preprocessing plus 4 register tokens.
KNOWN_VISION["facebook/dinov2-with-registers-large"] = {
    "config": {
        **KNOWN_VISION["facebook/dinov2-large"]["config"],
        "model_type": "dinov2_with_registers",
        "num_register_tokens": 4,
    },
    "preprocessor": KNOWN_VISION["facebook/dinov2-large"]["preprocessor"],
}
# Fixed-resolution SigLIP2 so400m/14 at 224 px: model_type siglip and so400m's shapes and preprocessing.
KNOWN_VISION["google/siglip2-so400m-patch14-224"] = KNOWN_VISION["google/siglip-so400m-patch14-224"]

KNOWN_LANGUAGE = {
    "Qwen/Qwen2.5-0.5B": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
    # Qwen3-0.6B's config.json (public copies found by code search agree): head_dim 128 is not hidden / heads.
    "Qwen/Qwen3-0.6B": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
}

# ---- memory model -----------------------------------------------------------------------------------------
BF16, FP32 = 2, 4
LOSS_CHUNK_PEAK_BYTES = CHUNK_BYTES * 3 // 2
"""The chunked loss's transient peak (models/loss.py): one chunk's fp32 logits and its bf16 matmul output (an upper
bound: 384-row chunks use 224 of the 256 MiB). Measured (benchmarks/bench_loss_memory.py, fp32 on CPU, where the
cast is free): 256 MiB above the model for 3,072 supervised tokens at Qwen's head, against 5.3 GiB for full logits."""


def head_activation_bytes(supervised_tokens: int, hidden: int, vocab: int, head_trains: bool) -> int:
    """Peak bytes the loss adds: the unit hidden-state gradient of every supervised token (compute dtype), one
    chunk's logits, and, when the head trains, its fp32 weight-gradient accumulator."""
    return (
        supervised_tokens * hidden * BF16
        + LOSS_CHUNK_PEAK_BYTES
        + (vocab * hidden * FP32 if head_trains else 0)
    )


PAPER_A800_HOURS = {"stage0": 1.0, "stage1": 1.0, "stage2": 12.0}
"""Section IV-A of the paper: one A800 80GB; stage 0 1 h, stage 1 1 h, stage 2 4 + 8 h (14 h; stage 3 not timed)."""


def activation_elements_per_token(stack: StackShape) -> int:
    """bf16 elements one layer keeps for backward per token, weights trainable (an upper bound for frozen ones).

    Both norms' inputs and outputs (4 x hidden), q, k, v after the rotary embedding (SDPA saves them), the
    attention output (o_proj's input), and the MLP: gate, up, act(gate) and their product (SwiGLU, 4 x
    intermediate) or fc1's output and GELU's (2 x intermediate).
    """
    q, kv = stack.heads * stack.head_dim, stack.kv_heads * stack.head_dim
    mlp = (4 if stack.gated_mlp else 2) * stack.intermediate
    return 4 * stack.hidden + q + 2 * kv + q + mlp


def stack_activation_bytes(stack: StackShape, layers: int, checkpointed: int, tokens: int) -> int:
    """Saved activations of `layers` layers of which `checkpointed` keep only their input (plus one layer's full
    set, rebuilt while its backward runs)."""
    full = activation_elements_per_token(stack) * BF16 * tokens
    kept = checkpointed * stack.hidden * BF16 * tokens + (layers - checkpointed) * full
    return kept + (full if checkpointed else 0)


# ---- communication model ----------------------------------------------------------------------------------
GPUS_PER_NODE = 8
"""GPUs per node: a job on at most this many GPUs runs within one node (over NVLink)."""
INTERCONNECTS: dict[str, tuple[str, float]] = {
    "nvlink": ("NVLink 4", 450.0),
    "ib-ndr": ("InfiniBand NDR", 50.0),
    "ib-hdr": ("InfiniBand HDR", 25.0),
    "100gbe": ("100 GbE", 12.5 / GPUS_PER_NODE),
}
"""Nominal bandwidth per GPU and direction, GB/s: NVLink 4 of an H100 SXM (18 links, 900 GB/s both ways);
one 400 Gb/s NDR (200 Gb/s HDR) adapter per GPU, as in DGX H100 (A100) nodes; one 100 GbE port per node, shared by
its 8 GPUs. NCCL's ring reaches about 80% of these in practice: the estimate is a lower bound on the time."""
DEFAULT_INTERCONNECT = "ib-ndr"


ENGINE_CONFIGS = ("zero2", "zero1", "fsdp")
"""The engine configs `plan` counts traffic for: DeepSpeed with ds_configs/zero2_bf16.json (the default) and
zero1_bf16.json, and the FSDP2 engine (train.engine=fsdp)."""
STEP_SYNC_VALUES = 9
"""float64 values of the trainer's one all-reduce per step (vlmtrain.dist.step_sync): 7 counts and flags, the
previous step's loss sum and gradient norm; a token budget adds one per possible micro-batch count."""


@dataclass(frozen=True)
class Communication:
    """Bytes and time of one optimizer step's collectives under one engine config (payload: a collective's full
    buffer, e.g. the whole gradient a reduce-scatter reduces; benchmarks/bench_comm.py measures the same)."""

    reduce_bytes: int  # fp32 gradients reduced (reduce-scattered or all-reduced)
    gather_bytes: int  # bf16 parameters all-gathered (after the update, or FSDP's per-unit gathers)
    wire_bytes: int  # what each GPU sends (a ring collective of S bytes over n GPUs sends S (n - 1) / n)
    link: str  # the interconnect the time is for
    seconds: float  # wire_bytes at the link's nominal bandwidth
    step_sync_bytes: int = 0  # the trainer's per-step all-reduce: negligible, not in wire_bytes
    config: str = "zero2"


def step_communication(
    trainable: int,
    accumulation: int,
    gpus: int,
    interconnect: str,
    engine: str = "zero2",
    block_trainable: int = 0,
    histogram: int = 0,
) -> Communication:
    """One optimizer step's traffic under `engine` (one of ENGINE_CONFIGS). On one GPU nothing is sent. Within one
    node (at most GPUS_PER_NODE GPUs) the link is NVLink, beyond it `interconnect`.

    - zero2: DeepSpeed reduces the fp32 gradient of every trainable parameter at the end of each micro-batch's
      backward (`accumulation` times per step) and all-gathers the updated bf16 parameters once.
    - zero1: gradients are reduced once, at the window's last micro-batch; the same all-gather.
    - fsdp: gradients are reduce-scattered once (`set_requires_gradient_sync` holds them unsharded until the
      window's last micro-batch); every micro-batch all-gathers the bf16 weights of each unit, the root unit
      once (it stays gathered for backward) and each transformer block twice (forward, and again in backward):
      2 x (trainable + block_trainable) x accumulation bytes. Frozen groups are replicated, never gathered.
    """
    if interconnect not in INTERCONNECTS:
        raise ValueError(f"--interconnect {interconnect!r} is not one of {sorted(INTERCONNECTS)}")
    if engine not in ENGINE_CONFIGS:
        raise ValueError(f"engine config {engine!r} is not one of {ENGINE_CONFIGS}")
    reduce_bytes = FP32 * trainable * (accumulation if engine == "zero2" else 1)
    if engine == "fsdp":
        gather_bytes = BF16 * (trainable + block_trainable) * accumulation
    else:
        gather_bytes = BF16 * trainable
    link = "nvlink" if gpus <= GPUS_PER_NODE else interconnect
    name, gb_per_s = INTERCONNECTS[link]
    wire = (reduce_bytes + gather_bytes) * (gpus - 1) // gpus
    sync = 8 * (STEP_SYNC_VALUES + histogram) if gpus > 1 else 0
    return Communication(reduce_bytes, gather_bytes, wire, name, wire / (gb_per_s * 1e9), sync, engine)


def engine_config(stage: StageConfig) -> str:
    """The ENGINE_CONFIGS entry a stage trains with: FSDP, DeepSpeed ZeRO-1, else ZeRO-2's count (ZeRO-3 and the
    offload configs are not modelled: they move at least ZeRO-2's bytes)."""
    if stage.train.engine == "fsdp":
        return "fsdp"
    return "zero1" if Path(stage.train.ds_config).stem == "zero1_bf16" else "zero2"


# ---- the plan ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    weights: int  # bf16 compute copies of every parameter (frozen ones too), on every rank
    gradients: int  # fp32, trainable only, ZeRO-2 partition
    optimizer: int  # fp32 masters + AdamW's two fp32 moments, trainable only, ZeRO-2 partition
    activations: int  # one micro-batch, at the longest row it can have

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class StagePlan:
    name: str
    dataset: str
    samples: int
    samples_source: str  # "manifest" or "paper"
    steps: int
    accumulation: int
    sample_tokens: int  # LM tokens of the average sample (image included)
    supervised_per_sample: int
    tokens: int  # LM tokens of the whole stage
    flops: FlopCount  # of the whole stage
    params: int
    trainable: int
    gpu_hours: float
    wall_hours: float
    memory: Memory
    samples_per_gpu: int  # the GPU's share of the global batch
    micro_batch: int  # samples per forward (batch.micro_batch_size, `auto` resolved)
    communication: Communication  # per optimizer step, under the stage's own engine config
    communication_by_config: dict[str, Communication]  # per optimizer step, under each of ENGINE_CONFIGS
    compute_seconds: float  # model FLOPs of one optimizer step / (GPUs x peak x MFU)
    recompute: RecomputeChoice | None = None  # `gradient_checkpointing: auto`'s choice (None: true / false)

    @property
    def communication_bound(self) -> bool:
        """The step's gradient and parameter traffic takes longer than its compute, even if fully overlapped."""
        return self.communication.seconds > self.compute_seconds

    @property
    def six_pt_all(self) -> float:
        return 6.0 * self.params * self.tokens

    @property
    def six_pt_trainable(self) -> float:
        return 6.0 * self.trainable * self.tokens


def meta_model(model: ModelConfig) -> Any:
    """The VLM on the meta device (no memory, no weights): exact parameter counts and the FLOP model's shapes."""
    from transformers import AutoModelForCausalLM

    from vlmtrain.models.language import language_config_from_dict
    from vlmtrain.models.projector import Projector
    from vlmtrain.models.vlm import VisionLanguageModel

    spec = vision_spec(model)
    language_cfg = language_config_from_dict(_language_dict(model))
    with torch.device("meta"):
        vision = spec.family.model_class(spec.config)
        language = AutoModelForCausalLM.from_config(language_cfg)
        projector = Projector(
            spec.family.hidden_size(spec.config),
            language_cfg.hidden_size,
            model.projector_hidden_act,
            model.pixel_shuffle,
        )
    return VisionLanguageModel(
        vision, projector, language, 0, model.vision_feature_layer, "sdpa", spec.transform, spec.family
    )


def vision_spec(model: ModelConfig) -> Any:
    """The tower's family, config and preprocessing: from `vision_config`, a known hub id, or a local checkpoint
    directory (its config.json and preprocessor_config.json; no weights are read)."""
    from vlmtrain.data.image_transform import ImageTransform
    from vlmtrain.models.backbones.vision import TowerSpec, spec_from_checkpoint, spec_from_dict

    if model.vision_config is not None:
        return spec_from_dict(model.vision_config)
    if model.vision in KNOWN_VISION:
        known = KNOWN_VISION[model.vision]
        spec = spec_from_dict(known["config"])
        transform = ImageTransform.from_preprocessor_config(
            known["preprocessor"], model.vision, spec.transform
        )
        return TowerSpec(spec.family, spec.config, transform)
    if (Path(str(model.vision)) / "config.json").is_file():
        return spec_from_checkpoint(str(model.vision))
    raise ValueError(
        f"model.vision: plan knows the shapes of {sorted(KNOWN_VISION)} and of local checkpoint directories; "
        f"{model.vision!r} is neither (give model.vision_config, or a directory with a config.json)"
    )


def _language_dict(model: ModelConfig) -> dict[str, Any]:
    if model.language_config is not None:
        return dict(model.language_config)
    return _known_or_local(model.language, KNOWN_LANGUAGE, "language")


def _known_or_local(name: str | None, known: Mapping[str, dict[str, Any]], part: str) -> dict[str, Any]:
    if name in known:
        return dict(known[name])
    config = Path(str(name)) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return data
    raise ValueError(
        f"model.{part}: plan knows the shapes of {sorted(known)} and of local checkpoint directories; "
        f"{name!r} is neither (give model.{part}_config, or a directory with a config.json)"
    )


def resolve_model(stage: StageConfig, stages: Mapping[str, StageConfig]) -> ModelConfig:
    """The model a stage trains: its own block, or through `init_from` that of the stage (or saved model) it
    starts from: a stage of this plan, a shipped preset of that name, or a model directory."""
    seen = []
    while stage.init_from is not None:
        if stage.init_from in seen:
            raise ValueError(f"init_from loops through {seen}")
        seen.append(stage.init_from)
        saved = Path(stage.init_from) / "vlm_config.json"
        if stage.init_from in stages:
            stage = stages[stage.init_from]
        elif saved.is_file():
            cfg = json.loads(saved.read_text())
            return ModelConfig(
                vision=None,
                vision_config=cfg["vision_config"],
                language=None,
                language_config=cfg["language_config"],
                vision_feature_layer=cfg["vision_feature_layer"],
                projector_hidden_act=cfg["projector"]["act"],
                pixel_shuffle=cfg.get("pixel_shuffle", 1),
            )
        else:
            from vlmtrain.config.load import ConfigError, load_stage_config

            try:
                stage = load_stage_config(stage=stage.init_from)
            except ConfigError:
                raise ValueError(
                    f"stage {stage.name}: init_from={stage.init_from!r} is neither a stage of this plan, a shipped "
                    "preset nor a saved model directory"
                ) from None
    return stage.model


def stage_samples(stage: StageConfig) -> tuple[int, str]:
    """(samples, "manifest") from the stage's shard manifest when it exists, else (the paper's size, "paper")."""
    from vlmtrain.data.shard import load_manifest

    train = Path(stage.data.train)
    if train.name.endswith(".json") and train.is_file():
        return int(load_manifest(train)["samples"]), "manifest"
    if stage.data.dataset in PAPER_DATASETS:
        return PAPER_DATASETS[stage.data.dataset].samples, "paper"
    raise ValueError(
        f"stage {stage.name}: no manifest at {stage.data.train} and {stage.data.dataset!r} is not one of the "
        f"paper's datasets {sorted(PAPER_DATASETS)}; write the shards first (vlmtrain shard)"
    )


def checkpointed_groups(stage: StageConfig) -> tuple[bool, bool]:
    """(vision, language) recomputed in backward for `train.gradient_checkpointing` without a device memory.

    True: the LM whenever anything trains, the tower when it trains (Trainer._enable_checkpointing). `auto`
    without a memory to plan for recomputes every group that trains (issue 12's rule); with one,
    `choose_recompute` drops what fits without it.
    """
    policy = stage.train.gradient_checkpointing
    vision_trains, language_trains = stage.modules["vision"].trainable, stage.modules["language"].trainable
    if policy is True:
        return vision_trains, True
    if policy is False:
        return False, False
    return vision_trains, language_trains


@dataclass(frozen=True)
class StageShapes:
    """The meta model of a stage and what the FLOP and memory models read from it."""

    vlm: Any
    shape: ModelShape
    setup: StepSetup
    params: int
    trainable: int

    def recomputing(self, vision: bool, language: bool, every: int = 1) -> StageShapes:
        """These shapes with the vision tower and / or the LM recomputed every `every`-th layer (transformers'
        `every_n_layers`: layers 0, every, 2 x every, ...) and the other one not at all."""
        setup = replace(
            self.setup,
            vision_checkpointed=-(-self.shape.vision_layers_used // every) if vision else 0,
            language_checkpointed=-(-self.shape.language.layers // every) if language else 0,
        )
        return replace(self, setup=setup)


def model_shapes(vlm: Any, mask_mode: str) -> StageShapes:
    """Shapes of a VLM (on the meta device, or the loaded one) whose trainable set is applied; nothing recomputed."""
    shape = ModelShape.from_model(vlm)
    trains = {n: any(p.requires_grad for p in m.parameters()) for n, m in vlm.module_groups().items()}
    setup = StepSetup(
        mask_mode=mask_mode,
        vision_trains=trains["vision"],
        projector_trains=trains["projector"],
        language_trains=trains["language"],
    )
    params = sum(p.numel() for p in vlm.parameters())
    trainable = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
    return StageShapes(vlm, shape, setup, params, trainable)


def stage_shapes(stage: StageConfig, model: ModelConfig) -> StageShapes:
    """The stage's model on the meta device with its trainable set, and the step setup of its recompute policy."""
    vlm = meta_model(model)
    for name, group in vlm.module_groups().items():
        group.requires_grad_(stage.modules[name].trainable)
    for p in vlm.unused_parameters():
        p.requires_grad_(False)
    vision_ckpt, language_ckpt = checkpointed_groups(stage)
    return model_shapes(vlm, stage.mask.mode).recomputing(
        vision_ckpt, language_ckpt, stage.train.checkpoint_every_n_layers
    )


def block_trainable(vlm: Any) -> int:
    """Trainable parameters inside the towers' transformer blocks: FSDP's per-block units, gathered twice per
    micro-batch (the rest sits in the root unit, gathered once)."""
    from vlmtrain.train.engines.fsdp import transformer_blocks

    blocks = [b for g in ("vision", "language") for b in transformer_blocks(vlm, g)]
    return sum(p.numel() for b in blocks for p in b.parameters() if p.requires_grad)


def memory_per_gpu(
    stage: StageConfig, shapes: StageShapes, gpus: int, micro: int, supervised_share: float = 1.0
) -> Memory:
    """Bytes per GPU under ZeRO-2 for micro-batches of `micro` samples at their longest rows.

    `supervised_share`: the fraction of a row's tokens that are supervised (the loss's hidden-state gradient);
    1.0, the most, when the data's is not known (`micro_batch_size: auto` in training)."""
    shape, setup = shapes.shape, shapes.setup
    # A token-budget micro-batch holds at most token_budget positions, whatever its row count.
    row = stage.data.pack_length or stage.data.max_length
    tokens_in_row = stage.data.token_budget or micro * row
    acts = stack_activation_bytes(
        shape.language, shape.language.layers, setup.language_checkpointed, tokens_in_row
    )
    if setup.vision_trains:
        acts += stack_activation_bytes(
            shape.vision, shape.vision_layers_used, setup.vision_checkpointed, micro * shape.vision_tokens
        )
    acts += head_activation_bytes(
        int(tokens_in_row * supervised_share), shape.language.hidden, shape.vocab, setup.language_trains
    )
    return Memory(
        weights=BF16 * shapes.params,
        gradients=FP32 * shapes.trainable // gpus,
        optimizer=3 * FP32 * shapes.trainable // gpus,
        activations=acts,
    )


@dataclass(frozen=True)
class RecomputeChoice:
    """The towers `gradient_checkpointing: auto` recomputes, and the memory estimates it chose by."""

    towers: tuple[str, ...]
    """Recomputed towers, of "vision" and "language"."""
    tried: tuple[tuple[tuple[str, ...], int], ...]
    """(towers recomputed, `memory_per_gpu` total in bytes) of each option tried, in order; empty without a budget."""
    memory: int | None
    """The device's bytes (train.device_memory_gib or the CUDA device's); None: not known (CPU), so every tower
    that trains recomputes, as before the memory plan."""

    @property
    def budget(self) -> int | None:
        """The share of `memory` planned for (batching.AUTO_MEMORY_FRACTION, as `micro_batch_size: auto`)."""
        return None if self.memory is None else int(self.memory * AUTO_MEMORY_FRACTION)

    def describe(self) -> str:
        """One line for the log: what recomputes, and each estimate against the budget."""
        what = " + ".join(self.towers) or "nothing"
        if self.budget is None:
            return f"recompute (auto): {what}: no device memory to plan for (set train.device_memory_gib)"
        options = "; ".join(
            f"{' + '.join(t) or 'none'} {_size(b)} {'fits' if b <= self.budget else 'does not fit'}"
            for t, b in self.tried
        )
        fits = self.tried[-1][1] <= self.budget
        tail = (
            ""
            if fits
            else "; nothing fits: every trained tower recomputes (lower data.token_budget or the micro-batch)"
        )
        return (
            f"recompute (auto): {what}: plan's estimate per GPU against {_size(self.budget)} "
            f"({AUTO_MEMORY_FRACTION:.0%} of {_size(self.memory)}): {options}{tail}"
        )


def _size(n: int) -> str:
    """Bytes for a log line: GiB from 1 GiB up, MiB below (tiny test models)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def choose_recompute(
    stage: StageConfig, shapes: StageShapes, gpus: int, micro: int, memory: int | None
) -> RecomputeChoice:
    """The fewest trained towers to recompute so that `memory_per_gpu` fits the budget (RecomputeChoice.budget).

    Tried in order: none; each single trained tower, the one saving the most memory first; both. The first that
    fits wins; when none does, every trained tower recomputes. Frozen towers never recompute under `auto`: a
    frozen tower runs without autograd, and a frozen LM's recompute adds a forward to a backward that computes no
    LM weight gradients (benchmarks/README.md, "Recompute"). `memory` None: every trained tower recomputes.
    """
    trained = tuple(n for n in ("vision", "language") if getattr(shapes.setup, f"{n}_trains"))
    if memory is None:
        return RecomputeChoice(trained, (), None)
    every = stage.train.checkpoint_every_n_layers

    def total(towers: tuple[str, ...]) -> int:
        with_recompute = shapes.recomputing("vision" in towers, "language" in towers, every)
        return memory_per_gpu(stage, with_recompute, gpus, micro).total

    singles = sorted(((t,) for t in trained), key=total) if len(trained) > 1 else []
    tried: list[tuple[tuple[str, ...], int]] = []
    budget = RecomputeChoice((), (), memory).budget
    for towers in dict.fromkeys(((), *singles, trained)):
        tried.append((towers, total(towers)))
        if tried[-1][1] <= budget:
            return RecomputeChoice(towers, tuple(tried), memory)
    return RecomputeChoice(trained, tuple(tried), memory)


def device_memory_bytes(stage: StageConfig, device: torch.device) -> int | None:
    """Bytes of the device a stage runs on, that `micro_batch_size: auto` and `gradient_checkpointing: auto` plan
    for: `train.device_memory_gib`, else the CUDA device's total memory; None on CPU without the key."""
    if stage.train.device_memory_gib is not None:
        return int(stage.train.device_memory_gib * 2**30)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def auto_recompute(stage: StageConfig, vlm: Any, world_size: int, device: torch.device) -> RecomputeChoice:
    """`gradient_checkpointing: auto` for a loaded model (trainability applied) on `device`: `choose_recompute` at
    the stage's micro-batch (`auto` not yet resolved: its largest, the rank's share)."""
    micro = resolve_micro_batch(stage, world_size, None).batch.micro_batch_size
    memory = device_memory_bytes(stage, device)
    return choose_recompute(stage, model_shapes(vlm, stage.mask.mode), world_size, int(micro), memory)


def plan_stage(
    stage: StageConfig,
    model: ModelConfig,
    gpus: int,
    peak_tflops: float,
    mfu: float,
    text_tokens: tuple[int, int] | None = None,
    memory_bytes: int | None = None,
    interconnect: str = DEFAULT_INTERCONNECT,
) -> StagePlan:
    """One stage's figures on `gpus` GPUs of `peak_tflops` at `mfu`; `text_tokens` = (unsupervised, supervised)
    per sample overrides the dataset estimate; `memory_bytes` (one GPU's) bounds `micro_batch_size: auto`."""
    shapes = stage_shapes(stage, model)
    samples, source = stage_samples(stage)
    steps = stage.train.max_steps or math.floor(samples * stage.train.epochs / stage.batch.global_batch_size)
    if text_tokens is None:
        estimate = PAPER_DATASETS.get(stage.data.dataset)
        if estimate is None:
            raise ValueError(
                f"stage {stage.name}: no text-length estimate for {stage.data.dataset!r}; pass --text-tokens"
            )
        text_tokens = estimate.text_tokens()
    unsupervised, supervised = text_tokens
    image = shapes.vlm.num_image_tokens
    sample_tokens = image + unsupervised + supervised
    share = supervised / sample_tokens
    stage = resolve_micro_batch(
        stage, gpus, memory_bytes, lambda m: memory_per_gpu(stage, shapes, gpus, m, share).total
    )
    micro = stage.batch.micro_batch_size
    recompute = None
    if stage.train.gradient_checkpointing == "auto":  # as the trainer decides it, at the chosen micro-batch
        recompute = choose_recompute(stage, shapes, gpus, micro, memory_bytes)
        every = stage.train.checkpoint_every_n_layers
        shapes = shapes.recomputing("vision" in recompute.towers, "language" in recompute.towers, every)
    accumulation = stage.batch.accumulation_steps(gpus)
    layout = BatchLayout(((sample_tokens, image),) * micro, images=micro, supervised=micro * supervised)
    per_step = step_flops(shapes.shape, shapes.setup, [layout] * (stage.batch.global_batch_size // micro))
    flops = FlopCount(
        {
            p: Flops(f.forward * steps, f.backward * steps, f.recompute * steps)
            for p, f in per_step.parts.items()
        }
    )
    gpu_hours = flops.model / (mfu * peak_tflops * 1e12) / 3600
    histogram = stage.batch.global_batch_size // gpus if stage.data.token_budget is not None else 0
    by_config = {
        e: step_communication(
            shapes.trainable, accumulation, gpus, interconnect, e, block_trainable(shapes.vlm), histogram
        )
        for e in ENGINE_CONFIGS
    }
    comm = by_config[engine_config(stage)]
    return StagePlan(
        name=stage.name,
        dataset=stage.data.dataset,
        samples=samples,
        samples_source=source,
        steps=steps,
        accumulation=accumulation,
        sample_tokens=sample_tokens,
        supervised_per_sample=supervised,
        tokens=steps * stage.batch.global_batch_size * sample_tokens,
        flops=flops,
        params=shapes.params,
        trainable=shapes.trainable,
        gpu_hours=gpu_hours,
        wall_hours=gpu_hours / gpus,
        memory=memory_per_gpu(stage, shapes, gpus, micro, share),
        samples_per_gpu=stage.batch.global_batch_size // gpus,
        micro_batch=micro,
        communication=comm,
        communication_by_config=by_config,
        compute_seconds=per_step.model / (gpus * mfu * peak_tflops * 1e12),
        recompute=recompute,
    )


def plan_stages(
    stages: Sequence[StageConfig],
    gpus: int,
    gpu: str,
    mfu: float,
    text_tokens: Mapping[str, tuple[int, int]] | None = None,
    peak_tflops: float | None = None,
    memory_gib: float | None = None,
    interconnect: str = DEFAULT_INTERCONNECT,
) -> tuple[list[StagePlan], str, float]:
    """Plans of `stages` in order, the GPU's name and its peak; `text_tokens` by stage name. `memory_gib` (one GPU's)
    bounds `micro_batch_size: auto`; None: the GPU table's memory (no bound for a GPU it does not know)."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    if interconnect not in INTERCONNECTS:
        raise ValueError(f"--interconnect {interconnect!r} is not one of {sorted(INTERCONNECTS)}")
    found = gpu_peak_tflops(gpu)
    if peak_tflops is None:
        if found is None:
            from vlmtrain.train.flops import GPU_PEAK_TFLOPS

            known = ", ".join(label for _, label, _ in GPU_PEAK_TFLOPS)
            raise ValueError(f"--gpu {gpu!r} is not in the table ({known}); pass --peak-tflops")
        gpu, peak_tflops = found
    if memory_gib is None and found is not None:
        memory_gib = GPU_MEMORY_GIB[found[0]]
    memory = None if memory_gib is None else int(memory_gib * 2**30)
    by_name = {s.name: s for s in stages}
    texts = text_tokens or {}
    plans = [
        plan_stage(
            s, resolve_model(s, by_name), gpus, peak_tflops, mfu, texts.get(s.name), memory, interconnect
        )
        for s in stages
    ]
    return plans, gpu, peak_tflops


# ---- printing ---------------------------------------------------------------------------------------------
def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


STEP_COLUMNS = (
    "stage",
    "samples/GPU",
    "micro x accum",
    "reduce-scatter GB",
    "all-gather GB",
    "sent/GPU GB",
    "comm s",
    "compute s",
    "bound by",
)


def _table(title: str, columns: Sequence[str]) -> Table:
    """A table whose first column (the stage) is left-aligned and the figures right-aligned."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    return table


def plan_tables(plans: Sequence[StagePlan], gpus: int, gpu: str, peak: float, mfu: float) -> list[Table]:
    compute = Table(
        title=f"vlmtrain plan: {gpus} x {gpu} ({peak:g} dense bf16 TFLOP/s each) at {mfu:.0%} MFU"
    )
    for col in (
        "stage",
        "data",
        "samples",
        "steps",
        "tokens",
        "model FLOPs",
        "6PT all",
        "6PT trainable",
        "GPU-h",
        "wall h",
    ):
        compute.add_column(col, justify="left" if col in ("stage", "data") else "right")
    for p in plans:
        compute.add_row(
            p.name,
            p.dataset,
            f"{p.samples:,} ({p.samples_source})",
            f"{p.steps:,}",
            f"{_si(p.tokens)} ({p.sample_tokens}/sample)",
            f"{_si(p.flops.model)}",
            _si(p.six_pt_all),
            _si(p.six_pt_trainable),
            f"{p.gpu_hours:.2f}",
            f"{p.wall_hours:.2f}",
        )
    total = sum(p.gpu_hours for p in plans)
    flops = _si(sum(p.flops.model for p in plans))
    compute.add_row("total", "", "", "", "", flops, "", "", f"{total:.2f}", f"{total / gpus:.2f}")
    memory = _table(
        f"memory per GPU (GiB), ZeRO-2 over {gpus} GPU(s), one micro-batch at its longest rows",
        ("stage", "params (trainable)", "bf16 weights", "fp32 grads", "optimizer", "activations", "total"),
    )
    for p in plans:
        m = p.memory
        memory.add_row(
            p.name,
            f"{p.params / 1e6:.0f}M ({p.trainable / 1e6:.1f}M)",
            _gib(m.weights),
            _gib(m.gradients),
            _gib(m.optimizer),
            _gib(m.activations),
            _gib(m.total),
        )
    link = plans[0].communication.link if plans else ""
    engines = {p.communication.config for p in plans}
    step = _table(
        f"per optimizer step on {gpus} GPU(s), {'/'.join(sorted(engines))} collectives over {link}",
        STEP_COLUMNS,
    )
    for p in plans:
        c = p.communication
        step.add_row(
            p.name,
            str(p.samples_per_gpu),
            f"{p.micro_batch} x {p.accumulation}",
            f"{c.reduce_bytes / 1e9:.2f}",
            f"{c.gather_bytes / 1e9:.2f}",
            f"{c.wire_bytes / 1e9:.2f}",
            f"{c.seconds:.3f}",
            f"{p.compute_seconds:.3f}",
            "communication" if p.communication_bound else "compute",
        )
    configs = _table(
        f"communication per optimizer step on {gpus} GPU(s) by engine config, over {link} "
        "(zero2: reduce every micro-batch; zero1 and fsdp: once per step)",
        ("stage", "config", "reduce GB", "all-gather GB", "sent/GPU GB", "comm s", "bound by"),
    )
    for p in plans:
        for name, c in p.communication_by_config.items():
            configs.add_row(
                p.name,
                name + (" (this stage's)" if c.config == p.communication.config else ""),
                f"{c.reduce_bytes / 1e9:.2f}",
                f"{c.gather_bytes / 1e9:.2f}",
                f"{c.wire_bytes / 1e9:.2f}",
                f"{c.seconds:.3f}",
                "communication" if c.seconds > p.compute_seconds else "compute",
            )
    return [compute, memory, step, configs]


def plan_warnings(plans: Sequence[StagePlan]) -> list[str]:
    """One line per stage whose step would be bound by communication, with what to change."""
    return [
        f"{p.name}: each step sends {p.communication.wire_bytes / 1e9:.2f} GB per GPU over "
        f"{p.communication.link} ({p.communication.seconds:.3f} s) against {p.compute_seconds:.3f} s of compute: "
        f"the step is bound by communication ({p.samples_per_gpu} samples per GPU, gradients reduced "
        f"{p.accumulation}x per step). Fewer GPUs, a larger batch.global_batch_size (with optim.lr_scaling) or a "
        "faster interconnect move it back to compute"
        for p in plans
        if p.communication_bound
    ]


def parse_text_tokens(values: Sequence[str]) -> dict[str, tuple[int, int]]:
    """`--text-tokens stage3=120,300` -> {"stage3": (120, 300)} (unsupervised, supervised text tokens per sample);
    a bare stage number names the preset (`3=120,300`)."""
    out: dict[str, tuple[int, int]] = {}
    for value in values:
        name, _, counts = value.partition("=")
        parts = counts.split(",")
        if not name or len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--text-tokens {value!r}: expected STAGE=PROMPT,ANSWER, e.g. stage3=120,300")
        key = f"stage{name}" if name.isdigit() else name
        out[key] = (int(parts[0]), int(parts[1]))
    return out
