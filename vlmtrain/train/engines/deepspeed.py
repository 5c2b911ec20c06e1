"""DeepSpeed ZeRO engine (ZeRO-2 bf16 by default) with per-group LRs and world-size-independent state."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed import comm as ds_comm
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)

from vlmtrain.config.load import ConfigError
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
from vlmtrain.train.shards import KINDS, Piece, StateReader

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
    check_supported(cfg, path, stage, world_size)
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
        self.config_source = stage.train.ds_config
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
        self._window, self._micro = self.accumulation_steps, 0  # the open step's micro-batch count, done
        # DeepSpeed links fragments to optimizer state once, after the first group's first step, so with
        # several groups the others would stay unlinked; creating the state up front links every group.
        self._prime_optimizer_state()
        for name, p in self.trainable_named_parameters():
            safe_set_full_fp32_param(p, incoming.pop(name).to(ctx.device))

    def begin_step(self, n_micro: int) -> None:
        if n_micro < 1:
            raise ValueError(f"an optimizer step needs at least one micro-batch, got {n_micro}")
        self._window, self._micro = n_micro, 0
        self._set_boundary()

    def _set_boundary(self) -> None:
        # DeepSpeed's own counter ends a window every `gradient_accumulation_steps` (fixed in its config); the
        # explicit flag puts the boundary on the step's last micro-batch, whatever the count. It is read by
        # ZeRO's gradient hooks during backward and by engine.step(), so it is set before each forward.
        self.engine.set_gradient_accumulation_boundary(self._micro + 1 == self._window)

    def forward(self, batch: dict[str, torch.Tensor], mask_mode: str) -> VLMOutput:
        if (self._blank_image or self.zero3) and not has_images(batch):
            # Every rank must run the image path in every micro-batch: ZeRO-2 reduces gradients in buckets
            # filled in the order they become ready, and a rank that skipped the path would mix them up.
            # ZeRO-3 all-gathers each module's weights as it runs, so even a frozen tower must run everywhere.
            m = self.module
            batch = with_blank_image(batch, m.image_token_id, m.num_image_tokens, m.image_size)
        return self.engine(**batch, mask_mode=mask_mode)

    def _mode_module(self) -> torch.nn.Module:
        return self.engine  # DeepSpeed's forward reads the wrapper's own train/eval flag

    # generation_context: the base one. ZeRO-1/2 keep a whole compute copy of every parameter on every rank,
    # so the Generator's direct submodule calls need nothing. ZeRO-3 partitions parameters and gathers them
    # in per-submodule hooks; lockstep generation through those hooks is not verified, so multi-rank ZeRO-3
    # with validation.cider is refused at config time (check_supported) rather than left to hang.

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
        self._micro = 0 if boundary else self._micro + 1
        self._set_boundary()
        if not boundary:
            return StepResult(boundary=False)
        # DeepSpeed decides a skip on the host inside its step (its bf16 overflow check reads an all-reduced
        # flag, and it tests the norm for NaN/Inf: device syncs of its own); the norm itself is left unread.
        norm = self.engine.get_global_grad_norm()
        if self.engine.skipped_steps > skipped_before:
            norm = float("inf")  # skipped: what the trainer reads as "not applied"
        elif norm is None:
            raise RuntimeError(
                "DeepSpeed computed no gradient norm (zero_optimization.compute_grad_norm=false in "
                f"{self.config_source}?); the trainer logs it and detects skipped steps by it: remove that key"
            )
        return StepResult(
            boundary=True, norm=torch.as_tensor(norm, dtype=torch.float32, device=self.ctx.device)
        )

    def settle(self, skipped: bool) -> None:
        """Nothing to wind back: DeepSpeed decided the skip on the host and left its schedule and moments alone."""

    def group_lrs(self) -> dict[str, float]:
        return {g["name"]: float(g["lr"]) for g in self.ds_optimizer.param_groups}

    # ---- state --------------------------------------------------------------------------------------
    def gather_state(self, moments: bool = True) -> EngineState:
        state = EngineState(
            optimizer_steps=self._adam_step_count(), scheduler_steps=int(self.scheduler.last_epoch)
        )
        keep = self.ctx.is_main
        for name, p in self.trainable_named_parameters():
            full = safe_get_full_fp32_param(p)  # collective: every rank takes part, rank 0 keeps it
            if keep:
                state.params[name] = full.detach().float().cpu().clone()
            if state.optimizer_steps == 0 or not moments:
                continue
            for key, target in zip(ADAM_STATES, (state.exp_avg, state.exp_avg_sq), strict=True):
                value = safe_get_full_optimizer_state(p, key)
                if keep:
                    target[name] = value.detach().float().cpu().clone()
        return state

    def local_pieces(self) -> dict[str, Piece]:
        moments = self._adam_step_count() > 0
        out = {}
        for name, p in self.trainable_named_parameters():
            start, numel = self._local_range(p)
            if numel == 0:
                continue
            if self.zero3:
                # ZeRO-3's partition of the parameter's flat tensor, padded to the partition size.
                tensors = {"param": safe_get_local_fp32_param(p).narrow(0, 0, numel)}
                if moments:
                    tensors.update(
                        {k: safe_get_local_optimizer_state(p, k).narrow(0, 0, numel) for k in ADAM_STATES}
                    )
            else:
                # ZeRO-1/2: this rank's fragment of the fp32 partition, and of each moment.
                mapping = p._hp_mapping
                tensors = {"param": mapping.hp_fragment}
                if moments:
                    tensors.update({k: mapping.get_optim_state_fragment(k) for k in ADAM_STATES})
            out[name] = Piece(tuple(full_shape_like(p).shape), start, numel, tensors)
        return out

    def _local_range(self, p: torch.nn.Parameter) -> tuple[int, int]:
        """(start, numel) of this rank's part in the flattened full parameter; numel 0: it holds none."""
        if self.zero3:
            # Rank r of the data-parallel group holds elements [r * partition, (r + 1) * partition) of the
            # flattened parameter, the last partition padded past its end.
            part = p.ds_tensor.ds_numel
            start = ds_comm.get_rank(group=p.ds_process_group) * part
            return start, max(0, min(part, p.ds_numel - start))
        mapping = p._hp_mapping
        if mapping is None:
            return 0, 0
        return mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel

    def load_pieces(self, reader: StateReader, optimizer_steps: int, scheduler_steps: int) -> None:
        named = self.trainable_named_parameters()
        reader.check_covers({n: tuple(full_shape_like(p).shape) for n, p in named}, optimizer_steps > 0)
        kinds = KINDS if optimizer_steps > 0 else KINDS[:1]
        for name, p in named:
            start, numel = self._local_range(p)
            for kind in kinds:
                value = reader.read(kind, name, start, numel).to(self.ctx.device)
                if self.zero3:
                    padded = torch.zeros(p.ds_tensor.ds_numel, dtype=torch.float32, device=self.ctx.device)
                    padded[:numel] = value
                    if kind == "param":
                        safe_set_local_fp32_param(p, padded)
                    else:
                        safe_set_local_optimizer_state(p, padded, kind)
                elif numel:
                    p._hp_mapping.get_hp_fragment(None if kind == "param" else kind).data.copy_(value)
        if self.zero3:
            refresh_zero3_compute_params(self.ds_optimizer)
        else:
            # Collective: each rank casts its fp32 partition into its bf16 one and all-gathers them, so every
            # rank's compute copy is whole again (what ZeRO-2's own step does after the update).
            self.ds_optimizer.update_lp_params()
        self._set_step_counts(optimizer_steps, scheduler_steps)

    def _set_step_counts(self, optimizer_steps: int, scheduler_steps: int) -> None:
        for st in self.optimizer.state.values():
            if "step" in st:
                st["step"].fill_(float(optimizer_steps))
        self._restore_schedule(scheduler_steps)

    def _prime_optimizer_state(self) -> None:
        """Create AdamW's (normally lazy) state exactly as its first step would, and link it to the params."""
        if self.zero3:
            # ZeRO-3 keeps the optimizer's param lists empty between steps (it steps one flat fp32
            # partition per sub-group) and reads moments straight from `state[flat]`: nothing to link.
            flats = list(self.ds_optimizer.fp32_partitioned_groups_flat)
        else:
            flats = [flat for group in self.optimizer.param_groups for flat in group["params"]]
        for flat in flats:
            st = self.optimizer.state[flat]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        if not self.zero3:
            # ZeRO-1/2 link parameter fragments to optimizer state at their first step; link them now.
            self.ds_optimizer._lazy_init_hp_params_optimizer_state()

    @property
    def zero3(self) -> bool:
        """ZeRO stage 3: parameters are partitioned between forwards (`p.data` is an empty placeholder)."""
        return self.engine.zero_optimization_partition_weights()

    def load_state(self, state: EngineState) -> None:
        self.check_state_covers(state, self.ctx.is_main)
        dev = self.ctx.device
        for name, p in self.trainable_named_parameters():
            like = full_shape_like(p)
            full = broadcast_full(state.params.get(name), like, dev)
            safe_set_full_fp32_param(p, full)
            if not self.zero3:
                p.data.copy_(full.to(p.dtype))  # the compute copy every rank holds
            if state.optimizer_steps > 0:
                for key, saved in zip(ADAM_STATES, (state.exp_avg, state.exp_avg_sq), strict=True):
                    safe_set_full_optimizer_state(p, broadcast_full(saved.get(name), like, dev), key)
        if self.zero3:
            refresh_zero3_compute_params(self.ds_optimizer)
        self._set_step_counts(state.optimizer_steps, state.scheduler_steps)


def full_shape_like(p: torch.nn.Parameter) -> torch.Tensor:
    """A storage-free tensor of the parameter's full shape (ZeRO-3's `p.shape` is its empty placeholder's)."""
    return torch.empty(getattr(p, "ds_shape", p.shape), device="meta")


def refresh_zero3_compute_params(optimizer: Any) -> None:
    """Collective: rewrite ZeRO-3's low-precision partitions from its fp32 masters, as its own step does.

    `safe_set_full_fp32_param` writes only the fp32 master partition; the bf16 partition the forward
    gathers from, and the small "persistent" parameters every rank keeps whole, still hold the old values.
    This is the sequence DeepSpeed's checkpoint load runs: release every gathered parameter, copy each
    sub-group's fp32 partition into its bf16 partition, then re-gather the persistent parameters.
    """
    optimizer._partition_all_parameters()
    for sub_group in range(len(optimizer.fp16_groups)):
        optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)
    optimizer.checkpoint_event_epilogue()


SUPPORTED_ZERO_STAGES = (1, 2, 3)
SHIPPED_CONFIGS = "zero2_bf16 (default), zero1_bf16, zero2_offload_bf16, zero3_bf16, zero3_offload_bf16"


def check_supported(cfg: dict[str, Any], path: Path, stage: StageConfig, world_size: int) -> None:
    """Refuse a DeepSpeed config vlmtrain has not verified to train, checkpoint and resume exactly.

    Verified (tests/test_ds_configs.py): ZeRO-1 (zero1_bf16), ZeRO-2 and ZeRO-3, each of the last two with and
    without CPU offload. ZeRO-0 and NVMe offload are untested paths of DeepSpeed's optimizers and of this
    engine's state handling.
    """
    zero = cfg.get("zero_optimization", {})
    level = zero.get("stage", 0)
    if level not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(
            f"{path}: zero_optimization.stage={level} is not supported (vlmtrain trains, checkpoints and "
            f"resumes ZeRO stages 1, 2 and 3); set train.ds_config to one of {SHIPPED_CONFIGS}"
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in ("none", "cpu"):
            raise ConfigError(
                f"{path}: zero_optimization.{key}.device={device!r} is not supported (only 'cpu' or no "
                f"offload); use zero2_offload_bf16 or zero3_offload_bf16 for CPU offload"
            )
    if level == 3 and world_size > 1 and stage.validation.data is not None and stage.validation.cider:
        # ZeRO-3 gathers each module's weights from every rank as it runs (and checks the module order
        # across ranks), so a forward on rank 0 alone waits forever for the other ranks.
        raise ConfigError(
            f"stage {stage.name}: validation.cider captions on rank 0 alone, which ZeRO-3 ({path}) cannot do "
            f"with {world_size} ranks; set validation.cider=false, or train.ds_config=zero2_bf16"
        )
