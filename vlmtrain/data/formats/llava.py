"""LLaVA conversation files (a JSON list or JSONL): ReCap-118K/558K, LLaVA-NeXT-790k and the like."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmtrain.data.formats.base import (
    Invalid,
    Item,
    ReadOptions,
    ReadStats,
    Record,
    Turn,
    iter_json_records,
    json_id,
    sniff,
)
from vlmtrain.data.images import SampleError

EXPECTED = "LLaVA format (a JSON list or JSONL of records with 'id', 'conversations' and an optional 'image')"
HINT = "Use --format coco / karpathy for caption annotation files."

IMAGE_PLACEHOLDER = "<image>"

# Source role names and the names samples use.
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}

# The placeholder with the whitespace around it; replaced by one space, then the turn is stripped.
_PLACEHOLDER_RE = re.compile(r"\s*" + re.escape(IMAGE_PLACEHOLDER) + r"\s*")


def read(path: Path, options: ReadOptions, stats: ReadStats) -> Iterator[Item]:
    """One item per record, in file order."""
    records = sniff(
        path,
        iter_json_records(path, EXPECTED, HINT),
        lambda pair: isinstance(pair[1], dict) and "conversations" in pair[1],
        EXPECTED,
        HINT,
    )
    for where, record in records:
        yield record if isinstance(record, Invalid) else parse_record(record, where)


def parse_record(record: Any, where: str) -> Item:
    """Validate one LLaVA record and normalise its conversation."""
    if not isinstance(record, dict):
        return Invalid("malformed_record", f"record is not a JSON object but {type(record).__name__}", where)
    source_id = json_id(record.get("id"))
    if source_id is None:
        return Invalid(
            "malformed_record", f"'id' must be a string or integer, got {record.get('id')!r}", where
        )
    sid = str(source_id)
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        kind = "a list (multi-image records are not supported)" if isinstance(image, list) else repr(image)
        return Invalid("malformed_record", f"'image' must be a non-empty string, got {kind}", where, sid)
    try:
        turns = parse_turns(record.get("conversations"), has_image=image is not None)
    except SampleError as e:
        return Invalid(e.reason, e.detail, where, sid)
    return Record(id=sid, task="chat", conversations=turns, image_id=source_id, where=where, image=image)


def parse_turns(conversations: Any, has_image: bool) -> tuple[Turn, ...]:
    """Normalised turns; a SampleError says why the conversation must be skipped."""
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(
            "malformed_record", f"'conversations' must be a non-empty list, got {conversations!r:.60}"
        )
    turns: list[Turn] = []
    for i, turn in enumerate(conversations):
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("from"), str)
            and isinstance(turn.get("value"), str)
        ):
            raise SampleError(
                "malformed_record", f"turn {i} must be an object with string 'from' and 'value'"
            )
        role = ROLES.get(turn["from"].strip().lower())
        if role is None:
            raise SampleError("malformed_conversation", f"turn {i} has unknown role {turn['from']!r}")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise SampleError(
                "malformed_conversation", f"turn {i} is {role}, expected {expected} (turns must alternate)"
            )
        value = turn["value"]
        if i == 0:
            value = _PLACEHOLDER_RE.sub(" ", value).strip()
        elif IMAGE_PLACEHOLDER in value:
            raise SampleError(
                "malformed_conversation", f"turn {i} has {IMAGE_PLACEHOLDER} outside the first human turn"
            )
        if role == "gpt" and not value.strip():
            raise SampleError("empty_answer", f"turn {i} (gpt) is empty")
        if role == "human" and not value.strip() and not (i == 0 and has_image):
            raise SampleError("malformed_conversation", f"turn {i} (human) is empty")
        turns.append(Turn(role, value))
    if len(turns) == 1:
        raise SampleError("no_answer", "the conversation has a question but no gpt turn")
    if turns[-1].role != "gpt":
        raise SampleError("malformed_conversation", "the conversation ends with an unanswered human turn")
    return tuple(turns)
