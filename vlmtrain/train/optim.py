"""Optimizer parameter groups per module group (no decay on biases and norms) and the LR schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vlmtrain.config.schema import OptimConfig, StageConfig
from vlmtrain.train.batching import lr_scale


@dataclass(frozen=True)
class GroupSpec:
    """One optimizer parameter group: a module group split by whether weight decay applies."""

    name: str  # e.g. "projector" or "projector.no_decay"
    module_group: str
    params: tuple[nn.Parameter, ...]
    param_names: tuple[str, ...]
    lr: float
    weight_decay: float


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # Biases, norm weights and other vectors: decaying them hurts and is not what AdamW recipes do.
    return p.ndim < 2 or "norm" in name.lower()


def build_param_groups(model: nn.Module, groups: dict[str, nn.Module], stage: StageConfig) -> list[GroupSpec]:
    """Trainable parameters of each module group, with its LR; frozen parameters never appear."""
    specs = []
    scale = lr_scale(stage)  # optim.lr_scaling: the peak LRs follow a global batch other than the reference
    for group, module in groups.items():
        cfg = stage.modules[group]
        if not cfg.trainable:
            continue
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for suffix, keep, wd in (("", False, stage.optim.weight_decay), (".no_decay", True, 0.0)):
            chosen = [(f"{group}.{n}", p) for n, p in named if _no_decay(n, p) == keep]
            if chosen:
                names, params = zip(*chosen, strict=True)
                specs.append(
                    GroupSpec(group + suffix, group, tuple(params), tuple(names), cfg.lr * scale, wd)
                )
    if not specs:
        raise ValueError(f"stage {stage.name}: no trainable parameters; check `modules` in the stage config")
    return specs


def make_optimizer(specs: list[GroupSpec], optim: OptimConfig) -> torch.optim.AdamW:
    param_groups = [
        {"params": list(s.params), "lr": s.lr, "weight_decay": s.weight_decay, "name": s.name} for s in specs
    ]
    return torch.optim.AdamW(param_groups, lr=specs[0].lr, betas=optim.betas, eps=optim.eps)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_lr: float) -> float:
    """Linear warmup from 0 to `peak`, then cosine decay to `min_lr` at `total_steps`.

    `step` counts optimizer steps taken so far: the LR used by step k+1 is lr_at(k).
    """
    if peak == 0.0:
        return 0.0
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, ratio: float) -> int:
    return round(total_steps * ratio)


def make_scheduler(
    optimizer: torch.optim.Optimizer, specs: list[GroupSpec], total_steps: int, optim: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-group multiplicative schedule, so every group follows lr_at with its own peak LR."""
    warmup = warmup_steps_for(total_steps, optim.warmup_ratio)
    lambdas = [
        (lambda step, peak=s.lr: lr_at(step, total_steps, warmup, peak, optim.min_lr) / peak) for s in specs
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
