"""Benchmark: optimizer-step time and peak memory of the DeepSpeed ZeRO-2 and FSDP2 engines, side by side.

Both engines train the same random-init model (same seed) on the same synthetic batches with the same
stage config (shipped stage 2 by default: every group trains, bf16, gradient checkpointing, per-group
AdamW), built and driven exactly as the trainer does: `make_engine`, then `forward` / `backward` / `step`
for every micro-batch of an accumulation window. Each engine runs in its own torchrun job, so peak memory
is that engine's alone.

Memory per rank: on CPU the peak resident set during engine setup and steps (Linux VmHWM, reset after the
model is built via /proc/self/clear_refs) and the resident set before the engine (`model` column); on CUDA
torch.cuda.max_memory_allocated over the same span and the allocation before the engine. The table shows the
largest rank. Step time: the median over the timed steps of the slowest rank's wall time per optimizer step.

    python benchmarks/bench_engines.py                            # 2 gloo ranks on CPU, tiny model
    python benchmarks/bench_engines.py --device cuda --real-sizes # 1 GPU, SigLIP-so400m + Qwen2.5-0.5B shapes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ENGINES = ("deepspeed", "fsdp")
RESULTS = Path(__file__).resolve().parent / "results"
CORPUS = ["a red circle on the left", "two blue squares at the top", "describe the image in detail"]


@dataclass(frozen=True)
class Sizes:
    """Model shapes (random init, built from configs: nothing is downloaded) and the per-rank batch."""

    vision: dict[str, Any]
    """SiglipVisionConfig keyword arguments."""
    language: dict[str, Any]
    """Qwen2Config keyword arguments."""
    micro_batch: int
    """Rows per micro-batch on each rank."""
    text_tokens: int
    """Supervised text tokens per row, after the image tokens."""


TINY = Sizes(
    vision={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 64, "patch_size": 8},
    language={"model_type": "qwen2", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 1024,
              "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
              "max_position_embeddings": 1024, "tie_word_embeddings": True, "rope_theta": 10000.0},
    micro_batch=4,
    text_tokens=64,
)  # fmt: skip
# google/siglip-so400m-patch14-224 (vision tower) and Qwen/Qwen2.5-0.5B, as their config.json files give them.
REAL = Sizes(
    vision={"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
            "image_size": 224, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
    language={"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "tie_word_embeddings": True, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6},
    micro_batch=8,
    text_tokens=256,
)  # fmt: skip


# ---- worker: one engine, one torchrun job ---------------------------------------------------------


def stage_for(args: argparse.Namespace, sizes: Sizes, world_size: int) -> Any:
    """The shipped stage with the benchmark's model, batch and engine; everything else as shipped."""
    from vlmtrain.config.load import shipped_stage_path, stage_config_from_dict

    cfg = json.loads(shipped_stage_path(args.stage).read_text())
    cfg["init_from"] = None
    cfg["model"] = {"vision": None, "vision_config": sizes.vision, "language": None,
                    "language_config": sizes.language, "attn_backend": "sdpa"}  # fmt: skip
    micro = sizes.micro_batch
    cfg["batch"] = {"global_batch_size": micro * world_size * args.accumulation, "micro_batch_size": micro}
    cfg["train"].update(engine=args.engine, precision=args.precision, max_steps=args.warmup + args.steps)
    return stage_config_from_dict(cfg, source=f"benchmark stage {args.stage}")


def synthetic_batch(
    model: Any, sizes: Sizes, rank: int, index: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Rows of image tokens then text, every text token after the first supervised; no padding."""
    gen = torch.Generator().manual_seed(1000 * rank + index)
    rows, p, t = sizes.micro_batch, model.num_image_tokens, sizes.text_tokens
    vocab = model.language.get_input_embeddings().num_embeddings
    text = torch.randint(10, vocab, (rows, t), generator=gen)
    input_ids = torch.cat([torch.full((rows, p), model.image_token_id), text], dim=1)
    labels = input_ids.clone()
    labels[:, : p + 1] = -100
    flags = torch.zeros_like(input_ids, dtype=torch.bool)
    flags[:, :p] = True
    size = model.vision.config.image_size
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "image_flags": flags,
        "sample_ids": torch.ones_like(input_ids),
        "position_ids": torch.arange(p + t).expand(rows, -1).clone(),
        "pixel_values": torch.randn(rows, 3, size, size, generator=gen),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class MemoryProbe:
    """Peak memory of this rank from `start()` on, against the memory in use at `start()`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = (
            "torch.cuda.max_memory_allocated" if device.type == "cuda" else "Linux VmHWM after clear_refs"
        )
        self.base_mib = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mib = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.base_mib = _status_kib("VmRSS") / 1024

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _status_kib("VmHWM") / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from vlmtrain.data.tokenizer import build_tokenizer
    from vlmtrain.dist import init_distributed
    from vlmtrain.models.freeze import apply_trainability
    from vlmtrain.models.loss import count_supervised
    from vlmtrain.models.vlm import VisionLanguageModel
    from vlmtrain.train.engines import make_engine
    from vlmtrain.train.optim import build_param_groups

    ctx = init_distributed()
    if ctx.device.type == "cpu":
        torch.set_num_threads(args.threads)
    sizes = REAL if args.real_sizes else TINY
    stage = stage_for(args, sizes, ctx.world_size)
    tokenizer = build_tokenizer(CORPUS * 20, vocab_size=320)
    torch.manual_seed(stage.train.seed)
    model = VisionLanguageModel.from_config(stage.model, tokenizer)
    apply_trainability(model, stage.modules)
    if stage.train.gradient_checkpointing:  # as the trainer does before it builds the engine
        kwargs = {"use_reentrant": False}
        model.language.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if stage.modules["vision"].trainable:
            model.vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train().to(ctx.device)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = [synthetic_batch(model, sizes, ctx.rank, i, ctx.device) for i in range(args.accumulation)]
    probe = MemoryProbe(ctx.device)
    probe.start()

    specs = build_param_groups(model, model.module_groups(), stage)
    engine = make_engine(
        args.engine, model=model, stage=stage, specs=specs, total_steps=args.warmup + args.steps, ctx=ctx
    )
    times, losses = [], []
    # The trainer all-reduces the step's supervised-token count; here every rank's batches have the same shape.
    step_tokens = ctx.world_size * sum(count_supervised(b["labels"], b["sample_ids"]) for b in batches)
    for step in range(args.warmup + args.steps):
        sync(ctx.device)
        start = time.perf_counter()
        for batch in batches:
            out = engine.forward(batch, stage.mask.mode)
            engine.backward(out.loss_sum, step_tokens)
            result = engine.step()
        sync(ctx.device)
        elapsed = time.perf_counter() - start
        if not result.boundary or result.skipped:
            raise RuntimeError(f"step {step}: {result}")
        losses.append(float(out.loss.detach()))
        if step >= args.warmup:
            times.append(elapsed)
    peak = probe.peak_mib()

    # The slowest rank sets the pace; report it, and the largest memory of any rank.
    stats = torch.tensor([*times, peak, probe.base_mib], dtype=torch.float64, device=ctx.device)
    if dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    stats = stats.cpu().tolist()
    step_times, peak_mib, base_mib = stats[: len(times)], stats[-2], stats[-1]
    if ctx.is_main:
        tokens = (
            ctx.world_size
            * args.accumulation
            * sizes.micro_batch
            * (model.num_image_tokens + sizes.text_tokens)
        )
        samples = ctx.world_size * args.accumulation * sizes.micro_batch
        median = statistics.median(step_times)
        result_record = {
            "engine": args.engine,
            "step_time_s_median": median,
            "step_time_s_all": step_times,
            "tokens_per_s": tokens / median,
            "samples_per_s": samples / median,
            "peak_mib": peak_mib,
            "model_mib": base_mib,
            "engine_and_steps_mib": peak_mib - base_mib,
            "memory_method": probe.method,
            "parameters": params,
            "trainable_parameters": trainable,
            "losses": losses,
        }
        Path(args.out).write_text(json.dumps(result_record, indent=2))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- driver: one job per engine, then the table -------------------------------------------------


def worker_command(args: argparse.Namespace, engine: str, out: Path) -> list[str]:
    worker = [
        str(Path(__file__).resolve()), "--worker", "--engine", engine, "--out", str(out),
        "--device", args.device, "--stage", str(args.stage), "--precision", args.precision,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--accumulation", str(args.accumulation),
        "--threads", str(args.threads),
    ] + (["--real-sizes"] if args.real_sizes else [])  # fmt: skip
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.ranks}",
        *worker,
    ]


def worker_env(device: str, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU benchmark must not pick up a GPU
    return env


def run_engine_job(args: argparse.Namespace, engine: str, tmp: Path) -> dict[str, Any]:
    out, log = tmp / f"{engine}.json", tmp / f"{engine}.log"
    with open(log, "w") as f:
        code = subprocess.call(worker_command(args, engine, out), env=worker_env(args.device, args.threads),
                               stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    if code != 0 or not out.is_file():
        raise SystemExit(f"{engine} benchmark failed (exit {code}); its output:\n{log.read_text()[-6000:]}")
    return json.loads(out.read_text())


def print_table(results: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="engines: one optimizer step (all micro-batches of the window)")
    for col in (
        "engine",
        "step time (s)",
        "tokens/s",
        "samples/s",
        "peak MiB",
        "model MiB",
        "engine+steps MiB",
    ):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for name, r in results.items():
        table.add_row(
            name, f"{r['step_time_s_median']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['samples_per_s']:.1f}",
            f"{r['peak_mib']:.0f}", f"{r['model_mib']:.0f}", f"{r['engine_and_steps_mib']:.0f}",
        )  # fmt: skip
    Console(width=120).print(table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ranks", type=int, default=None, help="processes (default: 2 on CPU, 1 on CUDA)")
    parser.add_argument("--real-sizes", action="store_true", help="SigLIP-so400m + Qwen2.5-0.5B shapes")
    parser.add_argument("--stage", type=int, default=2, help="shipped stage whose trainable groups to use")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per rank")
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default results/engines_<device>.json)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ranks is None:
        args.ranks = 2 if args.device == "cpu" else 1
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.ranks)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    with tempfile.TemporaryDirectory(prefix="bench_engines_") as tmp:
        results = {e: run_engine_job(args, e, Path(tmp)) for e in ENGINES}
    print_table(results)
    sizes = REAL if args.real_sizes else TINY
    record = {
        "benchmark": "bench_engines",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine(),
        "ranks": args.ranks,
        "threads_per_rank": args.threads,
        "torch": torch.__version__,
        "stage": args.stage,
        "precision": args.precision,
        "accumulation": args.accumulation,
        "steps": args.steps,
        "warmup": args.warmup,
        "sizes": "real" if args.real_sizes else "tiny",
        "model": asdict(sizes),
        "engines": results,
        "fsdp_over_deepspeed_step_time": results["fsdp"]["step_time_s_median"] / results["deepspeed"]["step_time_s_median"],
        "fsdp_over_deepspeed_peak_memory": results["fsdp"]["peak_mib"] / results["deepspeed"]["peak_mib"],
    }  # fmt: skip
    out = args.out or RESULTS / f"engines_{args.device}{'_real' if args.real_sizes else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
