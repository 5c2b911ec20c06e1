"""Benchmark: bytes each engine config communicates per optimizer step, and the host reads each step makes.

Every config trains the same random-init model (bench_engines' tiny shapes, shipped stage 2: everything trains)
through the trainer's own loop (`Trainer.fit`) on 2 gloo ranks, with every torch.distributed collective (and so
DeepSpeed's, which call them) wrapped to count its payload (vlmtrain.train.comm_meter.CommMeter), and the
host's reads of tensor values counted (HostReadMeter) outside the forward and backward (those run on the meta
device in tests/test_hot_path.py: no read) and the CPU batch prologue. The figures are per optimizer step, from
the steps after the first (lazy initialisation) and before the last (final flush), and are compared with
`vlmtrain plan`'s hand count (vlmtrain.train.plan.step_communication) on the same model.

Configs: DeepSpeed ZeRO-2 (`zero2_bf16`, the default: reduces every micro-batch), ZeRO-1 (`zero1_bf16`: reduces
once at the boundary), FSDP2 (gradient sync only on the window's last micro-batch).

    python benchmarks/bench_comm.py                     # 2 gloo ranks, tiny model; writes results/comm_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import CORPUS, TINY, Sizes, synthetic_batch

RESULTS = Path(__file__).resolve().parent / "results"
SMALL = Sizes(
    vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": 32, "patch_size": 8},
    language={"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": True, "rope_theta": 10000.0},
    micro_batch=2,
    text_tokens=16,
)  # fmt: skip
"""The tests' shapes (tests/test_step_sync.py): the same layout at a size that runs in seconds."""
SIZES = {"tiny": TINY, "small": SMALL}
CONFIGS: dict[str, tuple[str, str | None]] = {  # name -> (train.engine, train.ds_config)
    "zero2": ("deepspeed", "zero2_bf16"),
    "zero1": ("deepspeed", "zero1_bf16"),
    "fsdp": ("fsdp", None),
}


def stage_for(
    config: str, sizes: Sizes, world_size: int, accumulation: int, steps: int, log_every: int
) -> Any:
    from vlmtrain.config.load import shipped_stage_path, stage_config_from_dict

    engine, ds = CONFIGS[config]
    cfg = json.loads(shipped_stage_path(2).read_text())
    cfg["init_from"] = None
    cfg["model"] = {"vision": None, "vision_config": sizes.vision, "language": None,
                    "language_config": sizes.language, "attn_backend": "sdpa"}  # fmt: skip
    micro = sizes.micro_batch
    cfg["batch"] = {"global_batch_size": micro * world_size * accumulation, "micro_batch_size": micro}
    cfg["train"].update(engine=engine, max_steps=steps, log_every=log_every, save_every=0, tensorboard=False)
    if ds is not None:
        cfg["train"]["ds_config"] = ds
    return stage_config_from_dict(cfg, source=f"bench_comm {config}")


class MemoryLoader:
    """The trainer's loader interface over a fixed list of CPU micro-batches, cycled."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches

    def data_faults(self) -> dict[str, Any]:
        return {"base": {}, "skipped": {}, "corrupt_shards": []}


def measure(
    config: str, sizes: Sizes, accumulation: int, steps: int, log_every: int, out_dir: Path, comm: Any
) -> dict[str, Any]:
    """One config through Trainer.fit on this process's ranks; per-step bytes by op (`comm`, a CommMeter
    installed before the process group) and host reads."""
    from vlmtrain.data.tokenizer import build_tokenizer
    from vlmtrain.dist import init_distributed
    from vlmtrain.models.freeze import apply_trainability
    from vlmtrain.models.vlm import VisionLanguageModel
    from vlmtrain.train import trainer as trainer_module
    from vlmtrain.train.comm_meter import HostReadMeter
    from vlmtrain.train.engines import base
    from vlmtrain.train.engines.deepspeed import DeepSpeedEngine
    from vlmtrain.train.engines.fsdp import FSDPEngine
    from vlmtrain.train.plan import block_trainable
    from vlmtrain.train.trainer import Trainer

    ctx = init_distributed()
    stage = stage_for(config, sizes, ctx.world_size, accumulation, steps, log_every)
    tokenizer = build_tokenizer(CORPUS * 20, vocab_size=320)
    torch.manual_seed(stage.train.seed)
    model = VisionLanguageModel.from_config(stage.model, tokenizer)
    apply_trainability(model, stage.modules)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cpu = torch.device("cpu")
    raw = []
    for i in range(accumulation):
        b = synthetic_batch(model, sizes, ctx.rank, i, cpu)
        rows = b["input_ids"].shape[0]
        raw.append(
            {**b, "num_tokens": torch.tensor(b["input_ids"].numel()), "num_samples": torch.tensor(rows)}
        )
    host = [t for b in raw for t in b.values()]
    engines: list[Any] = []

    class MeasuredTrainer(Trainer):
        """The trainer with its checkpoint writes left out: this benchmark measures steps."""

        def _build_engine(self) -> Any:
            engines.append(super()._build_engine())
            return engines[-1]

        def _save(self, *args: Any, **kwargs: Any) -> Path:
            return self.ckpt_root

        def _write_output(self, *args: Any, **kwargs: Any) -> Path:
            return self.stage_dir

    def host_tensors() -> list[torch.Tensor]:
        # CPU by design in a GPU run too: the batches and AdamW's step counters (non-capturable AdamW).
        states = engines[0].optimizer.state.values() if engines else []
        return host + [s["step"] for s in states if "step" in s]

    reads = HostReadMeter(host_tensors)
    marks: list[tuple[dict[str, list[int]], int]] = []
    syncs: list[int] = []
    open_step, step_sync = Trainer.open_step, trainer_module.step_sync

    def marked_open_step(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        marks.append((comm.snapshot(), reads.count))
        return open_step(self, *args, **kwargs)

    def counted_sync(*args: Any, **kwargs: Any) -> Any:
        syncs.append(len(marks))
        return step_sync(*args, **kwargs)

    def paused(fn: Any) -> Any:
        """Leave a call out of the read count: proven sync-free on meta, or CPU-batch work by design."""

        def call(*args: Any, **kwargs: Any) -> Any:
            with reads.paused():
                return fn(*args, **kwargs)

        return call

    patches = [
        (Trainer, "open_step", marked_open_step),
        (trainer_module, "step_sync", counted_sync),
        (trainer_module, "supervised_index", paused(trainer_module.supervised_index)),
        (Trainer, "_step_flops", paused(Trainer._step_flops)),
        (Trainer, "_to_device", paused(Trainer._to_device)),
        (Trainer, "_step_batches", paused(Trainer._step_batches)),
    ]
    for cls in (DeepSpeedEngine, FSDPEngine):
        patches += [(cls, "forward", paused(cls.forward)), (cls, "backward", paused(cls.backward))]
    patches.append((base.Engine, "blank_batch", paused(base.Engine.blank_batch)))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, fn in patches:
        setattr(obj, name, fn)
    try:
        trainer = MeasuredTrainer(
            stage, out_dir / config, ctx, model.train(), tokenizer, lambda state: MemoryLoader(raw), steps
        )
        with reads.active():
            trainer.fit()
    finally:
        for obj, name, fn in reversed(saved):
            setattr(obj, name, fn)
    per_step = []
    for (before, reads_before), (after, reads_after) in itertools.pairwise(marks[1:]):
        ops = {
            op: [v[0] - before.get(op, [0, 0])[0], v[1] - before.get(op, [0, 0])[1]]
            for op, v in after.items()
        }
        per_step.append(
            {"ops": {k: v for k, v in ops.items() if v[0]}, "host_reads": reads_after - reads_before}
        )
    return {
        "config": config,
        "engine": CONFIGS[config][0],
        "ds_config": CONFIGS[config][1],
        "world_size": ctx.world_size,
        "accumulation": accumulation,
        "trainable_parameters": trainable,
        "block_parameters": block_trainable(model),
        "steps": per_step,  # steps 2 .. N-1, each from its open_step to the next one's
        "step_syncs_per_step": [syncs.count(i) for i in range(1, len(marks) + 1)],
        "read_sites": dict(reads.sites),
    }


def run_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from vlmtrain.train.comm_meter import CommMeter

    torch.set_num_threads(args.threads)
    results = {}
    with (
        CommMeter().installed() as comm
    ):  # before measure's init_distributed: DeepSpeed binds the functions then
        for config in args.configs:
            results[config] = measure(
                config, SIZES[args.sizes], args.accumulation, args.steps, args.log_every, Path(args.tmp), comm
            )
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(results, indent=2))
        dist.barrier()
        dist.destroy_process_group()


def worker_command(args: argparse.Namespace, out: Path, tmp: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
        str(Path(__file__).resolve()), "--worker", "--out", str(out), "--tmp", str(tmp),
        "--steps", str(args.steps), "--accumulation", str(args.accumulation), "--log-every", str(args.log_every),
        "--threads", str(args.threads), "--sizes", args.sizes, "--configs", *args.configs,
    ]  # fmt: skip


def run_job(args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_comm_") as tmp:
        out = Path(tmp) / "comm.json"
        proc = subprocess.run(worker_command(args, out, Path(tmp)), env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(
                f"bench_comm failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
            )
        return json.loads(out.read_text())


def with_plan(result: dict[str, Any]) -> dict[str, Any]:
    """The measured gradient and parameter bytes of a step next to `vlmtrain plan`'s hand count."""
    from vlmtrain.train.plan import step_communication

    step = result["steps"][-1]["ops"]
    ops = {k: v for k, v in step.items() if k not in ("all_gather_object", "broadcast_object_list")}
    hand = step_communication(
        result["trainable_parameters"], result["accumulation"], result["world_size"], "nvlink",
        engine=result["config"], block_trainable=result["block_parameters"],
    )  # fmt: skip
    return {
        **result,
        "measured_bytes_per_step": sum(b for _, b in ops.values()),
        "plan_bytes_per_step": hand.reduce_bytes + hand.gather_bytes + hand.step_sync_bytes,
        "plan": {
            "reduce_bytes": hand.reduce_bytes,
            "gather_bytes": hand.gather_bytes,
            "step_sync_bytes": hand.step_sync_bytes,
        },
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per config (>= 4)")
    parser.add_argument("--accumulation", type=int, default=3, help="micro-batches per optimizer step")
    parser.add_argument("--log-every", type=int, default=2, help="train.log_every: the per-rank log gathers")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    parser.add_argument(
        "--sizes", choices=tuple(SIZES), default="tiny", help="model shapes (small: the tests')"
    )
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default results/comm_cpu.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    results = {name: with_plan(r) for name, r in run_job(args).items()}
    for name, r in results.items():
        reads = [s["host_reads"] for s in r["steps"]]
        print(f"{name}: measured {r['measured_bytes_per_step']:,} B/step, plan {r['plan_bytes_per_step']:,} B/step, "
              f"host reads per step {reads}")  # fmt: skip
    record = {"benchmark": "bench_comm", "device": "cpu", "ranks": args.ranks, "torch": torch.__version__, "sizes": args.sizes,
              "steps": args.steps, "accumulation": args.accumulation, "log_every": args.log_every,
              "configs": results}  # fmt: skip
    out = args.out or RESULTS / "comm_cpu.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
