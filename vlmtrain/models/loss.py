"""Next-token loss as pure functions: which positions are supervised, and their per-token cross-entropy.

The trainer counts a step's supervised tokens with `supervised_mask` on the CPU batches before any forward, and
the model scores exactly those positions, so the count that normalises the step's loss and the tokens summed
into it cannot disagree.

The LM head and the cross-entropy run fused and chunked (`linear_cross_entropy`): the full-vocabulary fp32
logits of every supervised token are the largest tensors of a step (3,072 tokens x 151,936 x 4 bytes = 1.7 GiB,
and autograd keeps a log-softmax and a gradient of the same size), so the loss computes them a token chunk
at a time and keeps per token only its row max and sum of exponentials, plus, when backward needs it, the
hidden-state gradient for a unit upstream gradient ([N, D], the size of the hidden states: a token's loss
depends on its own hidden state only). The result equals `F.cross_entropy(head(hidden).float(), targets,
reduction="none")` and its gradients (same compute-dtype matmul, same fp32 softmax).

Cost at real size (V = 151,936, D = 896, chunk budget 256 MiB -> 384 rows, 3,072 supervised tokens = 8
chunks): the loss peaks at one fp32 chunk of logits (224 MiB; with bf16 compute also its bf16 matmul output,
112 MiB) instead of ~3 x 1.7 GiB. A frozen head (stages 0-1) costs the same two head matmuls as the
full-logits path. A trainable head (stages 2-3; Qwen ties it to the input embedding) recomputes each chunk's
logits in backward for its weight gradient: 4 instead of 3 x 2·N·V·D head FLOPs (+0.84 TFLOP for 3,072
supervised tokens, ~4% of a 4 x 1,024-token step's 6·params·tokens = 22 TFLOP at 0.9B parameters). That
gradient is added chunk by chunk, in place, into one fp32 [V, D] buffer (545 MB) allocated once per backward
and returned as the gradient (autograd casts it to a bf16 weight's dtype: +272 MB at the end, when no chunk
is alive); on CUDA a bf16 x bf16 -> fp32 GEMM adds into it directly, elsewhere an fp32 GEMM from the chunk's
fp32 probabilities, so no chunk makes a [V, D] product. Passes over a chunk's [rows, V] tile: forward 6
(matmul, max, x - max, exp, sum, gradient matmul; bf16 adds its upcast and a scaled downcast), backward 4
(matmul, x - max, exp, weight-gradient matmul; bf16 adds its upcast, and on CUDA the downcast its GEMM
reads). The softmax's 1/sum, the upstream gradient and the onehot act on [rows, D] tensors or on the c
target entries, never on the tile.
`compiled_chunk_fns` (torch.compile, `compiled=True`) fuses the elementwise passes around the matmuls. No
device->host sync: chunk bounds come from shapes.

Fused library kernels (liger-kernel's fused linear cross-entropy, Triton on CUDA) are not used: they return
a mean or sum, not the per-token losses the model reports (`VLMOutput.token_loss`), and no GPU was lent to
test one against this path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.data.process import IGNORE_INDEX

CHUNK_BYTES = 256 * 2**20
"""Byte budget of one chunk's fp32 logits [rows, V]: 384 rows (224 MiB) at Qwen's 151,936 words.

Why this size: with a trainable head the loss holds the fp32 weight gradient (519 MiB) and one chunk (its
fp32 tile, plus its bf16 matmul output under bf16 compute: 1.5 x 224 = 336 MiB), under the 1 GiB the loss
may add above the model. Every chunk reads the whole head [V, D] once per matmul (272 MB in bf16, four
matmuls with a trainable head), as much traffic as a pass over its tile: halving the chunk would double
those reads, doubling it would cross 1 GiB."""

GEMM_TILE_ROWS = 128
"""Chunks hold whole blocks of this many rows: the row tile of tensor-core GEMM kernels (64-256)."""


def supervised_mask(labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: position t predicts the supervised token t+1 of the same (real) sample.

    Never across a packed-row boundary, never into padding (sample id 0).
    """
    target = labels[:, 1:]
    same_sample = sample_ids[:, 1:] == sample_ids[:, :-1]
    return (target != IGNORE_INDEX) & same_sample & (sample_ids[:, 1:] > 0)


def count_supervised(labels: torch.Tensor, sample_ids: torch.Tensor) -> int:
    """Supervised tokens of a batch (read from CPU tensors by the trainer: no device sync)."""
    return int(supervised_mask(labels, sample_ids).sum())


def supervised_index(labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
    """[N, 2] long: (row, column) of every position that predicts a supervised token (`supervised_mask`).

    The trainer computes it from the CPU batch and hands it to the model, so selecting the supervised
    positions on the device needs no host sync (a boolean index would: its size is data-dependent).
    """
    return supervised_mask(labels, sample_ids).nonzero()


def token_losses(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    sample_ids: torch.Tensor,
    index: torch.Tensor | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cross-entropy of every supervised position [N] and the [N, 2] `supervised_index` that picked them.

    Only supervised positions go through the LM head, in token chunks (`linear_cross_entropy`): vocab x
    tokens is the largest tensor of a step. Without `index` it is computed here (a host sync on a GPU).
    `compiled`: the chunks' tile arithmetic under torch.compile (`compiled_chunk_fns`).
    """
    if index is None:
        index = supervised_index(labels, sample_ids)
    rows, cols = index.unbind(1)
    picked, targets = hidden[rows, cols], labels[rows, cols + 1]
    if hasattr(getattr(head, "weight", None), "ds_id"):
        # A DeepSpeed ZeRO-3 parameter is whole only inside its module's forward and backward hooks, which the
        # chunked function (it multiplies by the weight itself) bypasses: ZeRO-3 runs the full-logits loss
        # through the head module, at its memory cost (docs/training.md, ZeRO-3).
        return F.cross_entropy(head(picked).float(), targets, reduction="none"), index
    return linear_cross_entropy(picked, head, targets, compiled=compiled), index


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that the chunk's fp32 logits [rows, vocab] fit in `chunk_bytes` (at least 1).

    Rounded down to whole `GEMM_TILE_ROWS` blocks when the budget holds one: at Qwen's vocabulary 441 rows
    fit, 384 are used (3 x 128; 441 would run as 4 blocks of 128 rows, 71 of them padding).
    """
    rows = max(1, chunk_bytes // (vocab * 4))
    return rows - rows % GEMM_TILE_ROWS if rows >= GEMM_TILE_ROWS else rows


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_bytes: int = CHUNK_BYTES,
    compiled: bool = False,
) -> torch.Tensor:
    """Per-token fp32 loss [N] of `F.cross_entropy(head(hidden).float(), targets, reduction="none")`.

    `hidden` [N, D] and `targets` [N] (valid class ids: the caller selects supervised positions). `head` is a
    bias-free linear layer [V, D]; its weight tensor itself is the input, so a head tied to the input
    embedding gets its gradient on the shared parameter, and a frozen head costs no weight gradient.
    `compiled` runs each chunk's tile arithmetic through `torch.compile` (`compiled_chunk_fns`).
    """
    weight = _head_weight(head)
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy takes hidden [N, D] and targets [N]; got {tuple(hidden.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden states {hidden.dtype} [.., {hidden.shape[1]}] do not match the LM head's weight "
            f"{weight.dtype} {tuple(weight.shape)}: the head would fail on them too"
        )
    rows = chunk_rows(weight.shape[0], chunk_bytes)
    # needs_input_grad stays True under no_grad: say here whether backward can run at all.
    hidden_grad = torch.is_grad_enabled() and hidden.requires_grad
    fns = compiled_chunk_fns() if compiled else ChunkFns(forward_chunk, backward_chunk)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, rows, hidden_grad, fns)


def _head_weight(head: nn.Module) -> torch.Tensor:
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"the chunked loss needs the LM head as an nn.Linear, got {type(head).__name__}; "
            "use return_logits=True for the full-logits path"
        )
    if head.bias is not None:
        raise ValueError(
            "the chunked loss supports a bias-free LM head only (Qwen's has none); this head has a bias "
            f"of shape {tuple(head.bias.shape)}: use return_logits=True for the full-logits path"
        )
    return head.weight


# ---- one chunk's tile arithmetic: pure functions of a chunk, what `compiled_chunk_fns` compiles -------------
def forward_chunk(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Losses, row max, sum of exp(logit - max) of one chunk [c], and its unit hidden-state gradient [c, D].

    The gradient (softmax - onehot) @ W is formed as (E - s·onehot) @ W / s with E = exp(logits - max) and
    s its row sum: the onehot is c scattered entries and the 1/s scale lands on the [c, D] product (fp32)
    or on the cast that a bf16 matmul needs anyway, so no pass over the tile normalises it.
    """
    logits = hidden @ weight.T  # [c, V] in the compute dtype, as head(hidden)
    x = logits.float()  # the same tensor when fp32, else the fp32 tile: safe to modify in place
    row_max = x.amax(dim=1)
    x.sub_(row_max[:, None])
    shifted_target = x.gather(1, targets[:, None]).squeeze(1)
    total = x.exp_().sum(dim=1)
    # log_softmax's arithmetic, as the full path: (x - max) - log(sum exp(x - max)).
    losses = total.log() - shifted_target
    if not want_grad:
        return losses, row_max, total, None
    x.scatter_add_(1, targets[:, None], -total[:, None])  # E - s·onehot = s x (softmax - onehot)
    if x.dtype == weight.dtype:
        unit_grad = (x @ weight).div_(total[:, None])
    else:  # scale while casting to the compute dtype, into the logits' own storage
        unit_grad = torch.mul(x, total.reciprocal()[:, None], out=logits) @ weight
    return losses, row_max, total, unit_grad


def backward_chunk(hidden: torch.Tensor, weight: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """E = exp(logits - max) of one chunk, recomputed, in the dtype of the weight-gradient matmul.

    Bit for bit forward's E; the caller applies 1/s, the upstream gradient and the onehot on [c, D] tensors.
    """
    logits = hidden @ weight.T
    x = logits.float()
    x.sub_(row_max[:, None]).exp_()
    if weight.dtype != torch.float32 and weight.device.type == "cuda":
        # A bf16 x bf16 -> fp32 matmul exists on CUDA (`_accumulate`): cast into the logits' storage.
        return logits.copy_(x)
    return x  # elsewhere the weight gradient's matmul runs in fp32 from this tile


class ChunkFns(NamedTuple):
    """The per-chunk functions the chunked loss calls: `forward_chunk` and `backward_chunk`, or compiled."""

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@functools.cache
def compiled_chunk_fns() -> ChunkFns:
    """`forward_chunk` and `backward_chunk` under torch.compile, built once per process.

    Dynamic in the chunk's row count (the last chunk of a batch is shorter), so the shapes of a run compile
    once, not once per remainder. On CUDA, inductor fuses the tile's upcast, max, exp, sum and cast into a
    few kernels around the two matmuls; eager makes a pass over the tile per op.
    """
    return ChunkFns(torch.compile(forward_chunk, dynamic=True), torch.compile(backward_chunk, dynamic=True))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token losses from chunks of logits; only [N]-sized statistics outlive a chunk.

    d loss_i / d hidden_i depends on row i alone, so forward, which has each chunk's softmax in hand, also
    forms the hidden-state gradient of every token for a unit upstream gradient ([N, D], the size of the
    hidden states); backward scales its rows. A frozen head (stages 0-1) thus costs the same two matmuls as
    the full-logits path, and nothing is recomputed. The weight gradient sums over tokens with the upstream
    gradient inside the sum, so a trainable head recomputes each chunk's logits in backward (one extra
    matmul: 4 instead of 3 x 2·N·V·D for the head) and adds each chunk's product in place into one fp32
    [V, D] buffer, which backward returns (`_weight_grad`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        rows: int,
        hidden_grad: bool,
        fns: ChunkFns,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        row_max, total = torch.empty_like(losses), torch.empty_like(losses)
        # Only when backward will ask for it (not under no_grad, nor for hidden states that need none).
        unit_grad_hidden = torch.empty_like(hidden) if hidden_grad else None
        for s in range(0, n, rows):
            e = min(s + rows, n)
            # One call per chunk: its tiles are freed on return, before the next chunk's exist.
            losses[s:e], row_max[s:e], total[s:e], unit = fns.forward(
                hidden[s:e], weight, targets[s:e], hidden_grad
            )
            if unit is not None:
                unit_grad_hidden[s:e] = unit
            del unit
        keep_hidden = hidden if ctx.needs_input_grad[1] else None  # only the weight gradient reads it
        ctx.save_for_backward(keep_hidden, weight, targets, row_max, total, unit_grad_hidden)
        ctx.rows, ctx.fns = rows, fns
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, row_max, total, unit_grad_hidden = ctx.saved_tensors
        grad_losses = grad_losses.float()
        grad_hidden = None
        if unit_grad_hidden is not None:
            grad_hidden = (unit_grad_hidden.float() * grad_losses[:, None]).to(unit_grad_hidden.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(
                hidden, weight, targets, row_max, total, grad_losses, ctx.rows, ctx.fns
            )
        return grad_hidden, grad_weight, None, None, None, None


def _weight_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    total: torch.Tensor,
    grad_losses: torch.Tensor,
    rows: int,
    fns: ChunkFns,
) -> torch.Tensor:
    """sum_i g_i (softmax_i - onehot_i) h_i^T = E^T @ (g / s · h) - onehot^T @ (g · h), into one fp32 [V, D].

    The buffer is allocated once per backward and every chunk adds into it in place (`_accumulate`): no
    per-chunk [V, D] product. It is returned as the weight's gradient, in fp32: autograd's engine casts it
    to a bf16 weight's dtype and hands it to the parameter's AccumulateGrad, so gradient hooks (DeepSpeed's
    bucketing, FSDP2's reduce-scatter) and a tied embedding's own gradient see an ordinary gradient.
    Writing into `weight.grad` instead would bypass those hooks.
    """
    grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for s in range(0, hidden.shape[0], rows):
        e = min(s + rows, hidden.shape[0])
        scaled = hidden[s:e].float() * grad_losses[s:e, None]  # [c, D] fp32: g · h
        exp_tile = fns.backward(hidden[s:e], weight, row_max[s:e])
        _accumulate(grad, exp_tile.T, scaled / total[s:e, None])
        del exp_tile  # before the next chunk's logits exist: one chunk at a time
        grad.index_add_(0, targets[s:e], scaled, alpha=-1.0)  # the onehot's part, in fp32
    return grad


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place, acc fp32 [V, D]; `b` comes in fp32 and is cast to `a`'s dtype.

    fp32 `a`: addmm_. bf16 `a` (CUDA only, `backward_chunk`): cuBLAS's bf16 x bf16 -> fp32 GEMM adds into
    the fp32 buffer (torch.addmm's `out_dtype`, documented for CUDA), without a bf16 [V, D] product.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        torch.addmm(acc, a, b.to(a.dtype), out_dtype=torch.float32, out=acc)
