"""The one precision policy of a training run: which dtype holds, computes, accumulates and reduces what.

Every engine trains with the same four dtypes, so DeepSpeed and FSDP runs of a stage are interchangeable:
- master (fp32): the weights the optimizer updates and its AdamW moments; checkpoints store these;
- compute (bf16, or fp32 with `train.precision: fp32`): the copies forward and backward run on, and frozen
  groups (which no optimizer sees) are held in this dtype;
- gradient accumulation (fp32): the sum of the micro-batch gradients of an optimizer step. With 16 micro-steps a
  bf16 running sum keeps 8 significant bits of a total that grows 16x: the later micro-batches' low bits are lost;
- reduction (fp32): the dtype gradients cross ranks in.

Training loads every component in `LOAD_DTYPE` (fp32) whatever dtype its checkpoint was saved in (Qwen2.5 ships
bf16), so masters never start from, or degrade to, bf16. The engines translate the policy into their own
settings (`deepspeed_precision_config` here for DeepSpeed's JSON; FSDP2's MixedPrecisionPolicy in fsdp.py).

Cost at real size (0.9B parameters, all trainable in stage 2): fp32 accumulation keeps a 4-byte gradient per
trainable element instead of 2 (+1.8 GB over the whole model, divided over ranks by ZeRO-2 / FSDP sharding),
and fp32 reduction sends twice the bytes of a bf16 one per optimizer step (ZeRO-2 reduces every micro-step,
FSDP once per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

LOAD_DTYPE = torch.float32
"""The dtype every component is loaded in for training, whatever its checkpoint's dtype."""

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtypes of one run (see the module docstring)."""

    master: torch.dtype
    compute: torch.dtype
    grad_accum: torch.dtype
    reduce: torch.dtype

    @classmethod
    def for_precision(cls, precision: str) -> PrecisionPolicy:
        """The policy of `train.precision` (bf16 or fp32 compute; everything else fp32)."""
        if precision not in COMPUTE_DTYPES:
            raise ValueError(f"train.precision must be one of {sorted(COMPUTE_DTYPES)}, got {precision!r}")
        fp32 = torch.float32
        return cls(master=fp32, compute=COMPUTE_DTYPES[precision], grad_accum=fp32, reduce=fp32)

    @property
    def frozen(self) -> torch.dtype:
        """Frozen groups are held in the compute dtype: no optimizer updates them, so no master is needed."""
        return self.compute

    def as_dict(self) -> dict[str, str]:
        return {
            "master": DTYPE_NAMES[self.master],
            "compute": DTYPE_NAMES[self.compute],
            "grad_accum": DTYPE_NAMES[self.grad_accum],
            "reduce": DTYPE_NAMES[self.reduce],
            "frozen": DTYPE_NAMES[self.frozen],
            "load": DTYPE_NAMES[LOAD_DTYPE],
        }

    def describe(self) -> str:
        """One line for the start-of-stage log."""
        d = self.as_dict()
        return (
            f"precision: master weights {d['master']}, compute {d['compute']}, gradient accumulation "
            f"{d['grad_accum']}, reduction {d['reduce']}, frozen groups {d['frozen']}, loaded as {d['load']}"
        )


def cpu_bf16_warning(policy: PrecisionPolicy, device: torch.device) -> str | None:
    """A warning when bf16 compute would run on a CPU without native bf16 matmuls (AVX512-BF16 or AMX).

    There PyTorch emulates bf16 and a matmul is about 20x slower than fp32 (measured on a 2-core AVX2 EPYC:
    [4000, 128] x [128, 700] forward+backward 31 ms fp32, 580 ms bf16); train.precision=fp32 is then both
    faster and more exact. None on GPUs and on CPUs with native bf16.
    """
    if device.type != "cpu" or policy.compute != torch.bfloat16:
        return None
    native = [
        getattr(torch.cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    if any(native):
        return None
    return (
        "bf16 compute on a CPU without native bf16 (no AVX512-BF16 / AMX): PyTorch emulates it, about 20x "
        "slower than fp32 here; set train.precision=fp32 for CPU runs"
    )


def deepspeed_precision_config(policy: PrecisionPolicy) -> dict[str, Any]:
    """The DeepSpeed config keys that carry the policy (DeepSpeed's masters are always fp32)."""
    bf16 = policy.compute == torch.bfloat16
    return {
        # Without check_grad_overflow a bf16 step with a NaN/Inf gradient would be applied.
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "data_types": {"grad_accum_dtype": DTYPE_NAMES[policy.grad_accum]},
        "communication_data_type": DTYPE_NAMES[policy.reduce],
    }


def check_deepspeed_config(cfg: dict[str, Any], policy: PrecisionPolicy, source: str) -> None:
    """A DeepSpeed JSON may restate the policy's keys but never contradict them (fp16 is not supported)."""
    wanted = deepspeed_precision_config(policy)
    problems = []
    if cfg.get("fp16", {}).get("enabled"):
        problems.append("fp16.enabled=true (vlmtrain trains in bf16 or fp32; remove the fp16 section)")
    accum = cfg.get("data_types", {}).get("grad_accum_dtype")
    if accum is not None and accum != wanted["data_types"]["grad_accum_dtype"]:
        problems.append(f"data_types.grad_accum_dtype={accum!r} (the policy accumulates gradients in fp32)")
    comm = cfg.get("communication_data_type")
    if comm is not None and comm != wanted["communication_data_type"]:
        problems.append(f"communication_data_type={comm!r} (the policy reduces gradients in fp32)")
    if problems:
        raise ValueError(
            f"DeepSpeed config {source} contradicts vlmtrain's precision policy: {'; '.join(problems)}. "
            "Remove these keys: vlmtrain sets them from train.precision (docs/training.md, Numerics)"
        )
