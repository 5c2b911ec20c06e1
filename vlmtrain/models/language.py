"""Causal language model (Qwen2 by default): load or build it with the chosen attention backend."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from vlmtrain.models.strict_load import checkpoint_config, load_strict
from vlmtrain.precision import LOAD_DTYPE

SUPPORTED_LANGUAGE = (
    "language models load through AutoModelForCausalLM (any model_type it maps to a causal LM)"
)
# The output head of a tied-embedding LM is the input embedding: a checkpoint need not store it.
TIED_HEAD = r"^lm_head\.weight$"

ATTN_IMPLEMENTATION = {"sdpa": "sdpa", "eager": "eager", "flex": "flex_attention"}


def resolve_attn_backend(backend: str) -> str:
    """The concrete kernel of `backend`; `auto` is SDPA on every device for now.

    FlexAttention (block-sparse: it skips the fully masked blocks of the prefix-LM mask) is meant to become
    `auto`'s choice on CUDA, but its CUDA tests (backward against SDPA, training losses) have not run on a GPU
    yet, so it stays opt-in (`attn_backend: flex`).
    """
    if backend == "auto":
        return "sdpa"
    attn_implementation(backend)  # fail on an unknown name here, naming the choices
    return backend


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
