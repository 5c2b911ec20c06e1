"""The shard writer: reproducible tar files, index-based shard assignment, resume after interruption, resize."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest_shard import (
    decoded,
    image_bytes,
    read_with_tarfile,
    read_with_webdataset,
    tar_members,
    write_image,
)
from PIL import Image
from rich.console import Console

from vlmtrain.data import shard as shard_module
from vlmtrain.data.images import target_size, validate_and_maybe_resize
from vlmtrain.data.shard import load_manifest, print_summary, shard


def chat(image: str | None, id: str) -> dict:
    record = {
        "id": id,
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": id}],
    }
    if image:
        record["image"] = image
    return record


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    """11 LLaVA records over 4 images; records 2 and 5 are bad (missing image, no id)."""
    images = tmp_path / "images"
    for i in range(4):
        write_image(images / f"{i}.jpg", (80 + 8 * i, 60), seed=i)
    records = [chat(f"{i % 4}.jpg", f"r{i}") for i in range(11)]
    records[2]["image"] = "missing.jpg"
    del records[5]["id"]
    records[7].pop("image")
    ann = tmp_path / "chat.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    return ann, images


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_tar_headers_are_fixed_and_members_ordered_json_then_image(tmp_path: Path, dataset) -> None:
    ann, images = dataset
    shard(ann, "llava", images, tmp_path / "out", shard_size=4, keep_order=True, progress=False)
    with tarfile.open(tmp_path / "out/shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "0000000000.json",
        "0000000000.jpg",
        "0000000001.json",
        "0000000001.jpg",
        "0000000003.json",
        "0000000003.jpg",
    ]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (
            0,
            0,
            0,
            "",
            "",
            0o444,
            tarfile.REGTYPE,
        )


def test_shards_hold_fixed_index_ranges_whatever_is_skipped(tmp_path: Path, dataset) -> None:
    ann, images = dataset
    summary = shard(ann, "llava", images, tmp_path / "out", shard_size=4, keep_order=True, progress=False)
    keys = {
        s.name: sorted({name.split(".")[0] for name, _ in tar_members(tmp_path / "out" / s.name)})
        for s in summary.shards
    }
    assert keys == {
        "shard-000000.tar": ["0000000000", "0000000001", "0000000003"],
        "shard-000001.tar": ["0000000004", "0000000006", "0000000007"],
        "shard-000002.tar": ["0000000008", "0000000009", "0000000010"],
    }
    assert summary.skipped == {"malformed_record": 1, "missing_image": 1}
    assert summary.samples == 9 == sum(s.samples for s in summary.shards)
    # The text-only record has no image member.
    assert set(read_with_tarfile(tmp_path / "out")["0000000007"]) == {"json"}


def test_same_input_gives_byte_identical_output_with_any_worker_count(tmp_path: Path, dataset) -> None:
    ann, images = dataset
    shard(ann, "llava", images, tmp_path / "a", shard_size=4, image_size=32, progress=False)
    shard(ann, "llava", images, tmp_path / "b", shard_size=4, image_size=32, progress=False)
    shard(ann, "llava", images, tmp_path / "c", shard_size=4, image_size=32, workers=2, progress=False)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b == c
    assert len([n for n in a if n.endswith(".tar")]) == 3


def test_plain_webdataset_reads_every_sample(tmp_path: Path, dataset) -> None:
    ann, images = dataset
    shard(ann, "llava", images, tmp_path / "out", shard_size=4, progress=False)
    samples = read_with_webdataset(tmp_path / "out")  # records in the default seeded random order
    assert sorted(s["__key__"] for s in samples) == [f"{i:010d}" for i in (0, 1, 3, 4, 6, 7, 8, 9, 10)]
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["conversations"][1]["value"] == meta["id"]
        if meta["image"] is not None:
            assert s["jpg"] == (images / meta["image"]).read_bytes()


def test_resume_rewrites_only_damaged_or_missing_shards(
    tmp_path: Path, dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    ann, images = dataset
    out = tmp_path / "out"
    shard(ann, "llava", images, out, shard_size=4, progress=False)
    before = files(out)

    written: list[str] = []
    real_write = shard_module._write

    def counting_write(job):
        written.append(job.name)
        return real_write(job)

    monkeypatch.setattr(shard_module, "_write", counting_write)
    # Nothing damaged: nothing rewritten.
    summary = shard(ann, "llava", images, out, shard_size=4, progress=False)
    assert written == [] and summary.reused == 3
    # Corrupt one shard (same size, one byte flipped) and delete another.
    damaged = bytearray(before["shard-000001.tar"])
    damaged[600] ^= 0xFF
    (out / "shard-000001.tar").write_bytes(bytes(damaged))
    (out / "shard-000002.tar").unlink()
    summary = shard(ann, "llava", images, out, shard_size=4, progress=False)
    assert sorted(written) == ["shard-000001.tar", "shard-000002.tar"]
    assert summary.reused == 1
    assert files(out) == before  # shards, sidecars and manifest are byte-identical to the first run


def test_resume_after_an_interrupted_run(tmp_path: Path, dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    ann, images = dataset
    reference = tmp_path / "reference"
    shard(ann, "llava", images, reference, shard_size=4, progress=False)

    out = tmp_path / "out"
    real_write = shard_module._write

    def dies_on_second_shard(job):
        if job.name == "shard-000001.tar":
            (out / "shard-000001.tar.tmp").write_bytes(b"half a tar")
            raise KeyboardInterrupt
        return real_write(job)

    monkeypatch.setattr(shard_module, "_write", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        shard(ann, "llava", images, out, shard_size=4, progress=False)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(shard_module, "_write", real_write)
    summary = shard(ann, "llava", images, out, shard_size=4, progress=False)
    assert summary.reused == 1
    produced = {k: v for k, v in files(out).items() if not k.endswith(".tmp")}
    assert produced == files(reference)
    assert load_manifest(out)["skipped"] == {"malformed_record": 1, "missing_image": 1}


def test_changed_options_rewrite_every_shard(tmp_path: Path, dataset) -> None:
    ann, images = dataset
    out = tmp_path / "out"
    shard(ann, "llava", images, out, shard_size=4, progress=False)
    summary = shard(ann, "llava", images, out, shard_size=4, image_size=40, progress=False)
    assert summary.reused == 0
    assert load_manifest(out)["options"]["image_size"] == 40


# ---------------------------------------------------------------- resize


@pytest.mark.parametrize(
    ("size", "fmt", "mode", "expected"),
    [
        ((640, 480), "JPEG", "RGB", (299, 224)),  # JPEG: decoded at 1/2 scale by draft(), then resized
        ((480, 640), "JPEG", "L", (224, 299)),
        ((300, 1000), "PNG", "RGBA", (224, 747)),
        ((2000, 230), "WEBP", "RGB", (1948, 224)),
        ((224, 500), "PNG", "RGB", (224, 500)),  # shorter side already 224: re-encoded, not resized
        ((100, 80), "JPEG", "RGB", (100, 80)),  # smaller: never upscaled
    ],
)
def test_resize_shorter_side_never_upscaled(size, fmt, mode, expected) -> None:
    source = image_bytes(size, fmt, mode, seed=3)
    data, ext = validate_and_maybe_resize(source, 224)
    out = decoded(data)
    assert (ext, out.format, out.mode, out.size) == ("jpg", "JPEG", "RGB", expected)
    assert min(out.size) == min(224, *size)
    assert target_size(size, 224) == expected


def test_resized_pixels_match_a_plain_pil_resize() -> None:
    """draft() + bicubic must look like a straightforward full-resolution bicubic resize."""
    source = image_bytes((640, 480), "JPEG", seed=7)
    data, _ = validate_and_maybe_resize(source, 224)
    ours = np.asarray(decoded(data), dtype=np.float64)
    reference = Image.open(io.BytesIO(source)).convert("RGB").resize((299, 224), Image.Resampling.BICUBIC)
    diff = np.abs(ours - np.asarray(reference, dtype=np.float64))
    assert diff.mean() < 3.0, diff.mean()


def test_small_rgb_jpeg_keeps_its_bytes_when_resizing() -> None:
    source = image_bytes((100, 80), "JPEG", seed=1)
    assert validate_and_maybe_resize(source, 224) == (source, "jpg")
    assert validate_and_maybe_resize(source, None) == (source, "jpg")


def test_other_formats_are_stored_losslessly_as_png() -> None:
    gif = io.BytesIO()
    Image.new("P", (10, 6), 3).save(gif, format="GIF")
    data, ext = validate_and_maybe_resize(gif.getvalue(), None)
    assert ext == "png"
    assert np.array_equal(
        np.asarray(decoded(data).convert("RGB")), np.asarray(decoded(gif.getvalue()).convert("RGB"))
    )


def test_resize_through_the_writer(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "wide.png", (500, 250), "PNG", mode="RGBA")
    write_image(images / "tiny.jpg", (20, 30))
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"image": "wide.png", "caption": "w"})
        + "\n"
        + json.dumps({"image": "tiny.jpg", "caption": "t"})
        + "\n"
    )
    shard(tmp_path / "c.jsonl", "jsonl", images, tmp_path / "out", image_size=64, progress=False)
    samples = read_with_tarfile(tmp_path / "out")
    assert decoded(samples["0000000000"]["jpg"]).size == (128, 64)
    assert decoded(samples["0000000001"]["jpg"]).size == (20, 30)


def test_print_summary_lists_reasons_and_examples(tmp_path: Path, dataset) -> None:
    ann, images = dataset
    summary = shard(ann, "llava", images, tmp_path / "out", shard_size=4, progress=False)
    console = Console(record=True, width=200)
    print_summary(summary, console)
    text = console.export_text()
    for expected in (
        "samples written",
        "9",
        "missing_image",
        "malformed_record",
        "chat.jsonl:3",
        "manifest.json",
    ):
        assert expected in text
