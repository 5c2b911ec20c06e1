"""Helpers for the shard-writer tests: real image files and reading shards back two independent ways."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image


def image_bytes(size: tuple[int, int], fmt: str = "JPEG", mode: str = "RGB", seed: int = 0) -> bytes:
    """A real encoded image with smooth structure plus noise (so resizing and re-encoding do real work)."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [
        (x * 255 / max(1, width - 1)),
        (y * 255 / max(1, height - 1)),
        127 + 100 * np.sin((x + y) / 23.0 + seed),
    ]
    if mode == "RGBA":
        channels.append(np.full((height, width), 128))
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, len(channels)))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if mode == "L":
        img = img.convert("L")
    out = io.BytesIO()
    img.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def write_image(
    path: Path, size: tuple[int, int] = (64, 48), fmt: str = "JPEG", mode: str = "RGB", seed: int = 0
) -> bytes:
    """Write an image file (creating folders) and return its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image_bytes(size, fmt, mode, seed)
    path.write_bytes(data)
    return data


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of a tar file, in file order, read with the standard library."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def read_with_tarfile(out: Path) -> dict[str, dict[str, bytes]]:
    """Samples of all shards listed in the manifest, keyed by sample key, read with tarfile."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        for name, data in tar_members(out / shard["name"]):
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    return samples


def read_with_webdataset(out: Path) -> list[dict[str, Any]]:
    """Samples of all shards, read with a plain webdataset.WebDataset (no decoding)."""
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def sample_objects(out: Path) -> list[dict[str, Any]]:
    """The decoded .json of every sample, in key order, read with webdataset."""
    return [json.loads(s["json"]) for s in sorted(read_with_webdataset(out), key=lambda s: s["__key__"])]


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
