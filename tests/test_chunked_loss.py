"""The chunked linear cross-entropy against today's path: `F.cross_entropy(head(hidden).float(), ...)`.

Every comparison recomputes the reference with the full [N, V] logits and plain autograd, then checks the
per-token losses, the hidden-state gradient and the head's weight gradient in fp32: the largest difference is
at most 1e-6, relative to the tensor's largest entry where that exceeds 1. Element-wise relative 1e-6 is
not a property even of the reference: the same fp32 matmul over V = 1,000 terms differs by 3e-6 between
one row at a time (BLAS gemv) and all rows at once (gemm). Chunkings of one row are therefore compared in
float64 compute, where only the fp32 softmax arithmetic (the same in both paths) is left.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vlmtrain.models.loss import (
    CHUNK_BYTES,
    GEMM_TILE_ROWS,
    chunk_rows,
    linear_cross_entropy,
    supervised_index,
    supervised_mask,
    token_losses,
)

N, D, V = 70, 32, 1000
TOL = 1e-6


def assert_same(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    """max |got - ref| <= tol x max(1, max |ref|): fp32 agreement up to the order of a sum's terms."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape)
    if ref.numel() == 0:
        return
    err, scale = (got - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    assert err <= tol * scale, f"{what}: max difference {err:.3g} > {tol:g} x {scale:.3g}"


def make_head(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(D, V, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.5)  # logits of a few units: losses and softmax far from uniform
    return head


def make_inputs(n: int = N, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, D, generator=gen, dtype=dtype)
    targets = torch.randint(0, V, (n,), generator=gen)
    return hidden, targets


def losses_and_grads(
    fn, head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, upstream: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token losses and gradients of sum(upstream * losses) (of the plain sum when upstream is None)."""
    head.zero_grad(set_to_none=True)
    h = hidden.clone().requires_grad_(True)
    losses = fn(h, head, targets)
    (losses.sum() if upstream is None else (losses * upstream).sum()).backward()
    grad_w = None if head.weight.grad is None else head.weight.grad.clone()
    return losses.detach(), h.grad, grad_w


def reference(h: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, reduction="none")


def chunked(rows: int):
    return lambda h, head, t: linear_cross_entropy(h, head, t, chunk_bytes=rows * V * 4)


@pytest.mark.parametrize(
    "dtype, rows",
    [(torch.float32, r) for r in (16, 23, N, 4 * N)]  # dividing N, not dividing, one chunk, more than N
    + [(torch.float64, r) for r in (1, 16, 23)],
)
@pytest.mark.parametrize("weighted", [False, True], ids=["sum", "per-token"])
def test_losses_and_gradients_equal_full_logits(dtype, rows, weighted):
    head = make_head(dtype=dtype)
    hidden, targets = make_inputs(dtype=dtype)
    upstream = torch.rand(N, generator=torch.Generator().manual_seed(2)) if weighted else None
    ref = losses_and_grads(reference, head, hidden, targets, upstream)
    got = losses_and_grads(chunked(rows), head, hidden, targets, upstream)
    for name, a, b in zip(("losses", "grad hidden", "grad weight"), got, ref, strict=True):
        assert_same(a, b, name)
    torch.testing.assert_close(got[0].sum(), ref[0].sum(), rtol=1e-6, atol=0)


def test_tied_embedding_gets_both_gradients():
    """Qwen ties the head to the input embedding: the head's gradient must land on the shared parameter."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(V, D)
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.embed.weight

    torch.manual_seed(3)
    model = Tied()
    ids = torch.randint(0, V, (N,))
    targets = torch.roll(ids, -1)
    grads = []
    for fn in (reference, chunked(16)):
        model.zero_grad(set_to_none=True)
        h = torch.tanh(model.embed(ids))  # a nonlinearity between embedding and head
        fn(h, model.head, targets).sum().backward()
        grads.append(model.embed.weight.grad.clone())
    assert model.head.weight is model.embed.weight
    assert_same(grads[1], grads[0], "tied weight")


MATMULS = {"mm", "addmm", "addmm_", "matmul", "linear"}


class _Outputs(TorchDispatchMode):
    """Records every op's name and output shapes (matmul outputs, temporaries, gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.ops.append((func.overloadpacket.__name__, tuple(t.shape)))
        return out

    @property
    def matmuls(self) -> list[tuple[int, ...]]:
        return [shape for name, shape in self.ops if name in MATMULS]


def test_frozen_head_computes_no_weight_gradient():
    """Stages 0-1: a frozen head costs two matmuls per chunk, as the full path; a trainable one two more."""
    head = make_head().requires_grad_(False)
    hidden, targets = make_inputs()
    ref = losses_and_grads(reference, head, hidden, targets, None)
    got = losses_and_grads(chunked(16), head, hidden, targets, None)
    assert got[2] is None and ref[2] is None
    assert_same(got[1], ref[1], "grad hidden")

    chunks = -(-N // 16)
    for frozen in (True, False):
        head.requires_grad_(not frozen)
        h = hidden.clone().requires_grad_(True)
        with _Outputs() as fwd:
            losses = linear_cross_entropy(h, head, targets, chunk_bytes=16 * V * 4)
        with _Outputs() as bwd:
            losses.sum().backward()
        # forward: logits and the unit hidden-state gradient of each chunk; backward: nothing more when the
        # head is frozen, else the recomputed logits and the [V, D] weight-gradient product of each chunk.
        assert len(fwd.matmuls) == 2 * chunks
        assert len(bwd.matmuls) == (0 if frozen else 2 * chunks)
        assert bwd.matmuls.count((V, D)) == (0 if frozen else chunks)
    with torch.no_grad(), _Outputs() as evaluation:
        linear_cross_entropy(hidden.clone().requires_grad_(True), head, targets, chunk_bytes=16 * V * 4)
    assert len(evaluation.matmuls) == chunks  # no gradient work under no_grad


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors that ops create and that are alive at once (views and in-place results,
    which share an input's storage, are not new memory); a tensor counts until Python frees it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [
            x for a in (*args, *(kwargs or {}).values()) for x in (a if isinstance(a, list | tuple) else [a])
        ]
        held = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, list | tuple) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held:
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_one_chunk_of_logits_at_a_time(trainable):
    """Forward and backward together never hold more than one chunk of logits (plus the weight gradient
    and a few [N, D] / [N] tensors); the full path holds two [N, V] tensors at once."""
    head = make_head().requires_grad_(trainable)
    hidden, targets = make_inputs()
    rows = 8
    with _LiveBytes() as chunked_mode:
        h = hidden.clone().requires_grad_(True)
        linear_cross_entropy(h, head, targets, chunk_bytes=rows * V * 4).sum().backward()
    small = 4 * N * D * 4  # hidden-sized tensors: unit and final hidden gradient, [N] statistics
    assert rows * V * 4 <= chunked_mode.peak - trainable * V * D * 4 <= rows * V * 4 + small
    with _LiveBytes() as full_mode:
        reference(hidden.clone().requires_grad_(True), head, targets).sum().backward()
    assert full_mode.peak >= 2 * N * V * 4  # the probe sees the full path's logits and log-softmax


VIEWS_AND_INDEXING = frozenset(
    ("t", "transpose", "permute", "slice", "view", "expand", "unsqueeze", "squeeze", "gather", "scatter_add_")
)


class _TilePasses(TorchDispatchMode):
    """Names of the ops that read or write a [rows, V] tile (or its transpose): one pass over it each.

    Views and the c-element gather / scatter of the target column are not passes."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.shapes, self.names = {(rows, V), (V, rows)}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values(), *(out if isinstance(out, list | tuple) else [out])]
        touched = any(isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes for t in flat)
        if touched and func.overloadpacket.__name__ not in VIEWS_AND_INDEXING:
            self.names.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_passes_over_the_logits_tile(dtype):
    """Per chunk, forward makes 6 passes over the tile (matmul, max, x - max, exp, sum, gradient matmul; bf16
    adds the upcast and the scaled downcast) and a trainable head's backward 4 (matmul, x - max, exp, the
    in-place weight-gradient matmul; bf16 adds the upcast). The softmax's 1 / sum and the onehot never cost a
    pass: they are applied to [rows, D] tensors or to c scattered entries."""
    head = make_head(dtype=dtype)
    hidden, targets = make_inputs(n=32, dtype=dtype)
    h = hidden.clone().requires_grad_(True)
    with _TilePasses(16) as fwd:
        losses = linear_cross_entropy(h, head, targets, chunk_bytes=16 * V * 4)
    with _TilePasses(16) as bwd:
        losses.sum().backward()
    up = 1 if dtype == torch.bfloat16 else 0
    assert fwd.names == 2 * (
        ["mm"] + ["_to_copy"] * up + ["amax", "sub_", "exp_", "sum"] + ["mul"] * up + ["mm"]
    )
    assert bwd.names == 2 * (["mm"] + ["_to_copy"] * up + ["sub_", "exp_", "addmm_"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_gradient_accumulates_in_one_buffer(dtype):
    """Backward creates one [V, D] tensor (the fp32 buffer every chunk adds into in place), not one per chunk,
    and hands it to autograd as an ordinary gradient: a post-accumulate-grad hook (what DeepSpeed ZeRO and
    FSDP2 reduce from) fires once per backward, and two backwards (micro-steps) sum as autograd's own do."""
    head = make_head(dtype=dtype)
    hidden, targets = make_inputs(dtype=dtype)
    seen = []
    head.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    with _Outputs() as bwd:
        h = hidden.clone().requires_grad_(True)
        linear_cross_entropy(h, head, targets, chunk_bytes=16 * V * 4).sum().backward()
    created = [name for name, shape in bwd.ops if shape == (V, D) and not name.endswith("_")]
    # The buffer; autograd's cast of it to a bf16 weight's dtype; AccumulateGrad taking it as .grad (a
    # detached alias, no copy); the hook's own clone. No per-chunk product.
    cast = ["_to_copy"] if dtype == torch.bfloat16 else []
    assert created == ["zeros", *cast, "detach", "clone"], created
    assert [name for name, _ in bwd.ops].count("addmm_") == -(-N // 16)
    assert len(seen) == 1 and seen[0].dtype == dtype
    first = seen[0]
    linear_cross_entropy(
        hidden.clone().requires_grad_(True), head, targets, chunk_bytes=16 * V * 4
    ).sum().backward()
    head32 = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head32.weight.copy_(head.weight.float())
    ref = losses_and_grads(reference, head32, hidden.float(), targets, None)[2]
    tol = TOL if dtype == torch.float32 else BF16_GRAD_TOL
    assert len(seen) == 2
    assert_same(first.float(), ref, "one backward", tol)
    assert_same(seen[1].float(), 2 * ref, "two backwards", tol)


def test_empty_batch():
    head = make_head()
    hidden, targets = make_inputs(n=0)
    ref = losses_and_grads(reference, head, hidden, targets, None)
    got = losses_and_grads(chunked(16), head, hidden, targets, None)
    assert got[0].shape == (0,) and got[1].shape == (0, D)
    assert got[2] is not None and torch.equal(got[2], torch.zeros(V, D)) and torch.equal(ref[2], got[2])


BF16_LOSS_TOL, BF16_GRAD_TOL = 4e-3, 2e-2


ON_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the bf16 -> fp32 weight-gradient GEMM is CUDA's"
    ),
]


@pytest.mark.parametrize(
    "device, compiled",
    [
        ("cpu", False),
        pytest.param("cuda", False, marks=ON_CUDA, id="cuda-eager"),
        pytest.param("cuda", True, marks=ON_CUDA, id="cuda-compiled"),
    ],
)
def test_bf16_against_fp32_reference(device, compiled):
    """bf16 compute against the fp32 reference of the same (bf16-representable) weights and hidden states.

    The stated tolerance: max |error| <= 4e-3 x max |reference| for the losses (bf16 logits) and 2e-2 for
    both gradients, and never more than twice the error of the bf16 full-logits path itself. On CUDA the
    weight gradient runs through the bf16 x bf16 -> fp32 GEMM into the fp32 buffer (elsewhere an fp32 GEMM)."""
    head = make_head(dtype=torch.bfloat16).to(device)
    hidden, targets = (t.to(device) for t in make_inputs(dtype=torch.bfloat16))
    upstream = torch.rand(N, generator=torch.Generator().manual_seed(2)).to(device)
    head32 = nn.Linear(D, V, bias=False, device=device)
    with torch.no_grad():
        head32.weight.copy_(head.weight.float())
    ref = losses_and_grads(reference, head32, hidden.float(), targets, upstream)
    full16 = losses_and_grads(reference, head, hidden, targets, upstream)
    fn = lambda h, hd, t: linear_cross_entropy(h, hd, t, chunk_bytes=16 * V * 4, compiled=compiled)  # noqa: E731
    got = losses_and_grads(fn, head, hidden, targets, upstream)
    assert got[2].dtype == torch.bfloat16
    for name, tol, a, b, r in zip(
        ("losses", "grad hidden", "grad weight"),
        (BF16_LOSS_TOL, BF16_GRAD_TOL, BF16_GRAD_TOL),
        got,
        full16,
        ref,
        strict=True,
    ):
        err = (a.float() - r).abs().max().item() / r.abs().max().item()
        full_err = (b.float() - r).abs().max().item() / r.abs().max().item()
        assert err <= tol and err <= 2 * full_err + 1e-6, (name, err, full_err)


def test_bf16_matches_full_path_at_bf16_precision():
    """bf16 compute: the same bf16 matmul per row; the weight gradient sums chunks in fp32."""
    head = make_head(dtype=torch.bfloat16)
    hidden, targets = make_inputs(dtype=torch.bfloat16)
    ref = losses_and_grads(reference, head, hidden, targets, None)
    got = losses_and_grads(chunked(16), head, hidden, targets, None)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)  # same logits, same fp32 arithmetic
    torch.testing.assert_close(got[1], ref[1], rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got[2], ref[2], rtol=1.6e-2, atol=1e-2)


def test_rejects_heads_it_cannot_fuse():
    hidden, targets = make_inputs()
    with pytest.raises(ValueError, match="bias-free LM head only"):
        linear_cross_entropy(hidden, nn.Linear(D, V, bias=True), targets)
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        linear_cross_entropy(hidden, nn.Sequential(nn.Linear(D, V, bias=False)), targets)
    with pytest.raises(ValueError, match="do not match the LM head"):
        linear_cross_entropy(hidden.double(), make_head(), targets)


def test_chunk_size_at_qwen_vocabulary():
    """The largest whole number of 128-row GEMM blocks whose fp32 logits fit the budget; below one block, the
    largest row count that fits (at least 1)."""
    vocab = 151_936
    rows = chunk_rows(vocab)
    fits = CHUNK_BYTES // (vocab * 4)  # 441
    assert rows == 384 == fits - fits % GEMM_TILE_ROWS and rows * vocab * 4 <= CHUNK_BYTES
    assert chunk_rows(vocab, chunk_bytes=100 * vocab * 4 + 5) == 100
    assert chunk_rows(10**9) == 1


def test_token_losses_pick_supervised_positions():
    """token_losses (the model's loss) against the full logits at every position, masked the same way."""
    head = make_head()
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 12, D, generator=gen)
    labels = torch.randint(0, V, (3, 12), generator=gen)
    labels[:, :3] = -100
    sample_ids = torch.tensor([[1] * 6 + [2] * 6, [1] * 12, [1] * 8 + [0] * 4])
    losses, index = token_losses(hidden, head, labels, sample_ids)
    full = F.cross_entropy(
        head(hidden[:, :-1]).float().transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none"
    )
    valid = supervised_mask(labels, sample_ids)
    assert torch.equal(index, valid.nonzero())  # (row, predicting position), row-major like the mask
    assert len(index) == 3 * 9 - 1 - 4  # 3 x 9 targets past the prompt, less a boundary and padding
    assert_same(losses, full[valid], "losses")
    # The positions the trainer computes on the CPU give the same losses.
    given, same = token_losses(hidden, head, labels, sample_ids, supervised_index(labels, sample_ids))
    assert same is not index and torch.equal(same, index)
    assert_same(given, losses, "losses from given positions")


def test_model_loss_equals_full_logits_path(tiny_model, tokenizer):
    """VisionLanguageModel: the chunked training loss and its gradients equal the return_logits path."""
    from tests.test_model import make_sample, pack

    gen = torch.Generator().manual_seed(5)
    samples = [make_sample(tiny_model, gen, n, img) for n, img in ((9, True), (7, False), (12, True))]
    batch = pack(samples, [[0, 1], [2]], length=40)
    tiny_model.train()
    results = []
    for full in (True, False):
        tiny_model.zero_grad(set_to_none=True)
        out = tiny_model(**batch, mask_mode="prefix", return_logits=full)
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        results.append((out.token_loss.detach(), out.loss_sum.detach(), grads))
    (ref_tok, ref_sum, ref_grads), (tok, total, grads) = results
    assert_same(tok, ref_tok, "token_loss")
    torch.testing.assert_close(total, ref_sum, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys() and "language.lm_head.weight" not in grads  # tied: one tensor
    for name in ref_grads:
        assert_same(grads[name], ref_grads[name], name)


@pytest.mark.slow
def test_compiled_chunks_equal_full_logits_and_compile_once():
    """`compiled=True` (torch.compile of forward_chunk / backward_chunk, what `train.compile` turns on): the
    same 1e-6 agreement with the full-logits path, and one graph per function for batches whose last chunks
    differ in length (dynamic rows; a 1-row chunk would specialise once more)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    head = make_head()
    upstream = torch.rand(N, generator=torch.Generator().manual_seed(2))
    for n in (N, 50, 38):  # last chunks of 6, 2 and 6 rows
        hidden, targets = make_inputs(n=n)
        ref = losses_and_grads(reference, head, hidden, targets, upstream[:n])
        got = losses_and_grads(
            lambda h, hd, t: linear_cross_entropy(h, hd, t, chunk_bytes=16 * V * 4, compiled=True),
            head,
            hidden,
            targets,
            upstream[:n],
        )
        for name, a, b in zip(("losses", "grad hidden", "grad weight"), got, ref, strict=True):
            assert_same(a, b, f"{name} (n={n})")
    assert counters["stats"]["unique_graphs"] == 2
