"""Validation during training: held-out loss equals a sample-by-sample recomputation; CIDEr equals `eval caption`."""

from __future__ import annotations

import json

import pytest
import torch

from vlmtrain.config.load import read_json, shipped_stage_path, stage_config_from_dict
from vlmtrain.data.shard import shard
from vlmtrain.demo.corpus import write_corpus
from vlmtrain.dist import DistContext
from vlmtrain.train.run import make_loader_factory
from vlmtrain.train.validation import Validator


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    from tests.conftest import TINY_VISION, tiny_language_config
    from vlmtrain.config.schema import ModelConfig
    from vlmtrain.models.vlm import VisionLanguageModel

    root = tmp_path_factory.mktemp("val")
    corpus = write_corpus(root / "corpus", n_train=8, n_test=10, image_size=32, seed=2)
    manifest = root / "karpathy" / "manifest.json"
    shard(
        corpus.karpathy,
        "karpathy",
        corpus.images,
        manifest.parent,
        split="test",
        shard_size=4,
        progress=False,
    )
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=None,
        vision_config=TINY_VISION,
        language=None,
        language_config=tiny_language_config(len(tokenizer)),
    )
    model = VisionLanguageModel.from_config(cfg, tokenizer).eval()
    with torch.no_grad():
        model.language.get_output_embeddings().weight.mul_(8.0)  # peaked outputs: captions of varied length
    data = read_json(shipped_stage_path(2))
    data["validation"] = {
        "data": str(manifest),
        "every": 2,
        "max_samples": 7,
        "cider": True,
        "max_new_tokens": 8,
    }
    data["data"].update(max_length=256, num_workers=0)
    data["batch"] = {"global_batch_size": 4, "micro_batch_size": 2}
    stage = stage_config_from_dict(data)
    return root, manifest, model, stage


def test_held_out_loss_equals_sample_by_sample(setup, tokenizer):
    root, manifest, model, stage = setup
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    factory = make_loader_factory(stage, model, tokenizer, ctx, str(manifest), training=False)
    validator = Validator(stage, ctx, tokenizer, lambda: factory(None), root / "validation.jsonl")
    loss = validator.held_out_loss(model)
    # Reference: every sample alone (batch of one), summing token losses; the validator stops after the
    # micro-batch that reaches max_samples=7, i.e. 8 samples with micro-batches of 2.
    total, tokens, seen = 0.0, 0, 0
    for batch in factory(None):
        for i in range(batch["input_ids"].shape[0]):
            if seen >= 8:
                break
            keep = batch["sample_ids"][i] > 0
            one = {
                k: batch[k][i : i + 1, keep]
                for k in ("input_ids", "labels", "image_flags", "sample_ids", "position_ids")
            }
            img = int(batch["image_flags"][:i].any(dim=1).sum())
            one["pixel_values"] = batch["pixel_values"][img : img + 1]
            with torch.no_grad():
                out = model(**one, mask_mode=stage.mask.mode)
            total += float(out.token_loss.sum())
            tokens += out.num_label_tokens
            seen += 1
    assert seen == 8
    assert loss == pytest.approx(total / tokens, rel=1e-5)


@pytest.mark.slow
def test_cider_equals_eval_caption(setup, tokenizer):
    from vlmtrain.eval.generate import GenerationConfig
    from vlmtrain.eval.run import eval_caption

    root, manifest, model, stage = setup
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    factory = make_loader_factory(stage, model, tokenizer, ctx, str(manifest), training=False)
    validator = Validator(stage, ctx, tokenizer, lambda: factory(None), root / "validation.jsonl")
    record = validator.run(model, step=2)
    written = [json.loads(line) for line in (root / "validation.jsonl").read_text().splitlines()]
    assert written[-1] == record and record["step"] == 2
    model.save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(str(root / "ckpt"))
    metrics = eval_caption(
        root / "ckpt", str(manifest), root / "eval", None, GenerationConfig(max_new_tokens=8), limit=7
    )
    assert record["val_cider"] == pytest.approx(metrics["CIDEr"], abs=1e-9)


def test_due_steps(setup, tokenizer):
    root, _, _, stage = setup
    validator = Validator(
        stage, DistContext(0, 1, 0, torch.device("cpu")), tokenizer, lambda: [], root / "v.jsonl"
    )
    assert [s for s in range(1, 8) if validator.due(s, total=7)] == [2, 4, 6, 7]
