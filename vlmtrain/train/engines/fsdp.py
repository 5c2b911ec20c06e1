"""PyTorch FSDP2 engine: `fully_shard` per transformer block, bf16 compute over fp32 sharded master weights.

It keeps the DeepSpeed engine's contract, so the trainer, the checkpoints and the losses are the same:
- Trainable towers are sharded one FSDP unit per transformer block; the projector, the LM's embedding,
  final norm and tied head, and the vision tower's embeddings live in the root unit. Frozen groups are not
  sharded: their parameters are cast to the compute dtype and replicated, exactly as DeepSpeed ZeRO-2
  holds them, and no optimizer ever sees them.
- Sharded parameters stay fp32 (the master weights); `MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)` all-gathers them as bf16 for compute and reduces gradients in fp32.
- `backward` weights each micro-batch's summed token loss by world_size / (the step's supervised tokens), and
  FSDP averages over ranks, so both engines apply the token-mean gradient of the whole global batch.
  Gradients are reduced only on the last micro-batch of a window (`set_requires_gradient_sync`).
- The global gradient norm is reduced over ranks, so a non-finite gradient on any rank is seen by all:
  the step is skipped without a host read (the update is undone on the device, `_apply_if_finite`), the
  gradients are zeroed, and `settle` winds AdamW's step counts and the LR schedule back once the trainer has
  read the norm with the next step's counts (one blocking read per step in all: vlmtrain.dist.step_sync).
- Memory: `set_requires_gradient_sync(False)` keeps every unit's gradient unsharded, in fp32 (the reduce
  dtype), until the window's last micro-batch: 4 bytes x trainable parameters per GPU (0.9B: 3.6 GB, against
  3.6 GB / ranks sharded) for the whole accumulation window, in exchange for one reduce-scatter per step
  instead of one per micro-batch.
- `train.fsdp.replicate_over_nodes` shards within each node and replicates across nodes (HSDP, a 2D mesh):
  the per-block all-gathers and reduce-scatters stay inside a node, and one all-reduce of each node's gradient
  shards per step crosses the network. Per step and GPU at 0.9B trainable parameters on N nodes of 8: flat
  FSDP all-gathers 1.8 GB of bf16 weights twice (forward, backward recompute or backward) and reduce-scatters
  3.6 GB of fp32 gradients over all 8N ranks, most of it over the network; HSDP moves the same bytes over
  NVLink and sends 3.6 GB / 8 x 2 (N - 1) / N = 0.9 GB per GPU (ring all-reduce of the 450 MB shard) between
  nodes. Memory: the sharded state is 8N / 8 = N times that of flat FSDP (1/8 of it per GPU instead of 1/8N).
- `gather_state` / `load_state` go through torch.distributed.checkpoint's full state dicts and produce the
  world-size-independent EngineState that DeepSpeedEngine writes; checkpoints move between engines.
  Sharded checkpoints (`local_pieces` / `load_pieces`) address each DTensor's local shard as a range of its
  flattened full tensor (`dtensor_flat_range`), the layout DeepSpeed's fragments use too.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from vlmtrain.config.schema import FsdpConfig, StageConfig
from vlmtrain.dist import DistContext, broadcast_object
from vlmtrain.models.vlm import VisionLanguageModel, VLMOutput
from vlmtrain.precision import PrecisionPolicy
from vlmtrain.train.engines.base import (
    Engine,
    EngineState,
    StepResult,
    has_images,
    needs_image_path,
    with_blank_image,
)
from vlmtrain.train.optim import GroupSpec, make_optimizer, make_scheduler
from vlmtrain.train.shards import MOMENTS, Piece, StateReader


@dataclass(frozen=True)
class ShardPlan:
    """How the engine lays out a model's module groups."""

    sharded: tuple[str, ...]
    """Trainable groups: FSDP-sharded (towers block by block, everything else in the root unit)."""
    replicated: tuple[str, ...]
    """Frozen groups: cast to the compute dtype, left out of FSDP (`ignored_params`) and of the optimizer."""


def plan_sharding(model: VisionLanguageModel, stage: StageConfig) -> ShardPlan:
    groups = tuple(model.module_groups())
    sharded = tuple(g for g in groups if stage.modules[g].trainable)
    return ShardPlan(sharded, tuple(g for g in groups if g not in sharded))


def transformer_blocks(model: VisionLanguageModel, group: str) -> list[nn.Module]:
    """The repeated blocks of a tower; each becomes an FSDP unit, all-gathered just before it runs."""
    if group == "vision":
        return list(model.vision_family.encoder_layers(model.vision))  # SigLIP/CLIP `layers`, DINOv2 `layer`
    if group == "language":
        return list(model.language.get_decoder().layers)
    return []


def mixed_precision(policy: PrecisionPolicy) -> MixedPrecisionPolicy:
    """FSDP2's form of the policy: sharded params are the masters; all-gather in compute, reduce in fp32.

    FSDP2 also accumulates unsharded gradients between reductions (set_requires_gradient_sync(False)) in
    `reduce_dtype`, which makes the reduce dtype the gradient-accumulation dtype as well.
    """
    if policy.master != torch.float32 or policy.grad_accum != policy.reduce:
        raise ValueError(f"FSDP2 cannot hold this precision policy: {policy.as_dict()}")
    if policy.compute == policy.master:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=policy.compute, reduce_dtype=policy.reduce)


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Parameters only: buffers such as RoPE's inv_freq stay fp32, as DeepSpeed also leaves them."""
    for p in module.parameters():
        p.data = p.data.to(dtype)


def apply_fsdp(
    model: VisionLanguageModel, plan: ShardPlan, mesh: DeviceMesh, policy: PrecisionPolicy
) -> VisionLanguageModel:
    """Shard `model` in place, bottom-up: the blocks of the trainable towers, then the root.

    Only blocks and the root become units. The LM decoder cannot be one: its embedding is tied to the LM
    head, which runs outside the decoder's forward, so both stay in the root unit (unsharded for the step).
    The vision tower cannot be one either: `fully_shard` swaps a module's class, and transformers finds
    which outputs a model can record (the hidden states the projector reads) by its class. Its patch and
    position embeddings are small and join the root unit.
    """
    mp = mixed_precision(policy)
    ignored: set[nn.Parameter] = set()
    groups = model.module_groups()
    for group in plan.replicated:
        cast_parameters(groups[group], policy.frozen)
        ignored.update(groups[group].parameters())
    for group in plan.sharded:
        for block in transformer_blocks(model, group):
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    return model


def ranks_per_node(configured: int | None, env: Mapping[str, str] = os.environ) -> int:
    """Ranks of one node: the configured number, else the launcher's (torchrun and deepspeed export
    LOCAL_WORLD_SIZE; srun SLURM_NTASKS_PER_NODE, e.g. `8` or `8(x2)`)."""
    if configured is not None:
        return configured
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        found = re.match(r"\d+", env.get(name, ""))
        if found:
            return int(found.group())
    raise ValueError(
        "train.fsdp.replicate_over_nodes: the launcher does not say how many ranks a node has (no "
        "LOCAL_WORLD_SIZE or SLURM_NTASKS_PER_NODE); set train.fsdp.ranks_per_node"
    )


def device_mesh(ctx: DistContext, cfg: FsdpConfig) -> DeviceMesh:
    """One flat mesh over every rank, or with `replicate_over_nodes` a 2D (replicate, shard) mesh: ranks
    `node * per_node .. node * per_node + per_node - 1` shard among themselves, and each shard is replicated
    across the nodes (torchrun, deepspeed and srun number a node's ranks consecutively)."""
    if not cfg.replicate_over_nodes:
        return init_device_mesh(ctx.device.type, (ctx.world_size,))
    per_node = ranks_per_node(cfg.ranks_per_node)
    if ctx.world_size % per_node:
        raise ValueError(
            f"train.fsdp.replicate_over_nodes: {ctx.world_size} ranks do not fill whole nodes of {per_node}; "
            "set train.fsdp.ranks_per_node to the ranks of one node"
        )
    shape = (ctx.world_size // per_node, per_node)
    return init_device_mesh(ctx.device.type, shape, mesh_dim_names=("replicate", "shard"))


def rebind_specs(specs: list[GroupSpec], named: dict[str, nn.Parameter]) -> list[GroupSpec]:
    """The parameter groups with `fully_shard`'s new (DTensor) parameters in place of the originals."""
    return [replace(s, params=tuple(named[n] for n in s.param_names)) for s in specs]


class FSDPEngine(Engine):
    def __init__(
        self,
        model: VisionLanguageModel,
        stage: StageConfig,
        specs: list[GroupSpec],
        total_steps: int,
        ctx: DistContext,
    ) -> None:
        self.ctx = ctx
        self.accumulation_steps = stage.batch.accumulation_steps(ctx.world_size)
        self.grad_clip = stage.optim.grad_clip
        self.plan = plan_sharding(model, stage)
        _check_specs(model, specs)
        self.mesh = device_mesh(ctx, stage.train.fsdp)
        self.precision = PrecisionPolicy.for_precision(stage.train.precision)
        self.module = apply_fsdp(model, self.plan, self.mesh, self.precision)
        self._check_trainable_sharded()
        self.specs = rebind_specs(specs, dict(self.module.named_parameters()))
        self.optimizer = make_optimizer(self.specs, stage.optim)
        self.scheduler = make_scheduler(self.optimizer, self.specs, total_steps, stage.optim)
        self._micro = 0  # micro-batches done in the current accumulation window
        self._stepped: list[dict[str, Any]] = []  # AdamW states the last boundary stepped (settle winds back)
        self._window = self.accumulation_steps  # micro-batches of the open step (begin_step)
        self._blank_image = needs_image_path(self.module)

    def layout(self) -> str:
        names = self.mesh.mesh_dim_names or ("shard",)
        dims = " x ".join(f"{size} {name}" for size, name in zip(self.mesh.shape, names, strict=True))
        kind = "hybrid (HSDP)" if self.mesh.ndim == 2 else "flat"
        return f"FSDP2 {kind} mesh: {dims}"

    def _check_trainable_sharded(self) -> None:
        plain = [n for n, p in self.trainable_named_parameters() if not isinstance(p, DTensor)]
        if plain:
            raise RuntimeError(f"trainable parameters outside every FSDP unit: {plain[:3]}")

    @property
    def fsdp_root(self) -> FSDPModule:
        return self.module  # type: ignore[return-value]  # fully_shard made the model an FSDPModule

    # ---- steps --------------------------------------------------------------------------------------
    def begin_step(self, n_micro: int) -> None:
        if n_micro < 1:
            raise ValueError(f"an optimizer step needs at least one micro-batch, got {n_micro}")
        self._window, self._micro = n_micro, 0

    def forward(self, batch: dict[str, torch.Tensor], mask_mode: str) -> VLMOutput:
        if self._blank_image and not has_images(batch):
            batch = with_blank_image(
                batch,
                self.module.image_token_id,
                self.module.num_image_tokens,
                self.module.image_size,
            )
        return self.module(**batch, mask_mode=mask_mode)

    @contextlib.contextmanager
    def generation_context(self) -> Iterator[VisionLanguageModel]:
        """Every FSDP unit gathered once and kept whole until the context exits.

        Generation calls the model's submodules directly (the Generator's KV-cache steps), so the root unit
        (embedding, head, projector) must be unsharded outside a root forward, and a decoding step would
        otherwise all-gather every block again. One blank-image forward through the root unshards every unit
        the generation uses (and runs FSDP's lazy init if no forward has yet); with reshard-after-forward off
        the blocks stay whole. Cost: the compute-dtype model is held whole on every rank for the context
        (0.9B parameters in bf16: 1.8 GB), gathered once instead of once per decoding step.
        """
        blocks = [m for m in self.module.modules() if isinstance(m, FSDPModule) and m is not self.module]
        for block in blocks:
            block.set_reshard_after_forward(False, recurse=False)
        try:
            self.eval_forward(self.blank_batch(), "prefix")  # only its gathers count; any mask does
            with torch.no_grad():
                yield self.module
        finally:
            for block in blocks:
                block.set_reshard_after_forward(True, recurse=False)
            for unit in (self.fsdp_root, *blocks):
                unit.reshard()  # local: frees the whole copies; training's next forward gathers as usual

    def backward(self, loss_sum: torch.Tensor, step_tokens: int) -> None:
        last = self._micro + 1 == self._window
        # Reduce once per window, on its last micro-batch; until then FSDP2 sums the unsharded gradients in
        # the reduce dtype (fp32), not in bf16.
        self.fsdp_root.set_requires_gradient_sync(last)
        (loss_sum * self.loss_weight(step_tokens)).backward()

    def full_gradients(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.trainable_named_parameters():
            grad = p.grad
            if grad is None:
                continue
            full = grad.full_tensor() if isinstance(grad, DTensor) else grad  # collective for DTensors
            if self.ctx.is_main:
                out[name] = full.detach().float().cpu().clone()
        return out

    def step(self) -> StepResult:
        self._micro += 1
        if self._micro < self._window:
            return StepResult(boundary=False)
        self._micro = 0
        norm = self._clip_gradients()
        self._apply_if_finite(torch.isfinite(norm))
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(boundary=True, norm=norm)

    def _clip_gradients(self) -> torch.Tensor:
        """Global L2 norm of the gradients (before clipping), identical on every rank, left on the device; the
        gradients are clipped by it. A non-finite norm turns them into zeros or NaNs: that update is undone."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            raise RuntimeError("no trainable parameter received a gradient in this accumulation window")
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # the sum over every rank's shards: one value everywhere
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)  # tensor math: no host read
        return norm

    def _apply_if_finite(self, finite: torch.Tensor) -> None:
        """The optimizer and LR-schedule step, kept only where `finite` (a device bool): no host read.

        What the update writes on the device (the parameter shards, AdamW's two moments) is copied first and
        put back when the norm is not finite, so a skipped step leaves them bitwise unchanged. AdamW's step
        counts and the schedule live on the host; `settle` winds them back once the trainer has read the norm,
        before the next step. Cost per optimizer step: a copy of the trainable shards and both moments (12
        bytes per trainable parameter / shard ranks: 0.9B on 64 GPUs, 170 MB) and a few elementwise passes over
        them, against a second blocking read per step (which stalls the queue behind the whole backward).
        """
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        before = []
        with torch.no_grad():
            for p in params:
                state = self.optimizer.state[p]
                moments = (_local(state[k]).clone() if k in state else None for k in ADAM_MOMENTS)
                before.append([_local(p).clone(), *moments])
        self.optimizer.step()
        self.scheduler.step()
        self._stepped = [self.optimizer.state[p] for p in params]
        with torch.no_grad():
            for p, old in zip(params, before, strict=True):
                written = [p, *(self.optimizer.state[p][k] for k in ADAM_MOMENTS)]
                for t, prev in zip(written, old, strict=True):
                    local = _local(t)
                    # A moment this step created (the first ever) goes back to AdamW's fresh zeros.
                    kept = prev if prev is not None else torch.zeros_like(local)
                    local.copy_(torch.where(finite, local, kept))

    def settle(self, skipped: bool) -> None:
        if skipped:
            for state in self._stepped:
                state["step"] -= 1  # the undone update was not an AdamW step: bias correction stays put
            self._restore_schedule(self.scheduler.last_epoch - 1)
        self._stepped = []

    def group_lrs(self) -> dict[str, float]:
        return {g["name"]: float(g["lr"]) for g in self.optimizer.param_groups}

    # ---- state --------------------------------------------------------------------------------------
    def gather_state(self, moments: bool = True) -> EngineState:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0 only
        state = EngineState(
            optimizer_steps=self._adam_step_count(), scheduler_steps=int(self.scheduler.last_epoch)
        )
        names = [n for n, _ in self.trainable_named_parameters()]
        model_sd = get_model_state_dict(self.module, options=opts)
        # Before the first applied step AdamW has no state, and asking for it would create some (the
        # state-dict API runs a zero step), changing the bias correction of the next real step.
        moments = moments and state.optimizer_steps > 0
        optim_sd = get_optimizer_state_dict(self.module, self.optimizer, options=opts) if moments else {}
        if not self.ctx.is_main:
            return state
        state.params = {n: _fp32(model_sd[n]) for n in names}
        if moments:
            moments = optim_sd["state"]
            state.exp_avg = {n: _fp32(moments[n]["exp_avg"]) for n in names}
            state.exp_avg_sq = {n: _fp32(moments[n]["exp_avg_sq"]) for n in names}
        return state

    def load_state(self, state: EngineState) -> None:
        is_main = self.ctx.is_main
        self.check_state_covers(state, is_main)
        names = [n for n, _ in self.trainable_named_parameters()]
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        params = {n: state.params[n] for n in names} if is_main else {}
        set_model_state_dict(self.module, params, options=opts)
        if state.optimizer_steps > 0:
            self._check_moments(state, names)
            optim_sd = self._full_optimizer_state(state, names) if is_main else {}
            set_optimizer_state_dict(self.module, self.optimizer, optim_sd, options=opts)
        else:
            self.optimizer.state.clear()  # AdamW starts fresh, as in a new run
        self._restore_schedule(state.scheduler_steps)

    def local_pieces(self) -> dict[str, Piece]:
        moments = self._adam_step_count() > 0
        out = {}
        for name, p in self.trainable_named_parameters():
            start, numel, primary = dtensor_flat_range(p)
            if numel == 0 or not primary:
                continue  # nothing here, or an HSDP replica of a shard that replica 0 writes
            tensors = {"param": p.to_local().reshape(-1)}
            if moments:
                st = self.optimizer.state[p]
                tensors.update({k: st[k].to_local().reshape(-1) for k in MOMENTS})
            out[name] = Piece(tuple(p.shape), start, numel, tensors)
        return out

    def load_pieces(self, reader: StateReader, optimizer_steps: int, scheduler_steps: int) -> None:
        named = self.trainable_named_parameters()
        reader.check_covers({n: tuple(p.shape) for n, p in named}, optimizer_steps > 0)
        self.optimizer.state.clear()  # before the first step AdamW has no state, as in a new run
        with torch.no_grad():
            for name, p in named:
                start, numel, _ = dtensor_flat_range(p)  # replicas load their shard too
                targets = {"param": p}
                if optimizer_steps > 0:
                    # AdamW's own state layout: a float32 step count and moments shaped (and sharded) as
                    # the parameter.
                    st = self.optimizer.state[p]
                    st["step"] = torch.tensor(float(optimizer_steps), dtype=torch.float32)
                    for k in MOMENTS:
                        st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        targets[k] = st[k]
                for kind, target in targets.items():
                    local = target.to_local()
                    local.copy_(reader.read(kind, name, start, numel).view(local.shape))
        self._restore_schedule(scheduler_steps)

    def _check_moments(self, state: EngineState, names: list[str]) -> None:
        """Collective: a checkpoint that took optimizer steps must carry both moments of every parameter."""
        missing = None
        if self.ctx.is_main:
            missing = [n for n in names if n not in state.exp_avg or n not in state.exp_avg_sq]
        missing = broadcast_object(missing)
        if missing:
            raise KeyError(
                f"checkpoint has optimizer_steps={state.optimizer_steps} but lacks AdamW moments of "
                f"{len(missing)} parameter(s), e.g. {missing[:3]}; optimizer.safetensors is incomplete"
            )

    def _full_optimizer_state(self, state: EngineState, names: list[str]) -> dict[str, Any]:
        """AdamW's state dict keyed by parameter name: the format torch.distributed.checkpoint loads from."""
        step = torch.tensor(float(state.optimizer_steps), dtype=torch.float32)
        per_param = {
            n: {"step": step.clone(), "exp_avg": state.exp_avg[n], "exp_avg_sq": state.exp_avg_sq[n]}
            for n in names
        }
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": list(spec.param_names)}
            for g, spec in zip(self.optimizer.param_groups, self.specs, strict=True)
        ]
        return {"state": per_param, "param_groups": groups}


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the same storage: writing it writes the DTensor), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def dtensor_flat_range(t: DTensor) -> tuple[int, int, bool]:
    """(start, numel) of this rank's local shard in the flattened full tensor, and whether this rank is the
    first replica of it (the one that saves it).

    FSDP2 places its parameters (and AdamW's moments, created like them) as Shard(0) over the shard mesh
    dimension, and Replicate over HSDP's replicate one. Shard(0) splits dim 0 as `torch.chunk` does (chunks of
    ceil(rows / n) rows, the last ones shorter or empty), so a shard is a range of whole rows: a contiguous
    range of the flattened tensor.
    """
    coord = t.device_mesh.get_coordinate()
    if coord is None:
        raise RuntimeError("this rank is not in the parameter's device mesh")
    first, rows, primary = 0, t.shape[0] if t.dim() else 1, True
    for dim, placement in enumerate(t.placements):
        if placement.is_replicate():
            primary = primary and coord[dim] == 0
            continue
        if not placement.is_shard(0):
            raise NotImplementedError(f"sharded checkpoints: unsupported DTensor placement {placement}")
        chunk = -(-rows // t.device_mesh.size(dim))
        lo = min(coord[dim] * chunk, rows)
        first, rows = first + lo, min(lo + chunk, rows) - lo
    local = t.to_local()
    if (local.shape[0] if local.dim() else 1) != rows:
        raise RuntimeError(f"local shard of {tuple(t.shape)} has {tuple(local.shape)}, expected {rows} rows")
    row = math.prod(t.shape[1:])
    return first * row, rows * row, primary


def _fp32(t: torch.Tensor) -> torch.Tensor:
    # A copy even when nothing needs converting: on a CPU world of one the "full" tensor is the live shard.
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()


def _check_specs(model: VisionLanguageModel, specs: list[GroupSpec]) -> None:
    """Only trainable parameters of the model may reach the optimizer, each once."""
    named = dict(model.named_parameters())
    seen: set[str] = set()
    for spec in specs:
        for name in spec.param_names:
            if name not in named:
                raise KeyError(f"optimizer group {spec.name} names {name}, which the model does not have")
            if not named[name].requires_grad:
                raise ValueError(f"optimizer group {spec.name} holds frozen parameter {name}")
            if name in seen:
                raise ValueError(f"parameter {name} is in more than one optimizer group")
            seen.add(name)
