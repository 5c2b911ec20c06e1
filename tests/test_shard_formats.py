"""Every input format of `vlmtrain shard` round-trips: real files in -> shards -> read back with webdataset."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest_shard import (
    decoded,
    image_bytes,
    read_with_tarfile,
    read_with_webdataset,
    sample_objects,
    write_image,
)

from vlmtrain.data.shard import DEFAULT_CAPTION_PROMPT, load_manifest, shard

PROMPT = DEFAULT_CAPTION_PROMPT


def run(tmp_path: Path, input: Path, fmt: str, images: Path | None, **kwargs) -> Path:
    out = tmp_path / "out"
    shard(input, fmt, images, out, progress=False, **kwargs)
    return out


def caption_json(id: str, source: str, refs: list[str], image_id, image: str) -> dict:
    return {
        "id": id,
        "source": source,
        "task": "caption",
        "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": refs[0]}],
        "references": refs,
        "image_id": image_id,
        "image": image,
    }


# ---------------------------------------------------------------- llava


def llava_records() -> list[dict]:
    return [
        {
            "id": "000000033471",
            "image": "coco/a.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                {"from": "gpt", "value": "White and red."},
                {"from": "human", "value": "Is it moving?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {
            "id": 7,
            "conversations": [
                {"from": "user", "value": "Say hi."},
                {"from": "assistant", "value": "Hi."},
            ],
        },
        {
            "id": "c",
            "image": "b.png",
            "conversations": [
                {"from": "human", "value": "Describe this picture.\n<image>\n"},
                {"from": "gpt", "value": "A gradient."},
            ],
        },
        {
            "id": "e",
            "image": "coco/a.jpg",
            "conversations": [{"from": "human", "value": " <image>\n"}, {"from": "gpt", "value": "A bus."}],
        },
        {
            "id": "d",
            "image": "png_named.jpg",
            "conversations": [
                {"from": "human", "value": "Look at <image> please"},
                {"from": "gpt", "value": "Done."},
            ],
        },
    ]


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_llava_round_trip(tmp_path: Path, layout: str) -> None:
    images = tmp_path / "images"
    jpg = write_image(images / "coco/a.jpg", (64, 48), "JPEG", seed=1)
    png = write_image(images / "b.png", (30, 20), "PNG", seed=2)
    png_named_jpg = write_image(images / "png_named.jpg", (16, 16), "PNG", seed=3)
    records = llava_records()
    if layout == "json":
        ann = tmp_path / "chat.json"
        ann.write_text(json.dumps(records))
    else:
        ann = tmp_path / "chat.jsonl"
        ann.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    out = run(tmp_path, ann, "llava", images, shard_size=3)

    assert sample_objects(out) == [
        {
            "id": "000000033471",
            "source": "llava",
            "task": "chat",
            "conversations": [
                {"from": "human", "value": "What are the colors of the bus?"},
                {"from": "gpt", "value": "White and red."},
                {"from": "human", "value": "Is it moving?"},
                {"from": "gpt", "value": "Yes."},
            ],
            "image_id": "000000033471",
            "image": "coco/a.jpg",
        },
        {
            "id": "7",
            "source": "llava",
            "task": "chat",
            "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}],
            "image_id": 7,
            "image": None,
        },
        {
            "id": "c",
            "source": "llava",
            "task": "chat",
            "conversations": [
                {"from": "human", "value": "Describe this picture."},
                {"from": "gpt", "value": "A gradient."},
            ],
            "image_id": "c",
            "image": "b.png",
        },
        {
            "id": "e",
            "source": "llava",
            "task": "chat",
            "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "A bus."}],
            "image_id": "e",
            "image": "coco/a.jpg",
        },
        {
            "id": "d",
            "source": "llava",
            "task": "chat",
            "conversations": [
                {"from": "human", "value": "Look at please"},
                {"from": "gpt", "value": "Done."},
            ],
            "image_id": "d",
            "image": "png_named.jpg",
        },
    ]
    samples = read_with_tarfile(out)
    # Extension comes from the decoded format, bytes are the original file's; text-only has no image.
    assert samples["0000000000"] == {"json": samples["0000000000"]["json"], "jpg": jpg}
    assert set(samples["0000000001"]) == {"json"}
    assert samples["0000000002"]["png"] == png
    assert samples["0000000003"]["jpg"] == jpg
    assert samples["0000000004"]["png"] == png_named_jpg
    manifest = load_manifest(out)
    assert manifest["samples"] == 5 and manifest["skipped"] == {}
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [3, 2]


def test_llava_split_names_the_shards(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "coco/a.jpg")
    ann = tmp_path / "chat.json"
    ann.write_text(json.dumps(llava_records()[:2]))
    out = run(tmp_path, ann, "llava", images, split="train")
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]
    assert load_manifest(out)["source"]["split"] == "train"


# ---------------------------------------------------------------- coco


def test_coco_one_sample_per_image_with_all_captions_in_order(tmp_path: Path) -> None:
    images = tmp_path / "val2017"
    a = write_image(images / "000000000139.jpg", seed=1)
    b = write_image(images / "000000000285.jpg", seed=2)
    ann = tmp_path / "captions_val2017.json"
    ann.write_text(
        json.dumps(
            {
                "info": {},
                "images": [
                    {"id": 285, "file_name": "000000000285.jpg", "height": 48, "width": 64},
                    {"id": 139, "file_name": "000000000139.jpg", "height": 48, "width": 64},
                ],
                "annotations": [
                    {"id": 1, "image_id": 139, "caption": "A room with a TV. "},
                    {"id": 2, "image_id": 285, "caption": "A big bear."},
                    {"id": 3, "image_id": 139, "caption": "  "},
                    {"id": 4, "image_id": 139, "caption": "A living room."},
                    {"id": 5, "image_id": 285, "caption": "A brown bear sitting."},
                    {"id": 6, "image_id": 999, "caption": "No such image."},
                ],
            }
        )
    )
    out = run(tmp_path, ann, "coco", images)
    assert sample_objects(out) == [
        caption_json("285", "coco", ["A big bear.", "A brown bear sitting."], 285, "000000000285.jpg"),
        caption_json("139", "coco", ["A room with a TV.", "A living room."], 139, "000000000139.jpg"),
    ]
    samples = read_with_tarfile(out)
    assert samples["0000000000"]["jpg"] == b and samples["0000000001"]["jpg"] == a
    manifest = load_manifest(out)
    assert manifest["dropped"] == {"empty_caption": 1, "orphan_caption": 1}
    assert manifest["skipped"] == {}


# ---------------------------------------------------------------- karpathy


def karpathy_file(tmp_path: Path, with_filepath: bool) -> Path:
    def entry(i: int, split: str) -> dict:
        e = {
            "filename": f"img{i}.jpg",
            "imgid": i,
            "split": split,
            "sentences": [{"raw": f"caption {i} a", "tokens": []}, {"raw": f"caption {i} b", "tokens": []}],
            "sentids": [2 * i, 2 * i + 1],
        }
        if with_filepath:
            e["filepath"] = "val2014" if split != "train" else "train2014"
            e["cocoid"] = 1000 + i
        return e

    splits = ["val", "test", "restval", "train", "test", "val", "train"]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"dataset": "coco", "images": [entry(i, s) for i, s in enumerate(splits)]}))
    return path


@pytest.mark.parametrize(
    ("split", "expected_images"), [("train", [2, 3, 6]), ("val", [0, 5]), ("test", [1, 4])]
)
@pytest.mark.parametrize("with_filepath", [True, False])
def test_karpathy_split_selection(
    tmp_path: Path, split: str, expected_images: list[int], with_filepath: bool
) -> None:
    ann = karpathy_file(tmp_path, with_filepath)
    images = tmp_path / "images"
    splits = ["val", "test", "restval", "train", "test", "val", "train"]
    written = {}
    for i, s in enumerate(splits):
        rel = (
            (("val2014" if s != "train" else "train2014") + f"/img{i}.jpg")
            if with_filepath
            else f"img{i}.jpg"
        )
        written[i] = write_image(images / rel, seed=i)
    out = run(tmp_path, ann, "karpathy", images, split=split)
    objects = sample_objects(out)
    expected = []
    for i in expected_images:
        image_id = 1000 + i if with_filepath else i
        rel = (
            (("val2014" if splits[i] != "train" else "train2014") + f"/img{i}.jpg")
            if with_filepath
            else f"img{i}.jpg"
        )
        expected.append(
            caption_json(str(image_id), "karpathy", [f"caption {i} a", f"caption {i} b"], image_id, rel)
        )
    assert objects == expected
    samples = read_with_tarfile(out)
    assert [samples[f"{k:010d}"]["jpg"] for k in range(len(expected_images))] == [
        written[i] for i in expected_images
    ]
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{split}-000000.tar"]


# ---------------------------------------------------------------- pathvqa


def pathvqa_table(rows: list[tuple[bytes | None, str | None, str, str]]) -> pa.Table:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table(
        {
            "image": pa.array(
                [None if b is None else {"bytes": b, "path": p} for b, p, _, _ in rows], type=image_type
            ),
            "question": [q for _, _, q, _ in rows],
            "answer": [a for _, _, _, a in rows],
        }
    )


def test_pathvqa_round_trip_from_parquet(tmp_path: Path) -> None:
    png = image_bytes((40, 30), "PNG", seed=1)
    jpg = image_bytes((50, 40), "JPEG", seed=2)
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(
        pathvqa_table(
            [
                (png, "test_0.png", "Is this tissue inflamed?", "Yes"),
                (jpg, None, "What organ is shown?", "liver"),
            ]
        ),
        data / "test-00000-of-00002.parquet",
        row_group_size=1,
    )
    pq.write_table(
        pathvqa_table([(jpg, "test_2.jpg", "is there necrosis?", "no")]), data / "test-00001-of-00002.parquet"
    )
    pq.write_table(pathvqa_table([(png, None, "not selected", "yes")]), data / "train-00000-of-00001.parquet")
    out = run(tmp_path, data, "pathvqa", None, split="test")

    def vqa(i: int, q: str, a: str, kind: str, image: str | None) -> dict:
        return {
            "id": str(i),
            "source": "pathvqa",
            "task": "vqa",
            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
            "image_id": i,
            "answer_type": kind,
            "image": image,
        }

    assert sample_objects(out) == [
        vqa(0, "Is this tissue inflamed?", "Yes", "yes/no", "test_0.png"),
        vqa(1, "What organ is shown?", "liver", "open", None),
        vqa(2, "is there necrosis?", "no", "yes/no", "test_2.jpg"),
    ]
    samples = read_with_tarfile(out)
    assert samples["0000000000"]["png"] == png
    assert samples["0000000001"]["jpg"] == jpg
    assert samples["0000000002"]["jpg"] == jpg
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar"]


# ---------------------------------------------------------------- jsonl / csv


def test_jsonl_captions_from_several_columns(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "x.jpg")
    ann = tmp_path / "caps.jsonl"
    rows = [
        {
            "id": "x1",
            "file": "x.jpg",
            "short": "A cat.",
            "long": ["A grey cat on a mat.", "", "A cat sleeping."],
        },
        {"file": "x.jpg", "short": "Second.", "long": []},
    ]
    ann.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = run(tmp_path, ann, "jsonl", images, image_column="file", text_columns=("short", "long"))
    assert sample_objects(out) == [
        caption_json("x1", "jsonl", ["A cat.", "A grey cat on a mat.", "A cat sleeping."], "x1", "x.jpg"),
        caption_json("1", "jsonl", ["Second."], 1, "x.jpg"),
    ]
    assert load_manifest(out)["dropped"] == {"empty_caption": 1}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_tabular_vqa(tmp_path: Path, fmt: str) -> None:
    images = tmp_path / "images"
    data = write_image(images / "q.png", fmt="PNG")
    rows = [
        {"img": "q.png", "q": "Is it a gradient?", "a": "yes"},
        {"img": "q.png", "q": "Which colour?", "a": "red"},
    ]
    ann = tmp_path / f"vqa.{fmt}"
    if fmt == "jsonl":
        ann.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        with open(ann, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["img", "q", "a"])
            writer.writeheader()
            writer.writerows(rows)
    out = run(tmp_path, ann, fmt, images, image_column="img", question_column="q", answer_column="a")
    objects = sample_objects(out)
    assert [o["conversations"] for o in objects] == [
        [{"from": "human", "value": "Is it a gradient?"}, {"from": "gpt", "value": "yes"}],
        [{"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "red"}],
    ]
    assert [o["answer_type"] for o in objects] == ["yes/no", "open"]
    assert [o["task"] for o in objects] == ["vqa", "vqa"]
    assert all(s["png"] == data for s in read_with_webdataset(out))


def test_csv_captions(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "a b.jpg")
    ann = tmp_path / "caps.csv"
    ann.write_text('id,image,caption\n17,a b.jpg,"A caption, with a comma."\n', encoding="utf-8")
    out = run(tmp_path, ann, "csv", images)
    assert sample_objects(out) == [caption_json("17", "csv", ["A caption, with a comma."], "17", "a b.jpg")]


# ---------------------------------------------------------------- parquet -> llava helper


def load_converter():
    path = Path(__file__).resolve().parents[1] / "data_prep" / "parquet_to_llava.py"
    spec = importlib.util.spec_from_file_location("parquet_to_llava", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_parquet_to_llava_then_shard(tmp_path: Path) -> None:
    """The ReCap/NeXT parquet layout converts to LLaVA JSONL whose shards carry the original image bytes."""
    jpg = image_bytes((48, 32), "JPEG", seed=4)
    png = image_bytes((20, 20), "PNG", seed=5)
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    table = pa.table(
        {
            "id": ["000000000009", "text-only", "000000000025"],
            "image": pa.array(
                [{"bytes": jpg, "path": "9.jpg"}, None, {"bytes": png, "path": None}],
                type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "conversations": pa.array(
                [
                    [
                        {"from": "human", "value": "<image>\nDescribe."},
                        {"from": "gpt", "value": "Food on a tray."},
                    ],
                    [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}],
                    [
                        {"from": "human", "value": "<image>\nDescribe."},
                        {"from": "gpt", "value": "A giraffe."},
                    ],
                ],
                type=pa.list_(turn),
            ),
            "data_source": ["coco", "sharegpt", "coco"],
        }
    )
    parquet = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, parquet)
    converter = load_converter()
    stats = converter.convert([parquet], tmp_path / "recap.jsonl", tmp_path / "images")
    assert stats == converter.ConvertStats(rows=3, images=2, text_only=1, unknown_format=0)
    assert (tmp_path / "images/0000/000000000.jpg").read_bytes() == jpg
    assert (tmp_path / "images/0000/000000002.png").read_bytes() == png

    out = run(tmp_path, tmp_path / "recap.jsonl", "llava", tmp_path / "images")
    objects = sample_objects(out)
    assert [o["id"] for o in objects] == ["000000000009", "text-only", "000000000025"]
    assert [o["image"] for o in objects] == ["0000/000000000.jpg", None, "0000/000000002.png"]
    assert objects[0]["conversations"][0] == {"from": "human", "value": "Describe."}
    samples = read_with_tarfile(out)
    assert samples["0000000000"]["jpg"] == jpg and samples["0000000002"]["png"] == png
    assert decoded(samples["0000000002"]["png"]).size == (20, 20)
