"""Token-budget micro-batches against padded ones, per stage: padding and real (non-padding) tokens per second.

Both layouts train on the same samples per optimizer step (the global batch); they differ only in how those
are laid into micro-batches:
  padded   micro-batches of `micro_batch_size` samples, one per row, right-padded to the micro-batch's longest
  budget   the step's samples packed whole (first-fit decreasing) into rows of max_length, rows grouped into
           micro-batches of `token_budget` tokens (collate.budget_collate, the trainer's layout)

Sample lengths (image tokens + text tokens) are drawn from lognormal fits of the text length per dataset.
They are stated assumptions, not measured on the real data (no copy of it here): they encode what the paper's
datasets are known for, the two recaption sets similar in length, LLaVA-NeXT long-tailed:
  COCO-118k-Recap (stages 0, 1)  text median 90 tokens, sigma 0.25 (detailed one-paragraph recaptions)
  BLIP558k-Recap (stage 2)       text median 70 tokens, sigma 0.30 (shorter recaptions)
  LLaVA-NeXT-790k (stage 3)      text median 160 tokens, sigma 1.0 (one-word VQA answers to multi-turn
                                 conversations and long documents), clipped to max_length
Every sample has an image (256 tokens: SigLIP so400m at 224 px, patch 14).

Part 1, layout at real size (no model): the shipped presets' lengths, micro-batch size and token budget;
padding fraction and micro-batches per step, for one rank (a share of 128 samples) and for 8 ranks (16).

Part 2, measured CPU step: every length divided by SCALE (image tokens, text, max_length, budget, the
64-token width step), a small
random-init VLM of the real classes with each stage's trainability and mask, a share of STEP_SAMPLES samples
per step; one step = every micro-batch's forward + token-weighted backward, then AdamW. Rounds alternate the
layouts on the same samples; the median step time counts. Real tokens/s = non-padding tokens / step time.

    python benchmarks/bench_token_budget.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmtrain.data.collate import BUDGET_WIDTH_MULTIPLE, MODEL_KEYS, budget_collate, pad_collate
from vlmtrain.data.process import IGNORE_INDEX, ProcessedSample

RESULTS = Path(__file__).resolve().parent / "results"
IMAGE_TOKENS = 256
MICRO = 8
GLOBAL = 128
SCALE = 4
STEP_SAMPLES = 32
TARGET_SPEEDUP = 1.5  # stage 3, budget / padded real tokens per second
TARGET_PADDING = 0.05  # stage 3, budget layout


@dataclass(frozen=True)
class Dist:
    """A dataset's text-length distribution (lognormal fit, stated above) and its stage's sequence shape."""

    dataset: str
    median: float
    sigma: float
    max_length: int
    token_budget: int

    def lengths(self, rng: random.Random, n: int, scale: int = 1) -> list[int]:
        top = self.max_length // scale
        image = IMAGE_TOKENS // scale
        text = [
            max(2, round(rng.lognormvariate(math.log(self.median), self.sigma) / scale)) for _ in range(n)
        ]
        return [min(top, image + t) for t in text]


STAGES = {
    "stage0": (Dist("COCO-118k-Recap", 90, 0.25, 768, MICRO * 768), "bidirectional"),
    "stage1": (Dist("COCO-118k-Recap", 90, 0.25, 768, MICRO * 768), "prefix"),
    "stage2": (Dist("BLIP558k-Recap", 70, 0.30, 768, MICRO * 768), "prefix"),
    "stage3": (Dist("LLaVA-NeXT-790k", 160, 1.0, 2048, MICRO * 2048), "prefix"),
}


def make_samples(lengths: list[int], image_tokens: int, vocab: int, image_id: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        text = torch.randint(10, vocab - 10, (n - image_tokens,), generator=g)
        ids = torch.cat([torch.full((image_tokens,), image_id), text])
        labels = ids.clone()
        labels[:image_tokens] = IGNORE_INDEX
        flags = torch.zeros_like(ids, dtype=torch.bool)
        flags[:image_tokens] = True
        out.append(
            ProcessedSample(ids, labels, flags, torch.randn(3, size, size, generator=g), f"{i}", "b", i)
        )
    return out


def layouts(samples, dist: Dist, scale: int, size: int) -> dict[str, list[dict[str, Any]]]:
    row = dist.max_length // scale
    padded = [pad_collate(samples[i : i + MICRO], 0, image_size=size) for i in range(0, len(samples), MICRO)]
    budget = budget_collate(
        samples,
        row,
        dist.token_budget // scale,
        0,
        image_size=size,
        width_multiple=BUDGET_WIDTH_MULTIPLE // scale,
    )["micro_batches"]
    return {"padded": padded, "budget": budget}


def padding(micros: list[dict[str, Any]]) -> float:
    return 1.0 - sum(m["num_tokens"] for m in micros) / sum(m["input_ids"].numel() for m in micros)


# ---- part 1: layout at real size ------------------------------------------------------------------------


def layout_stats(dist: Dist, share: int, steps: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    acc: dict[str, list[float]] = {"padded": [], "budget": [], "padded_micro": [], "budget_micro": []}
    for _ in range(steps):
        samples = make_samples(dist.lengths(rng, share), IMAGE_TOKENS, 1000, 5, 1, seed)
        for name, micros in layouts(samples, dist, 1, 1).items():
            acc[name].append(padding(micros))
            acc[f"{name}_micro"].append(len(micros))
    for name in ("padded", "budget"):
        out[f"{name}_padding"] = statistics.fmean(acc[name])
        out[f"{name}_micro_batches"] = statistics.fmean(acc[f"{name}_micro"])
    return out


# ---- part 2: measured CPU step ---------------------------------------------------------------------------


def tiny_vlm(max_positions: int):
    from vlmtrain.config.schema import ModelConfig
    from vlmtrain.data.tokenizer import build_tokenizer
    from vlmtrain.models.vlm import VisionLanguageModel

    tokenizer = build_tokenizer(["a red circle on the left", "two blue squares"] * 10, vocab_size=300)
    patch = 16
    side = math.isqrt(IMAGE_TOKENS // SCALE) * patch  # (side / patch)^2 = IMAGE_TOKENS / SCALE
    vision = dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
        image_size=side, patch_size=patch,
    )  # fmt: skip
    language = dict(
        model_type="qwen2", vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    cfg = ModelConfig(vision=None, vision_config=vision, language=None, language_config=language)
    return VisionLanguageModel.from_config(cfg, tokenizer)


def time_step(model, opt, micros, mode: str) -> float:
    tokens = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micros)
    t0 = time.perf_counter()
    for m in micros:
        out = model(**{k: m[k] for k in MODEL_KEYS}, mask_mode=mode)
        (out.loss_sum / tokens).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measured(stage: int, dist: Dist, mode: str, rounds: int, seed: int) -> dict[str, Any]:
    from vlmtrain.config.load import load_stage_config
    from vlmtrain.models.freeze import apply_trainability

    model = tiny_vlm(2 * dist.max_length // SCALE)
    apply_trainability(model, load_stage_config(stage=stage).modules)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    size = model.vision.config.image_size
    rng = random.Random(seed)
    times: dict[str, list[float]] = {"padded": [], "budget": []}
    real: dict[str, int] = {}
    pads: dict[str, list[float]] = {"padded": [], "budget": []}
    for r in range(rounds + 1):  # round 0 warms up
        lengths = dist.lengths(rng, STEP_SAMPLES, SCALE)
        samples = make_samples(lengths, IMAGE_TOKENS // SCALE, 4096, model.image_token_id, size, seed + r)
        built = layouts(samples, dist, SCALE, size)
        for name in ("padded", "budget") if r % 2 == 0 else ("budget", "padded"):
            dt = time_step(model, opt, built[name], mode)
            if r > 0:
                times[name].append(dt)
                pads[name].append(padding(built[name]))
                real[name] = real.get(name, 0) + sum(m["num_tokens"] for m in built[name])
    out: dict[str, Any] = {}
    for name in times:
        step = statistics.median(times[name])
        out[f"{name}_step_s"] = step
        out[f"{name}_real_tokens_per_s"] = real[name] / rounds / step
        out[f"{name}_padding"] = statistics.fmean(pads[name])
    out["speedup"] = out["budget_real_tokens_per_s"] / out["padded_real_tokens_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layout-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "token_budget_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "global_batch": GLOBAL,
        "micro_batch_size": MICRO,
        "scale": SCALE,
        "step_samples_measured": STEP_SAMPLES,
        "stages": {},
    }
    for name, (dist, mode) in STAGES.items():
        stage = int(name[-1])
        entry: dict[str, Any] = {"dist": dist.__dict__, "mask": mode}
        for ranks in (1, 8):
            entry[f"layout_{ranks}_rank"] = layout_stats(dist, GLOBAL // ranks, args.layout_steps, seed=stage)
        entry["measured_cpu"] = measured(stage, dist, mode, args.rounds, seed=100 + stage)
        report["stages"][name] = entry
        m, one = entry["measured_cpu"], entry["layout_1_rank"]
        print(
            f"{name} {dist.dataset}: padding (real size, 1 rank) padded {one['padded_padding']:.1%} -> budget "
            f"{one['budget_padding']:.1%}; CPU real tokens/s x{m['speedup']:.2f} "
            f"(padding {m['padded_padding']:.1%} -> {m['budget_padding']:.1%})"
        )
    s3 = report["stages"]["stage3"]
    report["targets"] = {
        "stage3_speedup": s3["measured_cpu"]["speedup"],
        "stage3_speedup_target": TARGET_SPEEDUP,
        "stage3_budget_padding_1_rank": s3["layout_1_rank"]["budget_padding"],
        "stage3_budget_padding_8_ranks": s3["layout_8_rank"]["budget_padding"],
        "padding_target": TARGET_PADDING,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"], indent=2))


if __name__ == "__main__":
    main()
