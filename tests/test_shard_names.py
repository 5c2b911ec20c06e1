"""Shard names from a manifest are data: hostile ones are refused before any file is opened or process runs.

Local, http(s) and ``pipe:`` manifests; a seeded fuzz over hostile names (shell syntax, '..', absolute paths,
drives, URL-encoded separators, NUL, newline, very long names) and a property over the names the rule
accepts, checked against what a shell, a path join and a URL join actually do with them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import quote, urljoin, urlsplit

import pytest
from test_remote_shards import corpus, no_proxy, serve  # noqa: F401  (fixtures: real shards; no proxy for curl)

from vlmtrain.data.shard import load_manifest
from vlmtrain.data.sources import (
    MAX_SHARD_NAME_BYTES,
    ShardNameError,
    check_shard_name,
    load_source,
)
from vlmtrain.train.preflight import check_data_source

# Hand-picked hostile names: each would read outside the folder, run a command, or change a URL's target.
HOSTILE = [
    "a.tar; touch {marker} #",
    "$(touch {marker}).tar",
    "`touch {marker}`.tar",
    "x.tar|touch {marker}",
    "x.tar&&touch {marker}",
    "x.tar\ntouch {marker}",
    "x.tar\x00.tar",
    "../../elsewhere/recap-000.tar",
    "..",
    "../x.tar",
    "/abs/path/recap-000.tar",
    "sub/dir.tar",
    "C:\\shards\\x.tar",
    "C:x.tar",
    "..\\..\\x.tar",
    "..%2F..%2Fsecret.tar",
    "%2e%2e%2fx.tar",
    "%2Fetc%2Fpasswd.tar",
    "//evil.example/x.tar",
    "http://evil.example/x.tar",
    "@evil.example.tar",
    "x.tar?redirect=evil",
    "x.tar#frag",
    "-rf.tar",
    "a+b.tar",
    ".hidden.tar",
    "a..tar",
    " x.tar",
    "x .tar",
    "x.tar ",
    "tab\t.tar",
    "x.tar\r",
    "caf\u00e9.tar",
    "x\u202e.tar",
    "x.zip",
    "x.tar.gz",
    ".tar",
    "",
    "a" * (MAX_SHARD_NAME_BYTES - 3) + ".tar",
]


def hostile_names(marker: Path) -> list[str]:
    """HOSTILE plus a seeded fuzz: a safe stem with one hostile fragment spliced in at a random place."""
    rng = random.Random(0)
    fragments = [";", "|", "&", "$", "`", "(", ")", "<", ">", "'", '"', "\\", "/", "*", "?", "[", "{", "}",
                 "~", "!", "#", "%", ":", "=", ",", "@", " ", "\t", "\n", "\x00", "\x7f", "\x1b", "..",
                 "%2f", "%00", "\u00a0", "\u2215", "\uff0e\uff0e"]  # fmt: skip
    fuzzed = []
    for _ in range(400):
        stem = "".join(rng.choice("abcxyz019_-") for _ in range(rng.randint(1, 12)))
        at = rng.randint(0, len(stem))
        fuzzed.append(stem[:at] + rng.choice(fragments) + stem[at:] + ".tar")
    return [n.format(marker=marker) for n in HOSTILE] + fuzzed


def manifest(names: list[str]) -> dict:
    return {"shards": [{"name": n, "samples": 1, "sha256": "0" * 64} for n in names]}


def test_every_hostile_name_is_refused_with_the_manifest_the_entry_and_the_rule(tmp_path: Path) -> None:
    names = hostile_names(tmp_path / "marker")
    assert len(set(names)) > 300
    for name in names:
        assert check_shard_name(name) is not None, repr(name)
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "manifest.json"
    for name in names[:60]:  # through the whole loader entry point, behind a good first entry
        path.write_text(json.dumps(manifest(["ok-000.tar", name])))
        with pytest.raises(ShardNameError) as caught:
            load_source(path)
        message = str(caught.value)
        assert str(path) in message and f"shards[1].name {name!r}" in message
        assert "one plain file name" in message and "Nothing was read or run" in message


def test_local_manifest_never_reaches_outside_its_folder(tmp_path: Path) -> None:
    """The targets exist, so without the check these manifests would have loaded (as they did before)."""
    (tmp_path / "elsewhere").mkdir()
    outside = tmp_path / "elsewhere" / "recap-000.tar"
    outside.write_bytes(b"x" * 1024)
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    for name in ("../../elsewhere/recap-000.tar", str(outside)):
        assert (folder / name).resolve() == outside.resolve()  # the join really leads there
        (folder / "manifest.json").write_text(json.dumps(manifest([name])))
        with pytest.raises(ShardNameError, match="shards\\[0\\]"):
            load_source(folder / "manifest.json")


def pipe_manifest(tmp_path: Path, names: list[str], quoted: bool) -> str:
    folder = tmp_path / "pipe"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest(names)))
    where = f"'{folder}/manifest.json'" if quoted else f"{folder}/manifest.json"
    return f"pipe:cat {where}"


@pytest.mark.parametrize("quoted", [False, True])
def test_pipe_manifest_names_never_run(tmp_path: Path, quoted: bool) -> None:
    marker = tmp_path / "marker"
    shell_names = [n.format(marker=marker) for n in HOSTILE[:6]]
    source = pipe_manifest(tmp_path, ["ok-000.tar"], quoted)
    # The control: how the reader used to build a shard's command (the manifest's file name replaced by the
    # shard's name, run by a shell as webdataset's gopen does). It does run the injected command.
    for name in shell_names[:2] if not quoted else []:
        old_command = source[len("pipe:") :].replace("manifest.json", name)
        subprocess.run(old_command, shell=True, capture_output=True, check=False)
        assert marker.exists(), old_command
        marker.unlink()
    for name in shell_names:
        source = pipe_manifest(tmp_path, ["ok-000.tar", name], quoted)
        with pytest.raises(ShardNameError, match="shards\\[1\\]"):
            load_source(source)
        assert not marker.exists(), name


def test_pipe_manifest_good_names_become_the_users_command(tmp_path: Path, corpus: Path) -> None:  # noqa: F811
    """A good name only replaces the manifest's file name in the user's command; the bytes read equal disk."""
    from vlmtrain.data.shard_reader import read_shard

    for quoted in (False, True):
        where = f"'{corpus}/manifest.json'" if quoted else f"{corpus}/manifest.json"
        shards = load_source(f"pipe:cat {where}")
        on_disk = load_source(corpus / "manifest.json")
        assert [s.name for s in shards] == [s.name for s in on_disk]
        for s, d in zip(shards, on_disk, strict=True):
            assert shlex.split(s.path[len("pipe:") :]) == ["cat", str(d.path)]
        assert read_shard(shards[0].path).keys == read_shard(on_disk[0].path).keys


def test_url_manifest_names_cannot_change_host_or_scheme(tmp_path: Path, corpus: Path) -> None:  # noqa: F811
    root = tmp_path / "site"
    (root / "evil").mkdir(parents=True)
    bad = [
        "..%2F..%2Fsecret.tar",
        "//evil.example/x.tar",
        "http://evil.example/x.tar",
        "x.tar?a=b",
        "../x.tar",
    ]
    (root / "evil" / "manifest.json").write_text(json.dumps(manifest(["ok-000.tar", *bad])))
    good = root / "good"
    good.mkdir()
    for p in corpus.iterdir():
        (good / p.name).write_bytes(p.read_bytes())
    with serve(root) as site:
        url = f"{site.url}/evil/manifest.json"
        for name in bad:
            (root / "evil" / "manifest.json").write_text(json.dumps(manifest(["ok-000.tar", name])))
            with pytest.raises(ShardNameError, match=re.escape(f"shards[1].name {name!r}")):
                load_source(url)
            problems, urls, _ = check_data_source("s data.train", url)  # preflight says the same
            assert urls == [] and "shards[1].name" in problems[0].message
        assert set(site.requests) == {"/evil/manifest.json"}  # no shard was ever asked for
        shards = load_source(f"{site.url}/good/manifest.json")
        for s in shards:
            parts = urlsplit(s.path)
            assert (parts.scheme, parts.netloc, parts.path) == ("http", site.url[7:], f"/good/{s.name}")


def test_names_the_rule_accepts_are_inert_for_shell_paths_and_urls() -> None:
    """A property over random accepted names, checked by what shlex, path joins and urljoin do with them."""
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-."
    accepted = 0
    for _ in range(2000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) + ".tar"
        if check_shard_name(name) is not None:
            continue
        accepted += 1
        assert shlex.split(f"cat {name} -") == ["cat", name, "-"]  # one word, nothing expanded
        assert shlex.quote(name) == name
        assert PurePosixPath(name).name == name and PureWindowsPath(name).name == name
        assert os.path.normpath(os.path.join("/data/shards", name)) == f"/data/shards/{name}"
        assert quote(name, safe="") == name
        joined = urlsplit(urljoin("https://bucket.example/a/manifest.json?sig=1", quote(name, safe="")))
        assert (joined.scheme, joined.netloc, joined.path) == ("https", "bucket.example", f"/a/{name}")
    assert accepted > 1500


def test_names_vlmtrain_shard_writes_are_accepted(corpus: Path) -> None:  # noqa: F811
    names = [s["name"] for s in load_manifest(corpus)["shards"]]
    assert names and all(check_shard_name(n) is None for n in names)
    for split in ("train", "val2014", "karpathy_test", "a-b_c"):
        assert check_shard_name(f"{split}-{123456:06d}.tar") is None


def test_shard_manifest_check_uses_the_same_rule(tmp_path: Path, corpus: Path) -> None:  # noqa: F811
    data = json.loads((corpus / "manifest.json").read_text())
    data["shards"][0]["name"] = "../x.tar"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="one plain file name"):
        load_manifest(tmp_path)


def test_preflight_reports_a_bad_local_manifest_name(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest(["ok.tar", "$(id).tar"])))
    problems, _, _ = check_data_source("s1 data.train", str(tmp_path / "manifest.json"))
    assert len(problems) == 1 and "shards[1].name '$(id).tar' contains '$', '(', ')'" in problems[0].message


def test_very_long_names_are_refused_by_length() -> None:
    """Very long and odd-byte names are refused by length before anything else looks at them."""
    long = hashlib.sha256(b"x").hexdigest() * 4 + ".tar"
    assert check_shard_name(long) is not None and "bytes long" in check_shard_name(long)
