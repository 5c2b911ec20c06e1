"""Distributed context: initialise the process group (gloo on CPU, nccl on CUDA) and small collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistContext:
    """Join the job started by deepspeed, torchrun or srun; a plain `python` run becomes a world of one."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if int(os.environ["WORLD_SIZE"]) == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    else:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            # Per-process guesses would make the ranks wait for each other forever.
            raise RuntimeError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {' and '.join(missing)} unset: launch with deepspeed or "
                "torchrun, or export MASTER_ADDR (the first node) and MASTER_PORT (see launch/slurm/)"
            )
    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed picks its accelerator when first imported; without CUDA it must be told to use the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend or ("nccl" if cuda else "gloo"), verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when `flag` is True on at least one rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or _comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: list[float], device: torch.device | None = None) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device or _comm_device())
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def sum_over_ranks(values: list[float], device: torch.device | None = None) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device or _comm_device())
    dist.all_reduce(t)
    return t.tolist()


def step_sync(host: list[float], carried: torch.Tensor | None) -> list[float]:
    """The training loop's one blocking device-to-host read of an optimizer step.

    `host` (counts, flags: values the CPU already has) and `carried` (float device values not yet read: the
    previous step's loss sum and gradient norm) go into one float64 tensor, summed over ranks in one
    all-reduce and read back once. In a world of one without carried values nothing touches the device.
    """
    t = torch.tensor(host, dtype=torch.float64)
    if dist.is_initialized():
        t = t.to(_comm_device(), non_blocking=True)
    if carried is not None:
        t = torch.cat([t.to(carried.device), carried.to(torch.float64)])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
