"""Peak memory and time of the LM loss: chunked linear cross-entropy against the full-logits path.

The workload is the loss end of a training step at Qwen2.5-0.5B's real head: an LM head of 151,936 x 896
(random init, no bias, fp32 on CPU), hidden states of 4 rows x 1,024 tokens standing in for the decoder's
output (a leaf that requires grad, so backward produces the gradient the LM would receive), and labels with
the first 256 positions of each row unsupervised (image and prompt), which leaves 3,072 supervised tokens.
A step is `token_losses(...)` (vlmtrain.models.loss, what VisionLanguageModel.forward calls), the sum of the
per-token losses, and backward.

Variants: `full` (the path before the chunked loss: `head(hidden)` on the supervised positions, then
`F.cross_entropy(logits.float(), reduction="none")`), `old` (the chunked loss as it was at git revision
`--baseline-rev`, read from git into the probe: a per-chunk [V, D] weight-gradient product under bf16,
more passes over each chunk's logits) and `chunked` (today's linear_cross_entropy), each with a
frozen head (stages 0-1) and a trainable one (stages 2-3, where it also yields the head's weight gradient).
`--dtype bf16` runs the same on CPU in bf16 (the compute dtype of a GPU run; slower on CPU).

Method: every variant runs in a fresh subprocess. It allocates the head, the hidden states and the labels,
reads its resident set (Linux VmRSS: the "model's memory" baseline, libraries included), resets the peak
(writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS), runs one step, and reads VmHWM; the
step's peak is VmHWM - baseline. The head's weight gradient, when there is one, is part of that peak
(it is an output of the step); the results also give the peak without it. With --device cuda the same probe
uses torch.cuda.max_memory_allocated in bf16. Time is the wall and CPU time of the probe's steps; the
variants run alternately (full, chunked, ...) `--repeats` times and the median counts, so that drift in the
machine's load hits both paths alike.

    python benchmarks/bench_loss_memory.py                       # real size, 1 thread, ~10 min on 2 cores
    python benchmarks/bench_loss_memory.py --dtype bf16 --variants old-trainable chunked-trainable
    python benchmarks/bench_loss_memory.py --tokens 1024 --supervised 768 --vocab 32000   # quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import _reset_peak_rss, _rss_kib, cpu_name  # a sibling script, not a package

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = (
    "full-frozen",
    "old-frozen",
    "chunked-frozen",
    "full-trainable",
    "old-trainable",
    "chunked-trainable",
)
BASELINE_REV = "0b71927"  # main before the in-place weight gradient (issue 26, item 7)
TARGET_GIB = 1.0  # the bound on the step's peak above the model's memory (chunked path)


def full_token_losses(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, sample_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss as it was before the chunked path: full [N, V] logits, then fp32 cross-entropy."""
    from vlmtrain.models.loss import supervised_mask

    valid = supervised_mask(labels, sample_ids)
    logits = head(hidden[:, :-1][valid])
    return F.cross_entropy(logits.float(), labels[:, 1:][valid], reduction="none"), valid


def old_token_losses(rev: str):
    """`token_losses` of vlmtrain/models/loss.py at git revision `rev`, loaded as a module of its own."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        ["git", "-C", str(root), "show", f"{rev}:vlmtrain/models/loss.py"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"--baseline-rev {rev}: git cannot read vlmtrain/models/loss.py there: {proc.stderr}"
        )
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vlmtrain_loss_{rev}.py"
    path.write_text(proc.stdout)
    spec = importlib.util.spec_from_file_location(f"vlmtrain_loss_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.token_losses


def setup(args: argparse.Namespace, trainable: bool, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02)  # Qwen's initializer range
    head.requires_grad_(trainable)
    rows, tokens = args.rows, args.tokens
    prompt = tokens - args.supervised // rows  # unsupervised prefix per row (image + prompt)
    hidden = torch.randn(rows, tokens, args.hidden, device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (rows, tokens), device=device)
    labels[:, :prompt] = -100
    sample_ids = torch.ones(rows, tokens, dtype=torch.long, device=device)
    return head, hidden, labels, sample_ids


def probe(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this (fresh) process: the step's peak memory over the setup, and its step times."""
    from vlmtrain.models.loss import token_losses

    path, trainability = variant.split("-")
    device = torch.device(args.device)
    dtype = compute_dtype(args)
    head, hidden, labels, sample_ids = setup(args, trainability == "trainable", device, dtype)
    loss_fn = {"chunked": token_losses, "full": full_token_losses}.get(path) or old_token_losses(
        args.baseline_rev
    )

    def step() -> int:
        hidden.grad = None
        head.weight.grad = None
        losses, valid = loss_fn(hidden, head, labels, sample_ids)
        losses.sum().backward()
        return int(valid.sum())

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
        _reset_peak_rss()
    wall, cpu = [], []
    supervised = 0
    for _ in range(args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        supervised = step()
        if cuda:
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    grad_bytes = head.weight.numel() * head.weight.element_size() if trainability == "trainable" else 0
    return {
        "variant": variant,
        "method": "torch.cuda.max_memory_allocated" if cuda else "Linux VmHWM after clear_refs",
        "dtype": str(dtype).removeprefix("torch."),
        "supervised_tokens": supervised,
        "model_mib": base / 2**20,
        "step_peak_mib": (peak - base) / 2**20,
        "head_grad_mib": grad_bytes / 2**20,
        "step_peak_without_head_grad_mib": (peak - base - grad_bytes) / 2**20,
        "step_s": wall,
        "step_cpu_s": cpu,
    }


def run_probe(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    skip = ("probe", "out", "repeats", "variants")
    cmd = [sys.executable, __file__, "--probe", variant] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip and v is not None
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out = {}
    for variant, probes in runs.items():
        out[variant] = {
            "model_mib": statistics.median(p["model_mib"] for p in probes),
            "step_peak_mib": max(p["step_peak_mib"] for p in probes),
            "step_peak_without_head_grad_mib": max(p["step_peak_without_head_grad_mib"] for p in probes),
            "median_step_s": statistics.median(t for p in probes for t in p["step_s"]),
            "median_step_cpu_s": statistics.median(t for p in probes for t in p["step_cpu_s"]),
            "supervised_tokens": probes[0]["supervised_tokens"],
        }
    return out


def compute_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return torch.float32 if args.device == "cpu" else torch.bfloat16


def ratios(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """chunked / full and chunked / old, for each head trainability both variants of ran."""
    out = {}
    for trainability in ("frozen", "trainable"):
        chunked = summary.get(f"chunked-{trainability}")
        for other in ("full", "old"):
            base = summary.get(f"{other}-{trainability}")
            if chunked is None or base is None:
                continue
            key = f"{trainability}_{{}}_chunked_over_{other}"
            out[key.format("memory")] = chunked["step_peak_mib"] / base["step_peak_mib"]
            out[key.format("time")] = chunked["median_step_s"] / base["median_step_s"]
            out[key.format("cpu_time")] = chunked["median_step_cpu_s"] / base["median_step_cpu_s"]
    return out


def print_table(summary: dict[str, dict[str, float]], rat: dict[str, float]) -> None:
    print(f"{'variant':<20}{'step peak MiB':>15}{'w/o head grad':>15}{'step s':>10}{'cpu s':>10}")
    for name, s in summary.items():
        print(
            f"{name:<20}{s['step_peak_mib']:>15.0f}{s['step_peak_without_head_grad_mib']:>15.0f}"
            f"{s['median_step_s']:>10.2f}{s['median_step_cpu_s']:>10.2f}"
        )
    for key, value in rat.items():
        print(f"{key}: {value:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dtype", default=None, choices=["fp32", "bf16"], help="default fp32 on CPU, bf16 on CUDA"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="variants to run"
    )
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the `old` chunked loss")
    parser.add_argument("--vocab", type=int, default=151_936, help="LM head rows (Qwen2.5's vocabulary)")
    parser.add_argument("--hidden", type=int, default=896, help="LM width (Qwen2.5-0.5B)")
    parser.add_argument("--rows", type=int, default=4, help="rows of the micro-batch")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per row")
    parser.add_argument("--supervised", type=int, default=3072, help="supervised tokens of the micro-batch")
    parser.add_argument("--steps", type=int, default=1, help="steps per probe (the peak covers all)")
    parser.add_argument("--repeats", type=int, default=1, help="probes per variant, alternating variants")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--out", type=Path, default=None, help="default results/loss_memory_<device>.json")
    parser.add_argument("--probe", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.supervised % args.rows or args.supervised // args.rows >= args.tokens:
        raise SystemExit("--supervised must be a multiple of --rows and leave a prompt in every row")
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(args.probe, args)))
        return
    load = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for _ in range(args.repeats):
        for variant in args.variants:
            runs[variant].append(run_probe(variant, args))
            print(f"{variant}: {runs[variant][-1]['step_peak_mib']:.0f} MiB", flush=True)
    summary = summarize(runs)
    rat = ratios(summary)
    print_table(summary, rat)
    from vlmtrain.models.loss import CHUNK_BYTES, chunk_rows

    results = {
        "benchmark": "loss_memory",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": args.threads,
        "dtype": str(compute_dtype(args)).removeprefix("torch."),
        "baseline_rev": args.baseline_rev,
        "load_average_at_start": load,
        "shapes": {k: getattr(args, k) for k in ("vocab", "hidden", "rows", "tokens", "supervised")},
        "chunk_bytes": CHUNK_BYTES,
        "chunk_rows": chunk_rows(args.vocab),
        "fp32_logits_mib": args.supervised * args.vocab * 4 / 2**20,
        "target_step_peak_gib": TARGET_GIB,
        "summary": summary,
        "ratios": rat,
        "probes": runs,
    }
    default_dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    suffix = "" if compute_dtype(args) == default_dtype else f"_{args.dtype}"
    out = args.out or RESULTS / f"loss_memory_{args.device}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
