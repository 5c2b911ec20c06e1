"""Data faults never stop or hang a run: damaged shards give their readable samples and are counted as
`corrupt_shard` (reader-level units), a truncated shard in a 2-rank run is survived and reported, too many
corrupt shards end the run with a clear error, and a worker that raises ends every rank within 60 s."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest_shard import write_image
from train_fixtures import (
    PYTHON,
    REPO,
    RUN_TIMEOUT_S,
    TrainData,
    free_port,
    read_metrics,
    run_training,
    train_data,
    train_env,
    two_rank_config,
    write_config,
)

from vlmtrain.data.process import ImageTransform, ProcessorConfig, SampleProcessor
from vlmtrain.data.shard import shard
from vlmtrain.data.stream import TooManyCorruptShards, build_loader, merge_states, read_shard
from vlmtrain.data.tokenizer import build_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARDS, PER_SHARD = 4, 10
WORDS = ("a", "cat", "dog", "red", "sits", "on", "the", "mat", "what", "is", "there")


@pytest.fixture(scope="module")
def proc() -> SampleProcessor:
    tok = build_tokenizer([" ".join(WORDS)] * 20, vocab_size=300)
    return SampleProcessor(
        tok, ProcessorConfig(max_length=64, num_image_tokens=4), ImageTransform(image_size=8)
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shards of 10 image + chat samples (json then jpg member per sample), in input order."""
    root = tmp_path_factory.mktemp("pristine")
    records = []
    for i in range(SHARDS * PER_SHARD):
        write_image(root / "images" / f"{i}.jpg", (24, 16), seed=i)
        conv = [{"from": "human", "value": "<image>\nwhat is there"}, {"from": "gpt", "value": WORDS[i % 8]}]
        records.append({"id": f"r{i}", "image": f"{i}.jpg", "conversations": conv})
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shard(
        root / "chat.jsonl",
        "llava",
        root / "images",
        root / "out",
        shard_size=PER_SHARD,
        keep_order=True,
        progress=False,
    )
    return root / "out"


@pytest.fixture
def shards(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine shards to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "shards"))


def loader(source: Path | str, proc: SampleProcessor, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        micro_batch_size=3, rank=0, world_size=1, num_workers=0, seed=1, pad_token_id=0, resample=False
    )
    args.update(kw)
    return build_loader(source, proc, **args)


def keys_of(stream: Any) -> list[str]:
    return [k for b in stream for k in b["keys"]]


def all_keys() -> list[str]:
    return [f"{i:010d}" for i in range(SHARDS * PER_SHARD)]


def shard_path(root: Path, i: int) -> Path:
    return root / f"shard-{i:06d}.tar"


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


# --- reader level ----------------------------------------------------------------------------------------


def test_truncated_shard_yields_the_samples_before_the_cut(shards: Path, proc: SampleProcessor) -> None:
    path = shard_path(shards, 1)
    infos = members(path)  # the intact tar, read with the standard library
    jpgs = [m for m in infos if m.name.endswith(".jpg")]
    cut_through = jpgs[
        6
    ]  # cut inside the 7th sample's image: its json lies before the cut, its image does not
    path.write_bytes(path.read_bytes()[: cut_through.offset_data + cut_through.size // 2])
    complete = {m.name.split(".")[0] for m in jpgs if m.offset_data + m.size <= cut_through.offset_data}
    assert len(complete) == 6

    stream = loader(shards / "manifest.json", proc)
    got = keys_of(stream)
    lost = {f"{i:010d}" for i in range(PER_SHARD, 2 * PER_SHARD)} - complete
    assert sorted(got) == sorted(set(all_keys()) - lost)  # every other sample once, nothing of the cut
    assert stream.skip_counts() == {"corrupt_shard": len(lost)}  # the split sample is not a missing_image
    why = stream.corrupt_shards()["shard-000001.tar"]
    assert str(path) in why and "truncated" in why and "sha256" in why
    assert read_shard(path).damage is not None and len(read_shard(path)) == 6


def test_sha256_mismatch_is_named_and_every_readable_sample_used(shards: Path, proc: SampleProcessor) -> None:
    path = shard_path(shards, 2)
    json_member = members(path)[0]
    data = bytearray(path.read_bytes())
    text = bytes(data[json_member.offset_data : json_member.offset_data + json_member.size])
    changed = text.replace(b"what is there", b"what is THERE")  # same length: the tar still parses whole
    assert changed != text
    data[json_member.offset_data : json_member.offset_data + json_member.size] = changed
    path.write_bytes(bytes(data))
    assert (
        hashlib.sha256(data).hexdigest()
        != json.loads((shards / "manifest.json").read_text())["shards"][2]["sha256"]
    )

    stream = loader(shards / "manifest.json", proc)
    assert sorted(keys_of(stream)) == all_keys()  # nothing lost
    assert stream.skip_counts() == {}
    assert list(stream.corrupt_shards()) == ["shard-000002.tar"]
    assert "sha256 differs" in stream.corrupt_shards()["shard-000002.tar"]
    # a brace pattern has no digests: the same bytes are not flagged
    plain = loader(str(shards / "shard-{000000..000003}.tar"), proc)
    assert sorted(keys_of(plain)) == all_keys() and plain.corrupt_shards() == {}


@pytest.mark.parametrize(("claimed", "lost"), [(PER_SHARD + 3, 3), (PER_SHARD - 2, 0)])
def test_sample_count_mismatch_is_counted(
    shards: Path, proc: SampleProcessor, claimed: int, lost: int
) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["samples"] = claimed
    (shards / "manifest.json").write_text(json.dumps(manifest))
    stream = loader(shards / "manifest.json", proc)
    got = keys_of(stream)
    assert stream.skip_counts() == ({"corrupt_shard": lost} if lost else {})
    assert (
        f"holds {PER_SHARD} readable samples, the manifest/resume state says {claimed}"
        in (stream.corrupt_shards()["shard-000000.tar"])
    )
    first = [k for k in got if int(k) < PER_SHARD]
    assert len(first) == min(claimed, PER_SHARD) and len(set(first)) == len(first)  # the extra ones unused
    assert sorted(k for k in got if int(k) >= PER_SHARD) == all_keys()[PER_SHARD:]
    state = stream.state_dict()
    assert state["epoch_consumed"]["0"]["shard-000000.tar"] == claimed  # the epoch's accounting stays whole


def test_unreadable_shard_loses_all_its_samples(shards: Path, proc: SampleProcessor) -> None:
    stream = loader(shards / "manifest.json", proc)
    path = shard_path(shards, 3)
    path.unlink()
    path.mkdir()  # read_bytes() now fails with IsADirectoryError
    assert sorted(keys_of(stream)) == all_keys()[: 3 * PER_SHARD]
    assert stream.skip_counts() == {"corrupt_shard": PER_SHARD}
    assert "unreadable" in stream.corrupt_shards()["shard-000003.tar"]


def test_damaged_shard_of_unknown_size_counts_once(shards: Path, proc: SampleProcessor) -> None:
    path = shard_path(shards, 0)
    path.write_bytes(
        path.read_bytes()[: members(path)[8].offset]
    )  # cut on a header boundary: 4 samples whole
    pattern = str(shards / "shard-{000000..000003}.tar")
    full = loader(pattern, proc)
    got = keys_of(full)
    assert sorted(got) == sorted(all_keys()[:3] + all_keys()[PER_SHARD:])  # the 4th may be split: left out
    assert full.skip_counts() == {"corrupt_shard": 1}
    assert "no end-of-archive block" in full.corrupt_shards()["shard-000000.tar"]


def test_resume_after_a_corrupt_shard_is_exact(shards: Path, proc: SampleProcessor) -> None:
    path = shard_path(shards, 1)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    kw = dict(num_workers=2, open_shards=2, micro_batch_size=2)
    full = loader(shards / "manifest.json", proc, **kw)
    whole = [b["keys"] for b in full]
    for k in (1, 4, 7):
        head = loader(shards / "manifest.json", proc, **kw)
        first = [b["keys"] for b in itertools.islice(head, k)]
        saved = json.loads(json.dumps(merge_states([head.state_dict()])))
        tail = loader(shards / "manifest.json", proc, state=saved, **kw)
        rest = [b["keys"] for b in tail]
        assert first + rest == whole
        assert (
            tail.skip_counts() == full.skip_counts()
            and tail.state_dict()["epoch_consumed"] == (full.state_dict()["epoch_consumed"])
        )
        assert tail.corrupt_shards() == full.corrupt_shards()
    assert full.skip_counts()["corrupt_shard"] == PER_SHARD - len(
        {k for b in whole for k in b if 10 <= int(k) < 20}
    )


def test_more_corrupt_shards_than_allowed_is_a_clear_error(shards: Path, proc: SampleProcessor) -> None:
    for i in (0, 2):
        path = shard_path(shards, i)
        path.write_bytes(path.read_bytes()[:700])
    assert len(keys_of(loader(shards / "manifest.json", proc, max_corrupt_shards=2))) == 2 * PER_SHARD
    with pytest.raises(
        TooManyCorruptShards, match=r"2 corrupt shards, more than data.max_corrupt_shards=1"
    ) as err:
        keys_of(loader(shards / "manifest.json", proc, max_corrupt_shards=1))
    assert "shard-000000.tar" in str(err.value) and "shard-000002.tar" in str(err.value)


def test_evaluation_refuses_a_damaged_shard(shards: Path) -> None:
    from vlmtrain.eval.run import iter_eval_samples

    assert len(list(iter_eval_samples(shards / "manifest.json", ImageTransform(image_size=8)))) == 40
    path = shard_path(shards, 1)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"shard-000001\.tar: .*truncated.*re-write the evaluation shards"):
        list(iter_eval_samples(shards / "manifest.json", ImageTransform(image_size=8)))


class RaisingProcessor(SampleProcessor):
    """Raises an unexpected exception type for one sample (a bug, not bad data)."""

    def __call__(self, raw: Any) -> Any:
        if raw.key == "0000000013":
            raise ZeroDivisionError("bug in a worker")
        return super().__call__(raw)


def test_worker_exception_shuts_the_workers_down_at_once(pristine: Path, proc: SampleProcessor) -> None:
    raising = RaisingProcessor(proc.tokenizer, proc.config, proc.transform)
    stream = loader(pristine / "manifest.json", raising, num_workers=2)
    with pytest.raises(ZeroDivisionError, match="bug in a worker"):
        keys_of(stream)
    # The traceback still references the loader's frame; its workers must be gone anyway (they ignore
    # SIGTERM, so a worker left running would block interpreter exit).
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []


# --- training runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return train_data(tmp_path_factory.getbasetemp())


def truncated_copy(data: TrainData, dest: Path, shard_index: int) -> Path:
    """A copy of the recap shards with one shard cut to half its size; returns the new manifest."""
    shutil.copytree(data.recap.parent, dest)
    path = dest / f"shard-{shard_index:06d}.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return dest / "manifest.json"


def short_two_rank_config(data: TrainData, manifest: Path, steps: int) -> dict[str, Any]:
    cfg = two_rank_config(data)
    cfg["data"]["train"] = str(manifest)
    cfg["train"].update(max_steps=steps, save_every=steps, log_every=1)
    return cfg


@pytest.mark.slow
def test_two_rank_run_survives_a_truncated_shard(tmp_path: Path, data: TrainData) -> None:
    manifest = truncated_copy(data, tmp_path / "shards", 2)
    cfg = short_two_rank_config(data, manifest, steps=6)
    job = run_training([write_config(cfg, tmp_path / "cfg.json")], tmp_path / "run", ranks=2)
    records = read_metrics(tmp_path / "run" / cfg["name"] / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    last = records[-1]
    # 6 steps x 8 samples = 48 > 32: the whole first epoch went by, so all the cut shard's losses are in
    lost = PER_SHARD_TRAIN - len(read_shard(manifest.parent / "shard-000002.tar"))
    assert lost > 0 and last["data_skipped"].get("corrupt_shard", 0) >= lost
    assert last["corrupt_shards"] == ["shard-000002.tar"]
    assert f"corrupt shard shard-000002.tar: {manifest.parent / 'shard-000002.tar'}" in job.output()


PER_SHARD_TRAIN = 8  # train_fixtures.SHARD_SIZE


@pytest.mark.slow
def test_too_many_corrupt_shards_end_the_run_with_the_key_to_raise(tmp_path: Path, data: TrainData) -> None:
    manifest = truncated_copy(data, tmp_path / "shards", 1)
    cfg = short_two_rank_config(data, manifest, steps=6)
    cfg["data"].update(max_corrupt_shards=0, num_workers=0)
    job = run_training([write_config(cfg, tmp_path / "cfg.json")], tmp_path / "run", ranks=1, expect=1)
    out = job.output()
    assert "1 corrupt shards, more than data.max_corrupt_shards=0: shard-000001.tar" in out
    assert "TooManyCorruptShards" in out


@pytest.mark.slow
def test_a_raising_worker_ends_every_rank_within_60_s(tmp_path: Path, data: TrainData) -> None:
    """Two ranks started directly (like plain srun: no launcher kills the survivor); rank 0's worker raises."""
    cfg = write_config(short_two_rank_config(data, data.recap, steps=40), tmp_path / "cfg.json")
    port = free_port()
    logs, procs = [], []
    for rank in range(2):
        env = train_env()
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        cmd = [
            PYTHON,
            str(REPO / "tests" / "raising_entry.py"),
            "0",
            "6",
            "--config",
            str(cfg),
            "--run-dir",
            str(tmp_path / "run"),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
        logs.append(log)
    try:
        seen, tree = None, set()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            for p in procs:  # remember every process of the job (ranks and their DataLoader workers)
                with contextlib.suppress(psutil.NoSuchProcess):
                    tree |= {c.pid for c in psutil.Process(p.pid).children(recursive=True)}
            if seen is None and "injected failure" in (tmp_path / "rank0.log").read_text(errors="replace"):
                seen = time.monotonic()
            if seen is not None and time.monotonic() - seen > 60:
                break
            time.sleep(0.1)
        codes = [p.poll() for p in procs]
        ended = time.monotonic()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    text = [(tmp_path / f"rank{r}.log").read_text(errors="replace") for r in range(2)]
    if seen is None and "injected failure" in text[0]:
        # Logged after the last poll: every rank had ended within one polling interval of it (a race of the
        # loop, not of the job, which made this test flaky).
        seen = ended
    assert seen is not None, f"the injected failure never happened\n{text[0][-4000:]}"
    assert None not in codes, (
        f"a rank still ran 60 s after the failure: {codes}\n{text[0][-3000:]}\n{text[1][-3000:]}"
    )
    assert all(c != 0 for c in codes), codes
    assert ended - seen <= 60
    assert "ZeroDivisionError: injected failure in a DataLoader worker" in text[0]
    assert "vlmtrain: rank 0 failed" in text[0]
    time.sleep(1)
    alive = [
        pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert alive == [], f"processes of the job outlived it: {alive}"
    print(f"exit codes {codes}; last rank ended {ended - seen:.1f} s after the failure showed in the log")
