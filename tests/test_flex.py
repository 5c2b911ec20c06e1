"""FlexAttention path against the dense masks (masks.sdpa_mask is the reference) and SDPA; compile counts; the
`auto` decision's CUDA record."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from vlmtrain.models.compile import graphs_compiled
from vlmtrain.models.masks import FLEX_BLOCK_SIZE, attention_allowed, flex_block_mask, sdpa_mask

MODES = ["bidirectional", "prefix", "causal"]


def packed_layout(seed: int, batch: int, length: int):
    """Rows packed with samples of 20-150 tokens (an image prefix of 16-48 tokens on most), padding after."""
    rng = random.Random(seed)
    sample_ids = torch.zeros(batch, length, dtype=torch.long)
    image_flags = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        t, sid = 0, 0
        while t < length - 40:
            sid += 1
            n = min(rng.randint(20, 150), length - 40 - t)
            n_img = rng.choice([0, 16, 48]) if n > 48 else 0
            sample_ids[b, t : t + n] = sid
            image_flags[b, t : t + n_img] = True
            t += n
    return sample_ids, image_flags


def block_sets(num: torch.Tensor, indices: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[B, nq, nk] booleans from a BlockMask's (num_blocks, indices) pair (head dim broadcast, taken at 0)."""
    b, _, nq = num.shape
    out = torch.zeros(b, nq, n_kv, dtype=torch.bool)
    for i in range(b):
        for q in range(nq):
            out[i, q, indices[i, 0, q, : num[i, 0, q]]] = True
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_compiled_block_mask_equals_dense_mask_and_flex_equals_sdpa(mode):
    """For each mode, on packed rows, with and without a sliding window: the BlockMask's rule over every
    (q, kv) pair is the dense mask; its partial / full blocks are the tiles with some / all pairs allowed;
    FlexAttention with it (native GQA: 4 query heads on 2 KV heads) gives SDPA's output under the dense mask."""
    sample_ids, image_flags = packed_layout(seed=MODES.index(mode), batch=2, length=384)
    n = 384 // FLEX_BLOCK_SIZE
    for window in (None, 40):
        dense = attention_allowed(mode, sample_ids, image_flags, window)  # [B, T, T]
        bm = flex_block_mask(mode, sample_ids, image_flags, window)
        b, q, k = torch.meshgrid(torch.arange(2), torch.arange(384), torch.arange(384), indexing="ij")
        assert torch.equal(bm.mask_mod(b, 0, q, k), dense)
        tiles = dense.view(2, n, FLEX_BLOCK_SIZE, n, FLEX_BLOCK_SIZE)
        full = tiles.all(dim=4).all(dim=2)
        some = tiles.any(dim=4).any(dim=2)
        assert torch.equal(block_sets(bm.full_kv_num_blocks, bm.full_kv_indices, n), full)
        assert torch.equal(block_sets(bm.kv_num_blocks, bm.kv_indices, n), some & ~full)
        assert (~some).any() or mode == "bidirectional"  # there are skipped tiles to get right

        from vlmtrain.models.flex import _compiled_flex

        gen = torch.Generator().manual_seed(0)
        q_, k_, v_ = (torch.randn(2, h, 384, 8, generator=gen) for h in (4, 2, 2))
        out = _compiled_flex()(q_, k_, v_, block_mask=bm, enable_gqa=True)
        ref = F.scaled_dot_product_attention(
            q_,
            k_.repeat_interleave(2, 1),
            v_.repeat_interleave(2, 1),
            attn_mask=sdpa_mask(mode, sample_ids, image_flags, window),
        )
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_flex_path_compiles_nothing_after_warm_up_across_lengths():
    """BlockMask builder and flex kernel over micro-batches of varying width and row count: after two
    warm-up shapes, no further shape compiles a graph."""
    from vlmtrain.models.flex import _compiled_flex

    counts = []
    # The first shape is the test above's; the second changes rows and width together (inductor's CPU flex
    # template failed to build when they turned dynamic one at a time: torch 2.13, a CPU-only codegen bug).
    for i, (rows, width) in enumerate([(2, 384), (3, 256), (2, 512), (4, 640), (3, 1024), (2, 768)]):
        sample_ids, image_flags = packed_layout(seed=i, batch=rows, length=width)
        bm = flex_block_mask("prefix", sample_ids, image_flags)
        q = torch.randn(rows, 4, width, 8)  # the head shape of the test above: head sizes are static
        k, v = torch.randn(rows, 2, width, 8), torch.randn(rows, 2, width, 8)
        out = _compiled_flex()(q, k, v, block_mask=bm, enable_gqa=True)
        assert out.shape == q.shape
        counts.append(graphs_compiled())
    assert counts[1] > 0 and counts[2:] == [counts[1]] * 4, counts
