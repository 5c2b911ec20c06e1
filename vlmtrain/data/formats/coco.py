"""COCO captions annotation files (captions_train2017.json, ...): one sample per image with all its captions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmtrain.data.formats.base import (
    Invalid,
    Item,
    ReadOptions,
    ReadStats,
    caption_record,
    check_not_directory,
    json_id,
    load_json,
    require_keys,
)

EXPECTED = (
    "a COCO captions file (an object with 'images' [{id, file_name}] and 'annotations' [{image_id, caption}])"
)
HINT = (
    "Karpathy split files (dataset_coco.json) are --format karpathy; LLaVA conversations are --format llava."
)


def read(path: Path, options: ReadOptions, stats: ReadStats) -> Iterator[Item]:
    """One item per entry of 'images', in file order, carrying every caption annotated for it."""
    check_not_directory(path, EXPECTED)
    data = load_json(path, EXPECTED)
    require_keys(path, data, ("images", "annotations"), EXPECTED, HINT)
    captions = _captions_by_image(data["annotations"], stats)
    seen: set[str | int] = set()
    for i, image in enumerate(data["images"]):
        where = f"{path.name} images[{i}]"
        image_id = json_id(image.get("id")) if isinstance(image, dict) else None
        file_name = image.get("file_name") if isinstance(image, dict) else None
        if image_id is None or not isinstance(file_name, str) or not file_name:
            yield Invalid(
                "malformed_record", "image entry needs an integer/string 'id' and a 'file_name'", where
            )
            continue
        if image_id in seen:
            yield Invalid(
                "malformed_record", f"image id {image_id!r} appears twice in 'images'", where, str(image_id)
            )
            continue
        seen.add(image_id)
        yield caption_record(
            id=str(image_id),
            image_id=image_id,
            image=file_name,
            captions=captions.pop(image_id, []),
            prompt=options.caption_prompt,
            where=where,
        )
    # Whatever is left was annotated for an image id that 'images' does not list.
    stats.dropped["orphan_caption"] += sum(len(c) for c in captions.values())


def _captions_by_image(annotations: list[Any], stats: ReadStats) -> dict[str | int, list[Any]]:
    """Captions grouped by image id, each group in annotation order."""
    grouped: dict[str | int, list[Any]] = {}
    for annotation in annotations:
        image_id = json_id(annotation.get("image_id")) if isinstance(annotation, dict) else None
        if image_id is None:
            stats.dropped["malformed_caption"] += 1
            continue
        grouped.setdefault(image_id, []).append(annotation.get("caption"))
    return grouped
