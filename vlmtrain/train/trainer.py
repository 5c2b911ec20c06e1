"""The training loop for one stage, independent of the engine: steps, metrics, checkpoints, preemption."""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from safetensors.torch import save_file

from vlmtrain.config.load import STAGE_CONFIG_NAME, stage_config_to_dict
from vlmtrain.config.schema import StageConfig
from vlmtrain.data.collate import MODEL_KEYS
from vlmtrain.data.stream import merge_data_faults
from vlmtrain.dist import DistContext, barrier, gather_objects, step_sync
from vlmtrain.durable import fsync_tree, replace_durably, write_text_durably
from vlmtrain.logging import MetricsWriter, WandbSink, console_for, loss_curve, plot_loss_curves
from vlmtrain.models.compile import apply_compile
from vlmtrain.models.freeze import TABLE_COLUMNS, trainability_rows
from vlmtrain.models.lora import LoraBaseMismatch, lora_state, save_lora_output
from vlmtrain.models.loss import supervised_index
from vlmtrain.models.noise import corrupt_text_tokens, ordinary_token_ids
from vlmtrain.models.vlm import CONFIG_NAME, WEIGHTS_NAME, VisionLanguageModel
from vlmtrain.precision import cpu_bf16_warning
from vlmtrain.train import checkpoint as ckpt
from vlmtrain.train.batching import lr_scale
from vlmtrain.train.engines import Engine, make_engine
from vlmtrain.train.flops import FlopCount, StepFlopModel, resolve_peak_tflops, throughput
from vlmtrain.train.optim import build_param_groups
from vlmtrain.train.plan import auto_recompute
from vlmtrain.train.step_timer import StepTimer, peak_memory_gib
from vlmtrain.train.validation import Validator

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the SLURM scripts requeue the job on this status
FINAL = "final"
DONE_MARKER = "STAGE_COMPLETE"
PRECISION_NAME = "precision.json"  # the stage's precision policy, in its output folder


class Preempted(SystemExit):
    """Raised after a preemption checkpoint; exits the process with PREEMPTED_EXIT_CODE."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.checkpoint = checkpoint


class TooManyBadSteps(RuntimeError):
    """Consecutive non-finite steps exceeded `train.max_bad_steps`."""


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, checkpoints and exits.

    Installed once for the whole run (before any model loads), so a signal during loading or between
    stages is kept rather than killing the process; the next training step acts on it.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def installed(self) -> bool:
        return bool(self._previous)


PREEMPTION = PreemptionFlag()


@dataclass
class StageResult:
    output: Path
    steps: int
    skipped_nonfinite: int
    metrics: Path
    resumed_from: Path | None


LoaderFactory = Callable[
    [dict[str, Any] | None], Any
]  # reader state -> iterable of batches with state_dict()
Fault = Callable[[int, int, torch.Tensor], torch.Tensor]  # (step, micro, loss) -> loss; tests inject NaNs


@dataclass
class OpenStep:
    """A step's CPU micro-batches, taken from the loader, and what the step sync returned for them."""

    raws: list[dict[str, Any]]
    indices: list[torch.Tensor]  # each micro-batch's supervised positions, computed on the CPU
    n_micro: int  # micro-batches every rank runs
    label_tokens: int  # supervised tokens of the step, all ranks: each micro-batch's loss weight
    tokens: int
    samples: int
    positions: int  # row positions (padding included) of the step's data micro-batches, all ranks
    model_flops: float
    hardware_flops: float
    preempt: bool  # some rank was asked to stop: finish this step, checkpoint, exit
    # the carried values (the previous step's loss sum and grad norm), summed over ranks
    previous: list[float]
    timer: StepTimer


@dataclass
class PendingStep:
    """A run step whose device values are not read yet: the next step sync (or a flush) reads `carried`."""

    step: int  # optimizer steps done, this one included
    carried: torch.Tensor  # [this rank's loss sum, the grad norm on rank 0 (0 elsewhere)], on the device
    opened: OpenStep
    lrs: dict[str, float]
    seconds: float  # host wall time of the step
    peak_gib: float | None


def stable_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def is_stage_complete(stage_dir: Path) -> bool:
    return (stage_dir / FINAL / DONE_MARKER).is_file()


class Trainer:
    """Trains one stage. The model arrives with trainability already applied (models.freeze)."""

    def __init__(
        self,
        stage: StageConfig,
        stage_dir: Path,
        ctx: DistContext,
        model: VisionLanguageModel,
        tokenizer: Any,
        make_loader: LoaderFactory,
        total_steps: int,
        fault: Fault | None = None,
        validator: Validator | None = None,
    ) -> None:
        self.stage, self.stage_dir, self.ctx = stage, stage_dir, ctx
        self.model, self.tokenizer, self.make_loader = model, tokenizer, make_loader
        self.total_steps = total_steps
        self.fault = fault
        self.validator = validator
        self.console = console_for(ctx.is_main)
        self.ckpt_root = stage_dir / "checkpoints"
        # len(tokenizer), not the embedding rows: Qwen pads its embedding matrix past the last real token.
        self.noise_pool = ordinary_token_ids(len(tokenizer), set(tokenizer.all_special_ids))

    # ---- setup --------------------------------------------------------------------------------------
    def _frozen_originals(self) -> dict[str, torch.Tensor]:
        """Frozen weights as they came in (before the engine casts to bf16); rank 0 writes them out."""
        if not self.ctx.is_main or lora_state(self.model) is not None:
            return {}  # a LoRA output holds no frozen base (vlmtrain.models.lora)
        return {
            n: p.detach().float().cpu().clone()
            for n, p in self.model.named_parameters()
            if not p.requires_grad
        }

    def _enable_checkpointing(self) -> dict[str, bool]:
        """Set activation recompute on each tower as `train.gradient_checkpointing` says; returns the plan.

        `auto` recomputes a tower only where its weights train, and only when `vlmtrain plan`'s memory
        estimate of the micro-batch does not fit the device without it (vlmtrain.train.plan.choose_recompute;
        the decision and its estimates are logged); on CPU without `train.device_memory_gib` every trained
        tower recomputes. A frozen LM (stages 0-1) passes the projector's gradient back and stores
        activations for it, but recomputing them adds an LM forward to a step whose backward computes no LM
        weight gradients (+32% step time measured on CPU), and those stages hold no LM gradients or optimizer
        state, so the memory is there (benchmarks/README.md, "Recompute"). `true` also recomputes a frozen LM.
        A frozen vision tower runs under no_grad and stores nothing, so it never recomputes.
        """
        policy, modules = self.stage.train.gradient_checkpointing, self.stage.modules
        if policy == "auto":
            choice = auto_recompute(self.stage, self.model, self.ctx.world_size, self.ctx.device)
            self.console.print(choice.describe())
            plan = {"language": "language" in choice.towers, "vision": "vision" in choice.towers}
        else:
            plan = {"language": policy, "vision": policy and modules["vision"].trainable}
        towers = {"language": self.model.language, "vision": self.model.vision}
        for name, on in plan.items():
            if on:
                towers[name].activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False},
                    every_n_layers=self.stage.train.checkpoint_every_n_layers,
                )
            else:
                towers[name].activation_checkpointing_disable()
        return plan

    def _build_engine(self) -> Engine:
        specs = build_param_groups(self.model, self.model.module_groups(), self.stage)
        return make_engine(
            self.stage.train.engine,
            model=self.model,
            stage=self.stage,
            specs=specs,
            total_steps=self.total_steps,
            ctx=self.ctx,
        )

    # ---- steps --------------------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, Any], index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's inputs on the device, with the CPU-computed supervised positions: no host sync."""
        if self.ctx.device.type != "cpu":  # the model checks this itself only on CPU tensors
            pixels = batch.get("pixel_values")
            self.model.check_image_slots(batch["image_flags"], 0 if pixels is None else pixels.shape[0])
        out = {k: batch[k].to(self.ctx.device, non_blocking=True) for k in MODEL_KEYS if k in batch}
        out["supervised_index"] = index.to(self.ctx.device, non_blocking=True)
        return out

    def noisy_inputs(self, raw: dict[str, Any], step: int, micro: int) -> dict[str, Any]:
        """The CPU micro-batch with stage-0 input noise applied (labels keep the clean tokens).

        Runs on the CPU tensors before the host-to-device copy, so the noise costs no device sync and no
        round trip; the generator is seeded by (seed, step, micro-batch, rank), so a resumed run draws the
        same noise.
        """
        ratio = self.stage.mask.noise_ratio
        if ratio <= 0:
            return raw
        gen = torch.Generator().manual_seed(
            stable_seed(self.stage.train.seed, "noise", step, micro, self.ctx.rank)
        )
        noisy, _ = corrupt_text_tokens(
            raw["input_ids"], raw["sample_ids"], raw["image_flags"], ratio, self.noise_pool, gen
        )
        return {**raw, "input_ids": noisy}

    def open_step(
        self,
        engine: Engine,
        batches: Iterator[dict[str, Any]],
        step: int,
        carried: torch.Tensor | None = None,
        preempt: bool = False,
    ) -> OpenStep:
        """Take the step's micro-batches and make the step's one blocking device-to-host read.

        Fixed batches: `accumulation_steps` micro-batches of `micro_batch_size`. Token budget: one step group
        (the rank's share of the global batch in budget micro-batches); every rank runs the most any rank has,
        the shorter ones adding blank micro-batches (no label: no loss, no gradient).

        The micro-batches are CPU tensors (16 micro-batches of 8 at 224 px hold 77 MB of pixels), so the
        step's counts are known before the first forward. One all-reduce of one small tensor (step_sync) sums
        over ranks: the supervised-token count (every micro-batch's loss sum is weighted by it, so the optimizer
        sees the token mean of the whole step), the other counts and FLOPs, each rank's micro-batch histogram
        (token budget), the preemption flag, and `carried`: the previous step's loss sum and gradient norm,
        device values read here, one step late, instead of in a read of their own.
        """
        timer = StepTimer(self.ctx.device)
        with timer.span("data"):
            raws = self._step_batches(engine, batches)
        indices = [supervised_index(r["labels"], r["sample_ids"]) for r in raws]  # on the CPU
        flops = self._step_flops(raws)
        local = [
            sum(len(i) for i in indices),
            sum(int(r["num_tokens"]) for r in raws),
            sum(int(r["num_samples"]) for r in raws),
            sum(r["input_ids"].numel() for r in raws),  # row positions, padding included
            flops.model,
            flops.hardware,
            1.0 if preempt else 0.0,
        ]
        # float64: FLOPs exact to 2^53 per step
        with timer.span("comm"):
            reduced = step_sync([float(v) for v in local] + self._count_histogram(len(raws)), carried)
        *counts, model_flops, hardware_flops, preempts = reduced[: len(local)]
        label_tokens, tokens, samples, positions = (int(v) for v in counts)
        n_histogram = len(reduced) - len(local) - (0 if carried is None else carried.numel())
        histogram = reduced[len(local) : len(local) + n_histogram]
        return OpenStep(
            raws=raws,
            indices=indices,
            n_micro=self._step_micro_count(len(raws), histogram),
            label_tokens=label_tokens,
            tokens=tokens,
            samples=samples,
            positions=positions,
            model_flops=model_flops,
            hardware_flops=hardware_flops,
            preempt=preempts > 0,
            previous=reduced[len(local) + n_histogram :],
            timer=timer,
        )

    def run_step(self, engine: Engine, opened: OpenStep, step: int) -> torch.Tensor:
        """The step's micro-batches, then the engine's (possibly skipped) update; no host read.

        Returns what the next step sync reads: [this rank's loss sum, the gradient norm on rank 0 and 0 on the
        others] (the norm is the same on every rank; the sum over ranks then holds it once).
        """
        timer = opened.timer
        engine.begin_step(opened.n_micro)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        result = None
        for micro in range(opened.n_micro):
            with timer.span("fwd_bwd"):
                if micro < len(opened.raws):
                    raw = self.noisy_inputs(opened.raws[micro], step, micro)
                    batch = self._to_device(raw, opened.indices[micro])
                else:  # this rank's share fit fewer micro-batches: a stand-in forward, nothing supervised
                    batch = engine.blank_batch()
                out = engine.forward(batch, self.stage.mask.mode)
                loss = out.loss_sum if self.fault is None else self.fault(step, micro, out.loss_sum)
                engine.backward(loss, opened.label_tokens)
                loss_sum += loss.detach()
            last = micro + 1 == opened.n_micro
            with timer.span("optim" if last else "fwd_bwd"):
                result = engine.step()
        assert result is not None and result.boundary and result.norm is not None, (
            "micro-batch count and the engine's accumulation disagree"
        )
        norm = result.norm.to(torch.float32)
        # The step's record waits one step for its read; its CPU batches (77 MB of pixels at 16 x 8 x 224 px)
        # need not wait with it.
        opened.raws, opened.indices = [], []
        return torch.stack([loss_sum, norm if self.ctx.is_main else torch.zeros_like(norm)])

    def step_info(self, opened: OpenStep, values: list[float]) -> dict[str, Any]:
        """A run step's figures, given its carried values read back ([loss sum, grad norm] over ranks)."""
        loss_total, norm = values
        skipped = not math.isfinite(norm)
        return {
            "loss": loss_total / opened.label_tokens if opened.label_tokens else float("nan"),
            "tokens": opened.tokens,
            "samples": opened.samples,
            "label_tokens": opened.label_tokens,
            "micro_batches": opened.n_micro,
            # padded row positions / all row positions of the step's data micro-batches, over ranks
            "padding_fraction": 1.0 - opened.tokens / opened.positions if opened.positions else 0.0,
            "skipped": skipped,
            "grad_norm": None if skipped else norm,
            "model_flops": opened.model_flops,  # the step's, over all ranks (vlmtrain.train.flops)
            "hardware_flops": opened.hardware_flops,
        }

    def train_step(self, engine: Engine, batches: Iterator[dict[str, Any]], step: int) -> dict[str, Any]:
        """One whole optimizer step read back at once (two reads: for tools and tests; `fit` reads its steps'
        values one step late, with the next step's counts, in one read per step)."""
        opened = self.open_step(engine, batches, step)
        values = step_sync([], self.run_step(engine, opened, step))
        info = self.step_info(opened, values)
        engine.settle(info["skipped"])
        return info

    def _step_batches(self, engine: Engine, batches: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
        """This rank's CPU micro-batches of the step: one step group's (token budget) or a fixed count's."""
        if self.stage.data.token_budget is not None:
            group = next(batches)
            return list(group["micro_batches"])
        return [next(batches) for _ in range(engine.accumulation_steps)]

    def _count_histogram(self, mine: int) -> list[float]:
        """This rank's micro-batch count one-hot over 1..(its samples per step), summed over ranks with the
        step's counts so the most any rank has is known without a second collective (empty: fixed batches)."""
        if self.stage.data.token_budget is None:
            return []
        most = self.stage.batch.global_batch_size // self.ctx.world_size  # a micro-batch holds >= 1 sample
        if not 1 <= mine <= most:
            raise RuntimeError(f"{mine} micro-batches for a step share of {most} samples")
        return [1.0 if n == mine else 0.0 for n in range(1, most + 1)]

    def _step_micro_count(self, mine: int, histogram: list[float]) -> int:
        """Micro-batches every rank runs this step: the most any rank has (a fixed batch: the fixed count).

        A token budget lays each rank's share into as many micro-batches as it needs; the ranks must still
        run equally many (collectives in every forward and backward), so the shorter ones add blank ones.
        """
        if not histogram:
            return mine
        return max(n for n, ranks in enumerate(histogram, start=1) if ranks > 0)

    def _step_flops(self, raws: list[dict[str, Any]]) -> FlopCount:
        """This rank's FLOPs of a step, from its CPU batches. The FLOP model is read off the model at the first
        step, once trainability, checkpointing and train mode are what training runs with."""
        if getattr(self, "_flop_model", None) is None:
            self._flop_model = StepFlopModel.from_model(self.model, self.stage.mask.mode)
        return self._flop_model(raws)

    # ---- checkpoints --------------------------------------------------------------------------------
    def _trainer_state(self, loader: Any, step: int, counters: dict[str, int]) -> dict[str, Any]:
        from vlmtrain.data.stream import merge_states

        reader = merge_states(gather_objects(loader.state_dict()))
        lora = lora_state(self.model)
        return {
            "stage": self.stage.name,
            "reader": reader,
            "counters": counters,
            "total_steps": self.total_steps,
            # A checkpoint holds adapters only: resuming it onto another frozen base must fail (fit).
            **({"lora_base_fingerprint": lora.fingerprint} if lora is not None else {}),
        }

    def _check_resume_base(self, trainer_state: dict[str, Any], path: Path) -> None:
        lora = lora_state(self.model)
        saved = trainer_state.get("lora_base_fingerprint")
        mine = lora.fingerprint if lora is not None else None
        if saved != mine:
            raise LoraBaseMismatch(
                f"{path}: checkpoint's frozen LoRA base {saved} differs from this run's {mine}; the stage's "
                "base (init_from or model checkpoints, seed) has changed since the checkpoint was written: "
                "restore the original base, or start the stage afresh in another --run-dir"
            )

    def _save(
        self,
        writer: ckpt.CheckpointWriter,
        engine: Engine,
        loader: Any,
        step: int,
        counters: dict[str, int],
        wait: bool = True,
    ) -> Path:
        trainer_state = self._trainer_state(loader, step, counters)
        return writer.save(step, engine, trainer_state, wait=wait)

    def _write_output(self, engine: Engine, frozen: dict[str, torch.Tensor]) -> Path:
        """The stage's output: the full model (safetensors), tokenizer, model config and resolved stage config.

        It stays gathered: one `model.safetensors` that transformers-style loaders and export read whole. Only
        the fp32 weights are gathered (no AdamW moments, a third of a checkpoint's bytes), once per stage.
        """
        state = engine.gather_state(moments=False)
        out = self.stage_dir / FINAL
        if self.ctx.is_main:
            tmp = self.stage_dir / (FINAL + ".partial")
            tmp.mkdir(parents=True, exist_ok=True)
            if lora_state(self.model) is not None:
                save_lora_output(tmp, self.model, state.params)  # adapters + trained groups, no frozen base
            else:
                tensors = {**frozen, **state.params}
                names = [n for n, _ in self.model.named_parameters()]
                missing = [n for n in names if n not in tensors]
                if missing:
                    raise RuntimeError(f"stage output would lack {missing[:3]}")
                save_file(
                    {n: tensors[n].contiguous() for n in names},
                    str(tmp / WEIGHTS_NAME),
                    metadata={"format": "pt"},
                )
            cfg = self.model.config_dict()
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str))
            (tmp / STAGE_CONFIG_NAME).write_text(json.dumps(stage_config_to_dict(self.stage), indent=2))
            (tmp / PRECISION_NAME).write_text(json.dumps(engine.precision.as_dict(), indent=2))
            self.tokenizer.save_pretrained(str(tmp))
            fsync_tree(tmp)  # every file and the folder reach the disk before the marker vouches for them
            write_text_durably(tmp / DONE_MARKER, "ok\n")
            if out.exists():
                import shutil

                shutil.rmtree(out)
            replace_durably(tmp, out)
        barrier()
        return out

    # ---- the loop -----------------------------------------------------------------------------------
    def _lr_rows(self, engine: Engine) -> list[tuple[str, float, float]]:
        """(optimizer group, LR read back from the engine now, the group's peak LR: the config's x optim.lr_scaling)."""
        scale = lr_scale(self.stage)
        return [
            (n, lr, self.stage.modules[n.split(".")[0]].lr * scale) for n, lr in engine.group_lrs().items()
        ]

    def _lr_table(self, rows: list[tuple[str, float, float]]) -> Table:
        table = Table(
            title=f"{self.stage.name}: learning rate per optimizer group, read back from the engine"
        )
        table.add_column("group")
        table.add_column("lr now", justify="right")
        table.add_column("peak (config)", justify="right")
        for name, lr, peak in rows:
            table.add_row(name, f"{lr:.3g}", f"{peak:g}")
        return table

    def _wandb(self, resumed: bool) -> WandbSink | None:
        """Rank 0's W&B run when `train.wandb` is set; its config is the resolved stage config."""
        cfg = self.stage.train.wandb
        if cfg is None or not self.ctx.is_main:
            return None
        config = {
            **stage_config_to_dict(self.stage),
            "launch": {"world_size": self.ctx.world_size, "total_steps": self.total_steps},
        }
        return WandbSink.open(cfg, self.stage_dir, self.stage.name, config, resume=resumed)

    def fit(self, resume: bool = False) -> StageResult:
        stage = self.stage
        latest = ckpt.find_latest(self.ckpt_root) if resume else None
        if not resume and ckpt.find_latest(self.ckpt_root) is not None:
            raise FileExistsError(
                f"{self.ckpt_root} already holds checkpoints; pass --resume auto to continue, "
                "or choose another --run-dir"
            )
        frozen = self._frozen_originals()
        groups = trainability_rows(self.model, stage.modules)  # before an engine shards the parameters
        self._enable_checkpointing()
        self.console.print(
            f"{stage.name}: {apply_compile(self.model, stage.train.compile)}"
        )  # before the engine
        self.model.train()
        engine = self._build_engine()
        self.console.print(f"{stage.name}: {engine.precision.describe()}")
        if engine.layout():
            self.console.print(f"{stage.name}: {engine.layout()}")
        slow = cpu_bf16_warning(engine.precision, self.ctx.device)
        if slow is not None:
            self.console.print(f"[yellow]{stage.name}: warning: {slow}[/]")
        peak, peak_source = resolve_peak_tflops(
            stage.train.peak_tflops, self.ctx.device, stage.train.precision
        )
        self.console.print(f"{stage.name}: MFU against {peak_source}")
        counters = {"skipped_nonfinite": 0, "bad_streak": 0}
        start, reader_state = 0, None
        if latest is not None:
            loaded = ckpt.load_checkpoint(latest, self.ctx)
            self._check_resume_base(loaded.trainer, latest)
            engine.load_pieces(loaded.state, loaded.optimizer_steps, loaded.scheduler_steps)
            ckpt.restore_rng(loaded.rng)
            start = int(loaded.trainer["step"])
            counters.update(loaded.trainer.get("counters", {}))
            reader_state = loaded.trainer["reader"]
            self.console.print(f"[bold]{stage.name}[/]: resumed from {latest} at step {start}")
        metrics = MetricsWriter(
            self.stage_dir / "metrics.jsonl",
            self.ctx.is_main,
            self.stage_dir / "tensorboard" if stage.train.tensorboard else None,
            self._wandb(resumed=latest is not None),
        )
        metrics.table("trainability", TABLE_COLUMNS, groups)
        metrics.truncate_after(start)
        loader = self.make_loader(reader_state)
        batches = iter(loader)
        train = stage.train
        writer = ckpt.CheckpointWriter(
            self.ckpt_root, self.ctx, train.keep_checkpoints, train.checkpoint_format, train.checkpoint_async
        )
        preempt = PREEMPTION
        owns_handler = not preempt.installed  # run_stages installs it for the whole run
        if owns_handler:
            preempt.install()
        step = start
        pending: PendingStep | None = None
        try:
            with self._progress() as progress:
                task = progress.add_task(stage.name, total=self.total_steps, completed=start, info="")

                def settle(values: list[float]) -> None:
                    """Write the pending step's record once its device values are read (one step late)."""
                    nonlocal pending
                    assert pending is not None
                    done, pending = pending, None
                    record = self._record(engine, done, values, counters, peak)
                    if done.step % stage.train.log_every == 0 or done.step == self.total_steps:
                        # data_skipped (by reason) and corrupt_shards of the whole job, not rank 0's alone
                        metrics.write({**record, **merge_data_faults(gather_objects(loader.data_faults()))})
                    progress.update(task, completed=done.step, info=self._info(record))
                    if counters["bad_streak"] >= stage.train.max_bad_steps:
                        raise TooManyBadSteps(
                            f"{stage.name}: {counters['bad_streak']} non-finite steps in a row at step {done.step} "
                            f"(limit train.max_bad_steps={stage.train.max_bad_steps}); lower the LR or check the data"
                        )

                def flush() -> None:
                    """Read the pending step now (an extra read: before a checkpoint, an exit, the end)."""
                    if pending is not None:
                        settle(step_sync([], pending.carried))

                t_last = time.perf_counter()
                while step < self.total_steps:
                    carried = None if pending is None else pending.carried
                    opened = self.open_step(engine, batches, step, carried, preempt.requested)
                    if pending is not None:
                        settle(opened.previous)  # before this step's update: FSDP winds back a skipped one
                    lrs = engine.group_lrs()
                    if step == start:
                        lr_rows = self._lr_rows(engine)
                        self.console.print(self._lr_table(lr_rows))
                        metrics.table("lr_readback", ("group", "lr now", "peak (config)"), lr_rows)
                    carried = self.run_step(engine, opened, step)
                    step += 1
                    now = time.perf_counter()
                    dt, t_last = now - t_last, now
                    peak_gib = peak_memory_gib(self.ctx.device)
                    pending = PendingStep(step, carried, opened, lrs, dt, peak_gib)
                    if opened.preempt and step < self.total_steps:
                        flush()
                        path = self._save(writer, engine, loader, step, counters)
                        self.console.print(
                            f"[yellow]preempted[/]: checkpoint {path}; exit {PREEMPTED_EXIT_CODE}"
                        )
                        raise Preempted(path)
                    if self.validator is not None and self.validator.due(step, self.total_steps):
                        flush()  # the step's record first, as the log reads
                        # collective: all ranks validate in lockstep
                        val = self.validator.run(engine, step, self.total_steps)
                        lmms = val.pop("lmms", None)
                        if lmms is not None:  # benchmark scores beside the step metrics (TensorBoard, W&B)
                            metrics.write({"step": step, "lmms": lmms})
                            val.update({f"lmms/{k}": v for k, v in lmms.items()})
                        progress.console.print(
                            f"{stage.name} step {step}: "
                            + ", ".join(f"{k} {v:.4f}" for k, v in val.items() if k != "step")
                        )
                    writer.poll()  # completes an asynchronous save once every rank has written its part
                    if (
                        stage.train.save_every
                        and step % stage.train.save_every == 0
                        and step < self.total_steps
                    ):
                        flush()  # the checkpoint's counters and the FSDP schedule must know this step
                        self._save(writer, engine, loader, step, counters, wait=False)
                flush()
            self._save(writer, engine, loader, step, counters)
            out = self._write_output(engine, frozen)
        finally:
            # Closing the generator now shuts its DataLoader workers down here, not whenever the garbage
            # collector gets to it: workers ignore SIGTERM (preemption), so a worker still alive at
            # interpreter exit would block multiprocessing's exit-time join forever.
            batches.close()
            if owns_handler:
                preempt.uninstall()
            metrics.close()
        if self.ctx.is_main:
            plot_loss_curves(
                {stage.name: loss_curve(metrics.path)},
                self.stage_dir / "loss.png",
                f"{stage.name} training loss",
            )
        return StageResult(out, step, counters["skipped_nonfinite"], metrics.path, latest)

    def _record(
        self,
        engine: Engine,
        done: PendingStep,
        values: list[float],
        counters: dict[str, int],
        peak: float | None,
    ) -> dict[str, Any]:
        """A step's metrics record, its device values read back; settles the engine and the skip counters."""
        info = self.step_info(done.opened, values)
        engine.settle(info["skipped"])
        if info["skipped"]:
            counters["skipped_nonfinite"] += 1
            counters["bad_streak"] += 1
        else:
            counters["bad_streak"] = 0
        dt = done.seconds
        return {
            "step": done.step,
            "loss": info["loss"],
            "lr": done.lrs,
            "grad_norm": info["grad_norm"],
            "skipped": info["skipped"],
            "skipped_nonfinite_total": counters["skipped_nonfinite"],
            "tokens": info["tokens"],
            "samples": info["samples"],
            "micro_batches": info["micro_batches"],
            "padding_fraction": info["padding_fraction"],
            "tokens_per_s": info["tokens"] / dt,
            "samples_per_s": info["samples"] / dt,
            "step_time_s": dt,
            **done.opened.timer.seconds(),  # CUDA events: the device is past this step after the read
            "mem/peak_gib": done.peak_gib,
            **throughput(info["model_flops"], info["hardware_flops"], dt, self.ctx.world_size, peak),
        }

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.ctx.is_main,
            transient=False,
        )

    @staticmethod
    def _info(record: dict[str, Any]) -> str:
        lrs = " ".join(
            f"{k.split('.')[0][:4]}={v:.1e}" for k, v in record["lr"].items() if "no_decay" not in k
        )
        skipped = " [red]SKIPPED[/]" if record["skipped"] else ""
        mfu = f"MFU {record['mfu']:.1%}" if record.get("mfu") is not None else "MFU n/a"
        return (
            f"loss {record['loss']:.4f} {lrs} {record['tokens_per_s']:.0f} tok/s "
            f"{record['samples_per_s']:.1f} samples/s "
            f"{record.get('tflops_per_gpu', 0.0):.3g} TFLOP/s/GPU {mfu}{skipped}"
        )
