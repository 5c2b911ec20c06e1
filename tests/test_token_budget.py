"""Token-budget batching: a step's samples laid into budget micro-batches (collate.budget_collate) hold every
sample exactly once, never exceed the budget, use as few micro-batches as the rows need, and give each sample
the same losses as one-sample-per-row padding; the trainer's micro-batch count agreement over ranks."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_collate import make_samples, reference_rows

from vlmtrain.config.load import ValidationError, load_stage_config, stage_config_from_dict
from vlmtrain.config.schema import DataConfig
from vlmtrain.data.collate import MODEL_KEYS, budget_collate, first_fit_decreasing, pad_collate
from vlmtrain.data.process import IGNORE_INDEX, ProcessedSample

PAD = 0
SIZE = 8


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("row", "budget"), [(40, 40), (40, 120), (64, 200), (50, 1000)])
def test_budget_micro_batches_hold_every_sample_once_within_the_budget(seed, row, budget):
    samples = make_samples(seed, n=random.Random(seed).randint(1, 30), max_len=row)
    group = budget_collate(samples, row, budget, PAD, image_size=SIZE)
    micros = group["micro_batches"]
    keys = [k for m in micros for k in m["keys"]]
    assert sorted(keys) == sorted(s.key for s in samples) and len(keys) == len(set(keys))
    assert group["keys"] == keys and group["num_samples"] == len(samples)
    assert group["num_tokens"] == sum(len(s) for s in samples)
    widths = {m["input_ids"].shape[1] for m in micros}
    assert len(widths) == 1, "one row width per step"
    (width,) = widths
    assert max(len(s) for s in samples) <= width <= row and (width % 64 == 0 or width == row)
    for m in micros:
        assert m["input_ids"].numel() <= budget
    # Brute force over every allowed width: first-fit decreasing's positions there; ours is the fewest.
    lengths = [len(s) for s in samples]
    n_rows = sum(m["input_ids"].shape[0] for m in micros)
    candidates = [w for w in range(1, row + 1) if (w % 64 == 0 or w == row) and w >= max(lengths)]
    fewest = min(len(first_fit_decreasing(lengths, w)) * w for w in candidates)
    assert n_rows * width == fewest
    assert n_rows * width <= len(first_fit_decreasing(lengths, row)) * row  # never worse than full rows
    per_micro = budget // width
    assert len(micros) == math.ceil(n_rows / per_micro)
    assert [m["input_ids"].shape[0] for m in micros[:-1]] == [per_micro] * (len(micros) - 1)
    # Token by token: keys are in row order, so the rows' samples are known; rebuild them independently.
    by_key = {s.key: s for s in samples}
    for m in micros:
        it = iter(m["keys"])
        rebuilt = [
            [by_key[next(it)] for _ in range(int(m["sample_ids"][r].max()))]
            for r in range(m["input_ids"].shape[0])
        ]
        for name, want in reference_rows(rebuilt, width).items():
            assert m[name].long().tolist() == want, name


def test_a_budget_below_one_row_or_a_sample_above_the_row_is_refused():
    samples = make_samples(0, n=3, max_len=20)
    with pytest.raises(ValueError, match="token_budget=10 is below the row length 20"):
        budget_collate(samples, 20, 10, PAD, image_size=SIZE)
    with pytest.raises(ValueError, match="more than the row length 5"):
        budget_collate(samples, 5, 100, PAD, image_size=SIZE)
    with pytest.raises(ValidationError, match="token_budget"):
        DataConfig(max_length=256, token_budget=200).validate("data")


def test_per_sample_losses_equal_packed_and_padded(tiny_model):
    """Each sample's token losses are the same in budget micro-batches of packed rows as alone in a padded row."""
    model = tiny_model
    gen = torch.Generator().manual_seed(3)
    vocab = model.language.get_input_embeddings().num_embeddings
    p, size = model.num_image_tokens, model.vision.config.image_size
    samples = []
    for i, answer in enumerate((3, 17, 5, 29, 2, 11, 8, 23, 4)):
        prefix = p if i % 4 != 3 else 0
        text = torch.randint(10, vocab - 10, (4 + answer,), generator=gen)
        ids = torch.cat([torch.full((prefix,), model.image_token_id), text])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[prefix + 4 :] = text[4:]
        flags = torch.zeros_like(ids, dtype=torch.bool)
        flags[:prefix] = True
        pixels = torch.randn(3, size, size, generator=gen) if prefix else None
        samples.append(ProcessedSample(ids, labels, flags, pixels, f"s{i}", "synthetic", i))
    row = 2 * max(len(s) for s in samples)  # two samples or more per row
    group = budget_collate(samples, row, 2 * row, PAD, image_size=size)
    assert len(group["micro_batches"]) >= 2 and any(
        int(m["sample_ids"].max()) > 1 for m in group["micro_batches"]
    ), "the layout should pack several samples per row and use several micro-batches"
    packed: dict[str, list[float]] = {}
    with torch.no_grad():
        for m in group["micro_batches"]:
            out = model(**{k: m[k] for k in MODEL_KEYS}, mask_mode="prefix")
            it = iter(m["keys"])
            for r in range(m["input_ids"].shape[0]):
                for k in range(1, int(m["sample_ids"][r].max()) + 1):
                    where = m["sample_ids"][r] == k
                    packed[next(it)] = out.token_loss[r][where & (m["labels"][r] != IGNORE_INDEX)].tolist()
        for s in samples:
            alone = pad_collate([s], PAD, image_size=size)
            out = model(**{k: alone[k] for k in MODEL_KEYS}, mask_mode="prefix")
            want = out.token_loss[0][alone["labels"][0] != IGNORE_INDEX]
            # the first label position has no predecessor in its sample: both layouts leave it at 0
            assert torch.allclose(torch.tensor(packed[s.key]), want, rtol=1e-5, atol=1e-6), s.key


def test_shipped_presets_turn_the_budget_on_where_it_pays():
    budgets = {n: load_stage_config(stage=n).data.token_budget for n in range(4)}
    assert budgets[3] is not None and budgets[3] >= load_stage_config(stage=3).data.max_length
    assert all(budgets[n] is None for n in range(3)), budgets


def test_micro_batch_count_is_the_most_any_rank_has(tmp_path, tokenizer, tiny_model):
    """The count histogram summed over ranks gives every rank the largest count; fixed batches keep theirs."""
    from vlmtrain.dist import DistContext
    from vlmtrain.train.trainer import Trainer

    cfg = load_stage_config(stage=3)
    stage = stage_config_from_dict(
        {**_as_dict(cfg), "batch": {"global_batch_size": 8, "micro_batch_size": 2}}
    )
    ctx = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(stage, tmp_path, ctx, tiny_model, tokenizer, lambda s: None, total_steps=1)
    ranks = [trainer._count_histogram(n) for n in (1, 3)]  # 4 samples per rank: counts 1..4
    assert ranks == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    summed = [a + b for a, b in zip(*ranks, strict=True)]
    assert trainer._step_micro_count(1, summed) == 3 and trainer._step_micro_count(3, summed) == 3
    with pytest.raises(RuntimeError, match="5 micro-batches"):
        trainer._count_histogram(5)


def _as_dict(stage):
    from vlmtrain.config.load import stage_config_to_dict

    return stage_config_to_dict(stage)
