"""Next-token loss as pure functions: which positions are supervised, and their per-token cross-entropy.

The trainer counts a step's supervised tokens with `supervised_mask` on the CPU batches before any forward, and
the model scores exactly those positions, so the count that normalises the step's loss and the tokens summed
into it cannot disagree.

The LM head and the cross-entropy run fused and chunked (`linear_cross_entropy`): the full-vocabulary fp32
logits of every supervised token are the largest tensors of a step (3,072 tokens x 151,936 x 4 bytes = 1.7 GiB,
and autograd keeps a log-softmax and a gradient of the same size), so the loss computes them a token chunk
at a time and keeps per token only its row max and log-normaliser, plus, when backward will need it, the
hidden-state gradient for a unit upstream gradient ([N, D], the size of the hidden states: a token's loss
depends on its own hidden state only). The result equals `F.cross_entropy(head(hidden).float(), targets,
reduction="none")` and its gradients (same compute-dtype matmul, same fp32 softmax).

Cost at real size (V = 151,936, D = 896, chunk budget 256 MiB = 441 rows, 3,072 supervised tokens): the loss
peaks at one fp32 chunk of logits (256 MiB; with bf16 compute also its bf16 matmul output, 128 MiB) instead
of ~3 x 1.7 GiB. A frozen head (stages 0-1) costs the same two head matmuls as the full-logits path. A trainable
head (stages 2-3; Qwen ties it to the input embedding) recomputes each chunk's logits in backward for its
weight gradient: 4 instead of 3 x 2·N·V·D head FLOPs (+0.84 TFLOP for 3,072 supervised tokens, ~4% of a
4 x 1,024-token step's 6·params·tokens = 22 TFLOP at 0.9B parameters); that gradient is accumulated over the
chunks in fp32 (V x D x 4 = 545 MB while the backward runs, plus a bf16 chunk product of 272 MB under bf16
compute), then returned in the weight's dtype. No device->host sync: chunk bounds come from shapes.

Fused library kernels (liger-kernel's fused linear cross-entropy, Triton on CUDA) are not used: they return
a mean or sum, not the per-token losses the model reports (`VLMOutput.token_loss`), and no GPU was lent to
test one against this path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.data.process import IGNORE_INDEX

CHUNK_BYTES = 256 * 2**20
"""Byte budget of one chunk's fp32 logits [rows, V]: 441 rows at Qwen's 151,936 words."""


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cross-entropy of every supervised position [N] and the [N, 2] `supervised_index` that picked them.

    Only supervised positions go through the LM head, in token chunks (`linear_cross_entropy`): vocab x
    tokens is the largest tensor of a step. Without `index` it is computed here (a host sync on a GPU).
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
    return linear_cross_entropy(picked, head, targets), index


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that the chunk's fp32 logits [rows, vocab] fit in `chunk_bytes` (at least 1)."""
    return max(1, chunk_bytes // (vocab * 4))


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_bytes: int = CHUNK_BYTES
) -> torch.Tensor:
    """Per-token fp32 loss [N] of `F.cross_entropy(head(hidden).float(), targets, reduction="none")`.

    `hidden` [N, D] and `targets` [N] (valid class ids: the caller selects supervised positions). `head` is a
    bias-free linear layer [V, D]; its weight tensor itself is the input, so a head tied to the input
    embedding gets its gradient on the shared parameter, and a frozen head costs no weight gradient.
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
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, rows, hidden_grad)


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


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits of one chunk: the matmul in the compute dtype (as `head(hidden)`), then upcast."""
    return (hidden @ weight.T).float()  # a fresh fp32 tensor either way: safe to modify in place


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token losses from chunks of logits; only [N]-sized statistics outlive a chunk.

    d loss_i / d hidden_i depends on row i alone, so forward, which has each chunk's softmax in hand, also
    forms the hidden-state gradient of every token for a unit upstream gradient ([N, D], the size of the
    hidden states); backward scales its rows. A frozen head (stages 0-1) thus costs the same two matmuls as
    the full-logits path, and nothing is recomputed. The weight gradient sums over tokens with the upstream
    gradient inside the sum, so a trainable head recomputes each chunk's logits in backward (one extra
    matmul: 4 instead of 3 x 2·N·V·D for the head).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        rows: int,
        hidden_grad: bool,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        row_max = torch.empty(n, dtype=torch.float32, device=hidden.device)
        log_norm = torch.empty_like(row_max)
        losses = torch.empty_like(row_max)
        # Only when backward will ask for it (not under no_grad, nor for hidden states that need none).
        unit_grad_hidden = torch.empty_like(hidden) if hidden_grad else None
        for s in range(0, n, rows):
            e = min(s + rows, n)
            out = None if unit_grad_hidden is None else unit_grad_hidden[s:e]
            losses[s:e], row_max[s:e], log_norm[s:e] = _forward_chunk(hidden[s:e], weight, targets[s:e], out)
        keep_hidden = hidden if ctx.needs_input_grad[1] else None  # only the weight gradient reads it
        ctx.save_for_backward(keep_hidden, weight, targets, row_max, log_norm, unit_grad_hidden)
        ctx.rows = rows
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, row_max, log_norm, unit_grad_hidden = ctx.saved_tensors
        grad_losses = grad_losses.float()
        grad_hidden = None
        if unit_grad_hidden is not None:
            grad_hidden = (unit_grad_hidden.float() * grad_losses[:, None]).to(unit_grad_hidden.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(hidden, weight, targets, row_max, log_norm, grad_losses, ctx.rows)
        return grad_hidden, grad_weight, None, None, None


def _weight_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    grad_losses: torch.Tensor,
    rows: int,
) -> torch.Tensor:
    """sum over chunks of (g * (softmax - onehot))^T @ hidden, accumulated in fp32 as one full matmul would."""
    grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for s in range(0, hidden.shape[0], rows):
        e = min(s + rows, hidden.shape[0])
        d_logits = _softmax_grad(hidden[s:e], weight, targets[s:e], row_max[s:e], log_norm[s:e])
        d_logits.mul_(grad_losses[s:e, None])
        # The cast to the compute dtype is what autograd does to the gradient of `head(hidden).float()`.
        _accumulate(grad, d_logits.to(weight.dtype).T, hidden[s:e])
        del d_logits  # before the next chunk's logits exist: one chunk at a time
    return grad.to(weight.dtype)


def _forward_chunk(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, unit_grad_hidden: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Losses, row max and log-normaliser of one chunk; writes its unit hidden-state gradient if asked.

    A function, so that the chunk's logits are freed on return, before the next chunk's are computed.
    """
    # The arithmetic of log_softmax + nll_loss: x - max, then the log of the sum of exponentials.
    logits = _chunk_logits(hidden, weight)  # [c, V] fp32
    row_max = logits.amax(dim=1)
    logits.sub_(row_max[:, None])
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    total = logits.exp_().sum(dim=1)
    log_norm = total.log()
    if unit_grad_hidden is not None:
        d_logits = _minus_onehot(logits.div_(total[:, None]), targets)  # softmax - onehot, in place
        torch.mm(d_logits.to(weight.dtype), weight, out=unit_grad_hidden)
    return log_norm - target_logit, row_max, log_norm


def _softmax_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
) -> torch.Tensor:
    """softmax - onehot of one chunk from its recomputed logits and the statistics forward kept."""
    logits = _chunk_logits(hidden, weight)
    probs = logits.sub_(row_max[:, None]).sub_(log_norm[:, None]).exp_()  # exp(log_softmax)
    return _minus_onehot(probs, targets)


def _minus_onehot(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """softmax - onehot(targets) in place: d loss / d logits of one chunk."""
    return probs.scatter_add_(1, targets[:, None], probs.new_full((len(targets), 1), -1.0))


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32; in place when a, b are fp32, else through one compute-dtype product."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)
