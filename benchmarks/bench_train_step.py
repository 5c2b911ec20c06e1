"""Training-step speed and memory of vlmtrain's VisionLanguageModel against transformers' LLaVA.

Both sides get the same random-init SigLIP + GELU projector + Qwen2 weights (our model's weights copied into
`LlavaForConditionalGeneration`), the same batch (rows of `--seq` tokens: `--image-tokens` image tokens then
text, every text token supervised), the same dtype and the same optimizer (AdamW, fresh per variant). One
step = forward, loss, backward, AdamW step, zero_grad; a plain torch loop, so the engine is not measured.

Variants:
  vlmtrain-full       ours, stage 2: everything trains, prefix-LM mask (SDPA with a boolean 4D mask)
  llava-full          transformers LLaVA, everything trains, its causal mask (SDPA)
  vlmtrain-projector  ours, stages 0/1: vision and LM frozen, only the projector trains, prefix-LM mask

Speed is measured in one process: after warmup, rounds run one step of each variant in turn (so drift in
machine load hits all of them alike) and the median step time counts. Peak memory is measured per variant
in a fresh subprocess: CPU, the peak resident set during the steps (Linux VmHWM, reset after setup via
/proc/self/clear_refs) over the resident set after setup; CUDA, torch.cuda.max_memory_allocated over the
allocation after setup.

    python benchmarks/bench_train_step.py [--device cpu|cuda] [--steps 10] [--warmup 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

VARIANTS = ("vlmtrain-full", "llava-full", "vlmtrain-projector")
RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SPEED_RATIO = 1.0  # ours / LLaVA tokens per second, full model
TARGET_PROJECTOR_COST = 0.7  # projector-only step time / full-model step time
CORPUS = ["a red circle on the left", "two blue squares at the top", "describe the image in detail"]


@dataclass(frozen=True)
class BenchConfig:
    """Model and batch sizes; the defaults make compute dominate Python overhead on a CPU."""

    vision_hidden: int = 384
    """SigLIP width."""
    vision_layers: int = 4
    """SigLIP encoder layers."""
    image_size: int = 128
    """Pixels per side; with patch 16 this gives 64 image tokens."""
    patch_size: int = 16
    """SigLIP patch size."""
    text_hidden: int = 512
    """Qwen2 width."""
    text_layers: int = 4
    """Qwen2 decoder layers."""
    text_heads: int = 8
    """Query heads (key/value heads: a quarter, grouped-query attention as in Qwen2.5)."""
    vocab_size: int = 8192
    """LM vocabulary (the LM head is part of the work)."""
    seq: int = 256
    """Tokens per row: image tokens then text."""
    batch: int = 4
    """Rows per step."""

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# ---- models and batch ---------------------------------------------------------------------------


def build_our_model(cfg: BenchConfig):
    from vlmtrain.config.schema import ModelConfig
    from vlmtrain.data.tokenizer import build_tokenizer
    from vlmtrain.models.vlm import VisionLanguageModel

    tokenizer = build_tokenizer(CORPUS * 10, vocab_size=300)
    vision = {
        "hidden_size": cfg.vision_hidden,
        "intermediate_size": 4 * cfg.vision_hidden,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.vision_hidden // 64,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
    }
    language = {
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.text_hidden,
        "intermediate_size": 3 * cfg.text_hidden,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        "num_key_value_heads": max(1, cfg.text_heads // 4),
        "max_position_embeddings": 4 * cfg.seq,
        "tie_word_embeddings": True,
    }
    torch.manual_seed(0)
    model_cfg = ModelConfig(vision=None, vision_config=vision, language=None, language_config=language)
    return VisionLanguageModel.from_config(model_cfg, tokenizer)


def to_llava(model) -> nn.Module:
    """transformers' LLaVA holding exactly our weights, through vlmtrain's own export mapping."""
    from transformers import LlavaForConditionalGeneration

    from vlmtrain.export import llava_config, to_llava_state_dict

    cfg = llava_config(model)
    cfg.text_config._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    llava = LlavaForConditionalGeneration(cfg)
    missing, unexpected = llava.load_state_dict(to_llava_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return llava


def make_batch(cfg: BenchConfig, image_token_id: int) -> dict[str, torch.Tensor]:
    """Rows of one sample each: image tokens first, then random text, all text supervised, no padding."""
    g = torch.Generator().manual_seed(1)
    n_img = cfg.image_tokens
    text = torch.randint(0, cfg.vocab_size, (cfg.batch, cfg.seq - n_img), generator=g)
    text[text == image_token_id] = 0
    input_ids = torch.cat([torch.full((cfg.batch, n_img), image_token_id), text], dim=1)
    labels = input_ids.clone()
    labels[:, :n_img] = -100
    image_flags = torch.zeros_like(input_ids, dtype=torch.bool)
    image_flags[:, :n_img] = True
    return {
        "input_ids": input_ids,
        "labels": labels,
        "image_flags": image_flags,
        "sample_ids": torch.ones_like(input_ids),
        "pixel_values": torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=g),
    }


def set_trainable(model, variant: str) -> None:
    """Stage trainability: ours through the stage configs' own function; LLaVA made to match stage 2."""
    from vlmtrain.config.load import load_stage_config
    from vlmtrain.models.freeze import apply_trainability

    if variant.startswith("vlmtrain"):
        stage = 1 if variant == "vlmtrain-projector" else 2
        apply_trainability(model, load_stage_config(stage=stage).modules)
        return
    model.requires_grad_(True)
    # Features come from hidden_states[-1], before SigLIP's post_layernorm (as in ours): it never gets a gradient.
    model.model.vision_tower.post_layernorm.requires_grad_(False)


def step_function(variant: str, model, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    """One training step of `variant` on `batch`: forward, loss, backward, AdamW, zero_grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    if variant.startswith("vlmtrain"):
        keys = ("input_ids", "labels", "image_flags", "sample_ids", "pixel_values")
        inputs = {k: batch[k] for k in keys}

        def loss_fn() -> torch.Tensor:
            return model(**inputs, mask_mode="prefix").loss

    else:
        attention = torch.ones_like(batch["input_ids"])

        def loss_fn() -> torch.Tensor:
            out = model(
                input_ids=batch["input_ids"],
                pixel_values=batch["pixel_values"],
                attention_mask=attention,
                labels=batch["labels"],
            )
            return out.loss

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def prepare(variant: str, cfg: BenchConfig, device: torch.device, dtype: torch.dtype, ours=None):
    """Model of `variant` on `device` in `dtype` with its trainability, and the batch on `device`."""
    ours = ours if ours is not None else build_our_model(cfg)
    model = to_llava(ours) if variant == "llava-full" else copy.deepcopy(ours)
    set_trainable(model, variant)
    model.to(device=device, dtype=dtype).train()
    batch = make_batch(cfg, ours.image_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return model, batch


def check_same_weights(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> float:
    """|loss difference| of ours (causal mask) and LLaVA on the batch: they compute the same function."""
    ours = build_our_model(cfg)
    a, batch = prepare("vlmtrain-full", cfg, device, dtype, ours)
    b, _ = prepare("llava-full", cfg, device, dtype, ours)
    with torch.no_grad():
        keys = ("input_ids", "labels", "image_flags", "sample_ids", "pixel_values")
        la = a(**{k: batch[k] for k in keys}, mask_mode="causal").loss
        lb = b(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            labels=batch["labels"],
        ).loss
    return abs(float(la) - float(lb))


# ---- measurements -------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(
    steps: dict[str, Callable[[], float]], device: torch.device, warmup: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per step of each variant: `warmup` untimed steps each, then `rounds` rounds of
    one step per variant, rotating which goes first."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            sync(device)
            times[name]["wall"].append(time.perf_counter() - w0)
            times[name]["cpu"].append(time.process_time() - c0)
    return times


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def memory_probe(
    variant: str, cfg: BenchConfig, device: torch.device, dtype: torch.dtype, steps: int
) -> dict[str, Any]:
    """Run in a fresh process: peak memory of `steps` training steps over the memory after setup."""
    model, batch = prepare(variant, cfg, device, dtype)
    step = step_function(variant, model, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "torch.cuda.max_memory_allocated", "setup_mib": base / 2**20, "peak_mib": peak / 2**20,
                "train_mib": (peak - base) / 2**20}  # fmt: skip
    _reset_peak_rss()
    base = _rss_kib("VmRSS")
    for _ in range(steps):
        step()
    peak = _rss_kib("VmHWM")
    return {"method": "Linux VmHWM after clear_refs", "setup_mib": base / 1024, "peak_mib": peak / 1024,
            "train_mib": (peak - base) / 1024}  # fmt: skip


def probe_in_subprocess(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--probe", variant, "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads), "--config", json.dumps(asdict(args.cfg))]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


# ---- report -------------------------------------------------------------------------------------


def summarize(cfg: BenchConfig, times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Median step time, tokens per second (wall clock) and per CPU-second (insensitive to other load)."""
    tokens = cfg.batch * cfg.seq
    out = {}
    for name, t in times.items():
        wall, cpu = statistics.median(t["wall"]), statistics.median(t["cpu"])
        out[name] = {
            "median_step_s": wall,
            "tokens_per_s": tokens / wall,
            "median_step_cpu_s": cpu,
            "tokens_per_cpu_s": tokens / cpu,
            "min_step_s": min(t["wall"]),
            "max_step_s": max(t["wall"]),
        }
    return out


def print_table(
    summary: dict[str, dict[str, float]], memory: dict[str, dict[str, Any]], ratios: dict[str, float]
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="Training step: vlmtrain VisionLanguageModel vs transformers LlavaForConditionalGeneration"
    )
    for col in (
        "variant",
        "median step (s)",
        "tokens/s",
        "setup mem (MiB)",
        "peak mem (MiB)",
        "step mem (MiB)",
    ):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, s in summary.items():
        m = memory[name]
        table.add_row(name, f"{s['median_step_s']:.3f}", f"{s['tokens_per_s']:.0f}", f"{m['setup_mib']:.0f}",
                      f"{m['peak_mib']:.0f}", f"{m['train_mib']:.0f}")  # fmt: skip
    console = Console(width=120)
    console.print(table)
    console.print(
        f"speed ours/LLaVA (full model): [bold]{ratios['speed_ours_over_llava']:.2f}x[/] (target >= {TARGET_SPEED_RATIO})\n"
        f"projector-only step / full step: [bold]{ratios['projector_over_full_time']:.2f}x[/] (target <= {TARGET_PROJECTOR_COST})\n"
        f"step memory ours/LLaVA: {ratios['step_memory_ours_over_llava']:.2f}x; "
        f"projector-only/full: {ratios['step_memory_projector_over_full']:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=10, help="timed rounds (one step of each variant per round)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory probe")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 1 (default) measures per-core speed, which other processes "
                        "on the machine disturb far less than a multi-threaded step (OpenMP threads spin-wait)")  # fmt: skip
    parser.add_argument(
        "--config", default=None, help="BenchConfig as JSON (sizes), e.g. '{\"text_hidden\": 256}'"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default results/train_step_<device>.json)"
    )
    parser.add_argument("--probe", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    load_at_start = os.getloadavg()  # other work on the machine, for the record
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.cfg = BenchConfig(**json.loads(args.config)) if args.config else BenchConfig()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build / machine")

    if args.probe:
        print(json.dumps(memory_probe(args.probe, args.cfg, device, dtype, args.memory_steps)))
        return

    diff = check_same_weights(args.cfg, device, dtype)
    ours = build_our_model(args.cfg)
    steps = {}
    for variant in VARIANTS:
        model, batch = prepare(variant, args.cfg, device, dtype, ours)
        steps[variant] = step_function(variant, model, batch)
    times = time_variants(steps, device, args.warmup, args.steps)
    summary = summarize(args.cfg, times)
    memory = {v: probe_in_subprocess(v, args) for v in VARIANTS}
    ratios = {
        "speed_ours_over_llava": summary["vlmtrain-full"]["tokens_per_s"] / summary["llava-full"]["tokens_per_s"],
        "speed_ours_over_llava_cpu_time": summary["vlmtrain-full"]["tokens_per_cpu_s"] / summary["llava-full"]["tokens_per_cpu_s"],
        "projector_over_full_time": summary["vlmtrain-projector"]["median_step_s"] / summary["vlmtrain-full"]["median_step_s"],
        "step_memory_ours_over_llava": memory["vlmtrain-full"]["train_mib"] / memory["llava-full"]["train_mib"],
        "step_memory_projector_over_full": memory["vlmtrain-projector"]["train_mib"] / memory["vlmtrain-full"]["train_mib"],
    }  # fmt: skip
    print_table(summary, memory, ratios)
    results = {
        "benchmark": "train_step",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": args.dtype,
        "threads": args.threads,
        "load_average_at_start": load_at_start,
        "torch": torch.__version__,
        "config": {**asdict(args.cfg), "image_tokens": args.cfg.image_tokens},
        "warmup": args.warmup,
        "rounds": args.steps,
        "causal_loss_difference_ours_vs_llava": diff,
        "summary": summary,
        "step_times_s": times,
        "memory": memory,
        "ratios": ratios,
        "targets": {
            "speed_ours_over_llava_min": TARGET_SPEED_RATIO,
            "projector_over_full_time_max": TARGET_PROJECTOR_COST,
            "speed_met": ratios["speed_ours_over_llava"] >= TARGET_SPEED_RATIO,
            "projector_cost_met": ratios["projector_over_full_time"] <= TARGET_PROJECTOR_COST,
        },
    }
    out = args.out or RESULTS / f"train_step_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
