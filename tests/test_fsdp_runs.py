"""The FSDP engine end to end on 2 gloo ranks: every shipped stage chained 0->3 against the DeepSpeed engine
on the same data and seed, SIGKILL + resume against an uninterrupted run, and checkpoints that move between
engines and world sizes (2 -> 1 and 1 -> 2 ranks) with every sample of the epoch read exactly once."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from fsdp_fixtures import (
    PlainRun,
    initial_model_state,
    keys_by_rank,
    plain_reference,
    read_keys,
    record_command,
)
from train_fixtures import (
    TrainData,
    TrainProcess,
    assert_same_tensors,
    checkpoint_dir,
    checkpoint_tensors,
    complete_checkpoints,
    load_weights,
    read_metrics,
    run_training,
    session_cache,
    standalone,
    tiny_ds_config,
    tiny_stage_config,
    train_data,
    write_config,
)

from vlmtrain.config import MODULE_GROUPS

pytestmark = pytest.mark.slow

CHAIN_STEPS = 4
# Loss agreement between the engines. Both compute with the same weights rounded to bf16 and the same
# data, so step 1 of stage 0 is identical. They differ in how gradients are reduced (DeepSpeed ZeRO-2
# reduces and accumulates bf16 gradients, FSDP reduces in fp32) and in the master weights a stage starts
# from (DeepSpeed builds its fp32 masters from the bf16-cast model, FSDP keeps the stage input's fp32
# values), so the weights drift apart by about one bf16 rounding and the losses by well under one bf16
# ulp of the loss (2^-8 relative). Measured: at most 1.0e-3 relative over the 16 steps of the chain.
LOSS_RTOL = 2.0**-8
# Gradient norms (before clipping): measured within 1.5% of each other over the chain; a gradient summed
# instead of averaged over ranks or accumulation steps would be off by 2x or more.
GRAD_NORM_RTOL = 0.05
# fp32 runs against plain PyTorch in one process: they differ only in the order of floating-point
# reductions. Measured: losses within 3e-8 and gradient norms within 2.3e-7 relative, final weights within
# 4.3e-8 on an AVX2 CPU and within 2.2e-7 on an AVX512 one (ZeRO-3: one element of a down_proj), while every
# group moved by at least 1.2e-5 (vision: LR 5e-6 over 4 steps), 24x the weight tolerance.
FP32_RTOL = 1e-5
FP32_WEIGHT_ATOL = 5e-7


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return train_data(tmp_path_factory.getbasetemp())


def chain_configs(data: TrainData, engine: str) -> list[dict[str, Any]]:
    return [
        tiny_stage_config(
            i, data, max_steps=CHAIN_STEPS, save_every=2, train={"engine": engine}, precision="bf16"
        )
        for i in range(4)
    ]


def engine_chain(base: Path, data: TrainData, engine: str) -> Path:
    """Stages 0-3 in one 2-rank command with `engine`; the run directory (cached for the session)."""

    def make(out: Path) -> None:
        paths = [write_config(c, out / f"stage{i}.json") for i, c in enumerate(chain_configs(data, engine))]
        run_training(paths, out / "run", ranks=2)

    return session_cache(base, f"engine_chain_{engine}", make) / "run"


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory, data: TrainData) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp()
    return {e: engine_chain(base, data, e) for e in ("deepspeed", "fsdp")}


def stage_outputs(run: Path, configs: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Each stage's input followed by its output: [stage 0 input, stage 0 output, ..., stage 3 output]."""
    return [initial_model_state(configs[0])] + [
        load_weights(run / c["name"] / "final" / "model.safetensors") for c in configs
    ]


def test_fsdp_losses_match_deepspeed_per_step(chains, data):
    for cfg in chain_configs(data, "fsdp"):
        ds = read_metrics(chains["deepspeed"] / cfg["name"] / "metrics.jsonl")
        fsdp = read_metrics(chains["fsdp"] / cfg["name"] / "metrics.jsonl")
        assert [r["step"] for r in fsdp] == [r["step"] for r in ds] == list(range(1, CHAIN_STEPS + 1))
        for a, b in zip(fsdp, ds, strict=True):
            where = f"{cfg['name']} step {a['step']}"
            assert (a["samples"], a["tokens"]) == (b["samples"], b["tokens"]), f"{where}: different data"
            assert a["lr"] == b["lr"], f"{where}: LRs {a['lr']} != {b['lr']}"
            assert not a["skipped"] and a["grad_norm"] > 0, where
            assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL, abs=0), f"{where}: loss"
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=GRAD_NORM_RTOL), f"{where}: grad norm"
    first_fsdp = read_metrics(chains["fsdp"] / "stage0" / "metrics.jsonl")[0]
    first_ds = read_metrics(chains["deepspeed"] / "stage0" / "metrics.jsonl")[0]
    # Same bf16 weights, same batch, no update yet: the engines must agree to float rounding.
    assert first_fsdp["loss"] == pytest.approx(first_ds["loss"], rel=1e-6, abs=0)
    assert first_fsdp["grad_norm"] == pytest.approx(first_ds["grad_norm"], rel=1e-3)


def test_fsdp_chain_frozen_groups_bitwise_trainable_groups_updated(chains, data):
    configs = chain_configs(data, "fsdp")
    weights = stage_outputs(chains["fsdp"], configs)
    for k, cfg in enumerate(configs):
        trainable = {g for g in MODULE_GROUPS if cfg["modules"][g]["trainable"]}
        before, after = weights[k], weights[k + 1]
        assert after.keys() == before.keys()
        for group in MODULE_GROUPS:
            names = [n for n in after if n.startswith(group + ".")]
            changed = [n for n in names if not torch.equal(after[n], before[n])]
            if group in trainable:
                # SigLIP's post_layernorm is never reached (features come from before it): it stays frozen.
                expected = [n for n in names if not n.startswith("vision.post_layernorm.")]
                assert changed == expected, (
                    f"{cfg['name']}: {group} unchanged: {set(expected) - set(changed)}"
                )
            else:
                assert not changed, f"{cfg['name']}: frozen {changed[:3]} changed"
    # Stage 0 starts both engines from the same seed, so their frozen groups are the same tensors.
    ds0 = load_weights(chains["deepspeed"] / "stage0" / "final" / "model.safetensors")
    for n, value in ds0.items():
        if not n.startswith("projector."):
            assert torch.equal(weights[1][n], value), n


def text_only_keys(data: TrainData) -> set[str]:
    from vlmtrain.data.stream import load_source, read_shard

    keys = set()
    for shard in load_source(data.instruct):
        contents = read_shard(shard.path)
        keys |= {k for k, m in zip(contents.keys, contents.members, strict=True) if set(m) == {"json"}}
    return keys


def fp32_config(data: TrainData, engine: str, **train: Any) -> dict[str, Any]:
    """Stage 3 on its own (every group trains; instruction data with text-only samples) in fp32, one
    sample per micro-batch, so that some micro-batches hold no image while other ranks' do (fixed micro-batches:
    the shipped token budget is turned off)."""
    cfg = standalone(
        tiny_stage_config(
            3, data, max_steps=CHAIN_STEPS, save_every=0, micro_batch_size=1,
            train={"engine": engine, "precision": "fp32", **train},
        )
    )  # fmt: skip
    cfg["data"]["token_budget"] = None
    return cfg


@pytest.fixture(scope="module")
def plain(data: TrainData) -> PlainRun:
    torch.manual_seed(0)
    return plain_reference(fp32_config(data, "fsdp"), ranks=2, steps=CHAIN_STEPS)


def fp32_run(tmp: Path, data: TrainData, engine: str, **train: Any) -> tuple[Path, Path]:
    cfg = fp32_config(data, engine, **train)
    keys = record(tmp, "run", cfg, tmp / "run", ranks=2, resume=False, dump=False)
    return tmp / "run" / "stage3", keys


def assert_matches_plain(stage_dir: Path, keys: Path, plain: PlainRun, data: TrainData) -> None:
    assert keys_by_rank(keys) == plain.keys, "the run and the reference must read the same samples"
    # Micro-batches of one sample: a text-only sample is a text-only micro-batch (blank-image row).
    read = {k for r in plain.keys.values() for k in r}
    assert text_only_keys(data) & read, "no text-only micro-batch in the run: the test lost its point"
    records = read_metrics(stage_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, CHAIN_STEPS + 1))
    for r, loss, norm in zip(records, plain.losses, plain.grad_norms, strict=True):
        assert r["loss"] == pytest.approx(loss, rel=FP32_RTOL), f"step {r['step']}: loss"
        assert r["grad_norm"] == pytest.approx(norm, rel=FP32_RTOL), f"step {r['step']}: grad norm"
    weights = load_weights(stage_dir / "final" / "model.safetensors")
    assert weights.keys() == plain.weights.keys()
    for name, value in plain.weights.items():
        torch.testing.assert_close(
            weights[name], value, rtol=0, atol=FP32_WEIGHT_ATOL, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_fp32_fsdp_two_ranks_equal_plain_pytorch_with_text_only_micro_batches(tmp_path, data, plain):
    start = initial_model_state(fp32_config(data, "fsdp"))
    for group in MODULE_GROUPS:
        moved = max(
            float((plain.weights[n] - start[n]).abs().max()) for n in start if n.startswith(group + ".")
        )
        assert moved > 20 * FP32_WEIGHT_ATOL, f"{group} barely moved: the comparison would prove nothing"
    assert_matches_plain(*fp32_run(tmp_path, data, "fsdp"), plain, data)


def test_fp32_deepspeed_two_ranks_equal_plain_pytorch_with_text_only_micro_batches(tmp_path, data, plain):
    assert_matches_plain(*fp32_run(tmp_path, data, "deepspeed"), plain, data)


def test_fp32_deepspeed_zero3_two_ranks_equal_plain_pytorch_with_text_only_micro_batches(
    tmp_path, data, plain
):
    """ZeRO-3, parameters partitioned (tests/test_ds_configs.py covers its bf16 runs and resume)."""
    ds_config = tiny_ds_config("zero3_bf16", tmp_path / "ds")
    assert_matches_plain(*fp32_run(tmp_path, data, "deepspeed", ds_config=str(ds_config)), plain, data)


# ---- SIGKILL and resume -------------------------------------------------------------------------

RESUME_STEPS = 10
RESUME_SAVE_EVERY = 3


def resume_config(data: TrainData) -> dict[str, Any]:
    """Stage 2 (every group trains) on its own, 2 reader workers per rank, FSDP."""
    return standalone(
        tiny_stage_config(
            2,
            data,
            max_steps=RESUME_STEPS,
            save_every=RESUME_SAVE_EVERY,
            num_workers=2,
            train={"engine": "fsdp"},
        )
    )


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory: pytest.TempPathFactory, data: TrainData) -> tuple[Path, Path]:
    def make(out: Path) -> None:
        run_training([write_config(resume_config(data), out / "config.json")], out / "run", ranks=2)

    out = session_cache(tmp_path_factory.getbasetemp(), "fsdp_resume_reference", make)
    return out / "config.json", out / "run" / "stage2"


def test_fsdp_sigkill_then_resume_reproduces_uninterrupted_run(tmp_path, fsdp_reference, data):
    """The interrupted run writes its sharded checkpoints asynchronously (the reference synchronously): the
    bytes a background thread wrote resume to the uninterrupted run bitwise."""
    _, reference = fsdp_reference
    cfg = resume_config(data)
    cfg["train"]["checkpoint_async"] = True
    config = write_config(cfg, tmp_path / "config.json")
    run = tmp_path / "run"
    metrics = run / "stage2" / "metrics.jsonl"
    job = TrainProcess.start([config], run, ranks=2)
    job.wait_for_step(metrics, RESUME_SAVE_EVERY + 2)
    job.kill_all()
    assert job.wait() == -signal.SIGKILL
    complete = complete_checkpoints(run / "stage2")
    assert complete and complete[-1] < RESUME_STEPS, f"checkpoints {complete}"
    resume_from = complete[-1]
    assert len(list(checkpoint_dir(run / "stage2", resume_from).glob("rank-0000[01]-of-00002.*"))) == 4

    run_training([config], run, ranks=2, resume=True)
    ours, ref = read_metrics(metrics), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, RESUME_STEPS + 1))
    for a, b in zip(ours, ref, strict=True):
        if a["step"] > resume_from:
            for key in ("loss", "grad_norm", "lr", "tokens", "samples"):
                assert a[key] == b[key], f"step {a['step']}: {key} {a[key]} != uninterrupted {b[key]}"
    assert_same_tensors(
        load_weights(run / "stage2" / "final" / "model.safetensors"),
        load_weights(reference / "final" / "model.safetensors"),
        "FSDP final weights after SIGKILL + resume vs uninterrupted run",
    )


# ---- world-size changes and engine changes ------------------------------------------------------

EPOCH_STEPS = 4  # 32 recap samples / global batch 8
HALF = EPOCH_STEPS // 2


def epoch_keys(data: TrainData) -> list[str]:
    """Every sample key of the recap shards, read from the tar files (the reference the runs must cover)."""
    from vlmtrain.data.stream import load_source, read_shard

    return [k for shard in load_source(data.recap) for k in read_shard(shard.path).keys]


def record(
    tmp: Path, name: str, cfg: dict[str, Any], run: Path, ranks: int, resume: bool, dump: bool
) -> Path:
    """Train `cfg` with the recording entry point; returns the keys path (and `<tmp>/<name>-state`)."""
    spec = {
        "config": str(write_config(cfg, tmp / f"{name}.json")),
        "run_dir": str(run),
        "resume": resume,
        "keys": str(tmp / f"{name}-keys"),
        "state_out": str(tmp / f"{name}-state") if dump else None,
    }
    spec_path = tmp / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    job = TrainProcess(record_command(spec_path, ranks), tmp / "logs" / f"{name}.log")
    assert job.wait() == 0, job.describe()
    return tmp / f"{name}-keys"


def split_run(tmp: Path, data: TrainData, first: tuple[str, int], second: tuple[str, int]) -> dict[str, Any]:
    """Stage 0 for half an epoch with engine/ranks `first`, then resumed to a full epoch with `second`."""
    run = tmp / "run"

    def cfg(engine: str, steps: int) -> dict[str, Any]:
        return tiny_stage_config(0, data, max_steps=steps, save_every=0, train={"engine": engine})

    before = record(tmp, "first", cfg(first[0], HALF), run, first[1], resume=False, dump=False)
    after = record(tmp, "second", cfg(second[0], EPOCH_STEPS), run, second[1], resume=True, dump=True)
    return {"run": run, "before": before, "after": after, "state": tmp / "second-state"}


def assert_epoch_read_once(data: TrainData, result: dict[str, Any], ranks: tuple[int, int]) -> None:
    expected = epoch_keys(data)
    assert len(expected) == len(set(expected)) == 32, "sample keys of the tiny corpus must be unique"
    for part, n in zip(("before", "after"), ranks, strict=True):
        per_rank = keys_by_rank(result[part])
        assert sorted(per_rank) == list(range(n)), f"{part}: ranks {sorted(per_rank)}"
        assert len(read_keys(result[part])) == 16, f"{part}: read {len(read_keys(result[part]))} samples"
    consumed = read_keys(result["before"]) + read_keys(result["after"])
    repeats = {k: c for k, c in Counter(consumed).items() if c > 1}
    assert not repeats, f"samples read more than once: {repeats}"
    assert sorted(consumed) == sorted(expected), "the two runs together must read exactly the epoch"


def assert_checkpoint_survives(result: dict[str, Any]) -> None:
    """The resuming engine's gathered state equals the checkpoint it loaded, bitwise."""
    ckpt = result["run"] / "stage0" / "checkpoints" / f"step-{HALF:08d}"
    moments = load_weights(result["state"] / "optimizer.safetensors")
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        if kind == "param":
            mine = load_weights(result["state"] / "model.safetensors")
        else:
            mine = {k[len(kind) + 1 :]: v for k, v in moments.items() if k.startswith(f"{kind}.")}
        assert_same_tensors(mine, checkpoint_tensors(ckpt, kind), f"{kind} after reload")
    counts = json.loads((result["state"] / "counts.json").read_text())
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    assert counts == {"optimizer_steps": HALF, "scheduler_steps": HALF}
    assert (meta["optimizer_steps"], meta["scheduler_steps"]) == (HALF, HALF)


def test_deepspeed_two_ranks_resumed_by_fsdp_on_one(tmp_path, data):
    result = split_run(tmp_path, data, ("deepspeed", 2), ("fsdp", 1))
    assert_checkpoint_survives(result)
    assert_epoch_read_once(data, result, (2, 1))


def test_fsdp_two_ranks_resumed_by_deepspeed_on_four(tmp_path, data):
    """A 2-rank sharded checkpoint (each rank's FSDP shard) read by 4 ZeRO-2 ranks, each only its fragments."""
    result = split_run(tmp_path, data, ("fsdp", 2), ("deepspeed", 4))
    assert_checkpoint_survives(result)
    # 2 -> 4 ranks over 4 shards: the resumed half epoch is dealt below the shard, 4 samples to each new rank, so
    # its 2 steps read exactly the 16 the first run left (whole shards left 5/4/4/3: 2 read twice, 2 skipped).
    assert_epoch_read_once(data, result, (2, 4))
