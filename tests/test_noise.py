"""Stage-0 noise: exact counts per sample, only text inputs touched, labels clean, seeded."""

from __future__ import annotations

import json

import torch

from vlmtrain.models.noise import corrupt_text_tokens, ordinary_token_ids


def layout():
    sample_ids = torch.tensor([[1] * 10 + [2] * 7 + [0] * 3, [1] * 16 + [0] * 4])
    image_flags = torch.zeros_like(sample_ids, dtype=torch.bool)
    image_flags[0, :4] = True  # sample 1: 4 image tokens + 6 text; sample 2: 7 text
    image_flags[1, :6] = True  # 6 image + 10 text
    input_ids = torch.arange(20).repeat(2, 1) + 100
    return input_ids, sample_ids, image_flags


def test_exact_count_only_text_and_seeded():
    input_ids, sample_ids, image_flags = layout()
    pool = ordinary_token_ids(50, special_ids=[0, 1, 2, 3])
    gen = torch.Generator().manual_seed(7)
    noisy, corrupted = corrupt_text_tokens(input_ids, sample_ids, image_flags, 0.2, pool, gen)
    text = (sample_ids > 0) & ~image_flags
    assert not (corrupted & ~text).any(), "noise touched image tokens or padding"
    assert torch.equal(noisy[~corrupted], input_ids[~corrupted])
    for b, sid, n_text in ((0, 1, 6), (0, 2, 7), (1, 1, 10)):
        assert int((corrupted[b] & (sample_ids[b] == sid)).sum()) == round(0.2 * n_text)
    assert set(noisy[corrupted].tolist()) <= set(pool.tolist())
    assert not torch.equal(noisy, input_ids)
    again, _ = corrupt_text_tokens(
        input_ids, sample_ids, image_flags, 0.2, pool, torch.Generator().manual_seed(7)
    )
    assert torch.equal(noisy, again)
    other, _ = corrupt_text_tokens(
        input_ids, sample_ids, image_flags, 0.2, pool, torch.Generator().manual_seed(8)
    )
    assert not torch.equal(noisy, other)


def test_ratio_zero_and_one():
    input_ids, sample_ids, image_flags = layout()
    pool = ordinary_token_ids(50, special_ids=[])
    noisy, corrupted = corrupt_text_tokens(input_ids, sample_ids, image_flags, 0.0, pool, torch.Generator())
    assert torch.equal(noisy, input_ids) and not corrupted.any()
    _, corrupted = corrupt_text_tokens(input_ids, sample_ids, image_flags, 1.0, pool, torch.Generator())
    assert torch.equal(corrupted, (sample_ids > 0) & ~image_flags)


def test_pool_excludes_special_tokens():
    pool = ordinary_token_ids(10, special_ids={0, 9, 42})
    assert pool.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_trainer_noise_is_cpu_side_and_matches_the_device_path(tmp_path, tokenizer, tiny_model):
    """The trainer corrupts the CPU micro-batch before the copy to the device; the draw is the one the former
    device-side path made for the same (seed, step, micro-batch, rank): corrupt_text_tokens on the same ids
    with a generator seeded by stable_seed(seed, "noise", step, micro, rank)."""
    from vlmtrain.config.load import shipped_stage_path, stage_config_from_dict
    from vlmtrain.dist import DistContext
    from vlmtrain.train.trainer import Trainer, stable_seed

    cfg = json.loads(shipped_stage_path(0).read_text())
    stage = stage_config_from_dict(cfg)
    assert stage.mask.noise_ratio == 0.2
    ctx = DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    trainer = Trainer(stage, tmp_path, ctx, tiny_model, tokenizer, lambda state: [], total_steps=1)
    input_ids, sample_ids, image_flags = layout()
    raw = {"input_ids": input_ids, "sample_ids": sample_ids, "image_flags": image_flags, "labels": input_ids}
    out = trainer.noisy_inputs(raw, step=3, micro=1)
    gen = torch.Generator().manual_seed(stable_seed(stage.train.seed, "noise", 3, 1, 1))
    expected, corrupted = corrupt_text_tokens(
        input_ids, sample_ids, image_flags, 0.2, trainer.noise_pool, gen
    )
    assert corrupted.any()
    assert torch.equal(out["input_ids"], expected)
    assert out["labels"] is input_ids and torch.equal(raw["input_ids"], torch.arange(20).repeat(2, 1) + 100)
    assert out["input_ids"].device.type == "cpu"
    again = trainer.noisy_inputs(raw, step=3, micro=1)
    assert torch.equal(again["input_ids"], expected)
    assert not torch.equal(trainer.noisy_inputs(raw, step=3, micro=0)["input_ids"], expected)
