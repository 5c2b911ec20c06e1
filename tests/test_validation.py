"""Validation through the engines: the held-out loss equals a sample-by-sample recomputation and CIDEr equals
`eval caption`, on 1 rank and on 2 gloo ranks (FSDP and DeepSpeed) for the same weights; the ranks get
unequal numbers of held-out micro-batches, one rank's first is text-only while the vision tower trains, and
the caption chunks do not divide evenly. Training runs with validation at every step finish on 2 ranks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from train_fixtures import (
    REPO,
    RUN_TIMEOUT_S,
    TrainData,
    read_metrics,
    tiny_model_section,
    tiny_stage_config,
    train_data,
    train_env,
    write_config,
)

from vlmtrain.dist import DistContext
from vlmtrain.train.validation import Validator

FIXTURES = Path(__file__).resolve().parent / "validation_fixtures.py"
ENGINES = ("fsdp", "deepspeed")
PRECISIONS = ("fp32", "bf16")
MAX_NEW_TOKENS = 8
# fp32: the engines and the sample-by-sample reference add the same token losses in other groupings
# (micro-batches of other samples, padded to other widths, a blank image row on the text-only rank).
# Measured: 4.6e-8 relative.
FP32_RTOL = 1e-5
# bf16, 1 against 2 ranks and FSDP against DeepSpeed: the same bf16 weights on the same samples, grouped into
# other micro-batches. On CPU a row's result does not depend on its neighbours, and measured the losses are
# identical; the bound allows kernels whose blocking follows the batch shape: independent roundings of at most
# 2^-8 relative per token loss average over the ~400 supervised tokens to about 2^-8 / 20 = 2e-4. bf16 and
# fp32 differ by 5e-4 here; losing one micro-batch would move the loss by several percent.
BF16_RTOL = 2e-4


@dataclass(frozen=True)
class HeldOut:
    """The held-out set and the weights every run validates."""

    source: str
    """Brace pattern: caption shards of 4, 4 and 1 images with a text-only shard of 2 dealt to rank 1."""
    captions: str
    """The same three caption shards alone (what `eval caption` scores)."""
    init: Path
    """The weights the stage starts from (tiny model fitted to the captions), with its tokenizer."""
    data: TrainData


def write_held_out(root: Path, data: TrainData) -> HeldOut:
    from transformers import AutoTokenizer

    from vlmtrain.config.schema import ModelConfig
    from vlmtrain.data.shard import shard
    from vlmtrain.demo.corpus import write_corpus
    from vlmtrain.models.vlm import VisionLanguageModel

    corpus = write_corpus(root / "corpus", n_train=2, n_test=9, image_size=32, seed=3)
    shard(
        corpus.karpathy, "karpathy", corpus.images, root / "cap", split="test", shard_size=4, progress=False
    )
    text = [
        {
            "id": f"t{i}",
            "conversations": [
                {"from": "human", "value": f"Name a color, number {i}."},
                {"from": "gpt", "value": "A red square and a blue circle."},
            ],
        }
        for i in range(2)
    ]
    (root / "text.json").write_text(json.dumps(text))
    shard(root / "text.json", "llava", corpus.images, root / "text", shard_size=4, progress=False)
    caps = [f"cap/test-{i:06d}.tar" for i in range(3)]
    assert all((root / c).is_file() for c in caps) and not (root / "cap/test-000003.tar").exists()
    # Shards go to the ranks round-robin: rank 0 reads cap 0 and 1 (8 images), rank 1 the text-only shard
    # and cap 2 (2 text-only samples, then 1 image).
    source = f"{root}/{{{caps[0]},text/shard-000000.tar,{caps[1]},{caps[2]}}}"
    captions = f"{root}/{{{','.join(caps)}}}"
    tokenizer = AutoTokenizer.from_pretrained(str(data.tokenizer))
    torch.manual_seed(5)
    model = VisionLanguageModel.from_config(ModelConfig(**tiny_model_section(data)), tokenizer)
    memorize_captions(model, tokenizer, data, captions)
    model.save_pretrained(root / "init")
    tokenizer.save_pretrained(str(root / "init"))
    return HeldOut(source, captions, root / "init", data)


def memorize_captions(model: Any, tokenizer: Any, data: TrainData, source: str, steps: int = 200) -> None:
    """Fit `model` to the first reference of each image of `source` (one batch of all 9, AdamW; ~8 s).

    A random-init tiny LM with tied embeddings greedily repeats the prompt's last token, so every caption
    would be the same (empty) string and CIDEr 0: nothing would show a caption reaching the wrong sample.
    Fitted, its greedy captions differ per image and overlap the references (measured: 9 distinct, CIDEr 2.2).
    """
    from vlmtrain.config.load import stage_config_from_dict
    from vlmtrain.data.collate import MODEL_KEYS
    from vlmtrain.train.run import make_loader_factory

    cfg = tiny_stage_config(2, data, max_steps=1, save_every=0, global_batch_size=9, micro_batch_size=9)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    loader = make_loader_factory(stage_config_from_dict(cfg), model, tokenizer, ctx, source, training=False)
    (batch,) = list(loader(None))
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread on a shared machine only adds contention
    try:
        model.train()
        for _ in range(steps):
            model(**inputs, mask_mode="prefix").loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def stage_config(held: HeldOut, engine: str, precision: str, every: int = 0) -> dict[str, Any]:
    """Stage 2 (every group trains) from `held.init`, validating the whole held-out set with CIDEr."""
    cfg = tiny_stage_config(2, held.data, max_steps=2, save_every=0, train={"engine": engine})
    cfg["train"]["precision"] = precision
    cfg["init_from"] = str(held.init)
    cfg.pop("model")  # init_from supplies the model; a block beside it is refused
    cfg["validation"] = {
        "data": held.source,
        "every": every,
        "max_samples": 64,  # more than the 11 samples: 1 and 2 ranks validate the same set
        "cider": True,
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    return cfg


def run_fixture(jobs: list[dict[str, Any]], spec: Path, ranks: int) -> None:
    """validation_fixtures.py on `jobs`, in one process or under torchrun; fails with the log's tail."""
    spec.write_text(json.dumps({"jobs": jobs}))
    script = [str(FIXTURES), str(spec)]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    cmd = [sys.executable, *launch, *script]
    log = spec.with_suffix(".log")
    with open(log, "w") as out:
        code = subprocess.run(
            cmd, cwd=REPO, env=train_env(), stdout=out, stderr=subprocess.STDOUT, timeout=2 * RUN_TIMEOUT_S
        ).returncode
    assert code == 0, f"{' '.join(cmd)} exited {code}\n{log.read_text()[-8000:]}"


@dataclass(frozen=True)
class Runs:
    """Step-0 validation of `HeldOut.init` keyed by (ranks, engine, precision); training runs under root."""

    root: Path
    validated: dict[tuple[int, str, str], dict[str, Any]]


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> HeldOut:
    base = tmp_path_factory.getbasetemp()
    return write_held_out(tmp_path_factory.mktemp("held_out"), train_data(base))


@pytest.fixture(scope="module")
def runs(held: HeldOut, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Two commands: 1 rank validates per engine and precision; 2 ranks do the same, then train each engine
    for 2 steps with validation at every step."""
    root = tmp_path_factory.mktemp("val_runs")
    validated: dict[tuple[int, str, str], dict[str, Any]] = {}
    for ranks in (1, 2):
        jobs, outs = [], {}
        for engine in ENGINES:
            for precision in PRECISIONS:
                name = f"r{ranks}-{engine}-{precision}"
                cfg = write_config(stage_config(held, engine, precision), root / f"{name}.json")
                outs[(ranks, engine, precision)] = root / f"{name}.out.json"
                job = {
                    "config": str(cfg),
                    "run_dir": str(root / name),
                    "out": str(outs[(ranks, engine, precision)]),
                }
                jobs.append({"kind": "validate", **job})
        for engine in ENGINES if ranks == 2 else ():
            for name, every in ((f"train-{engine}", 1), (f"train-{engine}-noval", None)):
                cfg = stage_config(held, engine, "bf16", every=every or 0)
                if every is None:
                    cfg["validation"] = {}
                path = write_config(cfg, root / f"{name}.json")
                jobs.append({"kind": "train", "config": str(path), "run_dir": str(root / name)})
        run_fixture(jobs, root / f"spec{ranks}.json", ranks)
        validated.update({k: json.loads(path.read_text()) for k, path in outs.items()})
    return Runs(root, validated)


def sample_by_sample_loss(held: HeldOut, cfg: dict[str, Any]) -> tuple[float, int]:
    """Plain fp32 model on each held-out sample alone (no engine, no padding): token-mean loss, samples."""
    from transformers import AutoTokenizer

    from vlmtrain.config.load import stage_config_from_dict
    from vlmtrain.models.vlm import VisionLanguageModel
    from vlmtrain.train.run import make_loader_factory

    stage = stage_config_from_dict(cfg)
    model = VisionLanguageModel.from_pretrained(held.init).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(held.init))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    total, tokens, seen = 0.0, 0, 0
    for batch in make_loader_factory(stage, model, tokenizer, ctx, held.source, training=False)(None):
        for i in range(batch["input_ids"].shape[0]):
            keep = batch["sample_ids"][i] > 0
            one = {
                k: batch[k][i : i + 1, keep]
                for k in ("input_ids", "labels", "image_flags", "sample_ids", "position_ids")
            }
            if one["image_flags"].any():
                img = int(batch["image_flags"][:i].any(dim=1).sum())
                one["pixel_values"] = batch["pixel_values"][img : img + 1]
            with torch.no_grad():
                out = model(**one, mask_mode=stage.mask.mode)
            total += float(out.token_loss.sum())
            tokens += out.num_label_tokens
            seen += 1
    return total / tokens, seen


@pytest.mark.slow
def test_ranks_get_unequal_and_mixed_batches(runs):
    for engine in ENGINES:
        batches = runs.validated[(2, engine, "fp32")]["batches"]
        assert [[b["samples"] for b in r] for r in batches] == [[2, 2, 2, 2], [2, 1]], engine
        assert batches[0][0]["images"] == 2 and batches[1][0]["images"] == 0, "rank 1 starts text-only"


@pytest.mark.slow
def test_held_out_loss_equals_sample_by_sample_on_every_world_size(runs, held):
    reference, seen = sample_by_sample_loss(held, stage_config(held, "fsdp", "fp32"))
    assert seen == 11
    for ranks in (1, 2):
        for engine in ENGINES:
            loss = runs.validated[(ranks, engine, "fp32")]["record"]["val_loss"]
            assert loss == pytest.approx(reference, rel=FP32_RTOL, abs=0), f"{ranks} rank(s), {engine}"
    one = runs.validated[(1, "fsdp", "bf16")]["record"]["val_loss"]
    for ranks in (1, 2):
        for engine in ENGINES:
            loss = runs.validated[(ranks, engine, "bf16")]["record"]["val_loss"]
            assert loss == pytest.approx(one, rel=BF16_RTOL, abs=0), f"bf16, {ranks} rank(s), {engine}"
    assert abs(one - reference) > 1e-5 * reference, "bf16 and fp32 agree: the precision was not applied"


@pytest.mark.slow
def test_cider_equals_eval_caption_and_world_size_independent(runs, held):
    from vlmtrain.eval.generate import GenerationConfig
    from vlmtrain.eval.run import eval_caption

    root = runs.root
    metrics = eval_caption(
        held.init, held.captions, root / "eval", None, GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    )
    for precision in PRECISIONS:
        one = runs.validated[(1, "fsdp", precision)]
        assert len(one["captions"]) == 9 and len(set(one["captions"].values())) > 1, "captions all alike"
        for ranks in (1, 2):
            for engine in ENGINES:
                got = runs.validated[(ranks, engine, precision)]
                where = f"{precision}, {ranks} rank(s), {engine}"
                assert got["captions"] == one["captions"], where
                assert got["record"]["val_cider"] == one["record"]["val_cider"], where
    assert runs.validated[(1, "fsdp", "fp32")]["record"]["val_cider"] == pytest.approx(
        metrics["CIDEr"], abs=1e-9
    )


@pytest.mark.slow
def test_training_with_validation_finishes_on_two_ranks_and_trains_alike(runs):
    """Validation at every step leaves training as it was: the same losses and gradient norms, bitwise,
    as the same run without validation (the FSDP units are resharded, modes restored, nothing else moved)."""
    for engine in ENGINES:
        stage_dir = runs.root / f"train-{engine}" / "stage2"
        records = [json.loads(line) for line in (stage_dir / "validation.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2], engine
        for r in records:
            assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0, (engine, r)
            assert math.isfinite(r["val_cider"]) and r["val_cider"] > 0, (engine, r)
        assert (stage_dir / "final" / "STAGE_COMPLETE").is_file()
        with_val = read_metrics(stage_dir / "metrics.jsonl")
        without = read_metrics(runs.root / f"train-{engine}-noval" / "stage2" / "metrics.jsonl")
        assert [m["step"] for m in with_val] == [m["step"] for m in without] == [1, 2]
        for a, b in zip(with_val, without, strict=True):
            assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), f"{engine} step {a['step']}"
        assert records[1]["val_loss"] != records[0]["val_loss"], "step 2 validated the step-1 weights"


def test_due_steps(tmp_path):
    from vlmtrain.config.load import read_json, shipped_stage_path, stage_config_from_dict

    data = read_json(shipped_stage_path(2))
    data["validation"] = {"data": str(tmp_path / "manifest.json"), "every": 2}
    stage = stage_config_from_dict(data)
    validator = Validator(stage, DistContext(0, 1, 0, torch.device("cpu")), None, lambda: [], tmp_path / "v")
    assert [s for s in range(1, 8) if validator.due(s, total=7)] == [2, 4, 6, 7]
