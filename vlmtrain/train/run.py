"""Run stages end to end: resolve configs and `init_from`, build model, tokenizer and data, train, chain."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer

from vlmtrain.config.load import stage_config_to_dict
from vlmtrain.config.schema import StageConfig
from vlmtrain.data.chat_format import prepare_tokenizer
from vlmtrain.dist import DistContext, barrier
from vlmtrain.logging import console_for
from vlmtrain.models.freeze import apply_trainability, trainability_table
from vlmtrain.models.language import describe_attn_backend
from vlmtrain.models.lora import LoraBase
from vlmtrain.models.masks import FLEX_BLOCK_SIZE
from vlmtrain.models.vlm import VisionLanguageModel
from vlmtrain.train.batching import describe_batch, per_rank_samples, resolve_micro_batch
from vlmtrain.train.init_check import resolve_init, resolve_model
from vlmtrain.train.preflight import require_preflight
from vlmtrain.train.steps import total_steps_for
from vlmtrain.train.trainer import FINAL, PREEMPTION, Fault, StageResult, Trainer, is_stage_complete
from vlmtrain.train.validation import Validator


def load_model_and_tokenizer(stage: StageConfig, run_dir: Path) -> tuple[VisionLanguageModel, object]:
    """The stage's model and tokenizer; a `model` block that disagrees with `init_from` fails before any load."""
    stage = resolve_model(stage, run_dir)
    init = resolve_init(stage, run_dir)
    if init is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(init))
        prepare_tokenizer(tokenizer, stage.model.chat_template)
        model = VisionLanguageModel.from_pretrained(init, attn_backend=stage.model.attn_backend)
        return model, tokenizer
    source = stage.model.tokenizer or stage.model.language
    if source is None:
        raise ValueError(
            f"stage {stage.name}: model.tokenizer is required when the LM is built from a config"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    # The chat format (turn end, pad) before anything tokenizes; a base LM without a template fails here.
    prepare_tokenizer(tokenizer, stage.model.chat_template)
    torch.manual_seed(stage.train.seed)
    return VisionLanguageModel.from_config(stage.model, tokenizer), tokenizer


def lora_base(stage: StageConfig, run_dir: Path) -> LoraBase | None:
    """Where a LoRA stage's frozen base comes from (recorded in its output); None for a stage without LoRA."""
    if not stage.lora_groups:
        return None
    init = resolve_init(stage, run_dir)
    model = stage_config_to_dict(stage)["model"]
    return LoraBase(None if init is None else str(init.resolve()), model, stage.train.seed)


def make_loader_factory(
    stage: StageConfig,
    model: VisionLanguageModel,
    tokenizer,
    ctx: DistContext,
    source: str | None = None,
    training: bool = True,
):
    """Reader state -> this rank's loader. `training=False`: one unshuffled pass (validation)."""
    from vlmtrain.data.process import ProcessorConfig, SampleProcessor
    from vlmtrain.data.stream import build_loader

    processor = SampleProcessor(
        tokenizer,
        ProcessorConfig(
            max_length=stage.data.max_length,
            num_image_tokens=model.num_image_tokens,
            caption_choice=stage.data.caption_choice,
            seed=stage.train.seed,
        ),
        model.image_transform,  # the tower's preprocessing (vlm_config.json)
    )

    # A token budget (training only) makes each item a step group: the rank's share of the global batch.
    budget = stage.data.token_budget if training else None
    per_item = stage.batch.micro_batch_size if budget is None else step_samples(stage, ctx.world_size)

    def factory(state):
        return build_loader(
            source or stage.data.train,
            processor,
            micro_batch_size=per_item,
            rank=ctx.rank,
            world_size=ctx.world_size,
            num_workers=stage.data.num_workers if training else 0,
            seed=stage.train.seed,
            pad_token_id=tokenizer.pad_token_id,
            shuffle=training,
            resample=training,
            pack_length=stage.data.pack_length,
            # FlexAttention works in 128-token tiles: every batching path aligns its row widths to them.
            pad_to_multiple_of=FLEX_BLOCK_SIZE if model.attn_backend == "flex" else None,
            state=state,
            pin_memory=ctx.device.type == "cuda",
            open_shards=stage.data.open_shards,
            max_corrupt_shards=stage.data.max_corrupt_shards,
            token_budget=budget,
        )

    return factory


def step_samples(stage: StageConfig, world_size: int) -> int:
    """One rank's samples per optimizer step (its share of the global batch)."""
    return per_rank_samples(stage, world_size)


def _memory_bound(stage: StageConfig, ctx: DistContext) -> tuple[int | None, Callable[[int], int] | None]:
    """(bytes of one device, bytes per GPU a micro-batch size needs) for `micro_batch_size: auto`.

    `train.device_memory_gib`, else the CUDA device's memory; (None, None) on CPU or with an integer micro-batch.
    The estimate is `vlmtrain plan`'s memory model for the stage's model, built on the meta device.
    """
    if stage.batch.micro_batch_size != "auto":
        return None, None
    from vlmtrain.train.plan import device_memory_bytes, memory_per_gpu, stage_shapes

    memory = device_memory_bytes(stage, ctx.device)
    if memory is None:
        return None, None

    shapes = stage_shapes(stage, stage.model)
    return memory, lambda micro: memory_per_gpu(stage, shapes, ctx.world_size, micro).total


def _validator(stage: StageConfig, stage_dir: Path, ctx: DistContext, model, tokenizer) -> Validator | None:
    """The stage's `validation` section as a Validator, or None when it names neither data nor lmms-eval tasks."""
    source = stage.validation.data
    if source is None and stage.validation.lmms is None:
        return None
    factory = (
        make_loader_factory(stage, model, tokenizer, ctx, source=source, training=False) if source else None
    )
    return Validator(
        stage, ctx, tokenizer, lambda: factory(None) if factory else [], stage_dir / "validation.jsonl"
    )


def run_stage(
    stage: StageConfig, run_dir: Path, ctx: DistContext, resume: bool = False, fault: Fault | None = None
) -> StageResult:
    console = console_for(ctx.is_main)
    stage = resolve_model(stage, run_dir)  # the model block the output records is the one that trains
    stage_dir = run_dir / stage.name
    # `auto` becomes a number (recorded in the stage's stage_config.json); an impossible batch fails here,
    # before a model loads.
    stage = resolve_micro_batch(stage, ctx.world_size, *_memory_bound(stage, ctx))
    console.rule(f"[bold]{stage.name}[/] {stage.description}")
    console.print(describe_batch(stage, ctx.world_size))
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # paper: TF32 where fp32 is needed
        torch.backends.cudnn.allow_tf32 = True
    model, tokenizer = load_model_and_tokenizer(stage, run_dir)
    apply_trainability(model, stage.modules, stage.train.seed, lora_base(stage, run_dir))
    console.print(trainability_table(model, stage.modules, f"{stage.name}: module groups"))
    console.print(f"{stage.name}: {describe_attn_backend(stage.model.attn_backend, model.attn_backend)}")
    model.to(ctx.device)
    total = total_steps_for(stage)
    trainer = Trainer(
        stage,
        stage_dir,
        ctx,
        model,
        tokenizer,
        make_loader_factory(stage, model, tokenizer, ctx),
        total,
        fault,
        _validator(stage, stage_dir, ctx, model, tokenizer),
    )
    return trainer.fit(resume=resume)


def run_stages(
    stages: Sequence[StageConfig], run_dir: Path, ctx: DistContext, resume: bool = False
) -> list[StageResult | Path]:
    """Train stages in order; with `resume`, stages whose output is complete are skipped."""
    console = console_for(ctx.is_main)
    # Data, init_from, DeepSpeed configs, run dir, hub cache, batches: all problems at once, before any load.
    for note in require_preflight(stages, run_dir, ctx.world_size, resume).notes:
        console.print(note)
    results: list[StageResult | Path] = []
    PREEMPTION.install()  # for the whole run: a stop signal while a model loads is kept, not fatal
    try:
        for stage in stages:
            final = run_dir / stage.name / FINAL
            # Preflight refused a finished stage whose config has changed (check_completed_stages).
            if resume and is_stage_complete(run_dir / stage.name):
                console.print(f"[bold]{stage.name}[/]: already complete at {final}, skipping")
                results.append(final)
                continue
            results.append(run_stage(stage, run_dir, ctx, resume=resume))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            barrier()
    finally:
        PREEMPTION.uninstall()
    return results
