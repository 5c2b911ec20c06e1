"""What `train.compile` and the flex path buy: compiled / eager training-step time, and SDPA / flex forward.

The model and data of bench_gpu_step.py (its Size: the real SigLIP so400m + Qwen2.5-0.5B in bf16 on CUDA, the
REDUCED 2 + 2-layer fp32 model and lengths / 4 on a CPU), one stage's preset (trainability, mask, recompute):
1. Training steps (forward, token-weighted backward, AdamW; padded micro-batches), eager, then the same model
   after `vlmtrain.models.compile.apply_compile` (regional compile of every layer + the loss chunk). The
   compiled warm-up steps are timed apart (they compile); the graphs compiled during the timed steps are
   counted (0 expected: no recompile across the steps' varying lengths).
2. Forward only (no grad) of a fresh model on the same micro-batches (rows padded to 128 for both), the LM
   attending with SDPA and its dense boolean mask, then with FlexAttention and the compiled BlockMask builder
   (mask building included; flex warm-up calls excluded).
Writes benchmarks/results/compile_<device>.json.

    python benchmarks/bench_compile.py --stage 2 --steps 4
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_step import (
    RESULTS,
    Size,
    apply_stage,
    build_model,
    micro_batches,
    run_step,
    set_backend,
    sync,
)
from bench_token_budget import STAGES, make_samples

from vlmtrain.data.collate import MODEL_KEYS
from vlmtrain.models.compile import apply_compile, graphs_compiled


def step_batches(model, size: Size, stage_no: int, n: int, flex: bool) -> list[list[dict]]:
    dist, _ = STAGES[f"stage{stage_no}"]
    rng = random.Random(3000 + stage_no)
    out = []
    for i in range(n):
        lengths = dist.lengths(rng, size.samples_per_step, size.scale)
        samples = make_samples(
            lengths, model.num_image_tokens, model.language.config.vocab_size, model.image_token_id,
            model.image_size, seed=i,
        )  # fmt: skip
        out.append(micro_batches(samples, dist, size, budget=False, flex=flex))
    return out


def timed_steps(model, opt, steps, mode, device) -> list[float]:
    times = []
    for micros in steps:
        sync(device)
        t0 = time.perf_counter()
        run_step(model, opt, micros, mode, device, full_logits=False)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def training(size: Size, device: torch.device, stage_no: int, warmup: int, steps: int) -> dict:
    model, tokenizer = build_model(size, device)
    _, mode = STAGES[f"stage{stage_no}"]
    apply_stage(model, tokenizer, stage_no, None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    batches = step_batches(model, size, stage_no, warmup + steps, flex=False)
    eager = timed_steps(model, opt, batches, mode, device)[warmup:]
    line = apply_compile(model, True)
    t0 = time.perf_counter()
    timed_steps(model, opt, batches[:warmup], mode, device)
    compile_s = time.perf_counter() - t0
    before = graphs_compiled()
    compiled = timed_steps(model, opt, batches[warmup:], mode, device)
    recompiled = graphs_compiled() - before
    widths = sorted({m["input_ids"].shape[1] for micros in batches for m in micros})
    return {
        "stage": stage_no,
        "apply_compile": line,
        "row_widths": widths,
        "eager_step_s": statistics.median(eager),
        "compiled_step_s": statistics.median(compiled),
        "compiled_over_eager": statistics.median(compiled) / statistics.median(eager),
        "compile_warmup_s": compile_s,
        "graphs_compiled_in_timed_steps": recompiled,
    }


@torch.no_grad()
def forward(size: Size, device: torch.device, stage_no: int, warmup: int, steps: int) -> dict:
    model, _ = build_model(size, device)
    model.eval()
    _, mode = STAGES[f"stage{stage_no}"]
    micros = [m for step in step_batches(model, size, stage_no, 1, flex=True) for m in step]
    dtype = next(model.parameters()).dtype
    batches = [{k: m[k].to(device) for k in (*MODEL_KEYS, "supervised_index") if k in m} for m in micros]
    for b in batches:
        b["pixel_values"] = b["pixel_values"].to(dtype)
    out = {}
    for backend in ("sdpa", "flex"):
        set_backend(model, backend)
        times = []
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            for b in batches:
                model(**b, mask_mode=mode)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        out[f"{backend}_forward_s"] = statistics.median(times)
    out["flex_over_sdpa"] = out["flex_forward_s"] / out["sdpa_forward_s"]
    out["row_widths"] = sorted({b["input_ids"].shape[1] for b in batches})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = Size.for_device(device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or 'unknown'})"
    )
    result = {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reduced": size.reduced,
        "dtype": str(size.dtype),
        "samples_per_step": size.samples_per_step,
        "micro_batch": size.micro_batch,
        "training": training(size, device, args.stage, args.warmup, args.steps),
        "forward": forward(size, device, args.stage, args.warmup, args.steps),
    }
    RESULTS.mkdir(exist_ok=True)
    tag = "cpu" if device.type == "cpu" else name.replace(" ", "_").lower()
    path = RESULTS / f"compile_{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
