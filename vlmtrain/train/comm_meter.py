"""Meters for what a training step costs outside its kernels: bytes through collectives, host reads of tensors.

Measurement tools for benchmarks/bench_comm.py and the tests that hold the trainer to one host read per step
and `vlmtrain plan` to the bytes a step really sends. Neither is on in training.
"""

from __future__ import annotations

import contextlib
import pickle
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Collectives and the argument that holds the payload: the full buffer of the collective (what a ring moves
# (n - 1) / n of per rank), the unit vlmtrain.train.plan counts in.
TENSOR_COLLECTIVES: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], list[torch.Tensor]]] = {
    "all_reduce": lambda a, k: [k.get("tensor", a[0] if a else None)],
    "broadcast": lambda a, k: [k.get("tensor", a[0] if a else None)],
    "reduce": lambda a, k: [k.get("tensor", a[0] if a else None)],
    "all_gather_into_tensor": lambda a, k: [k.get("output_tensor", a[0] if a else None)],
    "all_gather_single": lambda a, k: [k.get("output_tensor", a[0] if a else None)],  # FSDP2's
    "_all_gather_base": lambda a, k: [k.get("output_tensor", a[0] if a else None)],
    "reduce_scatter_tensor": lambda a, k: [k.get("input", a[1] if len(a) > 1 else None)],
    "reduce_scatter_single": lambda a, k: [k.get("input", a[1] if len(a) > 1 else None)],  # FSDP2's
    "all_gather": lambda a, k: list(k.get("tensor_list", a[0] if a else [])),
    "reduce_scatter": lambda a, k: list(k.get("input_list", a[1] if len(a) > 1 else [])),
    "all_to_all_single": lambda a, k: [k.get("input", a[1] if len(a) > 1 else None)],
}
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object")
FUNCTIONAL = {  # torch.distributed._functional_collectives: DTensor's redistributions (FSDP's norm all-reduce)
    "all_reduce": 0,
    "all_gather_tensor": None,  # output = input x group size: counted from the result
    "reduce_scatter_tensor": 0,
}


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class CommMeter:
    """Counts calls and payload bytes of torch.distributed collectives (and DeepSpeed's, which call them), while
    installed. `by_op` maps an op name to [calls, bytes]; object collectives count their pickled size."""

    def __init__(self) -> None:
        self.by_op: dict[str, list[int]] = {}
        self._depth = 0  # a collective that calls another (a deprecated alias) counts once

    def _add(self, op: str, nbytes: int) -> None:
        entry = self.by_op.setdefault(op, [0, 0])
        entry[0] += 1
        entry[1] += nbytes

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.by_op.values())

    def snapshot(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.by_op.items()}

    @contextlib.contextmanager
    def installed(self) -> Iterator[CommMeter]:
        """Wrap the collectives while the context is open. DeepSpeed keeps references to torch.distributed's
        functions from `deepspeed.init_distributed` on: install before it to see DeepSpeed's traffic."""
        saved: list[tuple[Any, str, Any]] = []

        def patch(name: str, wrapper_for: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
            original = getattr(c10d, name)
            wrapper = wrapper_for(original)
            for module in (dist, c10d):  # the public name and the one c10d's own functions call
                if getattr(module, name, None) is original:
                    saved.append((module, name, original))
                    setattr(module, name, wrapper)

        for name, payload in TENSOR_COLLECTIVES.items():
            if hasattr(c10d, name):
                patch(name, lambda fn, name=name, payload=payload: self._tensor_wrapper(name, fn, payload))
        for name in OBJECT_COLLECTIVES:
            patch(name, lambda fn, name=name: self._object_wrapper(name, fn))
        for name, arg in FUNCTIONAL.items():
            original = getattr(funcol, name)
            saved.append((funcol, name, original))
            setattr(funcol, name, self._functional_wrapper(name, original, arg))
        try:
            yield self
        finally:
            for module, name, original in reversed(saved):
                setattr(module, name, original)

    def _outermost(self, name: str, nbytes: Callable[[], int], fn: Callable[[], Any]) -> Any:
        if self._depth == 0:
            self._add(name, nbytes())
        self._depth += 1
        try:
            return fn()
        finally:
            self._depth -= 1

    def _tensor_wrapper(
        self, name: str, fn: Callable[..., Any], payload: Callable[..., Any]
    ) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            size = lambda: sum(_nbytes(t) for t in payload(args, kwargs))  # noqa: E731
            return self._outermost(name, size, lambda: fn(*args, **kwargs))

        return wrapper

    def _object_wrapper(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            objects = (
                args[1] if name == "all_gather_object" and len(args) > 1 else (args[0] if args else None)
            )
            return self._outermost(name, lambda: len(pickle.dumps(objects)), lambda: fn(*args, **kwargs))

        return wrapper

    def _functional_wrapper(self, name: str, fn: Callable[..., Any], arg: int | None) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self._add(f"functional.{name}", _nbytes(args[arg] if arg is not None else out))
            return out

        return wrapper


class HostReadMeter(TorchDispatchMode):
    """Counts reads of tensor values by the host while active: `.item()`, `float()`, `bool()`, `int()` (ATen's
    `_local_scalar_dense`), `.tolist()` and `.numpy()`. On a GPU each is a device-to-host sync. Tensors that live
    on the host by design even in a GPU run (AdamW's step counters, CPU batches) are passed in `host_tensors`
    and not counted."""

    READS = (torch.ops.aten._local_scalar_dense.default,)

    def __init__(self, host_tensors: Callable[[], list[torch.Tensor]] = list) -> None:
        super().__init__()
        self.count = 0
        self.sites: Counter[str] = Counter()
        self._host_tensors = host_tensors
        self._paused = 0

    def _is_host(self, t: torch.Tensor) -> bool:
        return any(t is h for h in self._host_tensors())

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func in self.READS and not self._paused and not self._is_host(args[0]):
            self._count(str(func))
        return func(*args, **(kwargs or {}))

    def _count(self, site: str) -> None:
        if self._paused:
            return
        self.count += 1
        self.sites[site] += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Reads inside are not counted (code shown read-free elsewhere, or host work by design)."""
        self._paused += 1
        try:
            # off the dispatch stack too: forward and backward run at full speed
            with _disable_current_modes():
                yield
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def active(self) -> Iterator[HostReadMeter]:
        meter = self
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def counted(name: str) -> Callable[..., Any]:
            def read(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if not meter._is_host(t):
                    meter._count(f"Tensor.{name}")
                return originals[name](t, *args, **kwargs)

            return read

        for name in originals:
            setattr(torch.Tensor, name, counted(name))
        try:
            with self:
                yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)
