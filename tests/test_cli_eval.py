"""The eval, caption, ask and export commands on a tiny checkpoint, with their errors."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from vlmtrain.cli import app
from vlmtrain.data.shard import shard
from vlmtrain.demo.corpus import write_corpus

runner = CliRunner()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    import torch

    from tests.conftest import TINY_VISION, tiny_language_config
    from vlmtrain.config.schema import ModelConfig
    from vlmtrain.models.vlm import VisionLanguageModel

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=None,
        vision_config=TINY_VISION,
        language=None,
        language_config=tiny_language_config(len(tokenizer)),
    )
    model = VisionLanguageModel.from_config(cfg, tokenizer)
    model.save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(str(root / "ckpt"))
    corpus = write_corpus(root / "corpus", n_train=8, n_test=6, image_size=32, seed=1)
    shard(corpus.karpathy, "karpathy", corpus.images, root / "karpathy", split="test", progress=False)
    shard(
        corpus.vqa_test,
        "jsonl",
        corpus.images,
        root / "vqa",
        question_column="question",
        answer_column="answer",
        progress=False,
    )
    return root, corpus


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.mark.slow
def test_eval_caption_writes_coco_files_and_pycocoevalcap_metrics(assets):
    from vlmtrain.eval.caption_metrics import evaluate_with_coco_files

    root, _ = assets
    out = root / "eval_cap"
    r = invoke(
        "eval",
        "caption",
        "--checkpoint",
        root / "ckpt",
        "--data",
        root / "karpathy" / "manifest.json",
        "--out",
        out,
        "--max-new-tokens",
        "8",
        "--batch-size",
        "4",
    )
    assert r.exit_code == 0, r.output
    preds = json.loads((out / "predictions.json").read_text())
    refs = json.loads((out / "references.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(preds) == 6 and {"image_id", "caption"} <= set(preds[0])
    assert len(refs["images"]) == 6 and len(refs["annotations"]) == 30  # 5 references per test image
    expected = evaluate_with_coco_files(out / "references.json", out / "predictions.json")
    for key in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert metrics["metrics"][key] == pytest.approx(expected[key], abs=1e-12)
    assert metrics["meta"]["generation"]["max_new_tokens"] == 8 and metrics["meta"]["images"] == 6
    assert "CIDEr" in r.output


@pytest.mark.slow
def test_eval_vqa(assets):
    root, corpus = assets
    out = root / "eval_vqa"
    r = invoke(
        "eval",
        "vqa",
        "--checkpoint",
        root / "ckpt",
        "--data",
        root / "vqa" / "manifest.json",
        "--out",
        out,
        "--max-new-tokens",
        "4",
    )
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "predictions.json").read_text())
    gold = [json.loads(line) for line in corpus.vqa_test.read_text().splitlines()]
    assert len(rows) == len(gold)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    n_yes_no = sum(g["answer_type"] == "yes/no" for g in gold)
    assert metrics["n_yes_no"] == n_yes_no and metrics["n_items"] == len(gold)
    exact = sum(r_["answer"].strip().lower() == r_["gold"] for r_ in rows) / len(rows)
    assert metrics["accuracy"] == pytest.approx(exact)


def test_missing_checkpoint_is_a_clear_error(assets, tmp_path):
    root, _ = assets
    r = invoke(
        "eval",
        "caption",
        "--checkpoint",
        tmp_path / "nope",
        "--data",
        root / "karpathy" / "manifest.json",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 1 and "no vlm_config.json" in flat(r.output)
    r = invoke(
        "caption", root / "corpus" / "images" / "test" / "000000.png", "--checkpoint", tmp_path / "nope"
    )
    assert r.exit_code == 1 and "no vlm_config.json" in flat(r.output)


def test_missing_java_is_a_clear_error(assets, tmp_path, monkeypatch):
    root, _ = assets
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k)
    )
    r = invoke(
        "eval",
        "caption",
        "--checkpoint",
        root / "ckpt",
        "--data",
        root / "karpathy" / "manifest.json",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 1 and "Java" in flat(r.output)
    assert not (tmp_path / "o").exists(), "nothing should be generated before Java is known to be there"


def test_caption_ask_and_export_commands(assets, tmp_path):
    root, corpus = assets
    img = corpus.images / "test" / "000000.png"
    r = invoke("caption", img, img, "--checkpoint", root / "ckpt", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    assert r.output.count("000000.png") == 2
    r = invoke(
        "ask", img, "How many shapes are there?", "--checkpoint", root / "ckpt", "--max-new-tokens", "5"
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        ["ask", str(img), "--checkpoint", str(root / "ckpt"), "--max-new-tokens", "3"],
        input="What color is it?\nAnd the shape?\n\n",
    )
    assert r.exit_code == 0, r.output
    assert r.output.count("model>") == 2
    r = invoke("caption", root / "corpus" / "karpathy_shapes.json", "--checkpoint", root / "ckpt")
    assert r.exit_code == 1 and "cannot read this image" in flat(r.output)
    r = invoke("export", "--checkpoint", root / "ckpt", "--out", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hf" / "config.json").is_file() and (
        tmp_path / "hf" / "processor_config.json"
    ).is_file()


@pytest.mark.slow
def test_caption_ask_and_export_print_no_deprecation_warning(assets, tmp_path):
    """The commands as a user runs them (a fresh interpreter, every DeprecationWarning and FutureWarning
    shown): nothing on stderr/stdout mentions a warning; before generation passed `cache=`, each `caption`
    and `ask` printed transformers' FutureWarning that `past_key_values` goes in 5.40."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, corpus = assets
    img = corpus.images / "test" / "000000.png"
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(repo),
        "PYTHONWARNINGS": "always::DeprecationWarning,always::FutureWarning",
    }
    script = (
        "import sys; from vlmtrain.cli import app; "
        "[app(args, standalone_mode=False) for args in ("
        f"['caption', {str(img)!r}, '--checkpoint', {str(root / 'ckpt')!r}, '--max-new-tokens', '4'], "
        f"['ask', {str(img)!r}, 'What color is it?', '--checkpoint', {str(root / 'ckpt')!r}, '--max-new-tokens', '4'], "
        f"['export', '--checkpoint', {str(root / 'ckpt')!r}, '--out', {str(tmp_path / 'hf')!r}])]"
    )
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    output = r.stdout + r.stderr
    assert "000000.png" in output and "exported to" in output, output  # the commands ran
    assert "Warning" not in output and "deprecated" not in output, output
