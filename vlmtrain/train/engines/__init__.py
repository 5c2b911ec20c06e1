"""Distributed engines behind one interface: DeepSpeed ZeRO and PyTorch FSDP."""

from __future__ import annotations

from vlmtrain.train.engines.base import Engine, EngineState, StepResult

__all__ = ["Engine", "EngineState", "StepResult", "make_engine"]


def make_engine(kind: str, **kwargs) -> Engine:
    """Build the engine named by the stage config's `train.engine`."""
    if kind == "deepspeed":
        from vlmtrain.train.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(**kwargs)
    if kind == "fsdp":
        from vlmtrain.train.engines.fsdp import FSDPEngine

        return FSDPEngine(**kwargs)
    raise ValueError(f"unknown engine {kind!r}; expected deepspeed or fsdp")
