"""Where shards are: manifests and brace patterns naming local files, URLs or ``pipe:`` commands; remote reads.

A manifest is data from elsewhere (a shared bucket, a colleague's run, a dataset release), so the shard names
it lists are checked before anything opens them (``check_shard_name``): each is one plain file name, and the
shard's location is the manifest's own folder, URL folder or ``pipe:`` command with only the file name
changed. Commands come only from the user: a ``pipe:`` source is taken from the config or the command line,
never from a manifest, and a name never reaches a shell unquoted (docs/data_format.md, "Trust model").

Remote objects (URLs, ``pipe:`` commands) are read whole through webdataset's gopen, with retries and errors
that name the object, why it failed and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit
from urllib.request import url2pathname

import braceexpand
from webdataset.gopen import gopen, gopen_schemes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its state name, where it is, and its sample count when a manifest gives it."""

    name: str
    path: Path | str
    """A local file (Path), or a URL / ``pipe:`` command (str) read through webdataset's gopen."""
    samples: int | None
    sha256: str | None = None
    """Hex digest from the manifest; a shard whose bytes hash differently is counted as corrupt."""


# ---------------------------------------------------------------------------------------------------------
# Shard names from manifests (docs/data_format.md, "Shard names" and "Trust model")
# ---------------------------------------------------------------------------------------------------------

SHARD_SUFFIX = ".tar"
MAX_SHARD_NAME_BYTES = 255  # NAME_MAX of common file systems; a longer name cannot be a file
# Letters, digits, '_', '-' and '.': characters that are inert in a POSIX shell, need no percent-encoding
# in a URL path and cannot separate path segments. Nothing else may appear (no whitespace, quotes, '$', ';',
# '|', '&', '`', '%', ':', '\\', '/', control characters, non-ASCII). A leading '-' would read as an option
# of the command the name is passed to, a leading '.' would name a hidden file (or '.', '..').
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
SHARD_NAME_RULE = (
    "a shard name must be one plain file name: ASCII letters, digits, '_', '-' and '.', not starting with "
    f"'-' or '.', no '..', at most {MAX_SHARD_NAME_BYTES} bytes, ending in {SHARD_SUFFIX!r} "
    "(no path separators, absolute paths, drives, whitespace, shell or URL syntax)"
)


def check_shard_name(name: object) -> str | None:
    """Why ``name`` is not a plain shard file name, or None when it is one (SHARD_NAME_RULE)."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_SHARD_NAME_BYTES:
        return f"is {len(name.encode('utf-8', 'surrogatepass'))} bytes long, more than {MAX_SHARD_NAME_BYTES}"
    if _SHARD_NAME.fullmatch(name) is None:
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "_.-"))})
        if bad:
            return f"contains {', '.join(repr(c) for c in bad)}"
        return f"starts with {name[0]!r}"
    if ".." in name:
        return "contains '..'"
    if not name.endswith(SHARD_SUFFIX) or name == SHARD_SUFFIX:
        return f"does not end in {SHARD_SUFFIX!r} (the only shard format the reader supports)"
    return None


class ShardNameError(ValueError):
    """A manifest lists a shard name that is not a plain file name; nothing was opened or run."""

    def __init__(self, manifest: str, index: int, name: object, why: str) -> None:
        super().__init__(
            f"manifest {manifest}: shards[{index}].name {name!r} {why}; {SHARD_NAME_RULE}. Nothing was read or "
            "run. A manifest written by `vlmtrain shard` only has such names: re-shard the data, or fix the entry "
            "if you trust where the manifest came from"
        )
        self.manifest, self.index, self.name = manifest, index, name


# ---------------------------------------------------------------------------------------------------------
# Sources: local paths, URLs and pipe: commands (docs/data_format.md, "Training from a bucket or HTTP")
# ---------------------------------------------------------------------------------------------------------

# A remote read (URL or pipe: command) is tried this many times per shard visit, waiting REMOTE_RETRY_DELAY_S
# before the second attempt and twice as long before each later one. These wrap the tool's own retries
# (webdataset runs curl with --retry 30 for http(s)); module constants so tests can make the waits tiny.
REMOTE_ATTEMPTS = 3
REMOTE_RETRY_DELAY_S = 1.0

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
PIPE = "pipe:"
# What curl's exit statuses mean (webdataset opens http(s) with curl -f -s -L).
_CURL_EXITS = {
    6: "the host name does not resolve",
    7: "nothing accepts connections there (wrong host or port, server down, firewall)",
    18: "the transfer ended early",
    22: "the server answered with an HTTP error (wrong URL, missing object or no access)",
    28: "it timed out",
    35: "the TLS handshake failed",
    60: "the server's TLS certificate is not trusted",
}


class RemoteReadError(FileNotFoundError):
    """A URL or pipe: command gave no bytes after every attempt.

    A FileNotFoundError, so callers that report a missing local manifest report an unreachable one alike.
    """

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"{location}: {reason}")
        self.location, self.reason = location, reason


def is_remote(source: str | Path) -> bool:
    """Whether ``source`` is read through webdataset's gopen (a URL or ``pipe:`` command, not ``file://``)."""
    text = str(source)
    return text.startswith(PIPE) or (_URL.match(text) is not None and not text.startswith("file:"))


def load_source(source: str | Path) -> list[ShardInfo]:
    """Shards of a ``manifest.json`` (names relative to it) or of a brace pattern / single path.

    Either may be a local path, a ``file://``, ``http(s)://`` (or another scheme webdataset's gopen handles)
    URL, or a ``pipe:`` command writing the file to stdout. A remote manifest is fetched now (a clear
    RemoteReadError naming it when it cannot be); remote shards are only read when a worker opens them.
    """
    text = str(source)
    shards = _load_manifest(text) if names_manifest(text) else _expand_pattern(text)
    if not shards:
        raise ValueError(f"{text}: names no shards")
    _check_unique_names(shards, text)
    missing = [str(s.path) for s in shards if isinstance(s.path, Path) and not s.path.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{text}: {len(missing)} of {len(shards)} shard files are missing: {shown}")
    return shards


def _location(text: str) -> Path | str:
    """A local Path, or the URL / pipe: command itself once gopen is known to handle it."""
    if text.startswith("file:"):
        return Path(url2pathname(urlsplit(text).path))
    if not is_remote(text):
        return Path(text)
    if not text.startswith(PIPE):
        scheme = text.split(":", 1)[0].lower()
        if scheme not in gopen_schemes:
            raise ValueError(
                f"{text}: webdataset's gopen has no handler for {scheme}:// URLs; stream the object through its "
                f"command line tool instead, e.g. 'pipe:aws s3 cp {text} -' (see docs/data_format.md)"
            )
    return text


def _pipe_words(command: str) -> list[str]:
    return [w.strip("'\"") for w in command[len(PIPE) :].split()]


def names_manifest(text: str) -> bool:
    """A manifest, not a shard pattern: the path, URL path or a word of the pipe: command ends in .json."""
    if text.startswith(PIPE):
        return any(w.endswith(".json") for w in _pipe_words(text))
    return (urlsplit(text).path if is_remote(text) else text).endswith(".json")


def _shard_name(location: Path | str) -> str:
    """The state name of a pattern's shard: its file name (a URL's last path segment; for a pipe: command,
    that of its last word naming a .tar), so the same shards get the same names, orders and resume state
    whether read from disk, over HTTP or through a command."""
    if isinstance(location, Path):
        return location.name
    if location.startswith(PIPE):
        tars = [w for w in _pipe_words(location) if ".tar" in w]
        return tars[-1].rsplit("/", 1)[-1] if tars else location
    return urlsplit(location).path.rsplit("/", 1)[-1] or location


def _beside(manifest: Path | str, name: str) -> Path | str:
    """Where shard ``name`` of a manifest is: next to it (same folder, URL folder, or the pipe: command with
    the manifest's file name replaced by the shard's; a URL's query string, e.g. a SAS token, is kept).

    ``name`` has passed check_shard_name: one segment, no '..', nothing a shell or a URL parser reads as
    syntax. It is still quoted where it lands (shlex.quote in a command, percent-encoding in a URL), so the
    location can only differ from the manifest's in the file name, whatever the rule lets through.
    """
    if isinstance(manifest, Path):
        return manifest.parent / name
    if manifest.startswith(PIPE):
        word = [w for w in _pipe_words(manifest) if w.endswith(".json")][-1]
        at = manifest.rindex(word)
        shard = word[: word.rfind("/") + 1] + shlex.quote(name)
        return manifest[:at] + shard + manifest[at + len(word) :]
    parts = urlsplit(manifest)
    folder = parts.path[: parts.path.rfind("/") + 1]
    location = urlunsplit(parts._replace(path=folder + quote(name, safe=""), fragment=""))
    moved = urlsplit(location)
    if (moved.scheme, moved.netloc) != (parts.scheme, parts.netloc):  # unreachable for a checked name
        raise ShardNameError(manifest, -1, name, "would change the URL's scheme or host")
    return location


def _load_manifest(source: str) -> list[ShardInfo]:
    location = _location(source)
    if isinstance(location, Path):
        if not location.is_file():
            raise FileNotFoundError(
                f"manifest {location} does not exist; write shards with `vlmtrain shard` first"
            )
        data = location.read_bytes()
    else:
        data = fetch(location)
    return manifest_shards(source, data)


def manifest_shards(source: str, data: bytes) -> list[ShardInfo]:
    """The shards a manifest's bytes list, located beside ``source`` (the manifest's path, URL or ``pipe:``
    command). Every name is checked before any location is built from one (ShardNameError)."""
    location = _location(source)
    try:
        entries = json.loads(data)["shards"]
        names = [e["name"] for e in entries]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise _malformed(source, err) from err
    for i, name in enumerate(names):  # every name, before any location is built from one
        why = check_shard_name(name)
        if why is not None:
            raise ShardNameError(source, i, name, why)
    try:
        return [
            ShardInfo(name, _beside(location, name), int(e["samples"]), _sha256(e.get("sha256")))
            for name, e in zip(names, entries, strict=True)
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise _malformed(source, err) from err


def _malformed(source: str, err: Exception) -> ValueError:
    return ValueError(
        f"manifest {source}: expected {{'shards': [{{'name': str, 'samples': int, ...}}]}} ({err!r})"
    )


def _sha256(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 64:
        raise ValueError(f"sha256 {value!r} is not a hex digest")
    return value.lower()


def _expand_pattern(pattern: str) -> list[ShardInfo]:
    locations = [_location(p) for p in braceexpand.braceexpand(pattern)]
    return [ShardInfo(_shard_name(loc), loc, None) for loc in locations]


# ---------------------------------------------------------------------------------------------------------
# Remote reads
# ---------------------------------------------------------------------------------------------------------


def fetch(location: str) -> bytes:
    """The whole object at a URL, or a ``pipe:`` command's whole stdout, read with webdataset's gopen.

    Raises RemoteReadError naming ``location``, why and the fix after REMOTE_ATTEMPTS failed attempts.
    """
    return fetch_checked(location, None)[0]


def fetch_checked(location: str, sha256: str | None) -> tuple[bytes, bool]:
    """The bytes, and whether they hash to ``sha256`` (True when None). A transfer that hashes differently
    is fetched again like a failed one; after the last attempt its bytes are returned, flagged."""
    errors: list[str] = []
    data: bytes | None = None
    for attempt in range(REMOTE_ATTEMPTS):
        if attempt:
            time.sleep(REMOTE_RETRY_DELAY_S * 2 ** (attempt - 1))
        try:
            data = _read_once(location)
        # OSError: the tool failed or is missing; SubprocessError: a pipe's close timed out
        except (OSError, ValueError, subprocess.SubprocessError) as err:
            errors.append(_describe(location, err))
            logger.warning(
                "%s: attempt %d of %d failed: %s", location, attempt + 1, REMOTE_ATTEMPTS, errors[-1]
            )
            continue
        if sha256 is None or hashlib.sha256(data).hexdigest() == sha256:
            return data, True
        logger.warning(
            "%s: attempt %d of %d: its sha256 differs from the manifest's",
            location,
            attempt + 1,
            REMOTE_ATTEMPTS,
        )
    if data is not None:
        return data, False
    raise RemoteReadError(
        location,
        f"could not be read after {REMOTE_ATTEMPTS} attempts (last: {errors[-1]}); {_fix(location)}",
    )


def _read_once(location: str) -> bytes:
    stream = gopen(location, "rb")
    try:
        return stream.read()
    finally:
        stream.close()  # a pipe (pipe: command, or curl for http) raises here when it exited non-zero


def _describe(location: str, err: Exception) -> str:
    status = re.search(r"exit (\d+)", str(err))
    if status is None:
        return f"{type(err).__name__}: {err}"
    code = int(status.group(1))
    if location.startswith(PIPE):
        return f"the command exited with status {code}"
    meaning = _CURL_EXITS.get(code, "see `man curl`, EXIT CODES") if location.startswith("http") else None
    reader = "curl" if location.startswith("http") else "the reader"
    return f"{reader} exited with status {code}" + (f": {meaning}" if meaning else "")


def _fix(location: str) -> str:
    if location.startswith(PIPE):
        return (
            f"check that `{location[len(PIPE) :]} > /dev/null` works on this node (path, credentials, the tool "
            "installed), then resume"
        )
    if location.startswith("http"):
        return (
            f"check that `curl -fsSL '{location}' -o /dev/null` works on this node (URL, access, network or "
            "proxy), then resume"
        )
    return "check that webdataset's reader for this URL (webdataset.gopen) works on this node, then resume"


def _check_unique_names(shards: Sequence[ShardInfo], source: str) -> None:
    seen: dict[str, Path] = {}
    for s in shards:
        if s.name in seen:
            raise ValueError(
                f"{source}: two shards share the name {s.name!r} ({seen[s.name]}, {s.path}); resume state is "
                "keyed by shard name, so rename one"
            )
        seen[s.name] = s.path
