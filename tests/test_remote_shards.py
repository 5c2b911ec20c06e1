"""Shards read over HTTP (a local server on 127.0.0.1) and through `pipe:cat` give exactly the batches the
same shards give from disk, also across a mid-epoch resume; unreachable or damaged remote shards follow the
corrupt-shard path (named, counted, the others read), an unreachable manifest is a clear error at load; and
`vlmtrain shard`, now writing with webdataset's TarWriter, still writes the bytes plain tarfile would."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import itertools
import json
import shutil
import socket
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import CORPUS
from conftest_shard import tar_members, write_image
from train_fixtures import (
    checkpoint_dir,
    complete_checkpoints,
    read_metrics,
    run_training,
    tiny_stage_config,
    train_data,
    write_config,
)

from vlmtrain.data import shard as shard_module
from vlmtrain.data import sources as sources_module
from vlmtrain.data.process import ImageTransform, ProcessorConfig, SampleProcessor
from vlmtrain.data.shard import shard
from vlmtrain.data.stream import (
    RemoteReadError,
    TooManyCorruptShards,
    build_loader,
    load_source,
    read_shard,
)

SHARDS, PER_SHARD = 5, 8
PATTERN = "shard-{000000..000004}.tar"
# 40 samples in batches of 3 over 2 workers: 20 batches run into the second epoch.
STEPS, CUT = 20, 7
LOADER = dict(micro_batch_size=3, rank=0, world_size=1, num_workers=2, seed=7, pad_token_id=0, open_shards=2)
TINY_DELAY = 0.001  # REMOTE_RETRY_DELAY_S in the failure tests


@pytest.fixture(scope="module")
def proc(tokenizer) -> SampleProcessor:
    config = ProcessorConfig(max_length=96, num_image_tokens=4)
    return SampleProcessor(tokenizer, config, ImageTransform(image_size=8))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 shards of 8 image + chat samples (seeded record order), written by `vlmtrain shard`."""
    root = tmp_path_factory.mktemp("corpus")
    records = [
        {
            "id": f"r{i}",
            "image": f"{i}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image in detail."},
                {"from": "gpt", "value": CORPUS[i % len(CORPUS)]},
            ],
        }
        for i in range(SHARDS * PER_SHARD)
    ]
    for i in range(SHARDS * PER_SHARD):
        write_image(root / "images" / f"{i}.jpg", (20 + i % 7, 16), seed=i)
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shard(root / "chat.jsonl", "llava", root / "images", root / "out", shard_size=PER_SHARD, progress=False)
    return root / "out"


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: Counter[str]
    lock: threading.Lock

    def do_GET(self) -> None:
        with self.lock:
            self.requests[self.path] += 1
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """An HTTP server on 127.0.0.1 (a thread, port 0) serving /good (the shards), /missing (shard 2 gone)
    and /badsha (shard 1 with one byte of a json member changed); it counts GETs per path."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(corpus, root / "good")
    shutil.copytree(corpus, root / "missing")
    (root / "missing" / "shard-000002.tar").unlink()
    shutil.copytree(corpus, root / "badsha")
    tar = root / "badsha" / "shard-000001.tar"
    with tarfile.open(tar) as t:
        first = t.getmembers()[0]
    assert first.name.endswith(".json")
    data = bytearray(tar.read_bytes())
    at = data.index(b"Describe", first.offset_data)
    data[at : at + 8] = b"DESCRIBE"  # same length: the tar still parses whole, only its sha256 changes
    tar.write_bytes(bytes(data))

    with serve(root) as served:
        yield served


@contextlib.contextmanager
def serve(root: Path) -> Iterator[SimpleNamespace]:
    """An HTTP server for ``root`` on 127.0.0.1 in a thread (port 0): its base URL and GET counts by path."""
    handler = type("Handler", (_Handler,), {"requests": Counter(), "lock": threading.Lock()})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}", requests=handler.requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """curl must reach 127.0.0.1 directly even where a proxy is configured."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    source: str | Path, proc: SampleProcessor, n: int | None = STEPS, state: dict | None = None, **kw: Any
) -> tuple[list[dict[str, Any]], Any]:
    """The first ``n`` batches of a fresh loader (all of them when n is None), and the loader."""
    loader = build_loader(source, proc, **{**LOADER, **kw}, state=state)
    iterator = iter(loader)
    try:
        return list(itertools.islice(iterator, n)), loader
    finally:
        iterator.close()  # shuts the DataLoader workers down


def assert_same_batches(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    assert all(isinstance(v, torch.Tensor) for v in (want[0]["input_ids"], want[0]["pixel_values"]))
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.keys() == b.keys(), f"batch {i}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (
                    f"batch {i}: {key} differs"
                )
            else:
                assert a[key] == b[key], f"batch {i}: {key}: {a[key]!r} vs {b[key]!r}"


@pytest.fixture(scope="module")
def reference(corpus: Path, proc: SampleProcessor) -> dict[str, list[dict[str, Any]]]:
    """The uninterrupted batches from disk, for a manifest source and for a brace-pattern source."""
    return {
        "manifest": run(corpus / "manifest.json", proc)[0],
        "pattern": run(f"{corpus}/{PATTERN}", proc)[0],
    }


def remote_source(kind: str, site: SimpleNamespace, corpus: Path) -> str:
    return {
        "http-manifest": f"{site.url}/good/manifest.json",
        "http-pattern": f"{site.url}/good/{PATTERN}",
        "pipe-manifest": f"pipe:cat {corpus}/manifest.json",
        "pipe-pattern": f"pipe:cat {corpus}/{PATTERN}",
    }[kind]


KINDS = ["http-manifest", "http-pattern", "pipe-manifest", "pipe-pattern"]


@pytest.mark.parametrize("kind", KINDS)
def test_remote_shards_give_the_disk_batches(kind: str, site, corpus: Path, proc, reference) -> None:
    source = remote_source(kind, site, corpus)
    shards = load_source(source)
    assert [s.name for s in shards] == [f"shard-{i:06d}.tar" for i in range(SHARDS)]
    assert all(isinstance(s.path, str) for s in shards)  # read through gopen, not as local files
    if kind.endswith("manifest"):
        assert all(s.sha256 is not None for s in shards)  # the manifest's digests are checked remotely too
    before = Counter(site.requests)
    got, loader = run(source, proc)
    assert_same_batches(got, reference[kind.split("-")[1]])
    assert loader.corrupt_shards() == {} and loader.skip_counts() == {}
    if kind.startswith("http"):
        fetched = Counter(site.requests) - before
        assert {f"/good/shard-{i:06d}.tar" for i in range(SHARDS)} <= set(fetched)


@pytest.mark.parametrize("kind", ["http-manifest", "pipe-pattern"])
def test_mid_epoch_resume_from_remote_shards_continues_the_disk_run(
    kind: str, site, corpus: Path, proc, reference
) -> None:
    source = remote_source(kind, site, corpus)
    first, loader = run(source, proc, n=CUT)
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    assert 0 < sum(state["epoch_consumed"]["0"].values()) < SHARDS * PER_SHARD  # mid-epoch
    rest, _ = run(source, proc, n=STEPS - CUT, state=state)
    assert_same_batches(first + rest, reference[kind.split("-")[1]])


def test_unreachable_manifest_url_is_a_clear_error_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(sources_module, "time", SimpleNamespace(sleep=sleeps.append))
    monkeypatch.setattr(sources_module, "REMOTE_RETRY_DELAY_S", TINY_DELAY)
    url = f"http://127.0.0.1:{closed_port()}/shards/manifest.json"
    with pytest.raises(RemoteReadError) as caught:
        load_source(url)
    message = str(caught.value)
    assert message.startswith(f"{url}: could not be read after {sources_module.REMOTE_ATTEMPTS} attempts")
    assert "curl exited with status 7: nothing accepts connections there" in message
    assert f"curl -fsSL '{url}' -o /dev/null" in message  # the fix
    assert isinstance(caught.value, FileNotFoundError)  # reported like a missing local manifest
    assert sleeps == [TINY_DELAY, 2 * TINY_DELAY]  # backoff between the 3 attempts


def test_missing_manifest_is_tried_each_attempt_and_named(site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources_module, "REMOTE_RETRY_DELAY_S", TINY_DELAY)
    monkeypatch.setattr(sources_module, "REMOTE_ATTEMPTS", 4)
    url = f"{site.url}/nowhere/manifest.json"
    with pytest.raises(
        RemoteReadError, match=r"after 4 attempts .*status 22: the server answered with an HTTP"
    ):
        load_source(url)
    assert site.requests["/nowhere/manifest.json"] == 4
    command = "pipe:cat /nonexistent/manifest.json"
    with pytest.raises(
        RemoteReadError, match=r"pipe:cat /nonexistent/manifest.json: .*status 1.*`cat /nonex"
    ):
        load_source(command)


def keys_on_disk(corpus: Path, names: list[str]) -> list[str]:
    """Sample keys of the named shards, read with tarfile."""
    return sorted({name.split(".")[0] for n in names for name, _ in tar_members(corpus / n)})


def test_missing_remote_shard_is_a_corrupt_shard_and_the_others_are_read(
    site, corpus: Path, proc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources_module, "REMOTE_RETRY_DELAY_S", TINY_DELAY)
    source = f"{site.url}/missing/manifest.json"
    got, loader = run(source, proc, n=None, resample=False)  # 2 DataLoader workers: neither dies
    others = [f"shard-{i:06d}.tar" for i in range(SHARDS) if i != 2]
    assert sorted(k for b in got for k in b["keys"]) == keys_on_disk(corpus, others)
    assert loader.skip_counts() == {"corrupt_shard": PER_SHARD}  # its manifest count, lost
    why = loader.corrupt_shards()
    assert list(why) == ["shard-000002.tar"]
    url = f"{site.url}/missing/shard-000002.tar"
    assert url in why["shard-000002.tar"] and "after 3 attempts" in why["shard-000002.tar"]
    assert site.requests["/missing/shard-000002.tar"] == sources_module.REMOTE_ATTEMPTS
    with pytest.raises(TooManyCorruptShards, match=r"data\.max_corrupt_shards=0: shard-000002\.tar: http://"):
        run(source, proc, n=None, resample=False, max_corrupt_shards=0)


def test_shard_behind_a_closed_port_is_counted_and_the_others_are_read(
    site, corpus: Path, proc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources_module, "REMOTE_RETRY_DELAY_S", TINY_DELAY)
    dead = f"http://127.0.0.1:{closed_port()}/shard-000003.tar"
    urls = [f"{site.url}/good/shard-{i:06d}.tar" for i in range(SHARDS) if i != 3] + [dead]
    got, loader = run("{" + ",".join(urls) + "}", proc, n=None, resample=False)
    others = [f"shard-{i:06d}.tar" for i in range(SHARDS) if i != 3]
    assert sorted(k for b in got for k in b["keys"]) == keys_on_disk(corpus, others)
    assert loader.skip_counts() == {"corrupt_shard": 1}  # unknown size (a pattern): one lost position
    why = loader.corrupt_shards()["shard-000003.tar"]
    assert dead in why and "status 7" in why and "curl -fsSL" in why


def test_remote_sha256_mismatch_is_fetched_again_then_named(
    site, corpus: Path, proc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources_module, "REMOTE_RETRY_DELAY_S", TINY_DELAY)
    before = Counter(site.requests)
    got, loader = run(f"{site.url}/badsha/manifest.json", proc, n=None, resample=False)
    fetched = Counter(site.requests) - before
    assert fetched["/badsha/shard-000001.tar"] == sources_module.REMOTE_ATTEMPTS  # a bad transfer is retried
    assert fetched["/badsha/shard-000000.tar"] == 1
    assert list(loader.corrupt_shards()) == ["shard-000001.tar"]
    assert "sha256 differs" in loader.corrupt_shards()["shard-000001.tar"]
    all_names = [f"shard-{i:06d}.tar" for i in range(SHARDS)]
    assert sorted(k for b in got for k in b["keys"]) == keys_on_disk(corpus, all_names)  # every sample parses


def test_unknown_url_scheme_names_the_pipe_alternative() -> None:
    with pytest.raises(
        ValueError, match=r"no handler for s3:// URLs.*'pipe:aws s3 cp s3://bucket/m\.json -'"
    ):
        load_source("s3://bucket/m.json")


def test_shard_locations_resolve_beside_a_remote_manifest(site, corpus: Path) -> None:
    manifest = json.loads((corpus / "manifest.json").read_text())
    listed = [(e["name"], e["samples"], e["sha256"]) for e in manifest["shards"]]
    # pipe: the manifest's file name in the command is replaced by the shard's
    shards = load_source(f"pipe:cat {corpus}/manifest.json | cat")
    assert [(s.name, s.samples, s.sha256) for s in shards] == listed
    assert shards[1].path == f"pipe:cat {corpus}/shard-000001.tar | cat"
    # a URL: same folder, and the query string (e.g. a container-wide access token) kept
    shards = load_source(f"{site.url}/good/manifest.json?token=abc")
    assert [(s.name, s.samples, s.sha256) for s in shards] == listed
    assert shards[1].path == f"{site.url}/good/shard-000001.tar?token=abc"
    contents = read_shard(shards[1].path, shards[1].sha256)
    assert contents.damage is None and contents.keys == read_shard(corpus / "shard-000001.tar").keys
    assert site.requests["/good/shard-000001.tar?token=abc"] >= 1


def plain_tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """The tar the pre-webdataset writer made: USTAR, TarInfo's zero mtime/uid/gid/names, mode 0444."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o444
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("image_size", [None, 12])
def test_webdataset_writer_keeps_the_shard_bytes(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_size: int | None
) -> None:
    made: list[Any] = []

    class Counted(shard_module.TarWriter):
        def __init__(self, *args: Any, **kw: Any) -> None:
            made.append(self)
            super().__init__(*args, **kw)

    monkeypatch.setattr(shard_module, "TarWriter", Counted)
    root = corpus.parent
    out = tmp_path / "out"
    summary = shard(
        root / "chat.jsonl",
        "llava",
        root / "images",
        out,
        shard_size=6,
        image_size=image_size,
        progress=False,
    )
    assert len(made) == len(summary.shards) == 7  # every shard went through webdataset's writer
    for info in summary.shards:
        data = (out / info.name).read_bytes()
        members = tar_members(out / info.name)
        assert [n.rsplit(".", 1)[1] for n, _ in members] == ["json", "jpg"] * (len(members) // 2)
        assert data == plain_tarfile_bytes(members), info.name


# --- training ---------------------------------------------------------------------------------------------

TRAIN_STEPS, SAVE_EVERY = 6, 3  # 32 samples / global batch 8 = 4 steps an epoch: step 3 is mid-epoch


@pytest.mark.slow
def test_stage0_resumed_mid_epoch_from_http_trains_as_from_disk(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Disk run of 6 steps; a copy rolled back to its step-3 checkpoint resumes with the shards served over
    HTTP: steps 4-6 (the rest of epoch 0 from partly consumed shards, then epoch 1) have the same losses.
    (Two launches, not three: the uninterrupted remote stream is the loader-level tests' subject.)"""
    data = train_data(tmp_path_factory.getbasetemp())
    local = tiny_stage_config(0, data, max_steps=TRAIN_STEPS, save_every=SAVE_EVERY)
    run_training([write_config(local, tmp_path / "local.json")], tmp_path / "local")
    want = [
        (r["step"], r["loss"]) for r in read_metrics(tmp_path / "local" / local["name"] / "metrics.jsonl")
    ]
    assert [step for step, _ in want] == list(range(1, TRAIN_STEPS + 1))

    shutil.copytree(tmp_path / "local", tmp_path / "http")
    stage_dir = tmp_path / "http" / local["name"]
    shutil.rmtree(stage_dir / "final")
    shutil.rmtree(checkpoint_dir(stage_dir, TRAIN_STEPS))
    assert complete_checkpoints(stage_dir) == [SAVE_EVERY]
    with serve(data.recap.parent) as served:
        remote = {**local, "data": {**local["data"], "train": f"{served.url}/manifest.json"}}
        job = run_training([write_config(remote, tmp_path / "http.json")], tmp_path / "http", resume=True)
        fetched = dict(served.requests)
    assert f"resumed from {checkpoint_dir(stage_dir, SAVE_EVERY)}" in " ".join(job.output().split())
    shards = {f"/{e['name']}" for e in json.loads(data.recap.read_text())["shards"]}
    assert "/manifest.json" in fetched and shards <= set(fetched)  # every shard came over HTTP
    assert [(r["step"], r["loss"]) for r in read_metrics(stage_dir / "metrics.jsonl")] == want
