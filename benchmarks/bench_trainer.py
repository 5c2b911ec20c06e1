"""The trainer itself, timed: `vlmtrain train` per stage and per variant, read back from its own metrics.jsonl.

What runs (one subprocess per variant, `python launch/train.py --config ...`: one process = one rank, the
job `vlmtrain train` starts on one GPU):
  components  real-size random-init checkpoints written to a local directory, loaded by the trainer as it
              loads any checkpoint: SigLIP so400m/14-224 (`plan.KNOWN_VISION`, SiglipVisionModel) and
              Qwen2.5-0.5B (`plan.KNOWN_LANGUAGE`, vocabulary 151,936), config.json + model.safetensors
              (bf16, as Qwen ships), and a tokenizer built here (vlmtrain.data.tokenizer). Without CUDA a
              REDUCED size of the same classes (2 + 2 layers, widths 32 / 64, 32 px images) and the JSON
              says so (`"reduced": true`).
  data        synthetic shards per dataset, written by vlmtrain's shard writer (LLaVA JSON -> `shard`),
              whose text lengths follow the paper's datasets as `vlmtrain plan` models them
              (plan.PAPER_DATASETS: unsupervised and supervised text tokens of the average sample, turns):
              each sample is the plan's average sample with its question and answer words scaled by a
              lognormal factor of mean 1 and the spread bench_token_budget.py states per dataset (sigma 0.25
              COCO recaps, 0.30 BLIP recaps, 1.0 LLaVA-NeXT). Words are single tokens of the built tokenizer,
              so each sample's token counts hit their target exactly (tests/test_bench_trainer.py checks it).
  stages      each stage's shipped preset (vlmtrain/stages/stageN.json) with only these keys replaced:
              init_from null, model = the components above, data.train = the shards, train.max_steps =
              warm-up + timed steps, train.save_every 0, train.log_every 1 (reduced size also: fp32, global
              batch 8, micro-batch 4, 1 reader worker).
  variants    each toggled once against the shipped default, on one stage (--variant-stage, default 3):
                attn       model.attn_backend: flex where the default resolves to sdpa, else sdpa
                compile    train.compile: the other value than the default (auto read as on on CUDA)
                recompute  train.gradient_checkpointing: false (auto's opposite where it recomputes)
                layout     data.token_budget: null where the preset sets one, else 8 x max_length
                zero1      train.ds_config: zero1_bf16 (DeepSpeed ZeRO-1)
                fsdp       train.engine: fsdp (FSDP2)
              A variant whose key the config (or preflight's DeepSpeed-config check) refuses is recorded as
              "unsupported: <the error>"; a run that fails (OOM, crash) is recorded with its output's tail;
              the benchmark goes on either way.

Figures, all read from the trainer's metrics.jsonl (never computed here): the median over the timed steps
(those after --warmup-steps, so the first steps' compile, loader start and allocator warm-up are left out) of
step_time_s, tokens_per_s, samples_per_s, tflops_per_gpu, mfu, hfu, padding_fraction, micro_batches, loss,
and, when the trainer logs them, mem/peak_gib and the step breakdown time/data_s, time/fwd_bwd_s,
time/optim_s, time/comm_s. A key the trainer did not log is listed under "missing", never filled in.

Time budget (--budget-s, default 360 s = 6 min including the setup, so gpu.sh with its CUDA tests stays within 8 min): runs start in priority order (the
stage-3 preset, its variants, then the presets of stages 2, 1, 0) while at least --min-run-s remain; each
run is killed at min(--run-timeout-s, what remains). Runs that did not fit are listed as "skipped: time
budget". A run is stopped (SIGKILL to its process group) as soon as its last step is in metrics.jsonl: the
final checkpoint and model export (~11 GB at real size) are not what is measured.

    python benchmarks/bench_trainer.py                         # what gpu.sh runs
    python benchmarks/bench_trainer.py --stages 3 --variants attn,compile --steps 6
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_token_budget import STAGES as LENGTH_SPREAD  # a sibling script, not a package

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
LAUNCH = REPO / "launch" / "train.py"

VARIANTS = ("attn", "compile", "recompute", "layout", "zero1", "fsdp")
SHIPPED_ORDER = (3, 2, 1, 0)  # the stage-3 preset is the one the variants are compared with: it runs first
FIGURES = (
    "step_time_s",
    "tokens_per_s",
    "samples_per_s",
    "tflops_per_gpu",
    "mfu",
    "hfu",
    "padding_fraction",
    "micro_batches",
    "loss",
    "mem/peak_gib",
    "time/data_s",
    "time/fwd_bwd_s",
    "time/optim_s",
    "time/comm_s",
)
"""metrics.jsonl keys summarised per run (a `a/b` key is also looked up as record["a"]["b"])."""
TAIL_CHARS = 3000
"""Characters of a failed run's output kept in the JSON."""
PAPER_MICRO_BATCH = 8
"""The paper's micro-batch: the layout variant's token budget is this many rows of max_length."""


# ---- sizes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """The components' shapes and the preset keys a size replaces."""

    reduced: bool
    vision: dict[str, Any]
    """SiglipVisionConfig arguments."""
    language: dict[str, Any]
    """Qwen2 config arguments (vocab_size None: the built tokenizer's size)."""
    weights_dtype: torch.dtype
    records: int
    """Samples written per dataset (the trainer's reader resamples them)."""
    shard_size: int
    images: int
    """Distinct random images the records share."""
    preset: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Preset sections' keys replaced at this size."""

    @classmethod
    def real(cls) -> Size:
        from vlmtrain.train.plan import KNOWN_LANGUAGE, KNOWN_VISION

        vision = dict(KNOWN_VISION["google/siglip-so400m-patch14-224"]["config"])
        vision.pop("model_type")
        return cls(False, vision, dict(KNOWN_LANGUAGE["Qwen/Qwen2.5-0.5B"]), torch.bfloat16, 1024, 64, 32)

    @classmethod
    def reduced_size(cls) -> Size:
        vision = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        }
        language = {
            "model_type": "qwen2",
            "vocab_size": None,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
        }
        preset = {
            "batch": {"global_batch_size": 8, "micro_batch_size": 4},
            "data": {"num_workers": 1},
            "train": {"precision": "fp32"},  # CPUs without native bf16 emulate it ~20x slower
        }
        return cls(True, vision, language, torch.float32, 64, 16, 8, preset)


# ---- synthetic text whose token counts follow plan's datasets ---------------------------------------------
@dataclass(frozen=True)
class TextTarget:
    """Text tokens of one sample, chat template included (the image placeholders excluded)."""

    unsupervised: int
    supervised: int


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer built on pseudo-words, and the words that are one token wherever a turn puts them."""

    tokenizer: Any
    words: tuple[str, ...]


def build_vocabulary(seed: int = 0) -> Vocabulary:
    """Two-syllable pseudo-words; byte-level BPE trained on them (and on rendered chats, so the template's
    role names are tokens) learns most of them whole. Only the words that are one token both after a space
    and at a turn's start are kept, so n words are n tokens."""
    from vlmtrain.data.tokenizer import build_tokenizer

    rng = random.Random(seed)
    words = ["".join(p) for p in itertools.product("bdfgklmnprstvz", "aeiou", "bdfgklmnprstvz", "aeiou")]
    rng.shuffle(words)
    words = words[:400]
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)]
    chats = [
        [{"role": "user", "content": " ".join(words[i : i + 5])}, {"role": "assistant", "content": words[i]}]
        for i in range(0, 100, 5)
    ]
    tokenizer = build_tokenizer(texts, vocab_size=2048, chats=chats)
    single = tuple(
        w
        for w in words
        if len(tokenizer.encode(w, add_special_tokens=False)) == 1
        and len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1
    )
    if len(single) < 50:
        raise RuntimeError(f"only {len(single)} single-token words; the tokenizer build changed")
    return Vocabulary(tokenizer, single)


def plan_targets(dataset: str, sigma: float, n: int, rng: random.Random) -> list[TextTarget]:
    """`n` samples' text tokens: plan's average sample (PAPER_DATASETS) with its question and answer tokens
    scaled by a lognormal factor of mean 1 and spread `sigma`; the template's tokens stay fixed."""
    from vlmtrain.train.plan import (
        IMAGE_NEWLINE_TOKENS,
        PAPER_DATASETS,
        SYSTEM_TOKENS,
        TURN_TOKENS,
    )

    est = PAPER_DATASETS[dataset]
    prompt, supervised = est.text_tokens()
    fixed_prompt = SYSTEM_TOKENS + IMAGE_NEWLINE_TOKENS + est.turns * TURN_TOKENS
    fixed_supervised = est.turns  # each answer's turn-end token
    out = []
    for _ in range(n):
        f = rng.lognormvariate(-(sigma**2) / 2, sigma)  # E[f] = 1
        out.append(
            TextTarget(
                fixed_prompt + max(est.turns, round((prompt - fixed_prompt) * f)),
                fixed_supervised + max(est.turns, round((supervised - fixed_supervised) * f)),
            )
        )
    return out


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _messages(vocab: Vocabulary, questions: Sequence[int], answers: Sequence[int], rng) -> list[dict]:
    out = []
    for q, a in zip(questions, answers, strict=True):
        out.append({"role": "user", "content": " ".join(rng.choice(vocab.words) for _ in range(q))})
        out.append({"role": "assistant", "content": " ".join(rng.choice(vocab.words) for _ in range(a))})
    return out


def text_counts(renderer, messages: list[dict]) -> TextTarget:
    """(unsupervised, supervised) text tokens of a conversation as the trainer's renderer tokenizes it."""
    pairs = renderer.tokenize_pairs(messages)
    supervised = sum(p.supervised for p in pairs)
    return TextTarget(sum(len(p) for p in pairs) - supervised, supervised)


def conversation(
    vocab: Vocabulary, renderer, target: TextTarget, turns: int, rng: random.Random
) -> list[dict]:
    """Chat messages of `turns` exchanges whose tokens are `target` (at least one word per turn)."""
    probe = text_counts(renderer, _messages(vocab, [1] * turns, [1] * turns, rng))
    # Each word beyond the probe's one per turn adds exactly one token (single-token words).
    q = max(turns, target.unsupervised - probe.unsupervised + turns)
    a = max(turns, target.supervised - probe.supervised + turns)
    return _messages(vocab, _split(q, turns), _split(a, turns), rng)


# ---- inputs on disk ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Components:
    vision: Path
    language: Path
    tokenizer: Path


def write_components(root: Path, size: Size, vocab: Vocabulary) -> Components:
    """Random-init tower and LM saved as checkpoints (config.json + model.safetensors) and the tokenizer."""
    from transformers import AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from vlmtrain.models.language import language_config_from_dict

    out = Components(root / "vision", root / "language", root / "tokenizer")
    vocab.tokenizer.save_pretrained(str(out.tokenizer))
    torch.manual_seed(0)
    # No pooling head: vlmtrain drops it (vision_use_head=False), so its weights would be written for nothing.
    tower = SiglipVisionModel(SiglipVisionConfig(**size.vision, vision_use_head=False))
    tower.to(size.weights_dtype).save_pretrained(str(out.vision))
    del tower
    language = dict(size.language)
    if language["vocab_size"] is None:
        language["vocab_size"] = len(vocab.tokenizer)
    lm = AutoModelForCausalLM.from_config(language_config_from_dict(language))
    lm.to(size.weights_dtype).save_pretrained(str(out.language))
    return out


def write_images(folder: Path, n: int, side: int, seed: int = 0) -> list[str]:
    """`n` random-noise RGB JPEGs of `side` px (the tower's input size: the resize is a no-op)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"img{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / name, quality=90)
        names.append(name)
    return names


def write_dataset_shards(
    root: Path, stage_no: int, dataset: str, size: Size, vocab: Vocabulary, images: list[str], image_dir: Path
) -> Path:
    """LLaVA-format records of plan-length conversations, sharded by `vlmtrain shard`; returns the manifest."""
    from vlmtrain.data.prompt import ChatRenderer
    from vlmtrain.data.shard import shard
    from vlmtrain.train.plan import PAPER_DATASETS

    rng = random.Random(stage_no)
    renderer = ChatRenderer(vocab.tokenizer, None)
    turns = PAPER_DATASETS[dataset].turns
    sigma = LENGTH_SPREAD[f"stage{stage_no}"][0].sigma
    records = []
    for i, target in enumerate(plan_targets(dataset, sigma, size.records, rng)):
        turns_out = []
        for m in conversation(vocab, renderer, target, turns, rng):
            role = "human" if m["role"] == "user" else "gpt"
            text = m["content"] if turns_out else "<image>\n" + m["content"]
            turns_out.append({"from": role, "value": text})
        records.append({"id": i, "image": images[i % len(images)], "conversations": turns_out})
    source = root / f"{dataset}.json"
    source.write_text(json.dumps(records))
    out = root / "shards" / dataset
    shard(source, "llava", image_dir, out, shard_size=size.shard_size, progress=False, keep_order=True)
    return out / "manifest.json"


# ---- configs and variants ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One trainer run: a stage preset with overrides (dotted key -> value; None writes null)."""

    stage: int
    variant: str
    overrides: dict[str, Any]
    note: str = ""

    @property
    def name(self) -> str:
        return f"stage{self.stage}/{self.variant}"


def preset_config(stage_no: int, comps: Components, manifest: Path, size: Size, steps: int) -> dict[str, Any]:
    """The shipped preset with only the keys the benchmark must replace (module docstring, `stages`)."""
    from vlmtrain.config.load import shipped_stage_path

    cfg = json.loads(shipped_stage_path(stage_no).read_text())
    stage0_model = json.loads(shipped_stage_path(0).read_text())["model"]
    cfg["init_from"] = None  # each stage on its own, from the written components
    cfg["model"] = {
        **stage0_model,
        **cfg["model"],
        "vision": str(comps.vision),
        "language": str(comps.language),
        "tokenizer": str(comps.tokenizer),
    }
    cfg["data"]["train"] = str(manifest)
    cfg["train"].update(max_steps=steps, save_every=0, log_every=1)
    for section, values in size.preset.items():
        cfg[section].update(values)
    return cfg


def apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def variant_runs(stage_no: int, base: Any, names: Sequence[str], cuda: bool) -> list[Run]:
    """Each variant of `names` as the one key it changes against `base` (the resolved preset StageConfig)."""
    from vlmtrain.models.language import resolve_attn_backend

    runs = []
    for name in names:
        if name == "attn":
            other = "flex" if resolve_attn_backend(base.model.attn_backend) == "sdpa" else "sdpa"
            runs.append(Run(stage_no, f"attn={other}", {"model.attn_backend": other}))
        elif name == "compile":
            default = getattr(base.train, "compile", None)
            on = default if isinstance(default, bool) else cuda  # `auto` (or absent) read as on on CUDA only
            note = "" if isinstance(default, bool) else f"default {default!r} read as {'on' if on else 'off'}"
            runs.append(Run(stage_no, f"compile={'off' if on else 'on'}", {"train.compile": not on}, note))
        elif name == "recompute":
            default = base.train.gradient_checkpointing
            value = False if default is not False else "auto"
            label = "off" if value is False else "auto"
            runs.append(Run(stage_no, f"recompute={label}", {"train.gradient_checkpointing": value}))
        elif name == "layout":
            budget = base.data.token_budget
            value = None if budget else PAPER_MICRO_BATCH * base.data.max_length
            runs.append(
                Run(
                    stage_no,
                    f"layout={'padded' if value is None else 'budget'}",
                    {"data.token_budget": value},
                )
            )
        elif name == "zero1":
            runs.append(
                Run(stage_no, "engine=zero1", {"train.engine": "deepspeed", "train.ds_config": "zero1_bf16"})
            )
        elif name == "fsdp":
            runs.append(Run(stage_no, "engine=fsdp", {"train.engine": "fsdp"}))
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return runs


def config_problem(path: Path) -> str | None:
    """Why the trainer would refuse this config before loading anything (load + DeepSpeed-config check)."""
    from vlmtrain.config.load import ConfigError, load_stage_config
    from vlmtrain.config.schema import ValidationError
    from vlmtrain.train.batching import resolve_micro_batch
    from vlmtrain.train.preflight import check_ds_config

    try:
        stage = load_stage_config(config=path)
    except (ConfigError, ValidationError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    problems = check_ds_config(resolve_micro_batch(stage, 1, None), 1)
    return "; ".join(f"{p.where}: {p.message}" for p in problems) or None


# ---- running the trainer ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trainer_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(
        PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", COLUMNS="160", MASTER_PORT=str(_free_port())
    )
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def read_records(path: Path) -> list[dict[str, Any]]:
    """The step records of a metrics.jsonl that may be mid-write (a partial last line is left out)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and "step" in record:
                out.append(record)
    return out


def lookup(record: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(present, value) of `key` in a record, flat (`time/data_s`) or nested (record["time"]["data_s"])."""
    if key in record:
        return True, record[key]
    node: Any = record
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def summarize(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Medians over the steps after `warmup` of each FIGURES key; absent keys listed as missing."""
    timed = [r for r in records if int(r["step"]) > warmup]
    figures: dict[str, Any] = {}
    missing = []
    for key in FIGURES:
        found = [lookup(r, key) for r in timed]
        if not timed or not any(present for present, _ in found):
            missing.append(key)
            continue
        values = [v for present, v in found if present and isinstance(v, int | float)]
        figures[key] = statistics.median(values) if values else None  # None: logged as null (e.g. CPU MFU)
    return {
        "timed_steps": [int(r["step"]) for r in timed],
        "figures": figures,
        "missing": missing,
        "step_time_s_per_step": [r.get("step_time_s") for r in timed],
    }


def run_trainer(
    cfg_path: Path, run_dir: Path, total_steps: int, timeout: float, threads: int | None
) -> dict[str, Any]:
    """Start the trainer, wait for `total_steps` records (or its exit, or `timeout`), stop it; the outcome."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.with_suffix(".log")
    metrics = run_dir / json.loads(cfg_path.read_text())["name"] / "metrics.jsonl"
    cmd = [sys.executable, str(LAUNCH), "--config", str(cfg_path), "--run-dir", str(run_dir)]
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=trainer_env(threads),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        status = None
        try:
            while status is None:
                time.sleep(0.5)
                records = read_records(metrics)
                if records and int(records[-1]["step"]) >= total_steps:
                    status = "ok"
                elif proc.poll() is not None:
                    status = "ok" if proc.returncode == 0 else f"failed: exit code {proc.returncode}"
                elif time.monotonic() - start > timeout:
                    status = f"timed out after {timeout:.0f} s"
        finally:  # also when this script is interrupted: no trainer may outlive it holding the GPU
            if proc.poll() is None:
                # Its own process group: the trainer and its reader workers, nothing else.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    outcome: dict[str, Any] = {
        "status": status,
        "wall_s": round(time.monotonic() - start, 1),
        "metrics": str(metrics.relative_to(run_dir.parent.parent)),  # under the work dir
        "log": str(log.relative_to(run_dir.parent.parent)),
    }
    if status != "ok":
        outcome["error_tail"] = log.read_text(errors="replace")[-TAIL_CHARS:]
    return outcome


# ---- the benchmark ----------------------------------------------------------------------------------------
def device_name() -> str:
    """The GPU's name, asked in a child process: this process must hold no CUDA context (memory) while the
    trainer runs."""
    if torch.cuda.is_available():
        ask = "import torch; print(torch.cuda.get_device_name(0))"
        return subprocess.run(
            [sys.executable, "-c", ask], capture_output=True, text=True, check=True
        ).stdout.strip()
    return platform.processor() or platform.machine() or "cpu"


def device_tag(name: str, reduced: bool) -> str:
    if reduced:
        return "cpu-reduced"
    return name.lower().replace("nvidia ", "").replace(" ", "-")


@dataclass
class Budget:
    total_s: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)


def plan_runs(args, bases: dict[int, Any], cuda: bool) -> list[Run]:
    """Priority order: the variant stage's preset, its variants, then the other stages' presets."""
    stages = [int(s) for s in args.stages.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    runs = []
    if variants or args.variant_stage in stages:
        runs.append(Run(args.variant_stage, "shipped", {}))
    if variants:
        runs += variant_runs(args.variant_stage, bases[args.variant_stage], variants, cuda)
    runs += [Run(s, "shipped", {}) for s in SHIPPED_ORDER if s in stages and s != args.variant_stage]
    return runs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default="0,1,2,3", help="stages whose shipped preset runs")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"of {','.join(VARIANTS)}; '' for none"
    )
    parser.add_argument("--variant-stage", type=int, default=3, help="the stage the variants change")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the figures")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--budget-s", type=float, default=360.0, help="whole benchmark, setup included")
    parser.add_argument("--min-run-s", type=float, default=45.0, help="start no run with less left")
    parser.add_argument("--run-timeout-s", type=float, default=150.0, help="most seconds of one run")
    parser.add_argument("--threads", type=int, default=None, help="OMP threads of each trainer process")
    parser.add_argument("--reduced", action="store_true", help="the reduced size even with CUDA")
    parser.add_argument("--work-dir", type=Path, default=None, help="inputs and runs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS) - {""})
    if unknown:  # before minutes of setup
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    budget = Budget(args.budget_s)
    cuda = torch.cuda.is_available()
    size = Size.reduced_size() if args.reduced or not cuda else Size.real()
    name = device_name()
    if size.reduced:
        print(
            "REDUCED size (no CUDA or --reduced): the same path at 2 + 2 layers; not the real run's figures"
        )
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = _benchmark(args, size, name, work, budget, cuda)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    out = args.out or RESULTS / f"trainer_{device_tag(name, size.reduced)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['wall_s']:.0f} s)")
    return report


def _benchmark(args, size: Size, name: str, work: Path, budget: Budget, cuda: bool) -> dict[str, Any]:
    from vlmtrain.config.load import load_stage_config

    t0 = time.monotonic()
    vocab = build_vocabulary()
    comps = write_components(work / "components", size, vocab)
    images = write_images(work / "images", size.images, size.vision["image_size"])
    steps = args.warmup_steps + args.steps
    variants = [v for v in args.variants.split(",") if v]
    stages = sorted(
        {int(s) for s in args.stages.split(",") if s} | ({args.variant_stage} if variants else set())
    )
    manifests: dict[str, Path] = {}
    bases: dict[int, Any] = {}
    configs: dict[int, dict[str, Any]] = {}
    for s in stages:
        dataset = json.loads((REPO / "vlmtrain" / "stages" / f"stage{s}.json").read_text())["data"]["dataset"]
        if dataset not in manifests:
            manifests[dataset] = write_dataset_shards(work, s, dataset, size, vocab, images, work / "images")
        configs[s] = preset_config(s, comps, manifests[dataset], size, steps)
        path = work / "configs" / f"stage{s}-shipped.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(configs[s], indent=2))
        bases[s] = load_stage_config(config=path)
    setup_s = time.monotonic() - t0
    print(f"inputs written in {setup_s:.0f} s ({work})", flush=True)
    runs_out: dict[str, Any] = {}
    for run in plan_runs(args, bases, cuda):
        entry: dict[str, Any] = {"stage": run.stage, "variant": run.variant, "overrides": run.overrides}
        if run.note:
            entry["note"] = run.note
        runs_out[run.name] = entry
        cfg_path = work / "configs" / f"stage{run.stage}-{run.variant.replace('=', '-')}.json"
        cfg_path.write_text(json.dumps(apply_overrides(configs[run.stage], run.overrides), indent=2))
        problem = config_problem(cfg_path)
        if problem is not None:
            entry["status"] = f"unsupported: {problem}"
            print(f"{run.name}: {entry['status']}", flush=True)
            continue
        left = budget.left()
        if left < args.min_run_s:
            entry["status"] = f"skipped: time budget ({left:.0f} s left of {args.budget_s:.0f})"
            print(f"{run.name}: {entry['status']}", flush=True)
            continue
        run_dir = work / "runs" / run.name.replace("/", "-")
        entry.update(run_trainer(cfg_path, run_dir, steps, min(args.run_timeout_s, left), args.threads))
        records = read_records(work / entry["metrics"])
        if records:  # a run that died before its first step has figures of nothing
            entry.update(summarize(records, args.warmup_steps))
        _print_run(run.name, entry)
    _compare(runs_out)
    return {
        "benchmark": "trainer",
        "device": name,
        "reduced": size.reduced,
        "torch": torch.__version__,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "budget_s": args.budget_s,
        "setup_s": round(setup_s, 1),
        "work_dir": str(work) if args.work_dir is not None else None,  # None: a temp dir, deleted
        "wall_s": round(time.monotonic() - budget.start, 1),
        "components": {"vision": size.vision, "language": size.language, "weights": str(size.weights_dtype)},
        "preset_overrides": {
            "size": size.preset,
            "all": [
                "init_from",
                "model",
                "data.train",
                "train.max_steps",
                "train.save_every",
                "train.log_every",
            ],
        },
        # True would mean this process holds a CUDA context (~0.5 GB of the GPU) while the trainers run; it
        # imports deepspeed for preflight's DeepSpeed-config check, which is not meant to touch the device.
        "harness_cuda_initialized": torch.cuda.is_initialized(),
        "runs": runs_out,
    }


def _compare(runs: dict[str, Any]) -> None:
    """Each variant's speed-up against its stage's preset run: shipped step time / variant step time."""
    for entry in runs.values():
        shipped = runs.get(f"stage{entry['stage']}/shipped", {}).get("figures", {}).get("step_time_s")
        mine = entry.get("figures", {}).get("step_time_s")
        if entry["variant"] != "shipped" and shipped and mine:
            entry["speedup_vs_shipped"] = shipped / mine


def _print_run(name: str, entry: dict[str, Any]) -> None:
    f = entry.get("figures", {})
    parts = [entry["status"], f"{len(entry.get('timed_steps', []))} timed steps"]
    for key, fmt in (
        ("step_time_s", "{:.3f} s/step"),
        ("tokens_per_s", "{:,.0f} tok/s"),
        ("mfu", "MFU {:.1%}"),
    ):
        if f.get(key) is not None:
            parts.append(fmt.format(f[key]))
    if "mem/peak_gib" in f and f["mem/peak_gib"] is not None:
        parts.append(f"peak {f['mem/peak_gib']:.1f} GiB")
    print(f"{name}: " + ", ".join(parts), flush=True)
    if "error_tail" in entry:
        print("  " + entry["error_tail"][-600:].replace("\n", "\n  "), flush=True)


if __name__ == "__main__":
    # SIGTERM (an outer timeout) unwinds through run_trainer's cleanup instead of orphaning a trainer.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    main()
