"""DeepSpeed ZeRO engine (ZeRO-2 bf16 by default) with per-group LRs and world-size-independent state."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from vlmtrain.config.schema import StageConfig
from vlmtrain.dist import DistContext
from vlmtrain.models.vlm import VisionLanguageModel, VLMOutput
from vlmtrain.precision import PrecisionPolicy, check_deepspeed_config, deepspeed_precision_config
from vlmtrain.train.engines.base import (
    Engine,
    EngineState,
    StepResult,
    broadcast_full,
    has_images,
    needs_image_path,
    with_blank_image,
)
from vlmtrain.train.optim import GroupSpec, make_optimizer, make_scheduler

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def ds_config_path(name_or_path: str) -> Path:
    """A DeepSpeed JSON config: an existing file, or the name of one in the repository's ds_configs/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidates = [
        Path.cwd() / "ds_configs" / f"{name_or_path}.json",  # a checkout
        Path(str(resources.files("vlmtrain"))).parent
        / "ds_configs"
        / f"{name_or_path}.json",  # editable install
        Path(sys.prefix)
        / "share"
        / "vlmtrain"
        / "ds_configs"
        / f"{name_or_path}.json",  # pip install (data_files)
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"DeepSpeed config {name_or_path!r} not found (looked for {path} and {[str(c) for c in candidates]}); "
        "set train.ds_config to a JSON file or a name in ds_configs/"
    )


def resolve_ds_config(stage: StageConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config file with the stage's batch, clipping and precision policy written in."""
    path = ds_config_path(stage.train.ds_config)
    cfg = json.loads(path.read_text())
    policy = PrecisionPolicy.for_precision(stage.train.precision)
    check_deepspeed_config(cfg, policy, str(path))
    accum = stage.batch.accumulation_steps(world_size)
    cfg.update(
        train_batch_size=stage.batch.global_batch_size,
        train_micro_batch_size_per_gpu=stage.batch.micro_batch_size,
        gradient_accumulation_steps=accum,
        gradient_clipping=stage.optim.grad_clip,
        zero_allow_untested_optimizer=True,
        steps_per_print=cfg.get("steps_per_print", 1 << 30),
    )
    precision = deepspeed_precision_config(policy)
    cfg["bf16"] = {**cfg.get("bf16", {}), **precision.pop("bf16")}
    cfg["data_types"] = {**cfg.get("data_types", {}), **precision.pop("data_types")}
    cfg.update(precision)  # communication_data_type
    cfg.pop("fp16", None)
    cfg.pop("optimizer", None)  # the optimizer is ours: per-group LRs and no decay on norms/biases
    cfg.pop("scheduler", None)
    return cfg


class DeepSpeedEngine(Engine):
    def __init__(
        self,
        model: VisionLanguageModel,
        stage: StageConfig,
        specs: list[GroupSpec],
        total_steps: int,
        ctx: DistContext,
    ) -> None:
        self.ctx = ctx
        self.specs = specs
        self.precision = PrecisionPolicy.for_precision(stage.train.precision)
        self.config = resolve_ds_config(stage, ctx.world_size)
        self.accumulation_steps = self.config["gradient_accumulation_steps"]
        # DeepSpeed casts the model to bf16 before it builds its fp32 masters from it; keep the incoming fp32
        # values so the masters start exact rather than bf16-rounded (matters for chained stages).
        incoming = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = make_optimizer(specs, stage.optim)
        scheduler = make_scheduler(self.optimizer, specs, total_steps, stage.optim)
        self.engine, self.ds_optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=self.optimizer, lr_scheduler=scheduler, config=self.config
        )
        self.module = self.engine.module
        self._blank_image = needs_image_path(self.module)
        # DeepSpeed links fragments to optimizer state once, after the first group's first step, so with
        # several groups the others would stay unlinked; creating the state up front links every group.
        self._prime_optimizer_state()
        for name, p in self.trainable_named_parameters():
            safe_set_full_fp32_param(p, incoming.pop(name).to(ctx.device))

    def forward(self, batch: dict[str, torch.Tensor], mask_mode: str) -> VLMOutput:
        if self._blank_image and not has_images(batch):
            # Every rank must run the image path in every micro-batch: ZeRO-2 reduces gradients in buckets
            # filled in the order they become ready, and a rank that skipped the path would mix them up.
            m = self.module
            batch = with_blank_image(batch, m.image_token_id, m.num_image_tokens, m.vision.config.image_size)
        return self.engine(**batch, mask_mode=mask_mode)

    def _mode_module(self) -> torch.nn.Module:
        return self.engine  # DeepSpeed's forward reads the wrapper's own train/eval flag

    # generation_context: the base one. ZeRO-1/2 keep a whole compute copy of every parameter on every rank,
    # so the Generator's direct submodule calls need nothing. ZeRO-3 partitions parameters: DeepSpeed hooks
    # every submodule to gather its parameters when it runs (a collective per call, matched across ranks
    # because evaluation runs in lockstep), but that is not verified here (ZeRO-3 does not train yet).
    # The override to write here once it does: gather the whole model once for the context
    # (deepspeed.zero.GatheredParameters over self.module.parameters()), as FSDPEngine does.

    def backward(self, loss_sum: torch.Tensor, step_tokens: int) -> None:
        # scale_wrt_gas=False: the token weighting already spans the accumulation window.
        self.engine.backward(loss_sum * self.loss_weight(step_tokens), scale_wrt_gas=False)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.trainable_named_parameters():
            grad = safe_get_full_grad(p)  # the accumulation buffer (fp32 under the policy)
            if self.ctx.is_main and grad is not None:
                out[name] = grad.detach().float().cpu().clone()
        return out

    def step(self) -> StepResult:
        boundary = self.engine.is_gradient_accumulation_boundary()
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        if not boundary:
            return StepResult(boundary=False)
        skipped = self.engine.skipped_steps > skipped_before
        norm = self.engine.get_global_grad_norm()
        norm_value = float(norm) if norm is not None else None
        return StepResult(boundary=True, skipped=skipped, grad_norm=None if skipped else norm_value)

    def group_lrs(self) -> dict[str, float]:
        return {g["name"]: float(g["lr"]) for g in self.ds_optimizer.param_groups}

    # ---- state --------------------------------------------------------------------------------------
    def gather_state(self) -> EngineState:
        state = EngineState(
            optimizer_steps=self._adam_step_count(), scheduler_steps=int(self.scheduler.last_epoch)
        )
        keep = self.ctx.is_main
        for name, p in self.trainable_named_parameters():
            full = safe_get_full_fp32_param(p)  # collective: every rank takes part, rank 0 keeps it
            if keep:
                state.params[name] = full.detach().float().cpu().clone()
            if state.optimizer_steps == 0:
                continue
            for key, target in zip(ADAM_STATES, (state.exp_avg, state.exp_avg_sq), strict=True):
                value = safe_get_full_optimizer_state(p, key)
                if keep:
                    target[name] = value.detach().float().cpu().clone()
        return state

    def _prime_optimizer_state(self) -> None:
        """Create AdamW's (normally lazy) state exactly as its first step would, and link it to the params."""
        for group in self.optimizer.param_groups:
            for flat in group["params"]:
                st = self.optimizer.state[flat]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        # DeepSpeed links parameter fragments to optimizer state at its first step; link them now instead.
        self.ds_optimizer._lazy_init_hp_params_optimizer_state()

    def load_state(self, state: EngineState) -> None:
        self.check_state_covers(state, self.ctx.is_main)
        dev = self.ctx.device
        for name, p in self.trainable_named_parameters():
            full = broadcast_full(state.params.get(name), p, dev)
            safe_set_full_fp32_param(p, full)
            p.data.copy_(full.to(p.dtype))  # the compute copy every rank holds
            if state.optimizer_steps > 0:
                safe_set_full_optimizer_state(p, broadcast_full(state.exp_avg.get(name), p, dev), "exp_avg")
                safe_set_full_optimizer_state(
                    p, broadcast_full(state.exp_avg_sq.get(name), p, dev), "exp_avg_sq"
                )
        for st in self.optimizer.state.values():
            if "step" in st:
                st["step"].fill_(float(state.optimizer_steps))
        self._restore_schedule(state.scheduler_steps)
