"""FlexAttention as the LM's attention kernel: native grouped-query attention, no recompile across lengths.

Registered with transformers under `FLEX_IMPLEMENTATION` through its public `AttentionInterface` /
`AttentionMaskInterface`, and selected by `attn_implementation` (vlmtrain.models.language). Why not
transformers' own `flex_attention`: for a query-head count that is not a power of two (Qwen2.5-0.5B: 14 query,
2 KV heads) it repeats K and V to every query head (7x their memory and reads per layer), and it compiles the
kernel with `torch.compile`'s default dynamism. Here the kernel gets `enable_gqa=True` for any head ratio.

The mask is the caller's BlockMask (vlmtrain.models.masks.flex_block_mask), built once per micro-batch and
handed to the decoder as its `attention_mask`; a tensor mask is refused (it would be a dense score mask).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

FLEX_IMPLEMENTATION = "vlmtrain_flex"


@functools.cache
def _compiled_flex():
    """flex_attention compiled for the process: the first shape compiles a static kernel, the first other
    shape one with dynamic lengths and batch sizes that serves every later shape (two graphs in all).

    Not `dynamic=True` from the first call: on CPU, inductor's flex template then fails to build for a row
    shorter than a tile (torch 2.13), and the first graph specialised the batch size anyway.
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q [B, Hq, T, d], k / v [B, Hkv, S, d] -> out [B, T, Hq, d]."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if dropout > 0:
        raise ValueError(
            f"{FLEX_IMPLEMENTATION} has no attention dropout; set the LM's attention_dropout to 0"
        )
    for name in ("s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{FLEX_IMPLEMENTATION} does not support {name}; use attn_backend sdpa or eager")
    if attention_mask is not None and not isinstance(attention_mask, BlockMask):
        raise TypeError(
            f"{FLEX_IMPLEMENTATION} takes a BlockMask (vlmtrain.models.masks.flex_block_mask), got "
            f"{type(attention_mask).__name__}"
        )
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads")

    score_mod = None
    if softcap is not None:  # Gemma 2's logit soft-capping

        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)

    # Inside a compiled decoder layer (train.compile) the kernel is traced into the layer's graph.
    kernel = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    out = kernel(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=attention_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `FLEX_IMPLEMENTATION` an `attn_implementation` of transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(FLEX_IMPLEMENTATION, flex_attention_forward)
    # A prepared BlockMask passes through masking untouched; the mask builder matters only without one.
    AttentionMaskInterface.register(FLEX_IMPLEMENTATION, AttentionMaskInterface()["flex_attention"])
