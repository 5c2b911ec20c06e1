"""`validation.lmms` during training on 2 gloo ranks under FSDP and DeepSpeed: the lmms-eval score logged to
metrics.jsonl, and every prediction behind it, equal a separate `vlmtrain eval lmms` on the saved checkpoint.
Skips when lmms-eval's environment is absent (`make lmms-env`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lmms_fixtures import TASK, lmms_env_or_skip, make_chatty, write_vqa_task
from test_validation import run_fixture
from train_fixtures import tiny_model_section, tiny_stage_config, train_data, write_config
from typer.testing import CliRunner

from vlmtrain.cli import app

ENGINES = ("fsdp", "deepspeed")
LIMIT = 7  # questions: 2 lmms-eval batches of 5 and 2, dealt in micro-batch chunks of 2 to 2 ranks


def samples_of(folder: Path) -> list[tuple[int, str]]:
    (path,) = folder.glob(f"*samples_{TASK}.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted((r["doc_id"], str(r["filtered_resps"])) for r in rows)


@pytest.mark.slow
def test_logged_lmms_score_equals_eval_lmms_on_saved_checkpoint(tmp_path_factory, monkeypatch):
    from transformers import AutoTokenizer

    from vlmtrain.config.schema import ModelConfig
    from vlmtrain.demo.corpus import write_corpus
    from vlmtrain.models.vlm import VisionLanguageModel

    lmms_env_or_skip()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the task's JSON is local; nothing may reach for the Hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = train_data(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("lmms_train")
    tokenizer = AutoTokenizer.from_pretrained(str(data.tokenizer))
    torch.manual_seed(7)
    model = make_chatty(VisionLanguageModel.from_config(ModelConfig(**tiny_model_section(data)), tokenizer))
    model.save_pretrained(root / "init")
    tokenizer.save_pretrained(str(root / "init"))
    corpus = write_corpus(root / "corpus", n_train=2, n_test=3, image_size=32, seed=2)
    tasks = write_vqa_task(root / "tasks", corpus.vqa_test, corpus.images)
    jobs = []
    for engine in ENGINES:
        cfg = tiny_stage_config(2, data, max_steps=2, save_every=0, train={"engine": engine})
        cfg["init_from"] = str(root / "init")
        cfg.pop("model")  # init_from supplies the model
        cfg["validation"] = {
            "lmms": {"tasks": [TASK], "include_path": str(tasks), "limit": LIMIT, "batch_size": 5, "every": 0}
        }
        path = write_config(cfg, root / f"{engine}.json")
        jobs.append({"kind": "train", "config": str(path), "run_dir": str(root / engine)})
    run_fixture(jobs, root / "spec.json", ranks=2)

    runner = CliRunner()
    for engine in ENGINES:
        stage = root / engine / "stage2"
        logged = [
            r for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines()) if "lmms" in r
        ]
        assert [r["step"] for r in logged] == [2], engine  # every=0: once, at the end
        out = root / f"{engine}_eval"
        args = ["eval", "lmms", "--checkpoint", str(stage / "final"), "--tasks", TASK, "--include-path",
                str(tasks), "--limit", str(LIMIT), "--out", str(out)]  # fmt: skip
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        separate = json.loads((out / "scores.json").read_text())["scores"]
        assert logged[0]["lmms"] == separate, engine
        during = samples_of(stage / "lmms" / "step000002")
        assert during == samples_of(out), engine
        assert len(during) == LIMIT and len({p for _, p in during}) > 2, (
            during
        )  # varied answers, all compared
