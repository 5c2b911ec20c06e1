"""benchmarks/bench_trainer.py: its synthetic text follows `plan`'s datasets token for token, a variant the
config refuses is recorded (not fatal), and on CPU its JSON holds exactly what the trainer's metrics.jsonl says."""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_trainer as bt  # a script, not a package

from vlmtrain.data.prompt import ChatRenderer
from vlmtrain.train.plan import PAPER_DATASETS


@pytest.fixture(scope="module")
def vocab() -> bt.Vocabulary:
    return bt.build_vocabulary()


@pytest.mark.parametrize(("dataset", "sigma"), [("COCO-118k-Recap", 0.25), ("LLaVA-Next-790k", 1.0)])
def test_synthetic_text_follows_plan(vocab, dataset, sigma):
    est = PAPER_DATASETS[dataset]
    # The mean sample is plan's average sample (E[factor] = 1; 4,000 draws: the mean's sampling error at
    # sigma 1 is ~2% of the variable part, well inside 5%).
    many = bt.plan_targets(dataset, sigma, 4000, random.Random(1))
    prompt, supervised = est.text_tokens()
    assert statistics.fmean(t.unsupervised for t in many) == pytest.approx(prompt, rel=0.05)
    assert statistics.fmean(t.supervised for t in many) == pytest.approx(supervised, rel=0.05)
    assert statistics.pstdev(t.supervised for t in many) > 0  # a spread, not one length
    # Each written conversation has its target's tokens. Reference: transformers' own chat template
    # rendering for the total, and the answers' words (one token each) plus one turn end per answer.
    rng = random.Random(2)
    renderer = ChatRenderer(vocab.tokenizer, None)
    for target in many[:40]:
        messages = bt.conversation(vocab, renderer, target, est.turns, rng)
        assert len(messages) == 2 * est.turns
        ids = vocab.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert len(ids) == target.unsupervised + target.supervised
        answer_words = sum(len(m["content"].split()) for m in messages if m["role"] == "assistant")
        assert answer_words + est.turns == target.supervised


def test_refused_variant_is_recorded_with_the_config_error(tmp_path):
    comps = bt.Components(tmp_path / "v", tmp_path / "l", tmp_path / "t")
    base = bt.preset_config(3, comps, tmp_path / "manifest.json", bt.Size.reduced_size(), 3)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(base))
    assert bt.config_problem(path) is None
    for overrides, named in (
        ({"train.not_a_key": True}, "not_a_key"),
        ({"train.ds_config": "zero9_bf16"}, "train.ds_config"),
    ):
        path.write_text(json.dumps(bt.apply_overrides(base, overrides)))
        problem = bt.config_problem(path)
        assert problem is not None and named in problem


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and k != "vision_config":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_each_variant_changes_one_setting_of_the_preset(tmp_path, stage):
    from vlmtrain.config.load import load_stage_config

    comps = bt.Components(tmp_path / "v", tmp_path / "l", tmp_path / "t")
    base = bt.preset_config(stage, comps, tmp_path / "manifest.json", bt.Size.reduced_size(), 3)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(base))
    resolved = load_stage_config(config=path)
    runs = bt.variant_runs(stage, resolved, bt.VARIANTS, cuda=False)
    assert len(runs) == len(bt.VARIANTS)
    preset = json.loads(bt.REPO.joinpath("vlmtrain", "stages", f"stage{stage}.json").read_text())
    for run in runs:
        changed = {
            k: v
            for k, v in _flat(bt.apply_overrides(base, run.overrides)).items()
            if _flat(base).get(k, "absent") != v
        }
        assert len(changed) == 1, (run.variant, changed)  # zero1's engine=deepspeed is the preset's already
        (key, value), *_ = changed.items()
        if (
            key == "data.token_budget"
        ):  # the other layout: the preset's budget off, or 8 rows of max_length on
            expected = None if preset["data"].get("token_budget") else 8 * preset["data"]["max_length"]
            assert value == expected
        elif key == "train.gradient_checkpointing":
            assert preset["train"]["gradient_checkpointing"] == "auto" and value is False
        elif key == "model.attn_backend":
            assert preset["model"]["attn_backend"] == "auto" and value == "flex"  # auto is sdpa in this tree
        else:
            assert {key: value} in (
                {"train.compile": True},
                {"train.compile": False},
                {"train.ds_config": "zero1_bf16"},
                {"train.engine": "fsdp"},
            )


def _medians(records, warmup, key):
    return statistics.median(r[key] for r in records if r["step"] > warmup)


@pytest.mark.slow
def test_cpu_run_reports_the_trainers_metrics(tmp_path):
    """Stage 2 as shipped and with recompute off (reduced size, 1 warm-up + 2 timed steps each)."""
    out = tmp_path / "trainer.json"
    argv = ["--stages", "2", "--variants", "recompute", "--variant-stage", "2", "--warmup-steps", "1"]
    argv += ["--steps", "2", "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    report = bt.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["reduced"] is True
    runs = report["runs"]
    assert list(runs) == ["stage2/shipped", "stage2/recompute=off"]
    flops = {}
    for name, entry in runs.items():
        assert entry["status"] == "ok", entry.get("error_tail")
        metrics = Path(report["work_dir"]) / entry["metrics"]
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert entry["timed_steps"] == [2, 3]  # the warm-up step is not in the figures
        for key in ("step_time_s", "tokens_per_s", "samples_per_s", "padding_fraction", "loss"):
            assert entry["figures"][key] == pytest.approx(_medians(records, 1, key), rel=1e-12), key
        assert entry["figures"]["mfu"] is None  # logged as null on CPU: reported so, not filled in
        absent = [k for k in bt.FIGURES if all(bt.lookup(r, k)[0] is False for r in records[1:])]
        assert entry["missing"] == absent
        flops[name] = (records[-1]["hardware_flops"], records[-1]["model_flops"])
    # The variant reached the trainer: stage 2's `auto` recomputes both towers (hardware FLOPs above the
    # model's), recompute off does not (equal).
    assert flops["stage2/shipped"][0] > flops["stage2/shipped"][1]
    assert flops["stage2/recompute=off"][0] == flops["stage2/recompute=off"][1]
    assert runs["stage2/recompute=off"]["speedup_vs_shipped"] == pytest.approx(
        runs["stage2/shipped"]["figures"]["step_time_s"]
        / runs["stage2/recompute=off"]["figures"]["step_time_s"]
    )
