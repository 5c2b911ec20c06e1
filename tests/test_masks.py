"""Masks against a brute-force reference written from the paper's definitions, token pair by token pair."""

from __future__ import annotations

import random

import pytest
import torch

from vlmtrain.models.masks import (
    attention_allowed,
    eager_mask,
    position_ids_from_sample_ids,
    sdpa_mask,
)


def random_layout(rng: random.Random, batch: int, length: int):
    """Rows of packed samples, each an optional image prefix (varying token counts) then text; padding after."""
    sample_ids = torch.zeros(batch, length, dtype=torch.long)
    image_flags = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        t, sid = 0, 0
        while t < length - 1 and rng.random() < 0.85:
            sid += 1
            n_img = rng.choice([0, 0, 2, 3, 5])  # text-only samples and several image sizes
            n_txt = rng.randint(1, 6)
            for i in range(n_img + n_txt):
                if t >= length:
                    break
                sample_ids[b, t] = sid
                image_flags[b, t] = i < n_img
                t += 1
    return sample_ids, image_flags


def brute_force(mode: str, sample_ids: torch.Tensor, image_flags: torch.Tensor) -> torch.Tensor:
    b_, t_ = sample_ids.shape
    out = torch.zeros(b_, t_, t_, dtype=torch.bool)
    for b in range(b_):
        for q in range(t_):
            for k in range(t_):
                sq, sk = int(sample_ids[b, q]), int(sample_ids[b, k])
                if sq == 0:
                    out[b, q, k] = q == k  # padding sees only itself
                    continue
                if sq != sk:
                    continue  # never across samples, never into padding
                iq, ik = bool(image_flags[b, q]), bool(image_flags[b, k])
                if mode == "bidirectional":
                    ok = True
                elif mode == "causal":
                    ok = k <= q
                else:  # prefix
                    # image sees all image tokens, never text; text sees the whole image and earlier text
                    ok = ik if iq else (ik or k <= q)
                out[b, q, k] = ok
    return out


@pytest.mark.parametrize("mode", ["bidirectional", "prefix", "causal"])
@pytest.mark.parametrize("seed", range(6))
def test_mask_equals_brute_force(mode, seed):
    rng = random.Random(seed)
    sample_ids, image_flags = random_layout(rng, batch=3, length=24)
    expected = brute_force(mode, sample_ids, image_flags)
    assert torch.equal(attention_allowed(mode, sample_ids, image_flags), expected)
    assert torch.equal(sdpa_mask(mode, sample_ids, image_flags)[:, 0], expected)
    additive = eager_mask(mode, sample_ids, image_flags, torch.float32)[:, 0]
    assert torch.equal(additive == 0, expected)


def test_prefix_is_causal_for_text_only_rows():
    sample_ids = torch.tensor([[1, 1, 1, 2, 2, 0]])
    image_flags = torch.zeros_like(sample_ids, dtype=torch.bool)
    assert torch.equal(
        attention_allowed("prefix", sample_ids, image_flags),
        attention_allowed("causal", sample_ids, image_flags),
    )


def test_position_ids_restart_per_sample():
    rng = random.Random(3)
    sample_ids, _ = random_layout(rng, batch=4, length=30)
    pos = position_ids_from_sample_ids(sample_ids)
    for b in range(4):
        counter, prev = 0, None
        for t in range(30):
            sid = int(sample_ids[b, t])
            if sid == 0:
                assert pos[b, t] == 0
                prev = None
                continue
            counter = counter + 1 if sid == prev else 0
            assert pos[b, t] == counter
            prev = sid


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="unknown mask mode"):
        attention_allowed("full", torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"must both be \[B, T\]"):
        attention_allowed("prefix", torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["bidirectional", "prefix", "causal"])
def test_skipped_block_share_equals_flex_block_mask(mode):
    """The share of skipped tiles equals what FlexAttention's own BlockMask keeps (its partial and full
    blocks), on packed rows padded to the tile size."""
    from torch.nn.attention.flex_attention import create_block_mask

    from vlmtrain.models.masks import _allowed, skipped_block_share

    rng = random.Random(3)
    sample_ids, image_flags = random_layout(rng, 3, 48)
    block = 16
    share = skipped_block_share(mode, sample_ids, image_flags, block_size=block)

    def mask_mod(b, h, q, k):
        return _allowed(mode, sample_ids[b, q], sample_ids[b, k], image_flags[b, q], image_flags[b, k], q, k)

    bm = create_block_mask(mask_mod, B=3, H=None, Q_LEN=48, KV_LEN=48, device="cpu", BLOCK_SIZE=block)
    kept = int(bm.kv_num_blocks.sum()) + int(bm.full_kv_num_blocks.sum())
    assert share == pytest.approx(1 - kept / (3 * 3 * 3))
    # Brute force, tile by tile.
    dense = brute_force(mode, sample_ids, image_flags)
    tiles = [
        dense[b, i : i + block, j : j + block].any()
        for b in range(3)
        for i in (0, 16, 32)
        for j in (0, 16, 32)
    ]
    assert share == pytest.approx(1 - sum(map(bool, tiles)) / len(tiles))
    if mode != "bidirectional":
        assert share > 0
