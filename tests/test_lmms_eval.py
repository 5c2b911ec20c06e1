"""`vlmtrain eval lmms` on a local lmms-eval task over the demo's VQA test split: its accuracy equals `vlmtrain
eval vqa`'s on the same questions, and its predictions equal `vlmtrain ask` greedy; an unreachable dataset is a
clear error; the wire helpers on their own. Tests that run lmms-eval skip when its environment is absent
(`make lmms-env` builds it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lmms_fixtures import MAX_NEW_TOKENS, TASK, lmms_env_or_skip, make_chatty, write_vqa_task
from typer.testing import CliRunner

from vlmtrain.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def chatty_model(tokenizer, seed: int = 0):
    """The tiny random model of the real classes, made chatty (lmms_fixtures.make_chatty)."""
    import torch

    from tests.conftest import TINY_VISION, tiny_language_config
    from vlmtrain.config.schema import ModelConfig
    from vlmtrain.models.vlm import VisionLanguageModel

    torch.manual_seed(seed)
    cfg = ModelConfig(
        vision=None,
        vision_config=TINY_VISION,
        language=None,
        language_config=tiny_language_config(len(tokenizer)),
    )
    return make_chatty(VisionLanguageModel.from_config(cfg, tokenizer))


def ask_answers(ckpt: Path, rows: list[dict], images: Path) -> list[str]:
    """What `vlmtrain ask IMAGE QUESTION` answers (its own helpers: model, generator, image loading)."""
    from vlmtrain.cli import _generator, _load_images
    from vlmtrain.data.prompt import question_messages
    from vlmtrain.eval.generate import GenerationConfig

    model, gen = _generator(ckpt, "cpu", GenerationConfig(max_new_tokens=MAX_NEW_TOKENS))
    out = []
    for row in rows:
        pixels = _load_images([images / row["image"]], model.image_transform)[0][None]
        out.append(
            gen.decode(gen.generate([gen.prompt(question_messages(row["question"]), True)], pixels)[0])
        )
    return out


@pytest.fixture(scope="module")
def lmms_assets(tmp_path_factory, tokenizer):
    """A checkpoint, the demo's VQA test split with every other gold answer set to what `ask` answers (so the
    accuracy is neither 0 nor 1), its shards, and an lmms-eval task over the same JSONL."""
    from vlmtrain.data.shard import shard
    from vlmtrain.demo.corpus import write_corpus

    lmms_env_or_skip()
    root = tmp_path_factory.mktemp("lmms")
    model = chatty_model(tokenizer)
    model.save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(str(root / "ckpt"))
    corpus = write_corpus(root / "corpus", n_train=4, n_test=4, image_size=32, seed=1)
    rows = [json.loads(line) for line in corpus.vqa_test.read_text().splitlines()]
    asked = ask_answers(root / "ckpt", rows, corpus.images)
    for i, row in enumerate(rows):
        if i % 2 == 0 and asked[i]:
            row["answer"] = asked[i]
    data = root / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shard(data, "jsonl", corpus.images, root / "shards", question_column="question", answer_column="answer",
          progress=False, keep_order=True)  # fmt: skip
    tasks = write_vqa_task(root / "tasks", data, corpus.images)
    return root, rows, asked, tasks


@pytest.mark.slow
def test_eval_lmms_equals_eval_vqa_and_ask(lmms_assets, monkeypatch):
    from vlmtrain.data.answers import normalize_answer

    root, rows, asked, tasks = lmms_assets
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = root / "lmms_out"
    r = invoke("eval", "lmms", "--checkpoint", root / "ckpt", "--tasks", TASK, "--include-path", tasks,
               "--out", out, "--batch-size", "3")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert TASK in r.output and "accuracy" in r.output  # the short table
    (samples_file,) = out.glob(f"*samples_{TASK}.jsonl")  # lmms-eval's own files
    (results_file,) = out.glob("*_results.json")
    samples = sorted(
        (json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    preds = [
        s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
        for s in samples
    ]
    assert preds == asked, "lmms-eval's predictions are not what `vlmtrain ask` answers"
    assert len(set(asked)) > 3, f"the model should answer differently per question: {asked}"

    r = invoke("eval", "vqa", "--checkpoint", root / "ckpt", "--data", root / "shards" / "manifest.json",
               "--out", root / "vqa_out", "--max-new-tokens", MAX_NEW_TOKENS)  # fmt: skip
    assert r.exit_code == 0, r.output
    vqa = json.loads((root / "vqa_out" / "metrics.json").read_text())["metrics"]["accuracy"]
    brute = sum(
        normalize_answer(a) == normalize_answer(row["answer"]) for a, row in zip(asked, rows, strict=True)
    ) / len(rows)
    lmms = json.loads((results_file).read_text())["results"][TASK]["accuracy,none"]
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert 0 < brute < 1
    assert lmms == pytest.approx(vqa, abs=1e-12) and vqa == pytest.approx(brute, abs=1e-12)
    assert scores == {f"{TASK}/accuracy": lmms}


@pytest.mark.slow
def test_unreachable_dataset_is_named_with_prefetch_hint(lmms_assets, monkeypatch):
    root, _, _, _ = lmms_assets
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(root / "empty_hf_home"))
    tasks = root / "remote_task"
    tasks.mkdir()
    (tasks / "remote.yaml").write_text(
        "task: vlmtrain_remote\ndataset_path: vlmtrain-tests/not-cached\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    r = invoke("eval", "lmms", "--checkpoint", root / "ckpt", "--tasks", "vlmtrain_remote", "--include-path",
               tasks, "--out", root / "remote_out")  # fmt: skip
    text = " ".join(r.output.split())
    assert r.exit_code == 1, r.output
    assert "vlmtrain-tests/not-cached" in text and "--prefetch" in text, text


def test_missing_environment_is_a_clear_error(tmp_path):
    r = invoke("eval", "lmms", "--checkpoint", tmp_path, "--tasks", "pope", "--env", tmp_path / "nope")
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "is missing" in text and "--setup" in text and "make lmms-env" in text, text


def test_flat_scores_and_budget_groups():
    from vlmtrain.eval.lmms import LmmsRequest, by_budget, flat_scores

    results = {
        "results": {
            "pope": {"alias": "pope", "pope_accuracy,none": 0.5, "pope_accuracy_stderr,none": 0.1},
            "mme": {"mme_cognition_score,none": 210.0, "exact_match,strip": 0.25, "samples": True},
        }
    }
    assert flat_scores(results) == {
        "mme/mme_cognition_score": 210.0,
        "mme/exact_match[strip]": 0.25,
        "pope/pope_accuracy": 0.5,
    }
    reqs = [LmmsRequest("a", None, 4), LmmsRequest("b", None, 16), LmmsRequest("c", None, 4)]
    assert by_budget(reqs) == {4: [0, 2], 16: [1]}


def test_client_helpers_without_lmms_eval():
    """The client module imports nothing outside the standard library at import time (it runs in another env)."""
    from vlmtrain.eval import lmms_client as client

    assert client._truncate("yes\n\nno", ["\n\n"]) == "yes" and client._truncate("yes", []) == "yes"

    class ConnectionError_(Exception):
        pass

    ConnectionError_.__name__ = "ConnectionError"
    try:
        try:
            raise ConnectionError_("Couldn't reach the Hub")
        except ConnectionError_ as inner:
            raise RuntimeError("loading failed") from inner
    except RuntimeError as err:
        assert client._is_offline_error(err)
        msg = client._offline_message(err, {"pope": "lmms-lab/POPE"}, ["pope"])
    assert "task pope reads lmms-lab/POPE" in msg and "--prefetch --tasks pope" in msg
    assert not client._is_offline_error(ValueError("bad yaml"))


def _stage_with_lmms(lmms: dict, **validation):
    from vlmtrain.config.load import read_json, shipped_stage_path, stage_config_from_dict

    data = read_json(shipped_stage_path(2))
    data["validation"] = {"lmms": lmms, **validation}
    return stage_config_from_dict(data)


def test_validation_lmms_config_errors_name_the_key():
    from vlmtrain.config.load import ConfigError
    from vlmtrain.config.schema import ValidationError

    for lmms, where in (
        ({"tasks": []}, "validation.lmms.tasks"),
        ({"tasks": ["pope"], "limit": 0}, "validation.lmms.limit"),
        ({"tasks": ["pope"], "every": -1}, "validation.lmms.every"),
        ({"tasks": ["pope"], "evry": 5}, "validation.lmms.evry"),
        ({"limit": 5}, "validation.lmms.tasks"),
    ):
        with pytest.raises((ConfigError, ValidationError)) as err:
            _stage_with_lmms(lmms)
        assert where in str(err.value), (lmms, str(err.value))
    assert _stage_with_lmms({"tasks": ["pope", "mme"]}).validation.lmms.tasks == ("pope", "mme")


def test_lmms_due_steps_apart_from_held_out_and_missing_env_fails_at_stage_start(tmp_path):
    import torch

    from vlmtrain.dist import DistContext
    from vlmtrain.eval.lmms_env import LmmsEnvError
    from vlmtrain.train.validation import Validator

    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    with pytest.raises(LmmsEnvError, match="--setup"):
        Validator(
            _stage_with_lmms({"tasks": ["pope"], "env": str(tmp_path / "none")}), ctx, None, list, tmp_path
        )
    venv = tmp_path / "venv"  # what env_python looks for: the interpreter and an installed lmms_eval
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "lib" / "python3.11" / "site-packages" / "lmms_eval").mkdir(parents=True)
    (venv / "lib" / "python3.11" / "site-packages" / "lmms_eval" / "__init__.py").write_text("")
    lmms = {"tasks": ["pope"], "every": 3, "env": str(venv)}
    v = Validator(
        _stage_with_lmms(lmms, data=str(tmp_path / "m.json"), every=2), ctx, None, list, tmp_path / "v"
    )
    assert [s for s in range(1, 8) if v.due(s, total=7)] == [2, 3, 4, 6, 7]
    assert [s for s in range(1, 8) if v._lmms_due(s, 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if v._loss_due(s, 7)] == [2, 4, 6, 7]
    v = Validator(_stage_with_lmms({**lmms, "every": 0}), ctx, None, list, tmp_path / "v")
    assert [s for s in range(1, 8) if v.due(s, total=7)] == [
        7
    ]  # no held-out data: lmms-eval alone, at the end


def test_lmms_record_in_metrics_is_not_a_training_step(tmp_path):
    """The trainer writes `{"step", "lmms": {...}}` beside the step records: TensorBoard gets `lmms/<task>/<metric>`,
    and the loss curve still reads only the training steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlmtrain.logging import MetricsWriter, loss_curve

    writer = MetricsWriter(tmp_path / "metrics.jsonl", True, tmp_path / "tb")
    writer.write({"step": 1, "loss": 2.5, "skipped": False})
    writer.write({"step": 1, "lmms": {"pope/pope_accuracy": 0.625}})
    writer.close()
    assert loss_curve(tmp_path / "metrics.jsonl") == [(1, 2.5)]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    (scalar,) = events.Scalars("lmms/pope/pope_accuracy")
    assert (scalar.step, scalar.value) == (1, 0.625)
