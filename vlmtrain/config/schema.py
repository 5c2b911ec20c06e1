"""Configuration dataclasses for one training stage; every field documents itself and is validated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

MODULE_GROUPS = ("vision", "projector", "language")
INIT_OVERRIDES = ("attn_backend",)
"""`model` keys that apply on top of an `init_from` checkpoint (a kernel choice, not part of the weights);
every other `model` key a stage with `init_from` gives must agree with the checkpoint (vlmtrain.train.init_check)."""
MaskMode = Literal["bidirectional", "prefix", "causal"]
AttnBackend = Literal["auto", "sdpa", "flex", "eager"]
NoiseStrategy = Literal["random_token"]


class ValidationError(ValueError):
    """An impossible value; `path` is the dotted key path inside the stage config."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def _require(condition: bool, path: str, message: str) -> None:
    if not condition:
        raise ValidationError(path, message)


_GIVEN_KEYS = "_given_keys"


def given_keys(section: object) -> frozenset[str]:
    """The keys of a config section that its JSON file or a `--set` override wrote, as the loader recorded them.

    Empty for a section built in code. Kept off the dataclass fields, so it is neither a config key nor part
    of the resolved config; `dataclasses.replace` of an enclosing section keeps it (the section object is
    shared), a replace of the section itself does not.
    """
    return getattr(section, _GIVEN_KEYS, frozenset())


def record_given_keys(section: object, keys: frozenset[str]) -> None:
    """Called by the loader on each section it builds (frozen dataclasses: set past `__setattr__`)."""
    object.__setattr__(section, _GIVEN_KEYS, keys)


@dataclass(frozen=True)
class ModelConfig:
    """Which vision tower, projector and language model make up the VLM."""

    vision: str | None = "google/siglip-so400m-patch14-224"
    """Hub id or local directory of a vision tower checkpoint; its config.json `model_type` picks the family: `siglip` (SigLIP, fixed-resolution SigLIP2), `clip`, `dinov2`, `dinov2_with_registers` (a full SigLIP / CLIP checkpoint with a text tower works); its preprocessor_config.json, when present, sets the image preprocessing."""
    vision_config: dict[str, Any] | None = None
    """Config keyword arguments of a randomly initialised tower (instead of loading one); `model_type` (default `siglip`) names the family, the rest are its transformers vision config's arguments."""
    language: str | None = "Qwen/Qwen2.5-0.5B"
    """Hub id or local directory of a causal LM checkpoint (any AutoModelForCausalLM whose tokenizer has a chat template, or see `chat_template`): Qwen2.5, Qwen3, Llama 3.x, SmolLM2, Gemma 3 are tested."""
    language_config: dict[str, Any] | None = None
    """Qwen2Config keyword arguments: build a randomly initialised LM instead of loading one."""
    tokenizer: str | None = None
    """Hub id or directory of the tokenizer; defaults to `language`."""
    chat_template: str | None = None
    """Jinja chat template (the text, or a path to a .jinja file) replacing the tokenizer's own: needed for a base LM whose tokenizer has none. The turn end, pad and stop tokens are derived from it (docs/data_pipeline.md)."""
    vision_feature_layer: int | None = None
    """Which hidden state of the vision tower feeds the projector (-1: the last encoder layer); null: the family's default (SigLIP and DINOv2 -1, CLIP -2 as LLaVA)."""
    pixel_shuffle: int = 1
    """k: merge each k x k block of neighbouring patches into one token before the projector (SmolVLM / Idefics3), dividing the image tokens by k^2; k must divide the patch grid's side. 1: the paper's projector."""
    projector_hidden_act: str = "gelu"
    """Activation between the projector's two linear layers (the paper uses GELU)."""
    attn_backend: AttnBackend = "auto"
    """Attention kernel of the LM: `sdpa` (boolean 4D mask), `flex` (FlexAttention BlockMask, CUDA for training), `eager`, or `auto`: sdpa for now on every device (FlexAttention's CUDA tests have not run yet; docs/architecture.md)."""

    def validate(self, path: str) -> None:
        for part, cfg in (("vision", self.vision_config), ("language", self.language_config)):
            source = getattr(self, part)
            _require(
                (source is None) != (cfg is None),
                f"{path}.{part}",
                f"give exactly one of `{part}` (a checkpoint) or `{part}_config` (random init)",
            )
        _require(
            isinstance(self.pixel_shuffle, int) and self.pixel_shuffle >= 1,
            f"{path}.pixel_shuffle",
            f"must be an integer >= 1 (1: no pixel shuffle), got {self.pixel_shuffle!r}",
        )


LORA_ALL_LINEAR = "all-linear"
Quantize = Literal["4bit"]


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (PEFT's LoRA) on one module group: its base weights freeze, the adapters train at the
    group's `lr`. A stage's output then holds the adapters and the fully trained groups, not the frozen base."""

    r: int = 8
    """Rank of each adapter pair (A: r x in, B: out x r)."""
    alpha: float = 16.0
    """Scale numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input in training (PEFT's `lora_dropout`); evaluation and the merged model have none."""
    target_modules: Literal["all-linear"] | tuple[str, ...] = LORA_ALL_LINEAR
    """`all-linear`: every linear layer of the group (an LM's output head excepted, PEFT's rule), or a list of
    module-name suffixes such as ["q_proj", "v_proj"]."""
    quantize: Quantize | None = None
    """`4bit`: QLoRA, the frozen base's linear layers held in 4-bit NF4 (the language group only, reloaded through
    transformers' BitsAndBytesConfig; needs CUDA and `pip install bitsandbytes`). None: the base stays in the
    engine's precision."""

    def validate(self, path: str) -> None:
        _require(self.r >= 1, f"{path}.r", f"must be >= 1, got {self.r}")
        _require(self.alpha > 0, f"{path}.alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        if not isinstance(self.target_modules, str):
            _require(
                len(self.target_modules) > 0,
                f"{path}.target_modules",
                f'must be "{LORA_ALL_LINEAR}" or a non-empty list of module-name suffixes',
            )
            for i, name in enumerate(self.target_modules):
                _require(bool(name.strip()), f"{path}.target_modules[{i}]", "must not be empty")


@dataclass(frozen=True)
class ModuleGroupConfig:
    """Trainability and learning rate of one module group (vision, projector or language)."""

    trainable: bool
    """Whether the group's parameters are optimised; frozen groups get no gradients and no optimizer state."""
    lr: float
    """Peak learning rate of the group; must be 0 for a frozen group and > 0 for a trainable one."""
    lora: LoraConfig | None = None
    """Train low-rank adapters instead of the group's weights ([LoraConfig](#loraconfig)); needs `trainable:
    true` (the adapters train at `lr`, the base weights freeze). None: the whole group trains as `trainable`
    says."""

    def validate(self, path: str) -> None:
        _require(self.lr >= 0, f"{path}.lr", f"learning rate must be >= 0, got {self.lr}")
        if self.lora is not None:
            _require(
                self.trainable,
                f"{path}.lora",
                "adapters need a trainable group: set trainable: true and lr > 0 (the base weights freeze "
                "and the adapters train at lr), or remove `lora`",
            )
            self.lora.validate(f"{path}.lora")
        if self.trainable:
            _require(
                self.lr > 0, f"{path}.lr", "a trainable group needs lr > 0 (set trainable: false to freeze)"
            )
        else:
            _require(self.lr == 0, f"{path}.lr", f"a frozen group must have lr 0, got {self.lr}")


@dataclass(frozen=True)
class MaskConfig:
    """Attention pattern of the stage and the stage-0 input noise."""

    mode: MaskMode = "prefix"
    """`bidirectional` (stage 0), `prefix` (image sees image, text causal and sees the image) or `causal`."""
    noise_ratio: float = 0.0
    """Fraction of text input tokens replaced by noise (stage 0: 0.2); labels keep the clean tokens."""
    noise_strategy: NoiseStrategy = "random_token"
    """How a corrupted token is replaced: `random_token` draws uniformly from the non-special vocabulary."""

    def validate(self, path: str) -> None:
        _require(
            0.0 <= self.noise_ratio <= 1.0,
            f"{path}.noise_ratio",
            f"must be in [0, 1], got {self.noise_ratio}",
        )


@dataclass(frozen=True)
class DataConfig:
    """Where the stage's training shards are and how samples become token sequences."""

    dataset: str = ""
    """Human-readable dataset name (e.g. COCO-118k-Recap), logged and recorded with the output."""
    train: str = ""
    """Manifest (`.../manifest.json`) or brace pattern of the WebDataset shards to train on."""
    max_length: int = 2048
    """Longest sequence in tokens, image tokens included; longer conversations lose trailing turns."""
    pack_length: int | None = None
    """Pack samples into rows of this many tokens (None: one sample per row, padded)."""
    token_budget: int | None = None
    """Most positions (rows x row width) of a micro-batch. Set: each rank's share of the global batch
    (global_batch_size / world size samples) is packed whole, first-fit decreasing, into rows at most
    pack_length (or max_length) wide and laid into as few micro-batches within this budget as fit, so the
    micro-batch count varies per step (batch.micro_batch_size then only sizes validation chunks and
    DeepSpeed's nominal accumulation). None: fixed micro-batches of micro_batch_size samples."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    caption_choice: Literal["first", "random"] = "random"
    """Which reference caption a caption sample trains on each epoch."""
    open_shards: int = 4
    """Shards each reader worker keeps open and interleaves, so a micro-batch mixes several shards. Each is
    held whole in memory: about open_shards x shard bytes x num_workers per rank."""
    max_corrupt_shards: int = 8
    """Damaged shards (unreadable, truncated, sha256 or sample count not as in the manifest) a rank may meet
    before the run stops: their readable samples are used and the lost ones skipped as `corrupt_shard`;
    more than a handful means broken storage or a bad copy rather than a stray bad file."""

    def validate(self, path: str) -> None:
        _require(self.max_length > 0, f"{path}.max_length", f"must be > 0, got {self.max_length}")
        _require(self.open_shards >= 1, f"{path}.open_shards", f"must be >= 1, got {self.open_shards}")
        _require(
            self.max_corrupt_shards >= 0,
            f"{path}.max_corrupt_shards",
            f"must be >= 0, got {self.max_corrupt_shards}",
        )
        if self.pack_length is not None:
            _require(
                self.pack_length >= self.max_length,
                f"{path}.pack_length",
                f"must be >= max_length ({self.max_length}) so every sample fits a row",
            )
        if self.token_budget is not None:
            row = self.pack_length if self.pack_length is not None else self.max_length
            _require(
                self.token_budget >= row,
                f"{path}.token_budget",
                f"must be >= the row length {row} (pack_length or max_length) so a row fits a micro-batch",
            )
        _require(self.num_workers >= 0, f"{path}.num_workers", "must be >= 0")


@dataclass(frozen=True)
class BatchConfig:
    """Global batch and how it is split into micro-batches and accumulation steps."""

    global_batch_size: int = 128
    """Samples per optimizer step over all ranks (the paper: 128)."""
    micro_batch_size: int | Literal["auto"] = 8
    """Samples per forward pass on one rank; accumulation = global / (micro * world size). `auto`: the largest micro-batch that divides the rank's share of the global batch and fits the device by `vlmtrain plan`'s memory estimate (`train.device_memory_gib`, else the CUDA device's memory; on CPU the whole share), chosen when the stage starts and logged."""

    def validate(self, path: str) -> None:
        _require(self.global_batch_size > 0, f"{path}.global_batch_size", "must be > 0")
        if self.micro_batch_size == "auto":
            return
        _require(self.micro_batch_size > 0, f"{path}.micro_batch_size", "must be > 0")
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            f"{path}.global_batch_size",
            f"{self.global_batch_size} is not divisible by micro_batch_size {self.micro_batch_size}",
        )

    def accumulation_steps(self, world_size: int) -> int:
        if self.micro_batch_size == "auto":
            raise ValidationError(
                "batch.micro_batch_size",
                "auto is chosen per world size and device (vlmtrain.train.batching.resolve_micro_batch) before "
                "the batch is split",
            )
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValidationError(
                "batch.global_batch_size",
                f"{self.global_batch_size} is not divisible by micro_batch_size x world size = {per_step}",
            )
        return self.global_batch_size // per_step


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule shared by all module groups."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW beta1, beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to biases and norm weights."""
    min_lr: float = 1e-8
    """Learning rate at the end of the cosine decay (the paper: 1e-8)."""
    warmup_ratio: float = 0.03
    """Fraction of the steps with linear warmup from 0 before the cosine decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """How every group's `lr` follows a `batch.global_batch_size` other than `lr_reference_batch`: `none` (as written), `linear` (x global / reference) or `sqrt` (x its square root). Printed when the stage starts and recorded in its stage_config.json."""
    lr_reference_batch: int = 128
    """The global batch the groups' `lr` values are tuned for (the presets': the paper's 128)."""

    def validate(self, path: str) -> None:
        for i, b in enumerate(self.betas):
            _require(0.0 <= b < 1.0, f"{path}.betas[{i}]", f"must be in [0, 1), got {b}")
        _require(self.eps > 0, f"{path}.eps", "must be > 0")
        _require(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")
        _require(self.min_lr >= 0, f"{path}.min_lr", "must be >= 0")
        _require(0.0 <= self.warmup_ratio < 1.0, f"{path}.warmup_ratio", "must be in [0, 1)")
        _require(self.grad_clip >= 0, f"{path}.grad_clip", "must be >= 0")
        _require(self.lr_reference_batch > 0, f"{path}.lr_reference_batch", "must be > 0")


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging of a stage (rank 0): the step metrics of `metrics.jsonl`, the stage config, the module-group table and the LRs read back at the start. Needs `pip install 'vlmtrain[wandb]'`; `WANDB_MODE=offline` keeps the run on disk (`wandb sync` uploads it later)."""

    project: str
    """W&B project the run goes to."""
    entity: str | None = None
    """W&B team or user that owns the project; None: the logged-in user's default entity."""
    name: str | None = None
    """Run name; None: `<run dir name>/<stage name>`. Each stage of a command is its own W&B run."""
    group: str | None = None
    """Group that collects the stages of one run directory; None: the run directory's name."""
    tags: tuple[str, ...] = ()
    """Tags of the run (the stage name is added)."""

    def validate(self, path: str) -> None:
        _require(bool(self.project.strip()), f"{path}.project", "must not be empty (the W&B project name)")
        for i, tag in enumerate(self.tags):
            _require(bool(tag.strip()), f"{path}.tags[{i}]", "must not be empty")


@dataclass(frozen=True)
class FsdpConfig:
    """Options of the FSDP2 engine (`train.engine: fsdp`)."""

    replicate_over_nodes: bool = False
    """Hybrid sharding (HSDP): parameters, gradients and optimizer state sharded over the ranks of one node and replicated across nodes (a 2D device mesh, nodes x ranks per node), so the per-block all-gathers and reduce-scatters stay on the node's NVLink and one gradient all-reduce per step crosses the network between nodes. False: one flat mesh over every rank."""
    ranks_per_node: int | None = None
    """Ranks of one node for `replicate_over_nodes`; None: the launcher's (LOCAL_WORLD_SIZE from torchrun or deepspeed, SLURM_NTASKS_PER_NODE under srun)."""

    def validate(self, path: str) -> None:
        if self.ranks_per_node is not None:
            _require(self.ranks_per_node >= 1, f"{path}.ranks_per_node", "must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Length of the stage, numerics, checkpointing and logging."""

    epochs: float = 1.0
    """Passes over the stage's data (fractional values allowed); sets the number of optimizer steps."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides `epochs` when set)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Parameter and compute dtype of the engine."""
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    """Activation recompute per tower. `auto`: of the towers whose weights train (the LM in stages 2-3, the vision tower when it trains; none in stages 0-1, where the LM is frozen and only passes gradients to the projector), only those `vlmtrain plan`'s memory estimate of the micro-batch needs to fit `device_memory_gib` (else the CUDA device's memory; fewest towers first, logged at the start; on CPU without device_memory_gib all of them); `true`: every trained tower and also a frozen LM that backward passes through; `false`: none. docs/training.md has the measured costs."""
    compile: Literal["auto"] | bool = "auto"
    """torch.compile of each vision and LM transformer layer (regional, dynamic shapes) and of the loss chunk (vlmtrain/models/compile.py). `auto`: on with CUDA once the CUDA tests have passed for this torch (vlmtrain/models/cuda_validated.json, written by benchmarks/gpu.sh), off otherwise; on CPU compiling costs tens of seconds per stage for a small gain (benchmarks/README.md, "Compile")."""
    checkpoint_every_n_layers: int = 1
    """In a checkpointed tower, recompute every n-th transformer layer (1: all); the others keep their activations, trading memory back for speed."""
    engine: Literal["deepspeed", "fsdp"] = "deepspeed"
    """Distributed engine."""
    ds_config: str = "zero2_bf16"
    """DeepSpeed config: a file path or the name of one shipped in ds_configs/."""
    seed: int = 0
    """Seed for initialisation, data order and noise."""
    save_every: int = 500
    """Write a resumable checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many periodic checkpoints to keep."""
    checkpoint_format: Literal["sharded", "gathered"] = "sharded"
    """`sharded`: every rank writes its own part of the fp32 weights and AdamW moments in parallel (`rank-XXXXX-of-YYYYY.safetensors` and its JSON index); `gathered`: rank 0 gathers the full state and writes `model.safetensors` / `optimizer.safetensors` alone. Either format resumes on any world size and either engine."""
    checkpoint_async: bool = False
    """Sharded checkpoints only: copy each rank's part to host memory, write it in a background thread while training goes on, and mark the checkpoint COMPLETE at the next save or the end of the stage. False: every save finishes before training continues."""
    log_every: int = 1
    """Print and record metrics every N optimizer steps."""
    max_bad_steps: int = 5
    """Stop with an error after this many consecutive non-finite steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files."""
    wandb: WandbConfig | None = None
    """Also log to Weights & Biases ([WandbConfig](#wandbconfig)); None: off."""
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    """Options of the FSDP2 engine ([FsdpConfig](#fsdpconfig)): hybrid sharding over nodes."""
    device_memory_gib: float | None = None
    """Memory of one device that `batch.micro_batch_size: auto` and `gradient_checkpointing: auto` plan for; None: the CUDA device's own (on CPU no bound: the rank's whole share of the global batch, and every trained tower recomputes)."""
    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one GPU that the logged MFU divides by; None: looked up from the GPU's name in vlmtrain/train/flops.py (bf16 on CUDA; on CPU, an unknown GPU or fp32 compute the MFU is null and TFLOP/s alone is logged)."""

    def validate(self, path: str) -> None:
        _require(self.epochs > 0, f"{path}.epochs", "must be > 0")
        if self.device_memory_gib is not None:
            _require(self.device_memory_gib > 0, f"{path}.device_memory_gib", "must be > 0")
        if self.max_steps is not None:
            _require(self.max_steps > 0, f"{path}.max_steps", "must be > 0")
        _require(self.save_every >= 0, f"{path}.save_every", "must be >= 0")
        _require(self.keep_checkpoints >= 1, f"{path}.keep_checkpoints", "must be >= 1")
        _require(
            not self.checkpoint_async or self.checkpoint_format == "sharded",
            f"{path}.checkpoint_async",
            'needs checkpoint_format: "sharded" (a gathered checkpoint is written by rank 0 alone, synchronously)',
        )
        _require(self.log_every >= 1, f"{path}.log_every", "must be >= 1")
        _require(self.max_bad_steps >= 1, f"{path}.max_bad_steps", "must be >= 1")
        if self.peak_tflops is not None:
            _require(
                self.peak_tflops > 0,
                f"{path}.peak_tflops",
                f"must be > 0 (TFLOP/s of one GPU, e.g. 989 for an H100 SXM), got {self.peak_tflops}",
            )
        _require(
            isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto",
            f"{path}.gradient_checkpointing",
            f'must be "auto", true or false, got {self.gradient_checkpointing!r}',
        )
        _require(
            isinstance(self.compile, bool) or self.compile == "auto",
            f"{path}.compile",
            f'must be "auto", true or false, got {self.compile!r}',
        )
        _require(self.checkpoint_every_n_layers >= 1, f"{path}.checkpoint_every_n_layers", "must be >= 1")
        if self.wandb is not None:
            self.wandb.validate(f"{path}.wandb")
        self.fsdp.validate(f"{path}.fsdp")


@dataclass(frozen=True)
class LmmsValidationConfig:
    """lmms-eval benchmarks during training (`vlmtrain eval lmms` on the weights being trained), on every rank."""

    tasks: tuple[str, ...]
    """lmms-eval task names (e.g. ["pope", "mme"]), or tasks of `include_path`."""
    limit: int | None = None
    """Only the first N documents of each task (None: all)."""
    every: int = 0
    """Run every N optimizer steps (0: only at the end of the stage)."""
    batch_size: int = 8
    """Questions generated together (split over the ranks in micro_batch_size chunks)."""
    include_path: str | None = None
    """A folder of extra lmms-eval task YAMLs (local datasets)."""
    env: str | None = None
    """lmms-eval's venv (default: $VLMTRAIN_LMMS_ENV or ~/.cache/vlmtrain/lmms-venv; `vlmtrain eval lmms --setup`)."""

    def validate(self, path: str) -> None:
        _require(bool(self.tasks) and all(self.tasks), f"{path}.tasks", "must name at least one task")
        _require(self.limit is None or self.limit >= 1, f"{path}.limit", "must be >= 1 or null")
        _require(self.every >= 0, f"{path}.every", "must be >= 0")
        _require(self.batch_size >= 1, f"{path}.batch_size", "must be >= 1")


@dataclass(frozen=True)
class ValidationConfig:
    """Optional validation during training, logged to `validation.jsonl` beside the training metrics."""

    data: str | None = None
    """Held-out shards (manifest or brace pattern); None disables validation."""
    every: int = 0
    """Validate every N optimizer steps (0: only at the end of the stage)."""
    max_samples: int = 64
    """Samples used for the held-out loss, and images captioned for CIDEr."""
    cider: bool = False
    """Also caption the held-out images (greedy) and score CIDEr against their references (needs Java)."""
    max_new_tokens: int = 32
    """Longest generated caption for CIDEr."""
    lmms: LmmsValidationConfig | None = None
    """lmms-eval benchmarks at their own interval (needs no `data`); scores go to metrics.jsonl, TensorBoard, W&B."""

    def validate(self, path: str) -> None:
        _require(self.every >= 0, f"{path}.every", "must be >= 0")
        _require(self.max_samples >= 1, f"{path}.max_samples", "must be >= 1")
        _require(self.max_new_tokens >= 1, f"{path}.max_new_tokens", "must be >= 1")
        if self.lmms is not None:
            self.lmms.validate(f"{path}.lmms")


@dataclass(frozen=True)
class StageConfig:
    """One training stage: what trains, with which mask, on which data, for how long."""

    name: str
    """Stage name; also the folder of its output under the run directory."""
    modules: dict[str, ModuleGroupConfig]
    """Trainability and LR of each module group: `vision`, `projector`, `language`."""
    description: str = ""
    """Free text shown in logs."""
    init_from: str | None = None
    """Previous stage's name (its output under the run directory) or a path to a saved model; None: `model`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Components to build when `init_from` is None. With `init_from`, the model comes from the checkpoint: keys given here must agree with it, except `attn_backend`, which applies on top."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    """Attention mask mode and input noise."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Global and micro batch."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop settings."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Held-out loss and CIDEr during training."""

    def validate(self, path: str = "") -> None:
        prefix = f"{path}." if path else ""
        _require(bool(self.name), f"{prefix}name", "must not be empty")
        missing = [g for g in MODULE_GROUPS if g not in self.modules]
        _require(
            not missing,
            f"{prefix}modules",
            f"missing module group(s) {missing}; every stage names all of {MODULE_GROUPS}",
        )
        for group, cfg in self.modules.items():
            cfg.validate(f"{prefix}modules.{group}")
        _require(
            any(cfg.trainable for cfg in self.modules.values()),
            f"{prefix}modules",
            "no module group is trainable; a stage must train something",
        )
        self.model.validate(f"{prefix}model")
        self.mask.validate(f"{prefix}mask")
        self.data.validate(f"{prefix}data")
        self.batch.validate(f"{prefix}batch")
        self.optim.validate(f"{prefix}optim")
        self.train.validate(f"{prefix}train")
        self.validation.validate(f"{prefix}validation")

    @property
    def trainable_groups(self) -> tuple[str, ...]:
        return tuple(g for g in MODULE_GROUPS if self.modules[g].trainable)

    @property
    def lora_groups(self) -> dict[str, LoraConfig]:
        """The groups that train adapters, with their LoRA settings."""
        return {g: cfg.lora for g, cfg in self.modules.items() if cfg.lora is not None}
