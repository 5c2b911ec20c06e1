"""Reading one shard: a whole tar into memory, members grouped into samples, damage found and described.

A damaged shard (unreadable or unreachable, truncated, garbled, or hashing differently from its manifest) never
raises here: it gives the samples it still holds and says what is wrong, so the loader can count the lost ones
as ``corrupt_shard`` skips and train on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmtrain.data.process import SAMPLE_EXTENSIONS
from vlmtrain.data.sources import RemoteReadError, fetch_checked

_BLOCK = 512  # tar block size


@dataclass(frozen=True)
class ShardSamples:
    """A shard's samples in natural order: undecoded member bytes, and the members that were ignored."""

    keys: list[str]
    members: list[dict[str, memoryview]]
    ignored: list[list[str]]
    """Per sample, the extensions of members that are not sample data (never decoded)."""
    damage: str | None = None
    """Why the shard is damaged (unreadable, truncated, sha256 mismatch); None when it read whole."""

    def __len__(self) -> int:
        return len(self.keys)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's convention: key = path up to the first dot of the file name, ext = the rest."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def read_shard(path: Path | str, sha256: str | None = None) -> ShardSamples:
    """Read a whole uncompressed tar into memory and group its members by key (no decoding).

    ``path``: a local file, or a URL / pipe: command (ShardInfo.path), fetched whole with retries.
    Never raises for a damaged file: an unreadable (or, remote, unreachable) one gives no samples; a
    truncated or garbled tar gives the samples whose members all lie before the first bad header or the cut
    (the sample the cut may have split is left out too); ``damage`` says what was wrong, including a sha256
    that is not ``sha256``.
    """
    try:
        data, intact = _shard_bytes(path, sha256)
    except RemoteReadError as err:
        return ShardSamples([], [], [], damage=f"unreadable ({err.reason})")
    except OSError as err:
        return ShardSamples([], [], [], damage=f"unreadable ({err})")
    problems = [] if intact else ["its sha256 differs from the manifest's"]
    infos, cut, cut_key = _tar_members(data)
    shard = _group_members(infos, memoryview(data))
    if cut is not None:
        problems.append(cut)
        if shard.keys and cut_key in (None, shard.keys[-1]):
            for column in (shard.keys, shard.members, shard.ignored):
                column.pop()  # the sample the cut went through may lack members
    return dataclasses.replace(shard, damage="; ".join(problems) or None)


def _shard_bytes(path: Path | str, sha256: str | None) -> tuple[bytes, bool]:
    """The shard's bytes and whether they hash to ``sha256``; a local file is read once, a remote one with
    retries (a remote transfer that hashes differently is fetched again)."""
    if isinstance(path, str):
        return fetch_checked(path, sha256)
    data = path.read_bytes()
    return data, sha256 is None or hashlib.sha256(data).hexdigest() == sha256


def _tar_members(data: bytes) -> tuple[list[tarfile.TarInfo], str | None, str | None]:
    """The members before any damage, what the damage is, and the key of the member it cut (None: unknown)."""
    infos: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            while (info := tar.next()) is not None:
                if info.offset_data + info.size > len(data):
                    cut = f"truncated ({len(data)} bytes): member {info.name} runs past the end"
                    return infos, cut, split_member_name(info.name)[0]
                infos.append(info)
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as err:
        return infos, f"not a readable tar after {len(infos)} members ({err})", None
    end = infos[-1].offset_data + -(-infos[-1].size // _BLOCK) * _BLOCK if infos else 0
    if data[end : end + _BLOCK] != bytes(_BLOCK):
        # tarfile stops quietly at a cut on a header boundary; a whole tar ends with zero blocks.
        return infos, f"truncated ({len(data)} bytes): no end-of-archive block after the last member", None
    return infos, None, None


def _group_members(infos: Sequence[tarfile.TarInfo], view: memoryview) -> ShardSamples:
    slot_of: dict[str, int] = {}
    shard = ShardSamples([], [], [])
    for info in infos:
        if info.isdir():
            continue
        key, ext = split_member_name(info.name)
        i = slot_of.setdefault(key, len(shard.keys))
        if i == len(shard.keys):
            shard.keys.append(key)
            shard.members.append({})
            shard.ignored.append([])
        if not info.isfile():
            shard.ignored[i].append("<link>")
        elif ext not in SAMPLE_EXTENSIONS:
            shard.ignored[i].append(ext or "<no extension>")
        elif ext in shard.members[i]:
            shard.ignored[i].append(f"duplicate {ext}")
        else:
            shard.members[i][ext] = view[info.offset_data : info.offset_data + info.size]
    return shard
