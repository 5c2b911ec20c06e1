"""Karpathy split files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json)."""

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
    describe_json,
    json_id,
    load_json,
    require_keys,
    sniff,
)

EXPECTED = (
    "a Karpathy split file (an object with 'images' [{filename, split, sentences: [{raw}], cocoid|imgid}])"
)
HINT = "COCO annotation files (captions_*.json) are --format coco."

# --split value -> the Karpathy split labels it selects. 'restval' is the part of COCO val2014 that the
# standard Karpathy setup trains on.
SPLITS: dict[str, tuple[str, ...]] = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def read(path: Path, options: ReadOptions, stats: ReadStats) -> Iterator[Item]:
    """One item per image of the selected split, in file order, carrying all its reference sentences."""
    if options.split not in SPLITS:
        raise ValueError(f"--format karpathy needs --split one of {sorted(SPLITS)}, got {options.split!r}")
    check_not_directory(path, EXPECTED)
    data = load_json(path, EXPECTED)
    require_keys(path, data, ("images",), EXPECTED, HINT)
    wanted = SPLITS[options.split]
    images = sniff(
        path,
        data["images"],
        lambda image: isinstance(image, dict) and "sentences" in image and "split" in image,
        EXPECTED,
        HINT,
    )
    for i, image in enumerate(images):
        where = f"{path.name} images[{i}]"
        if not isinstance(image, dict) or not isinstance(image.get("split"), str):
            yield Invalid(
                "malformed_record", f"image entry needs a string 'split', got {describe_json(image)}", where
            )
            continue
        if image["split"] not in wanted:
            continue
        yield _parse_image(image, where, options.caption_prompt)


def _parse_image(image: dict[str, Any], where: str, prompt: str) -> Item:
    image_id = json_id(image.get("cocoid", image.get("imgid")))
    filename = image.get("filename")
    filepath = image.get("filepath")
    sentences = image.get("sentences")
    if image_id is None or not isinstance(filename, str) or not filename:
        return Invalid("malformed_record", "image entry needs 'cocoid' or 'imgid' and a 'filename'", where)
    if filepath is not None and not isinstance(filepath, str):
        return Invalid(
            "malformed_record", f"'filepath' must be a string, got {filepath!r}", where, str(image_id)
        )
    if not isinstance(sentences, list):
        return Invalid("malformed_record", "'sentences' must be a list", where, str(image_id))
    return caption_record(
        id=str(image_id),
        image_id=image_id,
        image=f"{filepath}/{filename}" if filepath else filename,
        captions=[s.get("raw") if isinstance(s, dict) else None for s in sentences],
        prompt=prompt,
        where=where,
    )
