"""The engine interface the trainer loop drives: forward, backward, step, LRs, and full-state gather/load."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from vlmtrain.models.vlm import VisionLanguageModel, VLMOutput


@dataclass
class StepResult:
    """What `Engine.step` did at the end of a micro-batch."""

    boundary: bool  # an optimizer step was due (end of the accumulation window)
    skipped: bool = False  # the step was due but not applied: a non-finite gradient on some rank
    grad_norm: float | None = None


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

    module: VisionLanguageModel  # the unwrapped model (parameters in the compute dtype)
    accumulation_steps: int

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor], mask_mode: str) -> VLMOutput: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> StepResult:
        """Call after every micro-batch's backward; applies the optimizer at accumulation boundaries."""

    @abstractmethod
    def group_lrs(self) -> dict[str, float]:
        """The LR each optimizer group gets right now, read back from the optimizer itself."""

    @abstractmethod
    def gather_state(self) -> EngineState:
        """Collective: assemble the full state (tensors on rank 0 only)."""

    @abstractmethod
    def load_state(self, state: EngineState) -> None:
        """Collective: restore a state gathered by any engine at any world size."""

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

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
