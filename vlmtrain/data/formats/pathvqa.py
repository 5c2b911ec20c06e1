"""PathVQA's public parquet release (flaviagiammarino/path-vqa): image bytes, question and answer per row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlmtrain.data.formats.base import FormatError, Invalid, Item, ReadOptions, ReadStats, vqa_record

EXPECTED = "PathVQA parquet (columns 'image' = struct<bytes, path>, 'question', 'answer')"
COLUMNS = ("image", "question", "answer")

# Rows per pyarrow record batch: bounds memory to a few MB of image bytes at a time.
BATCH_ROWS = 256


def read(path: Path, options: ReadOptions, stats: ReadStats) -> Iterator[Item]:
    """One item per row, files in name order, rows in file order."""
    files = parquet_files(path, options.split)
    for file in files:
        check_schema(file)
    number = 0
    for file in files:
        row = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS)):
            columns = [batch.column(name).to_pylist() for name in COLUMNS]
            for image, question, answer in zip(*columns, strict=True):
                yield _parse_row(image, question, answer, number, f"{file.name} row {row}")
                number += 1
                row += 1


def parquet_files(path: Path, split: str | None) -> list[Path]:
    """The parquet files to read for ``path`` (a file, or a folder) and ``split``.

    In a folder, ``--split S`` picks the Hugging Face files ``S-*.parquet``; a folder named S (the
    ``refs/convert/parquet`` layout) or a folder read without --split contributes all its ``*.parquet``.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: input does not exist (expected {EXPECTED})")
    if path.is_file():
        return [path]
    everything = sorted(path.glob("*.parquet"))
    chosen = sorted(path.glob(f"{split}-*.parquet")) if split else everything
    if not chosen and split == path.name:
        chosen = everything
    if not chosen:
        found = ", ".join(p.name for p in everything[:6]) or "no .parquet files"
        wanted = f"files named '{split}-*.parquet'" if split else "parquet files"
        raise FormatError(path, f"{EXPECTED}: {wanted}", found)
    return chosen


def check_schema(file: Path) -> None:
    """A FormatError unless the file is parquet with PathVQA's columns and types."""
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(file, EXPECTED, f"a file pyarrow cannot read as parquet ({e})") from None
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise FormatError(file, EXPECTED, f"columns {schema.names} (missing {missing})")
    image_type = schema.field("image").type
    if not (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0):
        raise FormatError(file, EXPECTED, f"column 'image' of type {image_type}")


def _parse_row(image: dict | None, question: object, answer: object, number: int, where: str) -> Item:
    data = image.get("bytes") if image else None
    name = image.get("path") if image else None
    if data is None:
        return Invalid("missing_image", "row has no embedded image bytes", where, str(number))
    return vqa_record(
        id=str(number),
        image_id=number,
        question=question,
        answer=answer,
        where=where,
        image=name if isinstance(name, str) and name else None,
        image_bytes=bytes(data),
    )
