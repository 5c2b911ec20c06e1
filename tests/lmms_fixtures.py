"""A local lmms-eval task over the demo's VQA test split, and the lmms-eval environment check, for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtrain.eval.lmms_env import LmmsEnvError, env_python

TASK = "vlmtrain_demo_vqa"
MAX_NEW_TOKENS = 4


def lmms_env_or_skip() -> Path:
    """lmms-eval's venv, or skip naming how to build it (`make lmms-env`)."""
    try:
        return env_python()
    except LmmsEnvError as err:
        pytest.skip(f"lmms-eval environment absent: {err}")


def make_chatty(model):
    """Weights redrawn with std 0.3: a random-init tiny LM greedily repeats one token (an empty answer after
    decoding); with larger weights its greedy answers are text that changes with the image and the question."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


# The task's Python side, run inside lmms-eval's environment. Scoring takes vlmtrain's answer normalisation from
# its file (vlmtrain.data.answers imports nothing), so the accuracy is the one `vlmtrain eval vqa` reports.
UTILS = """
import importlib.util
from pathlib import Path

from PIL import Image

IMAGES = Path({images!r})
_spec = importlib.util.spec_from_file_location("vlmtrain_answers", {answers!r})
answers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(answers)


def doc_to_visual(doc):
    with Image.open(IMAGES / doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    pred = answers.normalize_answer(results[0])
    return {{"accuracy": float(pred == answers.normalize_answer(doc["answer"]))}}
"""

YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: ["<|never|>"]
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""


def write_vqa_task(folder: Path, vqa_jsonl: Path, images: Path) -> Path:
    """An lmms-eval task folder (`--include-path`) over `vqa_jsonl` (demo format: image, question, answer)."""
    import vlmtrain.data.answers as answers_mod

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(UTILS.format(images=str(images), answers=answers_mod.__file__))
    (folder / f"{TASK}.yaml").write_text(
        YAML.format(task=TASK, data=json.dumps(str(vqa_jsonl)), max_new_tokens=MAX_NEW_TOKENS)
    )
    return folder
