"""train.compile: compiled layers and loss chunk against the same model run eagerly (losses over training steps),
compile counts over varying lengths, and the `auto` decision."""

from __future__ import annotations

import copy

import pytest
import torch
from test_model import make_sample, pack

from vlmtrain.models.compile import (
    apply_compile,
    graphs_compiled,
)


def varying_batches(model, n: int) -> list[dict]:
    """n packed batches of 2-3 rows (each an image sample, the first also a text-only one) of varying widths.

    At least two images and two rows each: a dimension of size 1 is specialised by the compiler (one extra
    graph the first time), which this test keeps apart from the varying lengths it checks.
    """
    gen = torch.Generator().manual_seed(7)
    out = []
    for step in range(n):
        rows = 2 + step % 2
        width = 48 + 16 * (step % 5)
        samples = [
            make_sample(model, gen, int(torch.randint(3, 12, (1,), generator=gen)), True) for _ in range(rows)
        ]
        samples.append(make_sample(model, gen, 5, False))
        out.append(pack(samples, [[0, rows]] + [[r] for r in range(1, rows)], width))
    return out


def train(model, batches) -> tuple[list[float], list[int]]:
    """AdamW steps, one per batch: the losses, and the graphs compiled so far after each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, graphs = [], []
    for batch in batches:
        out = model(**batch, mask_mode="prefix")
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
        graphs.append(graphs_compiled())
    return losses, graphs


@pytest.mark.slow
def test_compiled_training_matches_eager_with_recompute_and_no_recompiles(tiny_model):
    """10 AdamW steps on batches of varying shape: the compiled model (layers + loss chunk, LM recomputed)
    gives eager's losses within 1e-4 relative (fp32: only the compiler's reordered reductions differ), and
    after two warm-up steps no step compiles anything."""
    assert tiny_model.num_image_tokens + 11 + 5 <= 48  # the widest row fits the narrowest width
    eager = copy.deepcopy(tiny_model).train()
    compiled = copy.deepcopy(tiny_model).train()
    compiled.language.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}
    )
    batches = varying_batches(tiny_model, 5) * 2  # each shape twice: the second pass shows the training
    ref, _ = train(eager, batches)
    assert apply_compile(compiled, True).startswith("compile: 4 transformer layers")
    assert compiled.compiled_loss and not eager.compiled_loss
    losses, graphs = train(compiled, batches)
    assert sum(ref[5:]) < sum(ref[:5])  # the steps train
    assert losses == pytest.approx(ref, rel=1e-4)
    assert graphs[1] > 0 and graphs[-1] == graphs[1], graphs  # nothing compiled after the warm-up steps
