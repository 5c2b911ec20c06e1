"""Causal language model (Qwen2 by default): load or build it with the chosen attention backend."""

from __future__ import annotations

import logging
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from vlmtrain.models import flex
from vlmtrain.models.cuda_validation import cuda_fast_path
from vlmtrain.models.strict_load import checkpoint_config, load_strict
from vlmtrain.precision import LOAD_DTYPE

SUPPORTED_LANGUAGE = (
    "language models load through AutoModelForCausalLM (any model_type it maps to a causal LM)"
)
# The output head of a tied-embedding LM is the input embedding: a checkpoint need not store it.
TIED_HEAD = r"^lm_head\.weight$"

ATTN_IMPLEMENTATION = {"sdpa": "sdpa", "eager": "eager", "flex": flex.FLEX_IMPLEMENTATION}
flex.register()  # before any LM is built with it

logger = logging.getLogger(__name__)


def resolve_attn_backend(backend: str) -> str:
    """The concrete kernel of `backend`; `auto` is FlexAttention on CUDA once its CUDA tests have passed for
    this torch (vlmtrain.models.cuda_validation), SDPA otherwise. The choice and its reason are logged.

    FlexAttention skips the fully masked tiles of the prefix / packed masks (27-73% at real size,
    benchmarks/README.md) and runs grouped-query attention natively; SDPA with a boolean mask computes every
    tile on K/V repeated to every query head. Its backward runs on CUDA only, so it is chosen there alone.
    """
    if backend == "auto":
        use_flex, why = attn_backend_decision()
        choice = "flex" if use_flex else "sdpa"
        logger.info("attn_backend auto -> %s (%s)", choice, why)
        return choice
    attn_implementation(backend)  # fail on an unknown name here, naming the choices
    return backend


def attn_backend_decision() -> tuple[bool, str]:
    """(auto picks flex, why): CUDA and a cuda_validated.json entry for this torch."""
    return cuda_fast_path("flex attention")


def describe_attn_backend(configured: str, resolved: str) -> str:
    """The log line for the stage's attention kernel: what `auto` chose and why."""
    if configured != "auto":
        return f"attention: {resolved} (model.attn_backend: {configured})"
    return f"attention: auto -> {resolved} ({attn_backend_decision()[1]})"


def attn_implementation(backend: str) -> str:
    if backend not in ATTN_IMPLEMENTATION:
        raise ValueError(
            f"unknown attention backend {backend!r}; expected one of {sorted(ATTN_IMPLEMENTATION)}"
        )
    return ATTN_IMPLEMENTATION[backend]


def language_config_from_dict(config: dict[str, Any]):
    """A transformers config from a plain dict; `model_type` defaults to qwen2."""
    data = dict(config)
    return AutoConfig.for_model(data.pop("model_type", "qwen2"), **data)


def load_language_model(
    name_or_path: str | None, config: dict[str, Any] | None = None, backend: str = "sdpa"
) -> PreTrainedModel:
    """A causal LM from a hub id / local dir or a config dict, with the attention kernel of `backend`.

    A checkpoint must fill every weight of the model (vlmtrain.models.strict_load): a partial download is an
    error, never a partly random LM.
    """
    impl = attn_implementation(resolve_attn_backend(backend))
    # fp32 whatever the checkpoint's dtype (Qwen2.5 ships bf16): the precision policy's load dtype.
    if config is not None:
        return AutoModelForCausalLM.from_config(
            language_config_from_dict(config), attn_implementation=impl, dtype=LOAD_DTYPE
        )
    if name_or_path is None:
        raise ValueError("give a language model checkpoint (hub id or directory) or a language_config")
    return load_strict(
        AutoModelForCausalLM,
        name_or_path,
        model_type=str(checkpoint_config(name_or_path).get("model_type")),
        supported=SUPPORTED_LANGUAGE,
        ignored_unexpected=(TIED_HEAD,),
        attn_implementation=impl,
        dtype=LOAD_DTYPE,
    )
