"""Strict checkpoint loading: every weight of the chosen class comes from the checkpoint, or loading fails.

transformers' `from_pretrained` initialises missing weights at random and drops unexpected ones with only a
load report in the log: a partial download, or a checkpoint of another architecture, would train on random
weights. `load_strict` asks for the loading info and raises, naming the directory, its model_type, the offending
keys and what is supported. Keys a family legitimately ignores (the text tower of a full SigLIP / CLIP
checkpoint) are declared as patterns by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

SHOW_KEYS = 5


def checkpoint_config(source: str) -> dict[str, Any]:
    """The checkpoint's config.json as a dict (a local directory or a hub id), without loading weights."""
    try:
        data, _ = PretrainedConfig.get_config_dict(str(source))
    except OSError as err:
        raise FileNotFoundError(f"{source}: no readable config.json ({err})") from err
    return data


def _keys(keys: Iterable[str], ignored: Sequence[str]) -> list[str]:
    return sorted(k for k in keys if not any(re.search(p, k) for p in ignored))


def _listing(kind: str, keys: Sequence[Any]) -> str:
    shown = ", ".join(str(k) for k in keys[:SHOW_KEYS])
    more = f" and {len(keys) - SHOW_KEYS} more" if len(keys) > SHOW_KEYS else ""
    return f"{len(keys)} {kind} ({shown}{more})"


def load_strict(
    model_class: Any,
    source: str,
    *,
    model_type: str,
    supported: str,
    ignored_unexpected: Sequence[str] = (),
    **kwargs: Any,
) -> PreTrainedModel:
    """`model_class.from_pretrained(source, **kwargs)`, refusing a checkpoint whose weights do not all load.

    Missing keys (they would be random), unexpected keys not matched by `ignored_unexpected` (regexes: weights
    of the checkpoint this class does not use by design) and shape mismatches are errors.
    """
    name = getattr(model_class, "__name__", str(model_class))

    def error(detail: str) -> ValueError:
        return ValueError(
            f"{source} (model_type {model_type!r}) does not load into {name}: {detail}. A partial download or "
            f"a checkpoint of another architecture would train on random weights, so vlmtrain refuses it. "
            f"Supported: {supported}. Fix: re-download the checkpoint, or name one of a supported family"
        )

    try:
        model, info = model_class.from_pretrained(str(source), output_loading_info=True, **kwargs)
    except RuntimeError as err:  # transformers raises on size mismatches (ignore_mismatched_sizes=False)
        if "mismatch" in str(err).lower():
            raise error(f"weights of the wrong shape ({err})") from err
        raise
    problems = []
    missing = _keys(info.get("missing_keys", ()), ())
    unexpected = _keys(info.get("unexpected_keys", ()), ignored_unexpected)
    mismatched = list(info.get("mismatched_keys", ()))
    if missing:
        problems.append(_listing("missing keys", missing))
    if unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    if mismatched:
        problems.append(_listing("keys of the wrong shape", mismatched))
    if info.get("error_msgs"):
        problems.append(_listing("load errors", list(info["error_msgs"])))
    if problems:
        raise error("; ".join(problems))
    return model
