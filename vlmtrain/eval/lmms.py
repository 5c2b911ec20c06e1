"""`vlmtrain eval lmms`: lmms-eval benchmarks answered by a vlmtrain model, from a checkpoint or during training.

lmms-eval runs in its own environment (vlmtrain.eval.lmms_env) as a child process (vlmtrain.eval.lmms_client)
that registers a `vlmtrain` model with lmms-eval's registry. That model sends each batch of questions here over
a pipe; this process answers with the trained model through `Generator` and `answer_batch`, the path of
`vlmtrain ask` and `eval vqa` (prompt: vlmtrain.data.prompt, image: the model's own transform, prefill: the
trained mask), so lmms-eval scores exactly what vlmtrain generates. lmms-eval writes its own result files
under OUT; `scores.json` and the printed table are the flat `task/metric` view of them.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from vlmtrain.eval.lmms_env import client_script, env_python

SCORES_NAME = "scores.json"
LOG_NAME = "lmms_eval.log"


class LmmsError(RuntimeError):
    """lmms-eval failed (its message, or the tail of its log)."""


@dataclass(frozen=True)
class LmmsRequest:
    """One question from lmms-eval: its prompt text, its image (PNG bytes, or None) and its answer budget."""

    text: str
    image: bytes | None
    max_new_tokens: int


Answerer = Callable[[list[LmmsRequest]], list[str]]  # requests -> answers, in order


def decode_png(data: bytes, transform: Any) -> torch.Tensor:
    """The model's input for an image lmms-eval sent, read as `vlmtrain ask` reads an image file."""
    from PIL import Image

    from vlmtrain.data.process import to_rgb

    with Image.open(io.BytesIO(data)) as img:
        return transform(to_rgb(img))


def by_budget(requests: Sequence[LmmsRequest]) -> dict[int, list[int]]:
    """Request positions grouped by max_new_tokens (one GenerationConfig per group)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.max_new_tokens, []).append(i)
    return groups


def run_lmms(
    answer: Answerer,
    tasks: Sequence[str],
    out: Path,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: Path | None = None,
    env: Path | None = None,
    prefetch: bool = False,
) -> dict[str, Any]:
    """Run lmms-eval on `tasks`, answering its questions with `answer`; returns its results (`results`, `configs`,
    `n-samples`). lmms-eval's files go under `out`, its log to `out/lmms_eval.log`."""
    python = env_python(env)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args = {
        "tasks": list(tasks),
        "limit": limit,
        "batch_size": batch_size,
        "output_path": str(out),
        "include_path": str(Path(include_path).resolve()) if include_path else None,
        "prefetch": prefetch,
    }
    server_r, client_w = os.pipe()  # the client's requests
    client_r, server_w = os.pipe()  # our answers
    environ = {
        **{k: v for k, v in os.environ.items() if not _launcher_variable(k)},
        "VLMTRAIN_LMMS_FDS": f"{client_r},{client_w}",
        "VLMTRAIN_LMMS_ARGS": json.dumps(args),
    }
    if prefetch:
        environ.pop("HF_DATASETS_OFFLINE", None)
        environ.pop("HF_HUB_OFFLINE", None)
    log_path = out / LOG_NAME
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [str(python), "-I", str(client_script())],  # -I: none of vlmtrain's paths in lmms-eval's python
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            pass_fds=(client_r, client_w),
        )
    os.close(client_r)  # our copies of the child's ends: its exit then reads as EOF here
    os.close(client_w)
    recv, send = Connection(server_r, writable=False), Connection(server_w, readable=False)
    results: dict[str, Any] | None = None
    error: str | None = None
    try:
        while True:
            try:
                msg = recv.recv()
            except EOFError:
                break
            if msg["kind"] == "generate":
                send.send(answer([LmmsRequest(**item) for item in msg["items"]]))
                continue
            if msg["kind"] == "done":
                results = json.loads(msg["results"])
            else:
                error = str(msg["message"])
            send.send(None)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # we failed while answering: do not leave lmms-eval waiting on the pipe
            proc.kill()
            proc.wait()
        recv.close()
        send.close()
    if error is not None:
        raise LmmsError(f"{error}\n(lmms-eval's log: {log_path})")
    if prefetch and code == 0:
        return {}
    if code != 0 or results is None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise LmmsError(f"lmms-eval exited with status {code}; the end of {log_path}:\n{tail}")
    return results


# A training job's launcher variables: lmms-eval reads WORLD_SIZE/RANK and would wait for ranks that are not its.
_LAUNCHER_NAMES = frozenset(
    {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
     "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"}
)  # fmt: skip
_LAUNCHER_PREFIXES = ("TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_", "SLURM_")


def _launcher_variable(name: str) -> bool:
    """lmms-eval runs as one process of its own, whatever launched vlmtrain."""
    return name in _LAUNCHER_NAMES or name.startswith(_LAUNCHER_PREFIXES)


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """`task/metric` -> value for every numeric metric lmms-eval reported (filters named unless `none`)."""
    scores: dict[str, float] = {}
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            scores[f"{task}/{metric}" + ("" if filt == "none" else f"[{filt}]")] = float(value)
    return scores


def scores_table(scores: dict[str, float], n_samples: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("task", "metric", "value", "n"):
        table.add_column(col, justify="right" if col in ("value", "n") else "left")
    for key, value in scores.items():
        task, metric = key.split("/", 1)
        n = n_samples.get(task, {})
        shown = "–" if math.isnan(value) else f"{value:.4f}"
        table.add_row(task, metric, shown, str(n.get("effective", "")) if isinstance(n, dict) else "")
    return table


def local_answerer(model: Any, tokenizer: Any, mode: str) -> Answerer:
    """Answers on this process alone, as `vlmtrain ask` does (greedy, trained prefill mask)."""
    from vlmtrain.eval.generate import GenerationConfig, Generator

    generators: dict[int, Generator] = {}

    def answer(requests: list[LmmsRequest]) -> list[str]:
        out = [""] * len(requests)
        for budget, idx in by_budget(requests).items():
            if budget not in generators:
                config = GenerationConfig(max_new_tokens=budget, mask_mode=mode)  # type: ignore[arg-type]
                generators[budget] = Generator(model, tokenizer, config)
            for i, text in zip(
                idx, answer_requests(generators[budget], [requests[i] for i in idx]), strict=True
            ):
                out[i] = text
        return out

    return answer


def answer_requests(generator: Any, requests: Sequence[LmmsRequest]) -> list[str]:
    """One batch through `answer_batch` (the evaluation path): images decoded with the model's transform."""
    from vlmtrain.eval.run import EvalSample, answer_batch

    model = generator.model
    samples = [
        EvalSample(str(i), {}, decode_png(r.image, model.image_transform) if r.image is not None else None)
        for i, r in enumerate(requests)
    ]
    return answer_batch(generator, samples, [r.text for r in requests], model.num_image_tokens)


def eval_lmms(
    checkpoint: Path,
    tasks: Sequence[str],
    out: Path,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    include_path: Path | None = None,
    env: Path | None = None,
    console: Console | None = None,
) -> dict[str, float]:
    """lmms-eval `tasks` on a trained checkpoint; writes lmms-eval's files and `scores.json` under `out`."""
    from vlmtrain.eval.caption_metrics import atomic_write_json
    from vlmtrain.eval.run import load_trained
    from vlmtrain.logging import make_console

    console = console or make_console()
    env_python(env)  # before loading the model: a missing environment fails at once
    model, tokenizer, mode = load_trained(checkpoint, device)
    results = run_lmms(
        local_answerer(model, tokenizer, mode), tasks, out, limit, batch_size, include_path, env
    )
    scores = flat_scores(results)
    atomic_write_json(
        Path(out) / SCORES_NAME,
        {"checkpoint": str(checkpoint), "tasks": list(tasks), "limit": limit, "scores": scores},
    )
    console.print(scores_table(scores, results.get("n-samples", {}), f"lmms-eval on {checkpoint}"))
    return scores
