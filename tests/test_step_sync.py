"""One host read per optimizer step, counted through the trainer's own loop, and the bytes each engine config
sends per step against `vlmtrain plan`'s hand count.

benchmarks/bench_comm.py runs `Trainer.fit` with every collective wrapped (CommMeter) and the host's reads of
tensor values counted (HostReadMeter: `.item()`/`float()`/`bool()` through ATen's `_local_scalar_dense`,
`.tolist()`, `.numpy()`), leaving out what tests/test_hot_path.py shows read-free on the meta device (forward,
backward) and the CPU batch prologue. Here: a gloo world of one in process (fast), and 2 ranks for each engine
config (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from train_fixtures import REPO, free_port, train_env

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_comm

from vlmtrain.dist import gather_objects, step_sync
from vlmtrain.train.comm_meter import CommMeter, HostReadMeter
from vlmtrain.train.plan import step_communication

STEPS, ACCUMULATION, LOG_EVERY = 4, 3, 2


@pytest.fixture(scope="module")
def world_of_one() -> Iterator[None]:
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def gather_reads() -> int:
    """Host reads of one per-rank log gather (all_gather_object pickles through tensors): the reference."""
    meter = HostReadMeter()
    with meter.active():
        gather_objects({"base": {}, "skipped": {}, "corrupt_shards": []})
    return meter.count


def log_step(interval: int) -> bool:
    """Whether the i-th measured interval (steps 2 .. N-1) writes a record: it holds that step's read."""
    return (interval + 2 - 1) % LOG_EVERY == 0  # interval i reads step i + 1's values (one step late)


def test_the_meters_count_what_they_claim(world_of_one):
    """The meters can fail: a bare step sync is one read and one all-reduce of its 8-byte values."""
    reads, comm = HostReadMeter(), CommMeter()
    carried = torch.tensor([2.0, 3.0])
    with comm.installed(), reads.active():
        values = step_sync([1.0, 4.0], carried)
        float(carried[0])  # a second read
    assert values == [1.0, 4.0, 2.0, 3.0]
    assert reads.count == 2 and comm.by_op == {"all_reduce": [1, 4 * 8]}


def test_fsdp_fit_reads_the_host_once_per_step_in_a_world_of_one(tmp_path, world_of_one):
    with CommMeter().installed() as comm:
        result = bench_comm.measure("fsdp", bench_comm.SMALL, ACCUMULATION, STEPS, LOG_EVERY, tmp_path, comm)
    # every step opens with one step sync; the last one's values are read by the final flush
    assert result["step_syncs_per_step"] == [1] * (STEPS - 1) + [2]
    gathered = gather_reads()
    assert gathered > 0
    for i, step in enumerate(result["steps"]):
        assert step["host_reads"] == 1 + (gathered if log_step(i) else 0), (i, step)
        assert step["ops"]["all_reduce"][0] == 1  # the trainer's one collective (FSDP's own: world of one)
    # the step breakdown: its phases are disjoint parts of the step's wall time, forward+backward the bulk
    records = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        phases = [r[f"time/{p}_s"] for p in ("data", "fwd_bwd", "optim", "comm")]
        assert all(t >= 0 for t in phases) and sum(phases) <= r["step_time_s"], r
        assert r["time/fwd_bwd_s"] > 0.5 * r["step_time_s"] and r["time/optim_s"] > 0, r
        assert r["mem/peak_gib"] is None  # CPU: no allocator peak to report


@pytest.mark.slow
def test_two_ranks_one_read_per_step_and_bytes_as_planned(tmp_path):
    out = tmp_path / "comm.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "benchmarks" / "bench_comm.py"), "--worker", "--out", str(out), "--tmp", str(tmp_path),
        "--steps", str(STEPS), "--accumulation", str(ACCUMULATION), "--log-every", str(LOG_EVERY),
        "--threads", "1", "--sizes", "small", "--configs", *bench_comm.CONFIGS,
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    for name, r in results.items():
        assert r["step_syncs_per_step"] == [1] * (STEPS - 1) + [2], name
        hand = step_communication(
            r["trainable_parameters"], ACCUMULATION, 2, "nvlink", name, r["block_parameters"]
        )
        for i, step in enumerate(r["steps"]):
            ops = step["ops"]
            assert ("all_gather_object" in ops) == log_step(i), (name, i)  # per-rank logs only when logged
            sync = hand.step_sync_bytes
            if name == "fsdp":
                # the step sync is the one all-reduce; the gradient is reduce-scattered once, exactly
                assert ops["all_reduce"] == [1, sync] and ops["reduce_scatter_single"][1] == hand.reduce_bytes
                # FSDP2 pads each parameter's shard to whole rows per rank: at most a row per parameter
                gathered = ops["all_gather_single"][1]
                assert 0 <= gathered - hand.gather_bytes <= 0.001 * hand.gather_bytes, (gathered, hand)
                assert ops["functional.all_reduce"][1] <= 4 * 128  # the norm's per-parameter partials
            else:
                assert ops["all_gather_into_tensor"][1] == hand.gather_bytes, (name, ops)
                # DeepSpeed's overflow flag and norm all-reduce ride beside the gradient: a few bytes
                reduced = ops["all_reduce"][1] - sync
                assert 0 <= reduced - hand.reduce_bytes <= 64, (name, ops, hand)
    # FSDP adds no read to the trainer's one; DeepSpeed's step makes its own (overflow and NaN checks)
    fsdp = results["fsdp"]["steps"]
    assert all(s["host_reads"] == 1 for i, s in enumerate(fsdp) if not log_step(i)), fsdp
    assert all(s["host_reads"] > 1 for s in results["zero2"]["steps"])


@pytest.mark.parametrize(("overrides", "own"), [([], "zero2"), (["train.ds_config=zero1_bf16"], "zero1"),
                                                (["train.engine=fsdp"], "fsdp")])  # fmt: skip
def test_plan_counts_every_engine_config_at_real_size(tmp_path, monkeypatch, overrides, own):
    """Stage 2 at real size on one node of 8, micro-batch 1 (16 accumulation steps): the hand count per config,
    with the blocks' parameters found by name (the towers' numbered `layers`), not by the engine's block list."""
    import re

    from vlmtrain.config.load import load_stage_config
    from vlmtrain.train.plan import plan_stages, stage_shapes

    monkeypatch.chdir(tmp_path)
    stage = load_stage_config(stage=2, overrides=["batch.micro_batch_size=1", *overrides])
    (plan,), _, _ = plan_stages([stage], 8, "H100", 0.4)
    vlm = stage_shapes(stage, stage.model).vlm
    trainable = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
    in_blocks = sum(
        p.numel() for n, p in vlm.named_parameters() if p.requires_grad and re.search(r"\.layers?\.\d+\.", n)
    )
    accum = plan.accumulation
    assert accum == 16 and plan.trainable == trainable and 0 < in_blocks < trainable
    by = plan.communication_by_config
    assert by["zero2"].reduce_bytes == 4 * trainable * accum and by["zero2"].gather_bytes == 2 * trainable
    assert by["zero1"].reduce_bytes == 4 * trainable and by["zero1"].gather_bytes == 2 * trainable
    assert by["fsdp"].reduce_bytes == 4 * trainable
    assert by["fsdp"].gather_bytes == 2 * (trainable + in_blocks) * accum  # root once, blocks twice
    for c in by.values():
        assert c.wire_bytes == (c.reduce_bytes + c.gather_bytes) * 7 // 8 and c.link == "NVLink 4"
    assert plan.communication is by[own]
