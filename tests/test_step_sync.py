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
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from train_fixtures import REPO, free_port, train_env

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_comm  # noqa: E402

from vlmtrain.dist import gather_objects, step_sync  # noqa: E402
from vlmtrain.train.comm_meter import CommMeter, HostReadMeter  # noqa: E402
from vlmtrain.train.plan import step_communication  # noqa: E402

STEPS, ACCUMULATION, LOG_EVERY = 5, 3, 2


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
            measured = sum(b for op, (_, b) in ops.items() if op != "all_gather_object")
            planned = hand.reduce_bytes + hand.gather_bytes + hand.step_sync_bytes
            # what the hand count leaves out: DeepSpeed's flag all-reduces, FSDP2's shard padding and its
            # per-parameter norm partials: a few KB of MBs
            assert measured == pytest.approx(planned, rel=2e-4), (name, i, ops)
            assert measured >= planned
    fsdp = results["fsdp"]["steps"]
    assert all(s["host_reads"] == 1 for i, s in enumerate(fsdp) if not log_step(i)), fsdp
    # ZeRO-2 reduces the gradient on every micro-batch, ZeRO-1 and FSDP once per step
    grads = {n: results[n]["steps"][0]["ops"] for n in results}
    assert grads["fsdp"]["reduce_scatter_single"][1] == 4 * results["fsdp"]["trainable_parameters"]
    zero1 = grads["zero1"]["all_reduce"][1]
    assert grads["zero2"]["all_reduce"][1] == pytest.approx(ACCUMULATION * zero1, rel=1e-4)
