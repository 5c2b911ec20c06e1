"""Regional torch.compile (`train.compile`): each transformer layer of both towers, and the loss chunk.

Compiling block by block rather than the whole model: the layers of a tower share one code object, so the
compiler traces one layer and reuses its graph for the others (compile time is one block, not 24), and the
parts between layers (masks, embedding merge, the chunked loss's Python loop) stay eager, where graph breaks
would otherwise split the model. Every region compiles with dynamic shapes: micro-batches of varying length
and row count reuse the graph instead of compiling again (sizes of exactly 1 are specialised by the compiler:
each adds one graph the first time it occurs). Activation recompute wraps the compiled layer unchanged
(transformers' checkpointing layer calls the module, which runs its compiled forward).

The loss chunk: the model's `compiled_loss` flag makes its forward run the chunked loss's per-chunk tile
arithmetic through `vlmtrain.models.loss.compiled_chunk_fns` (compiled once per process), so the chunk's
elementwise passes fuse into a few kernels. A flag on the model, not a swapped module global: two models in
one process (a test's eager reference beside the compiled one) never see each other's setting.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from vlmtrain.models.cuda_validation import cuda_fast_path


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


def compile_loss_chunk(model: nn.Module, enable: bool = True) -> None:
    """Run `model`'s loss chunks compiled (`enable=False`: eager again); see the module docstring."""
    model.compiled_loss = enable


def apply_compile(model: nn.Module, setting: bool | Literal["auto"]) -> str:
    """Compile `model`'s layers and the loss chunk as `train.compile` says (before an engine wraps the model,
    as FSDP2 wants); returns the line for the log."""
    on, why = resolve_compile(setting)
    compile_loss_chunk(model, on)
    if not on:
        return f"compile: off ({why})"
    return f"compile: {compile_regions(model)} transformer layers and the loss chunk, dynamic shapes ({why})"


def graphs_compiled() -> int:
    """Graphs torch.compile has produced in this process so far (compiles and recompiles alike)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
