"""Regional torch.compile (`train.compile`): each transformer layer of both towers, and the loss chunk.

Compiling block by block rather than the whole model: the layers of a tower share one code object, so the
compiler traces one layer and reuses its graph for the others (compile time is one block, not 24), and the
parts between layers (masks, embedding merge, the chunked loss's Python loop) stay eager, where graph breaks
would otherwise split the model. Every region compiles with dynamic shapes: micro-batches of varying length
and row count reuse the graph instead of compiling again (sizes of exactly 1 are specialised by the compiler:
each adds one graph the first time it occurs). Activation recompute wraps the compiled layer unchanged
(transformers' checkpointing layer calls the module, which runs its compiled forward).

The loss chunk: `vlmtrain.models.loss` runs the per-chunk work in module-level functions named by
`LOSS_CHUNK_FUNCTIONS`, which `compile_loss_chunk` swaps for compiled versions (and back), so the chunk's
elementwise passes fuse into a few kernels.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import nn

from vlmtrain.models import loss
from vlmtrain.models.cuda_validation import cuda_fast_path

LOSS_CHUNK_FUNCTIONS: tuple[str, ...] = ("_forward_chunk", "_softmax_grad")
"""Per-chunk functions of vlmtrain.models.loss (module attributes, called through the module's globals)."""

_EAGER: dict[str, object] = {}


def resolve_compile(setting: bool | Literal["auto"]) -> tuple[bool, str]:
    """(compile, why). `auto`: on CUDA once the CUDA tests have passed for this torch, else off."""
    if setting == "auto":
        return cuda_fast_path("train.compile auto")
    return bool(setting), f"train.compile: {str(setting).lower()}"


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of both towers of a VisionLanguageModel: vision encoder layers, LM decoder layers."""
    vision = list(model.vision_family.encoder_layers(model.vision))
    return vision + list(model.language.get_decoder().layers)


def compile_regions(model: nn.Module) -> int:
    """`module.compile(dynamic=True)` on every transformer layer of `model`; returns how many."""
    layers = transformer_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def compile_loss_chunk(enable: bool = True) -> None:
    """Compile the loss's per-chunk functions for this process (`enable=False` restores the eager ones)."""
    for name in LOSS_CHUNK_FUNCTIONS:
        eager = _EAGER.setdefault(name, getattr(loss, name))
        setattr(loss, name, _compiled(eager) if enable else eager)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def apply_compile(model: nn.Module, setting: bool | Literal["auto"]) -> str:
    """Compile `model`'s layers and the loss chunk as `train.compile` says (before an engine wraps the model,
    as FSDP2 wants); returns the line for the log."""
    on, why = resolve_compile(setting)
    compile_loss_chunk(on)
    if not on:
        return f"compile: off ({why})"
    return f"compile: {compile_regions(model)} transformer layers and the loss chunk, dynamic shapes ({why})"


def graphs_compiled() -> int:
    """Graphs torch.compile has produced in this process so far (compiles and recompiles alike)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
