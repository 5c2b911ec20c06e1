"""Convert a LLaVA-style parquet release (id, image, conversations) to LLaVA JSONL plus image files.

The Hugging Face releases of LLaVA-ReCap-118K, LLaVA-ReCap-558K and LLaVA-NeXT-Data store each record as a
parquet row: ``id`` (string), ``image`` (struct<bytes: binary, path: string>, null for text-only rows),
``conversations`` (list<struct<from, value>>) and ``data_source``. This writes every image to
``IMAGES_DIR/{n // 10000:04d}/{n:09d}.{ext}`` (n = row number over all files, ext from the image header)
and one JSONL line per row, so ``vlmtrain shard --format llava --images IMAGES_DIR`` can read them.

    python data_prep/parquet_to_llava.py OUT.jsonl IMAGES_DIR data/train-*.parquet
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

REQUIRED_COLUMNS = ("id", "image", "conversations")
BATCH_ROWS = 256
# Images per subfolder: keeps directories small for file systems that slow down on huge folders.
IMAGES_PER_FOLDER = 10_000
EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
}


@dataclass(frozen=True)
class ConvertStats:
    """What a conversion wrote."""

    rows: int
    """Records written to the JSONL file."""
    images: int
    """Image files written."""
    text_only: int
    """Rows without an image (no 'image' key in their JSONL record)."""
    unknown_format: int
    """Images whose header PIL does not recognise; written as .bin for `vlmtrain shard` to report."""


def convert(parquet_files: Sequence[Path], out_jsonl: Path, images_dir: Path) -> ConvertStats:
    """Write ``out_jsonl`` and the images under ``images_dir`` from ``parquet_files`` (read in the given order)."""
    for file in parquet_files:
        _check_schema(file)
    images_dir.mkdir(parents=True, exist_ok=True)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_jsonl.with_name(out_jsonl.name + ".tmp")
    rows = images = text_only = unknown = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for file in parquet_files:
            columns = [c for c in (*REQUIRED_COLUMNS, "data_source") if c in pq.read_schema(file).names]
            for batch in pq.ParquetFile(file).iter_batches(batch_size=BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    record = {"id": row["id"], "conversations": row["conversations"]}
                    if "data_source" in row:
                        record["data_source"] = row["data_source"]
                    data = (row["image"] or {}).get("bytes")
                    if data is None:
                        text_only += 1
                    else:
                        rel, known = _image_name(rows, data)
                        _write_bytes(images_dir / rel, data)
                        record["image"] = rel
                        images += 1
                        unknown += not known
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    rows += 1
    os.replace(tmp, out_jsonl)
    return ConvertStats(rows=rows, images=images, text_only=text_only, unknown_format=unknown)


def _check_schema(file: Path) -> None:
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{file}: not a readable parquet file ({e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(
            f"{file}: expected LLaVA parquet columns {list(REQUIRED_COLUMNS)}, found {schema.names}"
        )


def _image_name(row: int, data: bytes) -> tuple[str, bool]:
    """Relative file name for row ``row``'s image, and whether its format was recognised."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            ext = EXTENSIONS.get(str(img.format), str(img.format).lower())
        known = True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        ext, known = "bin", False
    return f"{row // IMAGES_PER_FOLDER:04d}/{row:09d}.{ext}", known


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_jsonl", type=Path, help="LLaVA JSONL file to write")
    parser.add_argument(
        "images_dir", type=Path, help="folder for the extracted images (the --images of shard)"
    )
    parser.add_argument("parquet", type=Path, nargs="+", help="parquet files, read in the order given")
    args = parser.parse_args(argv)
    stats = convert(args.parquet, args.out_jsonl, args.images_dir)
    print(
        f"wrote {stats.rows} records ({stats.images} images, {stats.text_only} text-only, "
        f"{stats.unknown_format} unrecognised images) to {args.out_jsonl}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
