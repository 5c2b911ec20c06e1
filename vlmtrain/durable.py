"""Durable writes: fsync files and directories so that a completion marker never outlives the data it vouches for.

A rename or a marker file is only as durable as the data written before it: after a power loss or a node
crash, the page cache may have reached the disk in any order, leaving a `COMPLETE` marker next to truncated
tensor files. Every writer therefore fsyncs its files, then the directory that holds them (the directory
entries), before it writes a marker or renames, and fsyncs the parent directory after the rename.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    """Flush one file's data and metadata to the storage device (any fd of the inode flushes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries: files created, removed or renamed inside it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under `root`, then every directory, deepest first (each entry after its files)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def write_text_durably(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file, fsync, rename) and fsync the directory after the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path)


def replace_durably(src: str | Path, dst: str | Path) -> None:
    """`os.replace(src, dst)`, then fsync the directory of `dst` so the new name survives a crash."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
