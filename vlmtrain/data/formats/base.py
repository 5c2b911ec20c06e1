"""Types and helpers shared by the input-format readers of ``vlmtrain shard``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtrain.data.answers import infer_answer_type

# How many leading records are inspected to decide whether a file is in the requested format at all.
SNIFF_RECORDS = 100


class FormatError(ValueError):
    """The annotation file is not in the requested format at all (a hard error, not a skip)."""

    def __init__(self, path: Path, expected: str, found: str, hint: str = "") -> None:
        message = f"{path}: expected {expected}, found {found}"
        super().__init__(f"{message}. {hint}" if hint else message)
        self.path = path


@dataclass(frozen=True)
class Turn:
    """One conversation turn with the role already normalised."""

    role: str
    """'human' or 'gpt'."""
    value: str
    """The text, never containing the '<image>' placeholder."""


@dataclass(frozen=True)
class Record:
    """A parsed input record that will become one shard sample once its image is loaded."""

    id: str
    """Sample id as a string (the source id, or the record's position where the source has none)."""
    task: str
    """'caption', 'chat' or 'vqa'."""
    conversations: tuple[Turn, ...]
    """Starts with human, alternates, ends with gpt."""
    image_id: str | int
    """The source's own image id, kept with its type for evaluation scripts."""
    where: str
    """Where the record is in the input (file and line, index or row), for skip reports."""
    references: tuple[str, ...] | None = None
    """All non-empty reference captions in source order (caption tasks only)."""
    answer_type: str | None = None
    """'yes/no' or 'open' (vqa tasks only)."""
    image: str | None = None
    """Image path relative to --images as written in the source, or the embedded image's name."""
    image_bytes: bytes | None = None
    """Embedded image bytes (parquet sources); None when the image is a file under --images."""
    dropped: tuple[str, ...] = ()
    """One drop reason per caption left out of this record (see images.DROP_REASONS)."""


@dataclass(frozen=True)
class Invalid:
    """An input record that cannot become a sample; it is counted under ``reason``."""

    reason: str
    """A key of images.SKIP_REASONS."""
    detail: str
    """What exactly is wrong, for the skip report."""
    where: str
    """Where the record is in the input."""
    id: str | None = None
    """The record's id when it could be read."""


Item = Record | Invalid


@dataclass(frozen=True)
class ReadOptions:
    """Reader options; each format uses the ones that apply to it."""

    caption_prompt: str
    """Human turn put before the reference caption of caption datasets."""
    split: str | None = None
    """Karpathy split to select (train includes restval); for pathvqa, picks '{split}-*.parquet' in a folder."""
    image_column: str = "image"
    """jsonl/csv: column holding the image path."""
    text_columns: tuple[str, ...] = ("caption",)
    """jsonl/csv: columns holding reference captions (strings, or lists of strings in jsonl)."""
    question_column: str | None = None
    """jsonl/csv: question column; with answer_column it makes vqa samples instead of captions."""
    answer_column: str | None = None
    """jsonl/csv: answer column."""


@dataclass
class ReadStats:
    """Counts a reader collects about the file as a whole (not tied to one record)."""

    dropped: Counter[str] = field(default_factory=Counter)
    """Captions left out that belong to no record (e.g. COCO annotations for an unknown image id)."""


Reader = Callable[[Path, ReadOptions, ReadStats], Iterator[Item]]


@dataclass(frozen=True)
class FormatSpec:
    """A registered input format."""

    name: str
    """The --format value."""
    read: Reader
    """Yields one Item per input record, in input order."""
    needs_images: bool
    """Whether image paths are relative to --images (False when images are embedded in the input)."""
    description: str
    """One line for --help and the docs."""


def caption_record(
    *,
    id: str,
    image_id: str | int,
    image: str,
    captions: Iterable[Any],
    prompt: str,
    where: str,
) -> Item:
    """A caption sample from all of an image's captions; empty or non-string captions are dropped (counted)."""
    references: list[str] = []
    dropped: list[str] = []
    for caption in captions:
        if not isinstance(caption, str):
            dropped.append("malformed_caption")
        elif caption.strip():
            references.append(caption.strip())
        else:
            dropped.append("empty_caption")
    if not references:
        return Invalid("empty_caption", "no non-empty caption", where, id)
    return Record(
        id=id,
        task="caption",
        conversations=(Turn("human", prompt), Turn("gpt", references[0])),
        image_id=image_id,
        where=where,
        references=tuple(references),
        image=image,
        dropped=tuple(dropped),
    )


def vqa_record(
    *,
    id: str,
    image_id: str | int,
    question: Any,
    answer: Any,
    where: str,
    image: str | None = None,
    image_bytes: bytes | None = None,
) -> Item:
    """A single-turn VQA sample; answers that normalise to yes/no (as VQA scoring does) are typed 'yes/no'."""
    if not isinstance(question, str) or not question.strip():
        return Invalid(
            "malformed_record", f"question must be a non-empty string, got {question!r}", where, id
        )
    if answer is None:
        return Invalid("no_answer", "answer is missing", where, id)
    if not isinstance(answer, str):
        return Invalid("malformed_record", f"answer must be a string, got {type(answer).__name__}", where, id)
    if not answer.strip():
        return Invalid("empty_answer", "answer is empty", where, id)
    return Record(
        id=id,
        task="vqa",
        conversations=(Turn("human", question.strip()), Turn("gpt", answer.strip())),
        image_id=image_id,
        where=where,
        answer_type=infer_answer_type(answer),
        image=image,
        image_bytes=image_bytes,
    )


def load_json(path: Path, expected: str) -> Any:
    """Parse a whole JSON file; a parse failure is a FormatError naming the file and the format."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(path, expected, f"invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise FormatError(path, expected, f"bytes that are not UTF-8 text ({e})") from None


def require_keys(path: Path, data: Any, keys: tuple[str, ...], expected: str, hint: str = "") -> None:
    """A FormatError unless ``data`` is a JSON object whose ``keys`` all hold lists."""
    if not isinstance(data, dict):
        raise FormatError(path, expected, describe_json(data), hint)
    missing = [k for k in keys if not isinstance(data.get(k), list)]
    if missing:
        raise FormatError(path, expected, f"{describe_json(data)} without list(s) {missing}", hint)


def describe_json(data: Any) -> str:
    """A short description of a parsed JSON value for error messages."""
    if isinstance(data, dict):
        keys = sorted(data)
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        return f"a JSON object with keys [{shown}]"
    if isinstance(data, list):
        first = describe_json(data[0]) if data else "nothing"
        return f"a JSON list of {len(data)} items whose first is {first}"
    return f"a JSON {type(data).__name__}"


def sniff(
    path: Path, records: Iterable[Any], looks_right: Callable[[Any], bool], expected: str, hint: str = ""
) -> Iterator[Any]:
    """Yield ``records`` unchanged, after checking that some of the first SNIFF_RECORDS look right.

    A file where none of them does is the wrong format (a FormatError), not a file of bad records.
    """
    iterator = iter(records)
    head: list[Any] = []
    for record in iterator:
        head.append(record)
        if len(head) >= SNIFF_RECORDS:
            break
    if head and not any(looks_right(r) for r in head):
        raise FormatError(path, expected, f"{len(head)} leading records like {describe_json(head[0])}", hint)
    yield from head
    yield from iterator


def json_id(value: Any) -> str | int | None:
    """An id as the source wrote it if it is a string or an integer, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | str) and str(value):
        return value
    return None


def check_not_directory(path: Path, expected: str) -> None:
    """A clear error for a missing input or a folder where a file is needed."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: input file does not exist (expected {expected})")
    if path.is_dir():
        raise FormatError(path, expected, "a directory", "Pass the annotation file itself.")


def iter_json_records(path: Path, expected: str, hint: str = "") -> Iterator[tuple[str, Any]]:
    """(location, record) for each record of a JSON-list or JSONL file, in file order.

    A file ending in .jsonl, or a .json file holding several JSON values, is read line by line; a line
    that does not parse comes back as an Invalid item (a bad record), not an error for the whole file.
    """
    check_not_directory(path, expected)
    if path.suffix != ".jsonl":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise FormatError(path, expected, f"invalid JSON ({e})", hint) from None
        except UnicodeDecodeError as e:
            raise FormatError(path, expected, f"bytes that are not UTF-8 text ({e})", hint) from None
        else:
            if not isinstance(data, list):
                raise FormatError(path, expected, describe_json(data), hint)
            for i, record in enumerate(data):
                yield f"{path.name}[{i}]", record
            return
    yield from _iter_jsonl(path)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_no}"
            try:
                yield where, json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                yield where, Invalid("malformed_record", f"line is not valid UTF-8 JSON ({e})", where)
