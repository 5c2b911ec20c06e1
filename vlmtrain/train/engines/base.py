"""The engine interface the trainer loop drives: forward, backward, step, LRs, full-state gather/load, each rank's
own part of the state for sharded checkpoints (`local_pieces` / `load_pieces`), and the evaluation entries
(held-out forward, lockstep generation) that validation runs through."""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vlmtrain.data.process import IGNORE_INDEX
from vlmtrain.dist import DistContext
from vlmtrain.models.vlm import VisionLanguageModel, VLMOutput
from vlmtrain.precision import PrecisionPolicy
from vlmtrain.train.shards import Piece, StateReader

if TYPE_CHECKING:
    from vlmtrain.eval.generate import GenerationConfig, Generator


@dataclass
class StepResult:
    """What `Engine.step` did at the end of a micro-batch."""

    boundary: bool  # an optimizer step was due (end of the accumulation window)
    norm: torch.Tensor | None = None
    """At a boundary: the global L2 norm of the window's gradients before clipping, a device scalar left unread
    (the trainer reads it with the next step's counts, in vlmtrain.dist.step_sync). Both engines apply a step
    only when its norm is finite: a non-finite norm (a NaN/Inf gradient on some rank) means it was skipped."""

    @property
    def grad_norm(self) -> float | None:
        """The norm read on the host (a device sync: for tests and tools, not the loop); None when skipped."""
        value = None if self.norm is None else float(self.norm)
        return value if value is not None and math.isfinite(value) else None

    @property
    def skipped(self) -> bool:
        """The step was due but not applied (reads the norm: a device sync)."""
        return self.norm is not None and not math.isfinite(float(self.norm))


@dataclass
class EngineState:
    """World-size-independent training state: full fp32 tensors keyed by parameter name.

    Only rank 0 holds the tensors after `gather_state`; other ranks get empty dicts.
    """

    params: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable params, fp32 master copies
    exp_avg: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_steps: int = 0  # AdamW's step count (bias correction)
    scheduler_steps: int = 0


class Engine(ABC):
    """A model wrapped for distributed training with one optimizer and LR schedule."""

    module: (
        VisionLanguageModel  # the model as the engine runs it (DeepSpeed: bf16 copies; FSDP: sharded fp32)
    )
    accumulation_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: PrecisionPolicy
    ctx: DistContext

    def layout(self) -> str:
        """How the engine spreads the model over the ranks, for the log ("" when there is nothing to say)."""
        return ""

    @abstractmethod
    def begin_step(self, n_micro: int) -> None:
        """Open an optimizer step of `n_micro` micro-batches: the window ends (gradients reduced, optimizer
        applied) at the `n_micro`-th `step()` call. Every rank must pass the same count (ZeRO-2 reduces
        buckets and FSDP gathers blocks on every micro-batch); `accumulation_steps` is the fixed-batch count,
        a token budget varies it per step."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor], mask_mode: str) -> VLMOutput: ...

    @abstractmethod
    def backward(self, loss_sum: torch.Tensor, step_tokens: int) -> None:
        """Backward of one micro-batch's summed token loss, weighted by the whole step's token count.

        `step_tokens` is the number of supervised tokens of the optimizer step over every micro-batch and rank,
        so the gradient the optimizer applies is (sum of every token's loss gradient) / step_tokens, whatever
        the micro-batch layout, padding or packing, accumulation count or world size.
        """

    def loss_weight(self, step_tokens: int) -> float:
        """What a micro-batch's loss sum is multiplied by before backward.

        Both engines average gradients over ranks (ZeRO's reduce, FSDP's reduce-scatter), which the world-size
        factor undoes; accumulation sums micro-batches (DeepSpeed is told not to divide by it). A step without
        any supervised token (possible only with tiny batches) gets zero gradients rather than a division by 0.
        """
        return self.ctx.world_size / max(step_tokens, 1)

    @abstractmethod
    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Collective, after the last micro-batch's backward and before `step`: the accumulated gradient of every
        trainable parameter as a full fp32 tensor (rank 0 holds them; other ranks get an empty dict)."""

    @abstractmethod
    def step(self) -> StepResult:
        """Call after every micro-batch's backward; applies the optimizer at accumulation boundaries."""

    @abstractmethod
    def settle(self, skipped: bool) -> None:
        """The trainer read the last boundary's norm (with the next step's counts) and says whether that step
        was skipped; call before the next optimizer step. An engine that skips on the device (FSDP) puts its
        host-side counters back here (LR schedule, AdamW's step counts); DeepSpeed skips on the host itself."""

    @abstractmethod
    def group_lrs(self) -> dict[str, float]:
        """The LR each optimizer group gets right now, read back from the optimizer itself."""

    @abstractmethod
    def gather_state(self, moments: bool = True) -> EngineState:
        """Collective: assemble the full state (tensors on rank 0 only); `moments=False`: the fp32 weights alone."""

    @abstractmethod
    def load_state(self, state: EngineState) -> None:
        """Collective: restore a state gathered by any engine at any world size."""

    def counts(self) -> tuple[int, int]:
        """(AdamW's step count, the LR scheduler's): the same on every rank."""
        return self._adam_step_count(), int(self.scheduler.last_epoch)

    @abstractmethod
    def local_pieces(self) -> dict[str, Piece]:
        """Local: this rank's part of every trainable parameter's fp32 state, as 1-D tensors (live views where
        the engine's layout allows; no collective), AdamW moments included once an optimizer step created them. Parameters this rank holds
        nothing of to save (no fragment, or a replica another rank writes) are left out."""

    @abstractmethod
    def load_pieces(self, reader: StateReader, optimizer_steps: int, scheduler_steps: int) -> None:
        """Collective: restore the state from a checkpoint of any engine, world size and format, each rank
        reading only the ranges it holds (a bad checkpoint fails on every rank alike: each reads the same
        index, `StateReader.check_covers`)."""

    # ---- evaluation ---------------------------------------------------------------------------------
    # Validation runs the model through these entries, never through the module directly: under FSDP a
    # forward issues collectives (an all-gather per sharded block), so every rank must run the same modules
    # the same number of times. Callers pad the shorter ranks with `blank_batch()` forwards and keep every
    # rank's `generate` calls equal in number; the entries keep the rest (image path, decoding steps) equal.

    def eval_forward(self, batch: dict[str, torch.Tensor], mask_mode: str) -> VLMOutput:
        """`forward` without autograd and in eval mode, with training's blank-image rule (as `forward` applies it)."""
        with torch.no_grad(), self._eval_mode():
            return self.forward(batch, mask_mode)

    def blank_batch(self) -> dict[str, torch.Tensor]:
        """One row holding a blank image and nothing supervised: a rank's stand-in forward (results discarded)."""
        m = self.module
        empty = torch.zeros((0, 0), dtype=torch.long, device=self.ctx.device)
        batch = {"input_ids": empty, "labels": empty, "image_flags": empty.bool(), "sample_ids": empty}
        return with_blank_image(batch, m.image_token_id, m.num_image_tokens, m.image_size)

    def all_ranks_done(self, done: bool) -> bool:
        """Collective (one all-reduce; none in a world of one): whether `done` holds on every rank."""
        from vlmtrain.dist import any_rank

        return not any_rank(not done, self.ctx.device)

    @contextlib.contextmanager
    def generator(self, tokenizer: Any, config: GenerationConfig) -> Iterator[Generator]:
        """Collective: a Generator that decodes in lockstep on every rank, over the engine's model.

        The Generator's KV-cache steps call the model's submodules directly (embedding, decoder, head), not
        its forward; `generation_context` makes that valid for the engine's parameter layout. Each decoding
        step ends with `all_ranks_done`, so all ranks run the same number of steps; the caller must call
        `generate` equally often on every rank, each time with at least one prompt (a dummy where a rank has
        none), and with an image in every call when `needs_image_path` (validation captions always have one).
        """
        from vlmtrain.eval.generate import Generator

        with self.generation_context() as model, self._eval_mode():
            yield Generator(model, tokenizer, config, all_done=self.all_ranks_done)

    @contextlib.contextmanager
    def generation_context(self) -> Iterator[VisionLanguageModel]:
        """Collective: the model, usable by direct submodule calls (no autograd) until the context exits.

        Default: replicated parameters (DeepSpeed ZeRO-1/2) need nothing. Engines that partition parameters
        override it (FSDP gathers every unit once for the whole context).
        """
        with torch.no_grad():
            yield self.module

    def _mode_module(self) -> torch.nn.Module:
        """The outermost module whose train/eval flag the engine's forward reads."""
        return self.module

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        target = self._mode_module()
        was_training = target.training
        target.eval()
        try:
            yield
        finally:
            target.train(was_training)

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def _adam_step_count(self) -> int:
        steps = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return max(steps, default=0)

    def _restore_schedule(self, scheduler_steps: int) -> None:
        """Put the LR schedule (and every group's current LR) where it was after `scheduler_steps` steps."""
        sched = self.scheduler
        sched.last_epoch = scheduler_steps
        for group, base, fn in zip(
            self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
        ):
            group["lr"] = base * fn(scheduler_steps)

    def check_state_covers(self, state: EngineState, is_main: bool) -> None:
        """Collective: fail on every rank (not only rank 0, which alone holds tensors) if parameters are missing."""
        from vlmtrain.dist import broadcast_object

        missing = (
            [n for n, _ in self.trainable_named_parameters() if n not in state.params] if is_main else None
        )
        missing = broadcast_object(missing)
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} trainable parameter(s), e.g. {missing[:3]}; "
                "was it written by a stage with other trainable groups?"
            )


def broadcast_full(tensor: torch.Tensor | None, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rank 0's full fp32 tensor on every rank (other ranks pass None)."""
    import torch.distributed as dist

    buf = (
        tensor.to(device)
        if tensor is not None
        else torch.empty(like.shape, dtype=torch.float32, device=device)
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(buf, src=0)
    return buf


def with_blank_image(
    batch: dict[str, torch.Tensor], image_token_id: int, num_image_tokens: int, image_size: int
) -> dict[str, torch.Tensor]:
    """The micro-batch plus one row holding a blank image and no label; for micro-batches without images.

    A trainable vision tower must run on every rank for every micro-batch, so that all ranks' backward
    passes produce the same gradients in the same order: FSDP all-gathers and reduce-scatters its blocks
    as collectives (a rank that skipped the tower would pair its collectives with other ones), and
    DeepSpeed ZeRO-2 reduces gradients in buckets filled in the order they become ready. The added row is
    a sample of its own with nothing supervised, so the loss and every gradient are unchanged. (The
    model's own fallback, a zero-weighted sum over the tower's parameters, cannot reach parameters that
    are sharded between forwards, and makes those gradients ready at another point of the backward.)
    """
    ids = batch["input_ids"]
    rows, width = ids.shape
    width = max(width, num_image_tokens)

    def grow(t: torch.Tensor, fill: int | bool, image_value: int | bool) -> torch.Tensor:
        out = t.new_full((rows + 1, width), fill)
        out[:rows, : t.shape[1]] = t
        out[rows, :num_image_tokens] = image_value
        return out

    out = dict(batch)
    out["input_ids"] = grow(ids, 0, image_token_id)  # padding ids are never attended to or scored
    out["labels"] = grow(batch["labels"], IGNORE_INDEX, IGNORE_INDEX)
    out["image_flags"] = grow(batch["image_flags"].bool(), False, True)
    out["sample_ids"] = grow(batch["sample_ids"], 0, 1)
    if "position_ids" in batch:
        out["position_ids"] = grow(batch["position_ids"], 0, 0)
        out["position_ids"][rows, :num_image_tokens] = torch.arange(num_image_tokens, device=ids.device)
    pixels = batch.get("pixel_values")
    dtype = pixels.dtype if pixels is not None else torch.float32
    out["pixel_values"] = torch.zeros((1, 3, image_size, image_size), dtype=dtype, device=ids.device)
    return out


def has_images(batch: dict[str, torch.Tensor]) -> bool:
    pixels = batch.get("pixel_values")
    return pixels is not None and pixels.shape[0] > 0


def needs_image_path(model: VisionLanguageModel) -> bool:
    """Whether the image path (tower or projector) trains, so every micro-batch must run it."""
    return any(p.requires_grad for p in (*model.vision.parameters(), *model.projector.parameters()))
