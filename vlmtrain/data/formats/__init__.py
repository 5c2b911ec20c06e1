"""Input formats of ``vlmtrain shard``: a registry from --format name to its reader."""

from __future__ import annotations

import difflib

from vlmtrain.data.formats import coco, karpathy, llava, pathvqa, tabular
from vlmtrain.data.formats.base import (
    FormatError,
    FormatSpec,
    Invalid,
    Item,
    ReadOptions,
    ReadStats,
    Record,
    Turn,
)

FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec(
            "llava", llava.read, True, "LLaVA conversations: JSON list or JSONL with id/image/conversations"
        ),
        FormatSpec(
            "coco", coco.read, True, "COCO captions annotations: one sample per image, all its captions"
        ),
        FormatSpec(
            "karpathy", karpathy.read, True, "Karpathy split file; --split train|val|test selects images"
        ),
        FormatSpec("pathvqa", pathvqa.read, False, "PathVQA parquet (embedded images): question/answer rows"),
        FormatSpec(
            "jsonl", tabular.read_jsonl, True, "JSONL: image column plus caption or question/answer columns"
        ),
        FormatSpec(
            "csv",
            tabular.read_csv,
            True,
            "CSV with header: image column plus caption or question/answer columns",
        ),
    )
}


def get_format(name: str) -> FormatSpec:
    """The registered format ``name``; an unknown name is an error suggesting the nearest one."""
    if name in FORMATS:
        return FORMATS[name]
    near = difflib.get_close_matches(name, FORMATS, n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise ValueError(f"unknown --format {name!r}; choose one of {sorted(FORMATS)}.{hint}")


__all__ = [
    "FORMATS",
    "FormatError",
    "FormatSpec",
    "Invalid",
    "Item",
    "ReadOptions",
    "ReadStats",
    "Record",
    "Turn",
    "get_format",
]
