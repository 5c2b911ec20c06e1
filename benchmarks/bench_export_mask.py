"""What the export's prefix-mask prefill costs next to transformers' causal one, at the paper's real sizes.

The LM is Qwen2.5-0.5B's shape (hidden 896, 14 query / 2 key-value heads, intermediate 4,864) with random
weights and `--layers` of its 24 layers (the cost per layer is what matters: the mask is built once and
every layer takes it). A prefill is B rows of 256 image tokens + a `--prompt`-token prompt. Variants:
- `prefix`: the export's mask (create_causal_mask with the image as one bidirectional block), a prepared
  [B, 1, T, T] boolean mask;
- `causal-padded`: transformers' causal mask from a 2D padding mask (what a batched generate() builds);
- `causal`: no padding, so SDPA runs with is_causal and no mask tensor at all (a single prompt).

    python benchmarks/bench_export_mask.py                       # CPU, float32, 2 layers
    python benchmarks/bench_export_mask.py --device cuda --dtype bfloat16 --layers 24
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import Qwen2Config, Qwen2Model
from transformers.masking_utils import create_causal_mask


def qwen25_05b(layers: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4_864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4_096,
        attn_implementation="sdpa",
    )


def mask_builders(config, embeds: torch.Tensor, n_image: int) -> dict[str, Callable[[], torch.Tensor | None]]:
    b, t, _ = embeds.shape
    blocks = torch.full((b, t), -1, dtype=torch.long, device=embeds.device)
    blocks[:, :n_image] = 0
    padding = torch.ones(b, t, dtype=torch.long, device=embeds.device)
    padding[1:, :3] = 0  # a few rows left-padded, as in a batch of prompts of different lengths
    kw = {"config": config, "inputs_embeds": embeds, "cache": None, "position_ids": None}
    return {
        "prefix": lambda: create_causal_mask(**kw, attention_mask=padding, block_sequence_ids=blocks),
        "causal-padded": lambda: create_causal_mask(**kw, attention_mask=padding),
        "causal": lambda: create_causal_mask(**kw, attention_mask=None),
    }


def timed_rounds(fns: dict[str, Callable[[], object]], reps: int, sync) -> dict[str, tuple[float, float]]:
    """Median wall and CPU seconds per variant; the variants run in turn in each round, so that load from
    other jobs on the machine falls on all of them alike."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            w, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=44, help="text tokens after the 256 image tokens")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    config = qwen25_05b(args.layers)
    model = Qwen2Model(config).to(device, dtype).eval()
    n_image, t = 256, 256 + args.prompt
    embeds = torch.randn(args.batch, t, config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(t, device=device)[None].expand(args.batch, t)

    with torch.no_grad():
        builders = mask_builders(config, embeds, n_image)
        build = timed_rounds(builders, args.reps, sync)
        built = {name: fn() for name, fn in builders.items()}

        def forward(mask):
            return lambda: model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
            )

        forwards = {name: forward(mask) for name, mask in built.items()}
        for fn in forwards.values():
            fn()  # warm-up
        run = timed_rounds(forwards, args.reps, sync)

    print(
        f"B={args.batch} T={t} ({n_image} image + {args.prompt} text), {args.layers} layers, {dtype}, {device}"
    )
    print(
        f"{'variant':<14} {'mask bytes':>11} {'build ms':>9} {'prefill ms':>11} {'cpu ms':>9} {'vs causal':>10}"
    )
    for name, mask in built.items():
        size = 0 if mask is None else mask.numel() * mask.element_size()
        ratio = run[name][0] / run["causal"][0]
        print(
            f"{name:<14} {size:>11,} {build[name][0] * 1e3:>9.2f} {run[name][0] * 1e3:>11.1f} "
            f"{run[name][1] * 1e3:>9.1f} {ratio:>9.3f}x"
        )


if __name__ == "__main__":
    main()
