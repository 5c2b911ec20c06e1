"""Step time and peak memory of activation recompute (`train.gradient_checkpointing`) per stage trainability.

The model is bench_train_step.py's random-init SigLIP + GELU projector + Qwen2 (sizes through --config; the
defaults here: Qwen2 512 wide x 8 layers, 4 rows of 512 tokens, 64 of them image tokens). Trainability is the
shipped presets': stage 1 (vision and LM frozen, the projector trains: also stage 0's) and stage 2 (everything
trains: also stage 3's). Recompute is set by vlmtrain's own Trainer._enable_checkpointing from the stage's
`train.gradient_checkpointing` and `train.checkpoint_every_n_layers`, so the benchmark measures the policy the
trainer applies. A step is forward (prefix mask), token-mean loss, backward, AdamW step, zero_grad.

Variants: stage1-none (what `auto` does there), stage1-full (`true`), stage2-none (`false`), stage2-full
(`auto`), stage2-every2 (`auto` with checkpoint_every_n_layers=2).

Time: one process, `--warmup` untimed steps per variant, then `--steps` rounds of one step of each variant
in rotating order; medians count (wall and CPU seconds). Memory: each variant in a fresh subprocess with
glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536, so freed activations go back to the system and
the resident set follows the live tensors); after one step (which allocates gradients and AdamW state;
zero_grad keeps the gradient buffers), the peak resident set is reset (/proc/self/clear_refs) and the peak of
a second step over the resident set before it is the step's activation and temporary memory.

    python benchmarks/bench_recompute.py [--steps 3] [--threads 1] [--config '{"text_layers": 4}']
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import (  # a sibling script, not a package
    CORPUS,
    BenchConfig,
    _reset_peak_rss,
    _rss_kib,
    build_our_model,
    cpu_name,
    make_batch,
    time_variants,
)

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {  # name: (preset stage, gradient_checkpointing, checkpoint_every_n_layers)
    "stage1-none": (1, False, 1),
    "stage1-full": (1, True, 1),
    "stage2-none": (2, False, 1),
    "stage2-full": (2, "auto", 1),
    "stage2-every2": (2, "auto", 2),
}
DEFAULTS = {"text_layers": 8, "seq": 512}


def prepare(variant: str, cfg: BenchConfig):
    """Model with the preset's trainability and the trainer's recompute plan, its batch and optimizer."""
    from vlmtrain.config.load import load_stage_config
    from vlmtrain.data.tokenizer import build_tokenizer
    from vlmtrain.dist import DistContext
    from vlmtrain.models.freeze import apply_trainability
    from vlmtrain.train.trainer import Trainer

    stage_no, policy, every = VARIANTS[variant]
    stage = load_stage_config(stage=stage_no)
    stage = replace(
        stage, train=replace(stage.train, gradient_checkpointing=policy, checkpoint_every_n_layers=every)
    )
    model = build_our_model(cfg)
    apply_trainability(model, stage.modules)
    tokenizer = build_tokenizer(CORPUS * 10, vocab_size=300)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        plan = Trainer(stage, Path(tmp), ctx, model, tokenizer, lambda s: None, 1)._enable_checkpointing()
    model.train()
    batch = make_batch(cfg, model.image_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)

    def step() -> float:
        out = model(**batch, mask_mode="prefix")
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return float(out.loss.detach())

    return step, plan


def memory_probe(variant: str, cfg: BenchConfig) -> dict[str, Any]:
    step, plan = prepare(variant, cfg)
    base0 = _rss_kib("VmRSS")
    _reset_peak_rss()
    step()  # gradients and AdamW state appear here
    first = _rss_kib("VmHWM") - base0
    base = _rss_kib("VmRSS")
    _reset_peak_rss()
    step()
    return {
        "plan": plan,
        "setup_mib": base0 / 1024,
        "first_step_mib": first / 1024,
        "step_mib": (_rss_kib("VmHWM") - base) / 1024,
    }


def probe_in_subprocess(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--probe", variant, "--threads", str(args.threads),
           "--config", json.dumps(asdict(args.cfg))]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (one step of each variant)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--config", default=None, help="BenchConfig as JSON (sizes) over this script's defaults"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "recompute_cpu.json")
    parser.add_argument("--probe", choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cfg = BenchConfig(**{**DEFAULTS, **(json.loads(args.config) if args.config else {})})
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args.cfg)))
        return

    load = os.getloadavg()
    memory = {v: probe_in_subprocess(v, args) for v in VARIANTS}
    steps = {v: prepare(v, args.cfg)[0] for v in VARIANTS}
    times = time_variants(steps, torch.device("cpu"), args.warmup, args.steps)
    tokens = args.cfg.batch * args.cfg.seq
    summary = {}
    for v in VARIANTS:
        wall, cpu = statistics.median(times[v]["wall"]), statistics.median(times[v]["cpu"])
        summary[v] = {
            **memory[v],
            "median_step_s": wall,
            "median_step_cpu_s": cpu,
            "tokens_per_s": tokens / wall,
        }
    ratios = {}
    for stage, on in (("stage1", "stage1-full"), ("stage2", "stage2-full"), ("stage2", "stage2-every2")):
        off = summary[f"{stage}-none"]
        key = on.split("-")[1]
        ratios[f"{stage}_{key}_over_none_time"] = summary[on]["median_step_s"] / off["median_step_s"]
        ratios[f"{stage}_{key}_over_none_cpu_time"] = (
            summary[on]["median_step_cpu_s"] / off["median_step_cpu_s"]
        )
        ratios[f"{stage}_{key}_over_none_memory"] = summary[on]["step_mib"] / off["step_mib"]
    print(
        f"{'variant':<16}{'plan (language, vision)':>26}{'step MiB':>10}{'1st step MiB':>14}{'step s':>9}{'cpu s':>8}"
    )
    for v, s in summary.items():
        plan = f"{s['plan']['language']}, {s['plan']['vision']}"
        print(f"{v:<16}{plan:>26}{s['step_mib']:>10.0f}{s['first_step_mib']:>14.0f}"
              f"{s['median_step_s']:>9.2f}{s['median_step_cpu_s']:>8.2f}")  # fmt: skip
    for k, r in ratios.items():
        print(f"{k}: {r:.3f}")
    results = {
        "benchmark": "recompute",
        "device": "cpu",
        "device_name": cpu_name(),
        "threads": args.threads,
        "load_average_at_start": load,
        "torch": torch.__version__,
        "config": {**asdict(args.cfg), "image_tokens": args.cfg.image_tokens},
        "warmup": args.warmup,
        "rounds": args.steps,
        "variants": {
            v: {"stage": s, "gradient_checkpointing": p, "checkpoint_every_n_layers": n}
            for v, (s, p, n) in VARIANTS.items()
        },
        "summary": summary,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
