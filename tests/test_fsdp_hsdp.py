"""Hybrid sharding (train.fsdp.replicate_over_nodes): 2 "nodes" x 2 ranks on localhost train as the flat mesh."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import (
    load_weights,
    read_metrics,
    run_training,
    standalone,
    tiny_stage_config,
    train_data,
    write_config,
)

from vlmtrain.config.schema import FsdpConfig
from vlmtrain.train.engines.fsdp import ranks_per_node

STEPS = 3
# The two meshes sum the same fp32 gradients in a different order (reduce-scatter over 4 ranks, against
# reduce-scatter over 2 and an all-reduce over 2): losses and weights agree to fp32 rounding.
RTOL = 1e-5


def test_ranks_per_node_comes_from_the_config_or_the_launcher() -> None:
    assert ranks_per_node(4, {}) == 4
    assert ranks_per_node(None, {"LOCAL_WORLD_SIZE": "8"}) == 8
    assert ranks_per_node(None, {"SLURM_NTASKS_PER_NODE": "4(x2)"}) == 4
    with pytest.raises(ValueError, match=r"set train\.fsdp\.ranks_per_node"):
        ranks_per_node(None, {})
    with pytest.raises(ValueError, match="ranks_per_node: must be >= 1"):
        FsdpConfig(ranks_per_node=0).validate("train.fsdp")


@pytest.mark.slow
def test_hybrid_sharding_trains_as_the_flat_mesh(tmp_path) -> None:
    data = train_data(tmp_path.parent)
    runs = {}
    hybrid = {"replicate_over_nodes": True, "ranks_per_node": 2}
    for name, fsdp, kind, dims in (
        ("flat", {}, "flat", "4 shard"),
        ("hybrid", hybrid, "hybrid (HSDP)", "2 replicate x 2 shard"),
    ):
        cfg = standalone(
            tiny_stage_config(
                2, data, max_steps=STEPS, save_every=0, global_batch_size=8, micro_batch_size=1,
                train={"engine": "fsdp", "fsdp": fsdp},
            )
        )  # fmt: skip
        run_dir = tmp_path / name
        job = run_training([write_config(cfg, tmp_path / f"{name}.json")], run_dir, ranks=4)
        assert f"FSDP2 {kind} mesh: {dims}" in job.output()
        runs[name] = run_dir / cfg["name"]
    flat, hybrid = (read_metrics(runs[n] / "metrics.jsonl") for n in ("flat", "hybrid"))
    assert len(flat) == len(hybrid) == STEPS
    for a, b in zip(flat, hybrid, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=RTOL)
    wa, wb = (load_weights(runs[n] / "final" / "model.safetensors") for n in ("flat", "hybrid"))
    moved = 0
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=RTOL, atol=1e-6)
        moved += 1
    assert moved > 10
