"""Benchmark: checkpoint save and load, sharded (every rank writes its part) against gathered (rank 0 writes all).

One torchrun job per engine builds a ~50M-parameter model (a stage-2 VLM: every group trains), takes one
optimizer step so that AdamW's moments exist, then saves and loads the same state through the trainer's own
`CheckpointWriter` / `load_checkpoint` + `Engine.load_pieces` in each format, alternating, `--repeats` times:

- save time, load time: the slowest rank's wall time (saves include the fsyncs and the COMPLETE commit);
  the gathered format is loaded as it was before sharded checkpoints (rank 0 reads both files whole,
  `Engine.load_state` broadcasts every tensor), the sharded one by `load_pieces` (each rank its ranges);
- bytes written per rank (the files each rank wrote);
- rank 0's peak host memory above its resident set at the start of the save / load (Linux VmHWM after
  /proc/self/clear_refs, bench_engines.MemoryProbe);
- for the asynchronous sharded save: the time training is blocked (host copy + thread start) and the
  time until the checkpoint is complete.

Before timing, each format's files are checked against the other (rank 0 reassembles every tensor of the
sharded checkpoint and compares it with the gathered one: exact equality), and a load must reproduce
the saved state.

    python benchmarks/bench_checkpoint.py                  # 4 gloo ranks on CPU, both engines
    python benchmarks/bench_checkpoint.py --engines deepspeed --repeats 1
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from bench_engines import CORPUS, MemoryProbe, Sizes, synthetic_batch, worker_env

RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("deepspeed", "fsdp")
# A Qwen2-shaped LM of ~50M parameters (the embedding alone 16M) and a small SigLIP tower: enough bytes
# that writing dominates the fixed costs, small enough for 4 CPU ranks.
MODERATE = Sizes(
    vision={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 8},
    language={"model_type": "qwen2", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1536,
              "num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 2,
              "max_position_embeddings": 512, "tie_word_embeddings": True, "rope_theta": 10000.0},
    micro_batch=1,
    text_tokens=16,
)  # fmt: skip


def stage_for(engine: str, world_size: int) -> Any:
    from vlmtrain.config.load import shipped_stage_path, stage_config_from_dict

    cfg = json.loads(shipped_stage_path(2).read_text())
    cfg["init_from"] = None
    cfg["model"] = {"vision": None, "vision_config": MODERATE.vision, "language": None,
                    "language_config": MODERATE.language, "attn_backend": "sdpa"}  # fmt: skip
    cfg["batch"] = {"global_batch_size": world_size, "micro_batch_size": 1}
    cfg["train"].update(engine=engine, precision="fp32", max_steps=10, gradient_checkpointing=False)
    return stage_config_from_dict(cfg, source="benchmark checkpoint stage")


def slowest(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def files_of_rank(path: Path, rank: int, world: int, fmt: str) -> list[Path]:
    from vlmtrain.train.shards import GATHERED_MOMENTS, GATHERED_WEIGHTS, rank_stem

    out = [path / f"rng-rank{rank:05d}.safetensors"]
    if fmt == "sharded":
        out += sorted(path.glob(f"{rank_stem(rank, world)}.*"))
    elif rank == 0:
        out += [path / GATHERED_WEIGHTS, path / GATHERED_MOMENTS, path / "trainer_state.json"]
    if fmt == "sharded" and rank == 0:
        out.append(path / "trainer_state.json")
    return out


def trim_heap() -> None:
    """Hand freed heap pages back to the OS, so that a measurement does not reuse the previous one's pages
    (which would hide its allocations from the resident-set peak)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_gathered(path: Path, is_main: bool) -> Any:
    """Today's gathered load: rank 0 reads both files whole into an EngineState that `load_state` broadcasts."""
    from safetensors.torch import load_file

    from vlmtrain.train.engines.base import EngineState
    from vlmtrain.train.shards import GATHERED_MOMENTS, GATHERED_WEIGHTS

    meta = json.loads((path / "trainer_state.json").read_text())
    state = EngineState(optimizer_steps=meta["optimizer_steps"], scheduler_steps=meta["scheduler_steps"])
    if is_main:
        state.params = load_file(str(path / GATHERED_WEIGHTS))
        moments = load_file(str(path / GATHERED_MOMENTS))
        for kind, target in (("exp_avg", state.exp_avg), ("exp_avg_sq", state.exp_avg_sq)):
            target.update({k[len(kind) + 1 :]: v for k, v in moments.items() if k.startswith(f"{kind}.")})
    return state


def run_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from vlmtrain.data.tokenizer import build_tokenizer
    from vlmtrain.dist import barrier, init_distributed
    from vlmtrain.models.freeze import apply_trainability
    from vlmtrain.models.loss import count_supervised
    from vlmtrain.models.vlm import VisionLanguageModel
    from vlmtrain.train import checkpoint as ckpt
    from vlmtrain.train.engines import make_engine
    from vlmtrain.train.optim import build_param_groups
    from vlmtrain.train.shards import KINDS

    ctx = init_distributed()
    torch.set_num_threads(1)
    stage = stage_for(args.engine, ctx.world_size)
    tokenizer = build_tokenizer(CORPUS * 20, vocab_size=320)
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(stage.model, tokenizer)
    apply_trainability(model, stage.modules)
    model.train()
    specs = build_param_groups(model, model.module_groups(), stage)
    engine = make_engine(args.engine, model=model, stage=stage, specs=specs, total_steps=10, ctx=ctx)
    batch = synthetic_batch(engine.module, MODERATE, ctx.rank, 0, ctx.device)
    tokens = ctx.world_size * count_supervised(batch["labels"], batch["sample_ids"])
    engine.begin_step(1)
    engine.backward(engine.forward(batch, stage.mask.mode).loss_sum, tokens)
    if not engine.step().boundary:
        raise RuntimeError("expected an optimizer step")
    trainable = sum(math.prod(p.shape) for _, p in engine.trainable_named_parameters())

    root = Path(args.work) / args.engine
    probe = MemoryProbe(ctx.device)
    rows: dict[str, list[dict[str, float]]] = {"gathered": [], "sharded": [], "sharded_async": []}
    step = 0
    for repeat in range(args.repeats):
        for fmt in ("gathered", "sharded", "sharded_async"):
            step += 1
            writer = ckpt.CheckpointWriter(
                root / fmt, ctx, keep=1, fmt="gathered" if fmt == "gathered" else "sharded",
                asynchronous=fmt == "sharded_async",
            )  # fmt: skip
            barrier()
            trim_heap()
            probe.start()
            t0 = time.perf_counter()
            path = writer.save(step, engine, {"stage": "bench"}, wait=fmt != "sharded_async")
            blocked = time.perf_counter() - t0
            writer.finish()
            save_s = time.perf_counter() - t0
            save_mib = probe.peak_mib() - probe.base_mib
            written = sum(p.stat().st_size for p in files_of_rank(path, ctx.rank, ctx.world_size, writer.fmt))
            barrier()
            trim_heap()
            probe.start()
            t0 = time.perf_counter()
            if fmt == "gathered":
                engine.load_state(load_gathered(path, ctx.is_main))  # the load before sharded checkpoints
            else:
                loaded = ckpt.load_checkpoint(path, ctx)
                engine.load_pieces(loaded.state, loaded.optimizer_steps, loaded.scheduler_steps)
            load_s = time.perf_counter() - t0
            load_mib = probe.peak_mib() - probe.base_mib
            per_rank = torch.tensor([float(written)] * 1, dtype=torch.float64)
            gathered_bytes = [torch.zeros(1, dtype=torch.float64) for _ in range(ctx.world_size)]
            dist.all_gather(gathered_bytes, per_rank)
            rows[fmt].append({
                "save_s": slowest(save_s, ctx.device),
                "blocked_s": slowest(blocked, ctx.device),
                "load_s": slowest(load_s, ctx.device),
                "rank0_save_peak_mib": save_mib,
                "rank0_load_peak_mib": load_mib,
                "bytes_per_rank": [int(b.item()) for b in gathered_bytes],
            })  # fmt: skip
            if repeat == 0 and fmt == "sharded" and ctx.is_main:
                # The two formats hold the same state: every tensor, reassembled from the rank files, equals
                # the gathered one bitwise.
                gathered = ckpt.open_state(root / "gathered" / ckpt.checkpoint_name(step - 1))
                sharded = ckpt.open_state(path)
                assert sorted(gathered.names()) == sorted(sharded.names())
                for name in gathered.names():
                    for kind in KINDS:
                        if not torch.equal(gathered.full(kind, name), sharded.full(kind, name)):
                            raise AssertionError(
                                f"sharded {kind}.{name} differs from the gathered checkpoint"
                            )
    if ctx.is_main:
        summary = {
            fmt: {
                "save_s_median": statistics.median(r["save_s"] for r in runs),
                "blocked_s_median": statistics.median(r["blocked_s"] for r in runs),
                "load_s_median": statistics.median(r["load_s"] for r in runs),
                "rank0_save_peak_mib_max": max(r["rank0_save_peak_mib"] for r in runs),
                "rank0_load_peak_mib_max": max(r["rank0_load_peak_mib"] for r in runs),
                "bytes_per_rank": runs[0]["bytes_per_rank"],
                "runs": runs,
            }
            for fmt, runs in rows.items()
        }
        record = {"engine": args.engine, "trainable_parameters": trainable, "formats": summary}
        Path(args.out).write_text(json.dumps(record, indent=2))
    barrier()
    dist.destroy_process_group()


def run_job(args: argparse.Namespace, engine: str, tmp: Path) -> dict[str, Any]:
    out, log = tmp / f"{engine}.json", tmp / f"{engine}.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
        str(Path(__file__).resolve()), "--worker", "--engine", engine, "--out", str(out),
        "--work", str(tmp / "ckpt"), "--repeats", str(args.repeats),
    ]  # fmt: skip
    with open(log, "w") as f:
        code = subprocess.call(cmd, env=worker_env("cpu", 1), stdout=f, stderr=subprocess.STDOUT)
    if code != 0 or not out.is_file():
        raise SystemExit(f"{engine} benchmark failed (exit {code}); its output:\n{log.read_text()[-6000:]}")
    return json.loads(out.read_text())


def print_table(results: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="checkpoint save / load on CPU ranks (slowest rank; rank 0's peak above its start)")
    cols = ("engine", "format", "save s", "blocked s", "load s", "MB/rank (r0, others)", "r0 save MiB",
            "r0 load MiB")  # fmt: skip
    for c in cols:
        table.add_column(c, justify="left" if c in ("engine", "format") else "right")
    for engine, r in results.items():
        for fmt, s in r["formats"].items():
            b = s["bytes_per_rank"]
            table.add_row(
                engine, fmt, f"{s['save_s_median']:.2f}", f"{s['blocked_s_median']:.2f}", f"{s['load_s_median']:.2f}",
                f"{b[0] / 1e6:.0f}, {max(b[1:], default=0) / 1e6:.0f}", f"{s['rank0_save_peak_mib_max']:.0f}",
                f"{s['rank0_load_peak_mib_max']:.0f}",
            )  # fmt: skip
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "checkpoint_cpu.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_", dir=os.environ.get("BENCH_TMP")) as tmp:
        results = {e: run_job(args, e, Path(tmp)) for e in args.engines}
    print_table(results)
    record = {
        "benchmark": "bench_checkpoint",
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "ranks": args.ranks,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "model": asdict(MODERATE),
        "engines": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
