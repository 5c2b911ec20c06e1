"""Tests for the shard stream: exact coverage across ranks and workers, resume, world-size changes, safety."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtrain.data.process import ImageTransform, ProcessorConfig, SampleProcessor
from vlmtrain.data.stream import (
    ShardError,
    balanced_slots,
    build_loader,
    load_source,
    merge_states,
    permutation,
    read_shard,
    sample_order,
    shard_order,
    splitmix64,
)
from vlmtrain.data.tokenizer import build_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer trained

SHARD_SIZES = [5, 9, 3, 11, 7, 6, 8]  # 49 samples, uneven on purpose
BAD = {"0000000004": "bad_json", "0000000017": "bad_image", "0000000030": "missing_json"}
LONG = "0000000022"  # a three-turn chat too long for max_length: its last pairs are dropped
WORDS = (
    "a", "cat", "dog", "sits", "on", "red", "mat", "two", "dogs", "play", "in", "the",
    "park", "what", "is", "there", "how", "many", "answer",
)  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer([" ".join(WORDS)] * 20, vocab_size=300)


@pytest.fixture(scope="module")
def proc(tok: Any) -> SampleProcessor:
    return SampleProcessor(
        tok, ProcessorConfig(max_length=96, num_image_tokens=4), ImageTransform(image_size=8)
    )


def image_bytes(index: int, fmt: str) -> bytes:
    rng = np.random.default_rng(index)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def sample_members(index: int) -> dict[str, bytes]:
    key = f"{index:010d}"
    rng = np.random.default_rng(1000 + index)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS, n))

    if key == LONG:
        conv = [{"from": r, "value": words(12)} for _ in range(3) for r in ("human", "gpt")]
        rec = {"task": "chat", "conversations": conv, "image": None}
    elif index % 3 == 0:
        rec = {
            "task": "vqa",
            "conversations": [{"from": "human", "value": words(4)}, {"from": "gpt", "value": words(2)}],
        }
        rec["image"] = None
    else:
        conv = [{"from": "human", "value": "what is there"}, {"from": "gpt", "value": "x"}]
        rec = {
            "task": "caption",
            "conversations": conv,
            "references": [words(5), words(6)],
            "image": f"{key}.jpg",
        }
    rec.update({"id": key, "source": "test"})
    members: dict[str, bytes] = {"json": json.dumps(rec).encode()}
    if rec["image"] is not None:
        members["jpg" if index % 2 else "png"] = image_bytes(index, "JPEG" if index % 2 else "PNG")
    reason = BAD.get(key)
    if reason == "bad_json":
        members["json"] = b'{"task": "chat", "conversations": ['
    elif reason == "bad_image":
        members["jpg"] = members.pop("jpg", members.pop("png", b""))[:60]
    elif reason == "missing_json":
        del members["json"]
        members["txt"] = b"stray"
    return members


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    entries, index = [], 0
    for s, size in enumerate(SHARD_SIZES):
        name = f"train-{s:06d}.tar"
        write_tar(root / name, [(f"{i:010d}", sample_members(i)) for i in range(index, index + size)])
        data = (root / name).read_bytes()
        entries.append(
            {"name": name, "samples": size, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        )
        index += size
    (root / "manifest.json").write_text(json.dumps({"samples": index, "skipped": {}, "shards": entries}))
    return root / "manifest.json"


ALL_KEYS = [f"{i:010d}" for i in range(sum(SHARD_SIZES))]
GOOD_KEYS = sorted(set(ALL_KEYS) - set(BAD))


def loader(source: Path | str, proc: SampleProcessor, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        micro_batch_size=3, rank=0, world_size=1, num_workers=2, seed=1, pad_token_id=0, resample=False
    )
    args.update(kw)
    return build_loader(source, proc, **args)


def batches(stream: Any, limit: int | None = None) -> list[list[str]]:
    return [b["keys"] for b in itertools.islice(stream, limit)]


def flat(bs: list[list[str]]) -> list[str]:
    return [k for b in bs for k in b]


# --- coverage --------------------------------------------------------------------------------------------


def test_two_ranks_two_workers_read_every_sample_once(dataset: Path, proc: SampleProcessor) -> None:
    ranks = [loader(dataset, proc, rank=r, world_size=2) for r in range(2)]
    keys = [flat(batches(r)) for r in ranks]
    assert sorted(keys[0] + keys[1]) == GOOD_KEYS  # no duplicate, no gap
    assert set(keys[0]).isdisjoint(keys[1])
    state = merge_states([r.state_dict() for r in ranks])
    assert state["epoch_consumed"]["0"] == {f"train-{s:06d}.tar": n for s, n in enumerate(SHARD_SIZES)}
    assert state["counters"]["skipped"] == dict(Counter(BAD.values()))
    assert state["counters"]["truncated"] == {"dropped_pairs": 2, "truncated_turns": 1}
    assert state["counters"]["ignored_members"] == {"txt": 1}
    per_rank = Counter(ranks[0].skip_counts()) + Counter(ranks[1].skip_counts())
    assert dict(per_rank) == state["counters"]["skipped"]


def test_workers_hand_out_uint8_pixels(dataset: Path, proc: SampleProcessor) -> None:
    """Pixels cross from the worker processes as the resized 8-bit image (the model normalizes them)."""
    seen = 0
    for batch in loader(dataset, proc, num_workers=2):
        assert batch["pixel_values"].dtype == torch.uint8
        with_image = [k for k in batch["keys"] if int(k) % 3 and k != LONG]
        assert batch["pixel_values"].shape[0] == len(with_image)
        for key, pixels in zip(with_image, batch["pixel_values"], strict=True):
            i = int(key)
            img = Image.open(io.BytesIO(image_bytes(i, "JPEG" if i % 2 else "PNG"))).convert("RGB")
            ref = np.asarray(img.resize((8, 8), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
            np.testing.assert_array_equal(pixels.numpy(), ref)
            seen += 1
    assert seen == sum(1 for k in GOOD_KEYS if int(k) % 3 and k != LONG)


def test_batches_have_the_collated_layout(dataset: Path, proc: SampleProcessor) -> None:
    first = next(iter(loader(dataset, proc, num_workers=0)))
    assert first["input_ids"].shape[0] == 3 and first["num_samples"] == 3
    assert first["pixel_values"].shape[1:] == (3, 8, 8)
    assert first["pixel_values"].shape[0] == int(first["image_flags"].any(dim=1).sum())
    packed = loader(dataset, proc, num_workers=0, pack_length=128, micro_batch_size=5)
    bs = list(packed)
    assert all(b["input_ids"].shape[1] == 128 for b in bs)
    assert sorted(flat([b["keys"] for b in bs])) == GOOD_KEYS


# --- resume ----------------------------------------------------------------------------------------------


def run_ranks(
    dataset: Path,
    proc: SampleProcessor,
    world: int,
    state: dict | None = None,
    limit: int | None = None,
    **kw: Any,
) -> tuple[list[list[list[str]]], dict]:
    ranks = [loader(dataset, proc, rank=r, world_size=world, state=state, **kw) for r in range(world)]
    out = [batches(r, limit) for r in ranks]
    return out, merge_states([r.state_dict() for r in ranks])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core runner is fine here
@pytest.mark.parametrize(
    ("world", "workers", "seed", "k"),
    [
        (2, 2, 1, 1),
        (2, 2, 1, 3),
        (2, 2, 1, 5),
        (2, 2, 1, 7),  # after one worker of rank 0 ran dry
        # 3 workers, the third runs dry after batch 9: the next role is not (batches delivered) % workers
        (1, 3, 2, 12),
    ],
)
def test_same_topology_resume_replays_the_exact_order(
    dataset: Path, proc: SampleProcessor, world: int, workers: int, seed: int, k: int
) -> None:
    kw = {"num_workers": workers, "seed": seed}
    full, full_state = run_ranks(dataset, proc, world, **kw)
    head, saved = run_ranks(dataset, proc, world, limit=k, **kw)
    saved = json.loads(json.dumps(saved))  # what a checkpoint round trip does
    tail, final_state = run_ranks(dataset, proc, world, state=saved, **kw)
    for r in range(world):
        assert head[r] == full[r][:k]
        assert tail[r] == full[r][k:]  # identical remaining ORDER, batch by batch
    assert final_state["counters"] == full_state["counters"]
    assert final_state["epoch_consumed"] == full_state["epoch_consumed"]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_world_size_change_reads_the_remainder_once(
    dataset: Path, proc: SampleProcessor, before: int, after: int
) -> None:
    head, saved = run_ranks(dataset, proc, world=before, limit=2)
    tail, final = run_ranks(dataset, proc, world=after, state=saved)
    seen = [k for rank in head for k in flat(rank)]
    rest = [k for rank in tail for k in flat(rank)]
    assert len(seen) == 3 * 2 * before and not set(seen) & set(rest)
    assert sorted(seen + rest) == GOOD_KEYS
    assert final["counters"]["skipped"] == dict(Counter(BAD.values()))


def test_restore_rejects_partial_or_foreign_state(dataset: Path, proc: SampleProcessor) -> None:
    ranks = [loader(dataset, proc, rank=r, world_size=2, num_workers=0) for r in range(2)]
    for r in ranks:
        batches(r, 1)
    with pytest.raises(ValueError, match="covers ranks"):
        loader(dataset, proc, state=ranks[0].state_dict())
    with pytest.raises(ValueError, match="seed"):
        loader(dataset, proc, seed=2, state=merge_states([r.state_dict() for r in ranks]))
    with pytest.raises(ValueError, match="repeat ranks"):
        merge_states([ranks[0].state_dict(), ranks[0].state_dict()])


def test_iterating_again_continues(dataset: Path, proc: SampleProcessor) -> None:
    stream = loader(dataset, proc)
    first = batches(stream, 4)
    rest = batches(stream)
    assert sorted(flat(first) + flat(rest)) == GOOD_KEYS
    assert first + rest == batches(loader(dataset, proc))
    assert batches(stream) == []  # a finite stream that has been read to the end stays empty


# --- order -----------------------------------------------------------------------------------------------


def test_natural_order_without_shuffle(dataset: Path, proc: SampleProcessor) -> None:
    keys = flat(batches(loader(dataset, proc, shuffle=False, num_workers=0)))
    assert keys == GOOD_KEYS  # shard list order, then tar order


def test_shuffle_is_seeded(dataset: Path, proc: SampleProcessor) -> None:
    a = flat(batches(loader(dataset, proc, seed=1, num_workers=0)))
    b = flat(batches(loader(dataset, proc, seed=1, num_workers=0)))
    c = flat(batches(loader(dataset, proc, seed=2, num_workers=0)))
    assert a == b and a != c and sorted(a) == sorted(c) == GOOD_KEYS
    assert shard_order(7, 1, 0, True) != shard_order(7, 1, 1, True)
    assert sample_order(50, 1, 0, "s", True) != sample_order(50, 1, 1, "s", True)
    assert sorted(permutation(1000, "x")) == list(range(1000))
    # pinned: our own PRNG must not drift, or saved offsets would point at different samples
    assert permutation(8, "samples", 0, 0, "train-000000.tar") == PINNED_PERMUTATION


PINNED_PERMUTATION = [4, 1, 5, 3, 6, 7, 2, 0]


def test_splitmix64_reference_vectors() -> None:
    # published outputs of Vigna's splitmix64.c for seeds 0 and 1234567
    assert splitmix64(0)[1] == 0xE220A8397B1DCDAF
    state, out = 1234567, []
    for _ in range(3):
        state, value = splitmix64(state)
        out.append(value)
    assert out == [6457827717110365317, 3203168211198807973, 9817491932198370423]


def test_resample_continues_into_the_next_epoch(dataset: Path, proc: SampleProcessor) -> None:
    stream = loader(dataset, proc, resample=True, num_workers=0)
    n = len(GOOD_KEYS)
    keys = flat(batches(stream, (2 * n) // 3 + 1))
    epoch0, epoch1 = keys[:n], keys[n : 2 * n]
    assert sorted(epoch0) == sorted(epoch1) == GOOD_KEYS
    assert epoch0 != epoch1
    assert "1" in stream.state_dict()["epoch_consumed"]


# --- topology edge cases ---------------------------------------------------------------------------------


def test_fewer_shards_than_slots_warns_and_does_not_hang(dataset: Path, proc: SampleProcessor) -> None:
    source = str(dataset.parent / "train-{000000..000002}.tar")  # 3 shards, counts unknown
    with pytest.warns(
        UserWarning, match=r"3 shards for 2 ranks x 2 workers = 4 slots: 1 slot\(s\) read nothing"
    ):
        ranks = [loader(source, proc, rank=r, world_size=2) for r in range(2)]
    keys = flat(batches(ranks[0])) + flat(batches(ranks[1]))
    assert sorted(keys) == [k for k in GOOD_KEYS if int(k) < 17]
    assert merge_states([r.state_dict() for r in ranks])["shard_samples"] == {
        "train-000000.tar": 5, "train-000001.tar": 9, "train-000002.tar": 3,
    }  # fmt: skip
    with pytest.raises(ValueError, match="no data at all"):
        loader(str(dataset.parent / "train-000000.tar"), proc, rank=1, world_size=2, resample=True)


def test_all_skipped_endless_slot_raises(tmp_path: Path, proc: SampleProcessor) -> None:
    write_tar(tmp_path / "bad.tar", [(f"{i:010d}", {"json": b"nope"}) for i in range(4)])
    with pytest.raises(ShardError, match="no usable sample"):
        next(iter(loader(str(tmp_path / "bad.tar"), proc, resample=True, num_workers=0)))


# --- sources and safety ----------------------------------------------------------------------------------


def test_load_source_errors_name_the_path(dataset: Path, proc: SampleProcessor, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope/manifest\.json"):
        load_source(tmp_path / "nope" / "manifest.json")
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shard files are missing: .*train-000099.tar"):
        load_source(str(dataset.parent / "train-{000000,000099}.tar"))
    assert [s.samples for s in load_source(dataset)] == SHARD_SIZES
    manifest = json.loads(dataset.read_text())
    manifest["shards"][0]["samples"] = 6
    (tmp_path / "train-000000.tar").write_bytes((dataset.parent / "train-000000.tar").read_bytes())
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": manifest["shards"][:1]}))
    # A count that disagrees with the manifest is a corrupt shard: counted, not fatal (tests/test_corrupt_shards.py).
    stream = loader(tmp_path / "manifest.json", proc, num_workers=0)
    assert sorted(flat(batches(stream))) == [k for k in GOOD_KEYS if int(k) < 5]
    assert stream.skip_counts() == {"bad_json": 1, "corrupt_shard": 1}
    assert (
        "holds 5 readable samples, the manifest/resume state says 6"
        in stream.corrupt_shards()["train-000000.tar"]
    )


def test_pickles_in_shards_are_never_loaded(
    tmp_path: Path, proc: SampleProcessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = io.BytesIO()
    torch.save({"x": torch.ones(2)}, payload)
    samples = [(f"{i:010d}", sample_members(i)) for i in range(1, 4)]
    samples[0][1]["pth"] = payload.getvalue()
    samples[1][1]["pickle"] = pickle.dumps({"evil": 1})
    samples[2][1]["pyd"] = b"MZ\x90\x00"
    samples.append(("0000000099", {"pth": payload.getvalue()}))
    write_tar(tmp_path / "mixed.tar", samples)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("deserialization called")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, forbidden)
    stream = loader(str(tmp_path / "mixed.tar"), proc, num_workers=0)
    keys = flat(batches(stream))
    assert sorted(keys) == ["0000000001", "0000000002", "0000000003"]
    assert stream.ignored_member_counts() == {"pickle": 1, "pth": 2, "pyd": 1}
    assert stream.skip_counts() == {"missing_json": 1}
    assert set(read_shard(tmp_path / "mixed.tar").members[0]) == {"json", "jpg"}


# --- token budget: one step group per item ---------------------------------------------------------------

BUDGET = dict(token_budget=192, pack_length=96, micro_batch_size=5)  # a step share of 5 samples, 2 rows each


def test_budget_items_are_step_groups_of_the_step_share(dataset: Path, proc: SampleProcessor) -> None:
    groups = list(loader(dataset, proc, num_workers=0, **BUDGET))
    for g in groups[:-1]:  # the last group of a finite pass holds what is left
        assert g["num_samples"] == 5
        assert all(m["input_ids"].shape[1] <= 96 for m in g["micro_batches"])
        assert all(m["input_ids"].numel() <= 192 for m in g["micro_batches"])
    assert sorted(k for g in groups for k in g["keys"]) == GOOD_KEYS
    counts = {len(g["micro_batches"]) for g in groups}
    assert len(counts) > 1, f"the stream's lengths should give varying micro-batch counts, got {counts}"


@pytest.mark.parametrize("k", [1, 3])
def test_budget_same_topology_resume_replays_the_exact_groups(
    dataset: Path, proc: SampleProcessor, k: int
) -> None:
    kw = {"num_workers": 2, **BUDGET}
    full, _ = run_ranks(dataset, proc, 2, **kw)
    head, saved = run_ranks(dataset, proc, 2, limit=k, **kw)
    tail, _ = run_ranks(dataset, proc, 2, state=json.loads(json.dumps(saved)), **kw)
    for r in range(2):
        assert head[r] + tail[r] == full[r]


def test_budget_world_size_change_reads_the_remainder_once(dataset: Path, proc: SampleProcessor) -> None:
    head, saved = run_ranks(dataset, proc, world=2, limit=2, **BUDGET)
    tail, _ = run_ranks(dataset, proc, world=1, state=saved, **BUDGET)
    seen = [k for rank in head for k in flat(rank)]
    rest = [k for rank in tail for k in flat(rank)]
    assert len(seen) == 5 * 2 * 2 and not set(seen) & set(rest)
    assert sorted(seen + rest) == GOOD_KEYS


def test_balanced_slots_leave_remainders_within_one_shard() -> None:
    import random

    rng = random.Random(0)
    for _ in range(200):
        names = [f"s{i}" for i in range(rng.randint(1, 9))]
        left = {n: rng.randint(0, 12) for n in names}
        slots = rng.randint(1, 4)
        dealt = balanced_slots(names, left, slots)
        assert set(dealt) == set(names) and set(dealt.values()) <= set(range(slots))
        load = [sum(left[n] for n in names if dealt[n] == k) for k in range(slots)]
        assert max(load) - min(load) <= max(left.values())


@pytest.mark.parametrize("sizes_known", [True, False])
def test_world_size_change_deals_the_remainder_evenly_and_resumes_exactly(
    dataset: Path, proc: SampleProcessor, sizes_known: bool
) -> None:
    """1 slot interleaving 4 open shards, resumed on 2 ranks: each new slot owes half of what is left (within one
    sample below the shard with the manifest's sizes; within one shard in whole shards from a pattern, whose
    unread shards' sizes are unknown), and the re-dealt slots survive a second resume on the new topology."""
    source = dataset if sizes_known else str(dataset.parent / "train-{000000..000006}.tar")
    kw = {"num_workers": 0, "resample": True, "open_shards": 4}
    _, saved = run_ranks(source, proc, world=1, limit=3, **kw)
    saved = json.loads(json.dumps(saved))
    ranks = [loader(source, proc, rank=r, world_size=2, state=saved, **kw) for r in range(2)]
    consumed = saved["epoch_consumed"]["0"]
    left = [
        sum(
            (u.hi if u.hi is not None else SHARD_SIZES[u.shard]) - u.lo - consumed.get(u.key, 0)
            for u in r.dataset().assigned(r.rank, 0)
        )
        for r in ranks
    ]
    assert sum(left) == sum(SHARD_SIZES) - sum(consumed.values())
    assert abs(left[0] - left[1]) <= (1 if sizes_known else max(SHARD_SIZES))
    full = [batches(r, 4) for r in ranks]
    mid, state = run_ranks(source, proc, world=2, state=saved, limit=2, **kw)
    assert state["epoch_units" if sizes_known else "epoch_slots"]["0"]["slots"] == 2
    tail, _ = run_ranks(source, proc, world=2, state=json.loads(json.dumps(state)), limit=2, **kw)
    assert [m + t for m, t in zip(mid, tail, strict=True)] == full
