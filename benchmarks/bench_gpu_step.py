"""The training step at real size, per stage, with each of issue 12's optimisations toggled: MFU, tokens/s, memory.

Model: the presets' architecture with random weights, SigLIP so400m (27 layers, 1152 wide, 224 px, patch 14 ->
256 image tokens) + GELU projector + Qwen2.5-0.5B (24 layers, 896 wide, vocabulary 151,936), in bf16 on CUDA.
Each stage gets its preset's trainability (models.freeze.apply_trainability), mask and recompute policy (the
Trainer's own _enable_checkpointing). One step is one GPU's whole global batch (128 samples, lengths drawn from
bench_token_budget.py's per-dataset distributions, which say where each comes from): every micro-batch's forward
and token-weighted backward, then AdamW over the trainable parameters. Stage 0's text noise is left out (it
is computed on the CPU side and costs the step nothing).

Variants (one change each against `shipped`):
  shipped         the preset: padded micro-batches of 8 (stages 0-2) or the 16,384-token budget (stage 3),
                  chunked cross-entropy, `auto` recompute, SDPA (what attn_backend `auto` resolves to today)
  layout          the other batching: token budget of 8 x max_length in stages 0-2, padded micro-batches in 3
  full-logits     the [N, V] fp32 logits loss (return_logits=True)
  recompute       the other policy: `true` in stages 0-1 (the frozen LM recomputed), `false` in stages 2-3
  flex            FlexAttention with its BlockMask (CUDA only: its backward is GPU-only), rows padded to 128
torch.compile is not a vlmtrain option yet, so it is not toggled.

Per stage, at real size on any device: the share of FlexAttention's 128 x 128 attention tiles the stage's
mask lets a block-sparse kernel skip (padded and token-budget layouts; models.masks.skipped_block_share).
Figures per variant: median step seconds over --steps timed steps after --warmup, real (non-padding) tokens/s,
model TFLOP/s and MFU from vlmtrain.train.flops (the same FLOP model the trainer logs; the peak from its GPU
table, or --peak-tflops), hardware FLOP utilisation (recompute counted), and peak memory
(torch.cuda.max_memory_allocated over the step, reset per variant). Written to
benchmarks/results/gpu_<device>.json.

On a machine without CUDA the same code runs a REDUCED size (2 + 2 layers, narrow widths, vocabulary 8,192,
lengths / 4, 16 samples a step, fp32: CPUs without native bf16 emulate it) so the script is exercised; its
figures are not the real run's and the JSON says so (`"reduced": true`). No MFU on CPU (no peak).

    bash benchmarks/gpu.sh                # = python benchmarks/bench_gpu_step.py
    python benchmarks/bench_gpu_step.py --stages 2,3 --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_token_budget import STAGES, layouts, make_samples  # a sibling script, not a package

from vlmtrain.data.collate import BUDGET_WIDTH_MULTIPLE, MODEL_KEYS, budget_collate, pad_collate
from vlmtrain.models.loss import supervised_index

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("shipped", "layout", "full-logits", "recompute", "flex")
FLEX_BLOCK = 128


@dataclass(frozen=True)
class Size:
    """What one run measures: the model's shapes, the sequence scale and the samples a step trains on."""

    reduced: bool
    scale: int
    samples_per_step: int
    micro_batch: int
    dtype: torch.dtype

    @classmethod
    def for_device(cls, device: torch.device) -> Size:
        if device.type == "cuda":
            return cls(reduced=False, scale=1, samples_per_step=128, micro_batch=8, dtype=torch.bfloat16)
        return cls(reduced=True, scale=4, samples_per_step=16, micro_batch=4, dtype=torch.float32)


def model_config(size: Size) -> Any:
    from vlmtrain.config.schema import ModelConfig
    from vlmtrain.train.plan import KNOWN_LANGUAGE, KNOWN_VISION

    vision = dict(KNOWN_VISION["google/siglip-so400m-patch14-224"])
    language = dict(KNOWN_LANGUAGE["Qwen/Qwen2.5-0.5B"])
    if size.reduced:
        side = 224 // 2  # 8 x 8 patches of 14 = 64 image tokens, the real 256 / scale 4
        vision.update(hidden_size=192, intermediate_size=768, num_hidden_layers=2, num_attention_heads=3)
        vision.update(image_size=side)
        language.update(
            vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1,
        )  # fmt: skip
    return ModelConfig(vision=None, vision_config=vision, language=None, language_config=language)


def build_model(size: Size, device: torch.device):
    from vlmtrain.data.tokenizer import build_tokenizer
    from vlmtrain.models.vlm import VisionLanguageModel

    tokenizer = build_tokenizer(["a red circle on the left", "two blue squares"] * 10, vocab_size=300)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes for 0.9B parameters
        model = VisionLanguageModel.from_config(model_config(size), tokenizer)
    return model.to(size.dtype), tokenizer


def set_backend(model, backend: str) -> None:
    """Switch the LM's attention (the tower keeps SDPA: it has no mask) without rebuilding the model."""
    from vlmtrain.models.language import ATTN_IMPLEMENTATION

    model.language.set_attn_implementation(ATTN_IMPLEMENTATION[backend])
    model.attn_backend = backend


def apply_stage(model, tokenizer, stage_no: int, recompute: Any) -> dict[str, bool]:
    """The preset's trainability and the Trainer's recompute plan for `recompute` (None: the preset's)."""
    from vlmtrain.config.load import load_stage_config
    from vlmtrain.dist import DistContext
    from vlmtrain.models.freeze import apply_trainability
    from vlmtrain.train.trainer import Trainer

    stage = load_stage_config(stage=stage_no)
    if recompute is not None:
        stage = replace(stage, train=replace(stage.train, gradient_checkpointing=recompute))
    apply_trainability(model, stage.modules)
    device = next(model.parameters()).device
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        plan = Trainer(stage, Path(tmp), ctx, model, tokenizer, lambda s: None, 1)._enable_checkpointing()
    model.train()
    return plan


def micro_batches(samples, dist, size: Size, budget: bool, flex: bool) -> list[dict[str, Any]]:
    image = model_image_size(size)
    if budget:
        multiple = FLEX_BLOCK if flex else BUDGET_WIDTH_MULTIPLE // size.scale
        out = budget_collate(
            samples,
            dist.max_length // size.scale,
            size.micro_batch * dist.max_length // size.scale,
            0,
            image_size=image,
            width_multiple=multiple,
        )["micro_batches"]
    else:
        multiple = FLEX_BLOCK if flex else None
        out = [
            pad_collate(samples[i : i + size.micro_batch], 0, pad_to_multiple_of=multiple, image_size=image)
            for i in range(0, len(samples), size.micro_batch)
        ]
    for m in out:
        m["supervised_index"] = supervised_index(m["labels"], m["sample_ids"])  # on the CPU, as the trainer
    return out


def model_image_size(size: Size) -> int:
    return 112 if size.reduced else 224


def run_step(model, opt, micros, mode: str, device: torch.device, full_logits: bool) -> None:
    tokens = sum(int(m["supervised_index"].shape[0]) for m in micros)
    for m in micros:
        batch = {k: m[k].to(device, non_blocking=True) for k in (*MODEL_KEYS, "supervised_index") if k in m}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
        out = model(**batch, mask_mode=mode, return_logits=full_logits)
        (out.loss_sum / tokens).backward()
        del out
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model, tokenizer, stage_no: int, variant: str, size: Size, device: torch.device, args, peak: float | None
) -> dict[str, Any]:
    from vlmtrain.train.flops import StepFlopModel

    dist, mode = STAGES[f"stage{stage_no}"]
    preset_budget = stage_no == 3  # the shipped presets: only stage 3 sets data.token_budget
    budget = preset_budget != (variant == "layout")
    recompute = None
    if variant == "recompute":
        recompute = stage_no <= 1  # true where auto recomputes nothing, false where it recomputes the LM
    plan = apply_stage(model, tokenizer, stage_no, recompute)
    set_backend(model, "flex" if variant == "flex" else "sdpa")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, foreach=True)
    flop_model = StepFlopModel.from_model(model, mode)
    rng = random.Random(1000 + stage_no)
    times, real, flops, hw, pad = [], [], [], [], []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for i in range(args.warmup + args.steps):
        lengths = dist.lengths(rng, size.samples_per_step, size.scale)
        samples = make_samples(
            lengths, 256 // size.scale, model.language.config.vocab_size, model.image_token_id,
            model_image_size(size), seed=i,
        )  # fmt: skip
        micros = micro_batches(samples, dist, size, budget, variant == "flex")
        count = flop_model(micros)
        sync(device)
        t0 = time.perf_counter()
        run_step(model, opt, micros, mode, device, variant == "full-logits")
        sync(device)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
            real.append(sum(m["num_tokens"] for m in micros))
            flops.append(count.model)
            hw.append(count.hardware)
            pad.append(1 - real[-1] / sum(m["input_ids"].numel() for m in micros))
    del opt
    step = statistics.median(times)
    model_tflops = statistics.fmean(flops) / step / 1e12
    out: dict[str, Any] = {
        "layout": "token budget" if budget else "padded",
        "recompute": plan,
        "micro_batches_per_step": len(micros),
        "step_s": step,
        "real_tokens_per_s": statistics.fmean(real) / step,
        "padding_fraction": statistics.fmean(pad),
        "model_tflops": model_tflops,
        "mfu": model_tflops / peak if peak else None,
        "hfu": statistics.fmean(hw) / step / 1e12 / peak if peak else None,
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["step_memory_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    model.zero_grad(set_to_none=True)
    return out


def skipped_blocks(stage_no: int, samples: int = 128) -> dict[str, float]:
    """Share of FlexAttention's 128 x 128 tiles the stage's mask skips, at REAL size whatever the device: one
    step's samples (bench_token_budget's lengths) laid out padded and by token budget, averaged over the
    micro-batches (models.masks.skipped_block_share; SDPA with a boolean mask computes every tile)."""
    from vlmtrain.models.masks import skipped_block_share

    dist, mode = STAGES[f"stage{stage_no}"]
    lengths = dist.lengths(random.Random(2000 + stage_no), samples)
    built = layouts(make_samples(lengths, 256, 1000, 5, 1, seed=stage_no), dist, 1, 1)
    return {
        name: statistics.fmean(skipped_block_share(mode, m["sample_ids"], m["image_flags"]) for m in micros)
        for name, micros in built.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="per-GPU dense bf16 peak (default: table)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from vlmtrain.train.flops import resolve_peak_tflops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = Size.for_device(device)
    peak, peak_source = resolve_peak_tflops(
        args.peak_tflops, device, "bf16" if device.type == "cuda" else "fp32"
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    if size.reduced:
        print(
            "no CUDA: running a REDUCED size (2 + 2 layers, narrow, vocab 8,192, lengths / 4); not the real run"
        )
    model, tokenizer = build_model(size, device)
    report: dict[str, Any] = {
        "benchmark": "gpu_step",
        "device": name,
        "reduced": size.reduced,
        "torch": torch.__version__,
        "dtype": str(size.dtype).removeprefix("torch."),
        "samples_per_step": size.samples_per_step,
        "micro_batch": size.micro_batch,
        "peak": peak_source,
        "parameters": sum(p.numel() for p in model.parameters()),
        "stages": {},
    }
    t_start = time.perf_counter()
    variants = [v for v in args.variants.split(",") if v]
    for stage_no in (int(s) for s in args.stages.split(",")):
        entry: dict[str, Any] = {"attention_tiles_skipped_real_size": skipped_blocks(stage_no)}
        print(
            f"stage{stage_no} attention tiles a block-sparse kernel skips at real size: "
            + ", ".join(f"{k} {v:.1%}" for k, v in entry["attention_tiles_skipped_real_size"].items()),
            flush=True,
        )
        for variant in variants:
            if variant == "flex" and device.type != "cuda":
                entry[variant] = {"skipped": "FlexAttention's backward runs on CUDA only"}
                continue
            entry[variant] = r = measure(model, tokenizer, stage_no, variant, size, device, args, peak)
            mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else f"{r['model_tflops']:.3f} TFLOP/s"
            mem = f", peak {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""
            print(
                f"stage{stage_no} {variant:12s} {r['step_s']:.3f} s/step, {r['real_tokens_per_s']:,.0f} real tok/s, "
                f"{mfu}, padding {r['padding_fraction']:.1%}{mem}",
                flush=True,
            )
        shipped = entry.get("shipped")
        if shipped:
            entry["speed_vs_shipped"] = {
                v: shipped["step_s"] / e["step_s"]
                for v, e in entry.items()
                if isinstance(e, dict) and "step_s" in e
            }
        report["stages"][f"stage{stage_no}"] = entry
    report["wall_s"] = time.perf_counter() - t_start
    tag = "cpu-reduced" if size.reduced else name.lower().replace("nvidia ", "").replace(" ", "-")
    out = args.out or RESULTS / f"gpu_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
