"""Generic JSONL and CSV annotation files: an image-path column plus caption columns or question/answer columns.

Both formats share this module because only row parsing differs; rows become samples the same way.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmtrain.data.formats.base import (
    FormatError,
    Invalid,
    Item,
    ReadOptions,
    ReadStats,
    caption_record,
    check_not_directory,
    iter_json_records,
    json_id,
    sniff,
    vqa_record,
)


def expected(kind: str, options: ReadOptions) -> str:
    """What a valid file looks like, for error messages."""
    return f"{kind} with columns {list(required_columns(options))}"


def required_columns(options: ReadOptions) -> tuple[str, ...]:
    """The image column, then the question and answer columns (vqa) or the caption columns."""
    if options.question_column or options.answer_column:
        if not (options.question_column and options.answer_column):
            raise ValueError("question_column and answer_column must be given together")
        return (options.image_column, options.question_column, options.answer_column)
    if not options.text_columns:
        raise ValueError(
            "text_columns is empty: name at least one caption column (or question/answer columns)"
        )
    return (options.image_column, *options.text_columns)


def read_jsonl(path: Path, options: ReadOptions, stats: ReadStats) -> Iterator[Item]:
    """One item per JSON line (or per element of a JSON list), in file order."""
    columns = required_columns(options)
    kind = expected("JSONL objects", options)
    records = sniff(
        path,
        iter_json_records(path, kind),
        lambda pair: isinstance(pair[1], dict) and options.image_column in pair[1],
        kind,
    )
    for index, (where, record) in enumerate(records):
        if isinstance(record, Invalid):
            yield record
        elif not isinstance(record, dict):
            yield Invalid(
                "malformed_record", f"record is not a JSON object but {type(record).__name__}", where
            )
        else:
            yield row_record(record, columns, options, index, where)


def read_csv(path: Path, options: ReadOptions, stats: ReadStats) -> Iterator[Item]:
    """One item per CSV row after the header, in file order."""
    columns = required_columns(options)
    kind = expected("CSV with a header row", options)
    check_not_directory(path, kind)
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
        except (UnicodeDecodeError, csv.Error) as e:
            raise FormatError(path, kind, f"an unreadable header ({e})") from None
        missing = [c for c in columns if c not in header]
        if missing:
            raise FormatError(path, kind, f"header {header} (missing {missing})")
        index = 0
        while True:
            where = f"{path.name}:{reader.line_num + 1}"
            try:
                row = next(reader)
            except StopIteration:
                return
            except (UnicodeDecodeError, csv.Error) as e:
                # A broken row cannot be resynchronised reliably; the rest of the file is unreadable.
                raise FormatError(path, kind, f"an unparseable row near {where} ({e})") from None
            if None in row or any(row.get(c) is None for c in columns):
                yield Invalid(
                    "malformed_record", f"row does not have the header's {len(header)} fields", where
                )
            else:
                yield row_record(row, columns, options, index, where)
            index += 1


def row_record(
    row: dict[str, Any], columns: tuple[str, ...], options: ReadOptions, index: int, where: str
) -> Item:
    """A caption or vqa sample from one row; ``index`` is the row's position, the id when it has no 'id'."""
    source_id = json_id(row.get("id"))
    image_id: str | int = index if source_id is None else source_id
    sid = str(image_id)
    missing = [c for c in columns if c not in row]
    if missing:
        return Invalid("malformed_record", f"missing column(s) {missing}", where, sid)
    image = row[options.image_column]
    if not isinstance(image, str) or not image:
        return Invalid(
            "malformed_record",
            f"{options.image_column!r} must be a non-empty path, got {image!r}",
            where,
            sid,
        )
    if options.question_column and options.answer_column:
        return vqa_record(
            id=sid,
            image_id=image_id,
            question=row[options.question_column],
            answer=row[options.answer_column],
            where=where,
            image=image,
        )
    captions: list[Any] = []
    for column in options.text_columns:
        value = row[column]
        captions.extend(value if isinstance(value, list) else [value])
    return caption_record(
        id=sid, image_id=image_id, image=image, captions=captions, prompt=options.caption_prompt, where=where
    )
