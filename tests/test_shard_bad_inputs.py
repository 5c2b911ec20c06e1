"""Bad input never stops `vlmtrain shard` and is never silent: each class is skipped and counted by reason,
nothing outside the image root is opened, and a file in the wrong format is a clear error."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest_shard import image_bytes, read_with_tarfile, sample_objects, write_image
from PIL import Image

from vlmtrain.data import images as images_module
from vlmtrain.data.formats import FormatError
from vlmtrain.data.images import SKIP_REASONS, SampleError, resolve_image_path, validate_and_maybe_resize
from vlmtrain.data.shard import EXAMPLES_IN_MANIFEST, ManifestError, load_manifest, shard


def chat(
    image: str | None, question: str = "<image>\nWhat is it?", answer: str = "A thing.", id: str = "r"
) -> dict:
    record = {
        "id": id,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }
    if image is not None:
        record["image"] = image
    return record


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """An image root with one good image and one bad file of each kind, plus a secret outside the root."""
    root = tmp_path / "root"
    write_image(root / "good.jpg", (64, 48), seed=1)
    (root / "empty.jpg").write_bytes(b"")
    full = image_bytes((64, 48), "JPEG", seed=2)
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "damaged_header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "notes.jpg").write_text("<html>not an image</html>")
    write_image(root / "big.png", (400, 300), "PNG")
    outside = tmp_path / "outside"
    secret = outside / "secret.jpg"
    write_image(secret, seed=3)
    os.symlink(secret, root / "link.jpg")
    os.symlink(outside, root / "linkdir")
    return {"root": root, "secret": secret, "outside": outside}


# Each bad record with the reason it must be counted under (record order = input order).
BAD_RECORDS: list[tuple[dict | list | str, str]] = [
    (chat("missing.jpg"), "missing_image"),
    (chat("empty.jpg"), "empty_file"),
    (chat("truncated.jpg"), "unreadable_image"),
    (chat("damaged_header.png"), "unreadable_image"),
    (chat("notes.jpg"), "not_an_image_format"),
    (chat("big.png"), "decompression_bomb"),
    (chat("link.jpg"), "path_escapes_root"),
    (chat("linkdir/secret.jpg"), "path_escapes_root"),
    (chat("../outside/secret.jpg"), "path_escapes_root"),
    ("ABSOLUTE", "path_escapes_root"),
    ({"conversations": []}, "malformed_record"),
    (
        {"id": "x", "image": ["a.jpg", "b.jpg"], "conversations": chat(None)["conversations"]},
        "malformed_record",
    ),
    (
        {"id": "x", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
        "malformed_record",
    ),
    ([1, 2, 3], "malformed_record"),
    (
        {"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        "malformed_conversation",
    ),
    (
        {"id": "x", "conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}]},
        "malformed_conversation",
    ),
    (
        {
            "id": "x",
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
                {"from": "human", "value": "q2"},
            ],
        },
        "malformed_conversation",
    ),
    (chat("good.jpg", answer="see <image>"), "malformed_conversation"),
    (chat(None, question="<image>"), "malformed_conversation"),  # text-only: nothing is asked
    (
        {"id": "x", "image": "good.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}]},
        "no_answer",
    ),
    (chat("good.jpg", answer="  \n"), "empty_answer"),
]


def write_llava(tmp_path: Path, tree: dict[str, Path]) -> Path:
    records = []
    for i, (record, _) in enumerate(BAD_RECORDS):
        if record == "ABSOLUTE":
            record = chat(str(tree["secret"]))
        if isinstance(record, dict) and "id" in record:
            record = {**record, "id": f"bad{i}"}
        records.append(record)
        records.append(chat("good.jpg", id=f"good{i}"))
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def test_every_bad_record_is_skipped_with_its_reason_and_the_rest_is_written(
    tmp_path: Path, tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ann = write_llava(tmp_path, tree)
    opened: list[str] = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        opened.append(os.path.realpath(file) if isinstance(file, str | Path) else repr(file))
        return real_open(file, *args, **kwargs)

    real_image_open = Image.open

    def recording_image_open(fp, *args, **kwargs):
        opened.append(os.path.realpath(fp) if isinstance(fp, str | Path) else "<in-memory>")
        return real_image_open(fp, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(Image, "open", recording_image_open)
    out = tmp_path / "out"
    summary = shard(ann, "llava", tree["root"], out, shard_size=7, progress=False, max_image_pixels=100_000)
    monkeypatch.undo()

    expected: dict[str, int] = {}
    for _, reason in BAD_RECORDS:
        expected[reason] = expected.get(reason, 0) + 1
    assert summary.skipped == dict(sorted(expected.items()))
    assert set(summary.skipped) == set(SKIP_REASONS) - {"empty_caption"}  # captions are checked below
    assert summary.samples == len(BAD_RECORDS)
    # Good records keep their input index as key, whatever was skipped around them.
    assert sorted(read_with_tarfile(out)) == [f"{2 * i + 1:010d}" for i in range(len(BAD_RECORDS))]
    assert [o["id"] for o in sample_objects(out)] == [f"good{i}" for i in range(len(BAD_RECORDS))]
    manifest = load_manifest(out)
    assert manifest["skipped"] == summary.skipped
    # The first EXAMPLES_IN_MANIFEST skipped records, in input order, with their reasons.
    assert [e["index"] for e in manifest["skipped_examples"]] == [2 * i for i in range(EXAMPLES_IN_MANIFEST)]
    assert [e["reason"] for e in manifest["skipped_examples"]] == [r for _, r in BAD_RECORDS][
        :EXAMPLES_IN_MANIFEST
    ]
    assert manifest["skipped_examples"][0]["where"] == "mixed.json[0]"

    # Nothing outside the image root was opened: not through the symlinks, '..' or the absolute path.
    assert opened, "the recording hooks saw nothing; the test would prove nothing"
    outside = os.path.realpath(tree["outside"])
    assert not [p for p in opened if p.startswith(outside)]
    assert os.path.realpath(tree["root"] / "good.jpg") in opened


def test_empty_captions_drop_or_skip(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "a.jpg")
    ann = tmp_path / "captions.json"
    ann.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 1, "file_name": "a.jpg"},
                    {"id": 2, "file_name": "a.jpg"},
                    {"id": 3, "file_name": "a.jpg"},
                ],
                "annotations": [
                    {"image_id": 1, "caption": ""},
                    {"image_id": 1, "caption": " "},
                    {"image_id": 2, "caption": "kept"},
                    {"image_id": 2, "caption": ""},
                    {"image_id": 2, "caption": None},
                ],
            }
        )
    )
    summary = shard(ann, "coco", images, tmp_path / "out", progress=False)
    # Image 1: all captions empty -> skipped; image 2: empty/None captions dropped; image 3: none -> skipped.
    assert summary.skipped == {"empty_caption": 2}
    assert summary.dropped == {"empty_caption": 1, "malformed_caption": 1}
    assert [o["references"] for o in sample_objects(tmp_path / "out")] == [["kept"]]


def test_bad_rows_in_pathvqa_and_csv(tmp_path: Path) -> None:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    good = image_bytes((20, 20), "PNG")
    table = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": good, "path": None},
                    None,
                    {"bytes": b"", "path": None},
                    {"bytes": b"GIF89a..", "path": None},
                ],
                type=image_type,
            ),
            "question": ["q?", "q?", "q?", "q?"],
            "answer": ["yes", "no", "yes", "no"],
        }
    )
    pq.write_table(table, tmp_path / "test.parquet")
    summary = shard(tmp_path / "test.parquet", "pathvqa", None, tmp_path / "pv", progress=False)
    assert (summary.samples, summary.skipped) == (
        1,
        {"empty_file": 1, "missing_image": 1, "unreadable_image": 1},
    )

    images = tmp_path / "images"
    write_image(images / "a.jpg")
    (tmp_path / "c.csv").write_text("image,caption\na.jpg,fine\na.jpg\n,no image\na.jpg,\na.jpg,x,extra\n")
    summary = shard(tmp_path / "c.csv", "csv", images, tmp_path / "csv", progress=False)
    assert (summary.samples, summary.skipped) == (1, {"empty_caption": 1, "malformed_record": 3})
    assert [e.where for e in summary.skipped_examples] == ["c.csv:3", "c.csv:4", "c.csv:5", "c.csv:6"]


def test_invalid_jsonl_lines_are_skipped(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "a.jpg")
    lines = [
        json.dumps(chat("a.jpg", id="1")).encode(),
        b"{not json",
        json.dumps(chat("a.jpg", id="3")).encode(),
    ]
    (tmp_path / "c.jsonl").write_bytes(b"\n".join([*lines, b'{"id": "\xc3\x28"}', b""]))
    summary = shard(tmp_path / "c.jsonl", "llava", images, tmp_path / "out", progress=False)
    assert (summary.samples, summary.skipped) == (2, {"malformed_record": 2})
    assert [e.where for e in summary.skipped_examples] == ["c.jsonl:2", "c.jsonl:4"]


# ---------------------------------------------------------------- path containment, unit level


def test_resolve_image_path_refuses_escapes_before_opening(
    tmp_path: Path, tree: dict[str, Path], monkeypatch
) -> None:
    def no_open(*args, **kwargs):
        raise AssertionError("resolve_image_path must not open files")

    monkeypatch.setattr(builtins, "open", no_open)
    root = tree["root"]
    for rel in (
        "link.jpg",
        "linkdir/secret.jpg",
        "../outside/secret.jpg",
        str(tree["secret"]),
        "a/../good.jpg",
    ):
        with pytest.raises(SampleError) as err:
            resolve_image_path(root, rel)
        assert err.value.reason == "path_escapes_root", rel
    assert resolve_image_path(root, "good.jpg") == Path(os.path.realpath(root / "good.jpg"))
    # A root that is itself a symlink still contains its own files.
    os.symlink(root, tmp_path / "root_link")
    assert resolve_image_path(tmp_path / "root_link", "good.jpg") == Path(os.path.realpath(root / "good.jpg"))


def test_decompression_bomb_limit_is_the_configured_one(tmp_path: Path) -> None:
    data = image_bytes((400, 300), "PNG")
    with pytest.raises(SampleError) as err:
        validate_and_maybe_resize(data, None, max_pixels=400 * 300 - 1)
    assert err.value.reason == "decompression_bomb"
    assert validate_and_maybe_resize(data, None, max_pixels=400 * 300) == (data, "png")


def test_truncated_images_are_refused_even_if_pil_global_says_otherwise(monkeypatch) -> None:
    full = image_bytes((64, 48), "JPEG")
    with pytest.raises(SampleError) as err:
        validate_and_maybe_resize(full[: len(full) // 2], None)
    assert err.value.reason == "unreadable_image"
    monkeypatch.setattr(images_module.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        validate_and_maybe_resize(full[: len(full) // 2], None)


# ---------------------------------------------------------------- wrong format: a clear error, nothing written


def coco_file(tmp_path: Path) -> Path:
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    return path


@pytest.mark.parametrize(
    ("content", "fmt", "expected", "found"),
    [
        ("COCO", "llava", "expected LLaVA format", "a JSON object with keys ['annotations', 'images']"),
        ("{garbage", "llava", "expected LLaVA format", "invalid JSON"),
        ("{garbage", "coco", "expected a COCO captions file", "invalid JSON"),
        ('{"images": []}', "coco", "expected a COCO captions file", "without list(s) ['annotations']"),
        ('[{"id": 1}]', "coco", "expected a COCO captions file", "a JSON list"),
        (
            "COCO",
            "karpathy",
            "expected a Karpathy split file",
            "leading records like a JSON object with keys ['file_name', 'id']",
        ),
        ('{"dataset": "coco"}', "karpathy", "expected a Karpathy split file", "without list(s) ['images']"),
        ('[{"id": 1, "image": "a.jpg"}]', "llava", "expected LLaVA format", "1 leading records"),
        (
            '{"file": "a.jpg"}\n',
            "jsonl",
            "expected JSONL objects with columns ['image', 'caption']",
            "1 leading records",
        ),
        ("file,caption\na.jpg,x\n", "csv", "expected CSV with a header row", "missing ['image']"),
    ],
)
def test_wrong_format_is_an_error_naming_file_and_format(
    tmp_path: Path, content: str, fmt: str, expected: str, found: str
) -> None:
    path = coco_file(tmp_path) if content == "COCO" else tmp_path / f"input.{fmt}"
    if content != "COCO":
        path.write_text(content)
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "out"
    with pytest.raises(FormatError) as err:
        shard(path, fmt, images, out, split="train" if fmt == "karpathy" else None, progress=False)
    message = str(err.value)
    assert str(path) in message and expected in message and found in message, message
    assert not out.exists(), "nothing may be written for an input in the wrong format"


def test_wrong_pathvqa_inputs(tmp_path: Path) -> None:
    pq.write_table(pa.table({"img": [b"x"], "question": ["q"]}), tmp_path / "bad.parquet")
    with pytest.raises(
        FormatError, match=r"bad\.parquet: expected PathVQA parquet .*missing \['image', 'answer'\]"
    ):
        shard(tmp_path / "bad.parquet", "pathvqa", None, tmp_path / "out", progress=False)
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(FormatError, match="cannot read as parquet"):
        shard(tmp_path / "text.parquet", "pathvqa", None, tmp_path / "out", progress=False)
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.table({"a": [1]}), folder / "validation-00000-of-00001.parquet")
    with pytest.raises(FormatError, match=r"files named 'val-\*\.parquet', found validation-00000-of-00001"):
        shard(folder, "pathvqa", None, tmp_path / "out", split="val", progress=False)


def test_option_errors_are_clear(tmp_path: Path) -> None:
    ann = coco_file(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(ValueError, match=r"unknown --format 'lava'.*Did you mean 'llava'"):
        shard(ann, "lava", images, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="needs --split one of"):
        shard(ann, "karpathy", images, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="pass --images"):
        shard(ann, "coco", None, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        shard(ann, "coco", images, tmp_path / "o", shard_size=0, progress=False)
    with pytest.raises(ValueError, match="without '<image>'"):
        shard(ann, "coco", images, tmp_path / "o", caption_prompt="<image> caption", progress=False)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        shard(tmp_path / "nope.json", "coco", images, tmp_path / "o", progress=False)


def test_two_inputs_cannot_share_an_output_folder(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "a.jpg")
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(json.dumps(chat("a.jpg")) + "\n")
    second.write_text(json.dumps(chat("a.jpg")) + "\n")
    shard(first, "llava", images, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="already holds shards of another input"):
        shard(second, "llava", images, tmp_path / "out", progress=False)


def test_load_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"manifest\.json: no shard manifest here"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not a readable JSON manifest"):
        load_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(ManifestError, match="format_version is 2; this vlmtrain reads 1"):
        load_manifest(tmp_path)
