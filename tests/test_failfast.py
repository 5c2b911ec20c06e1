"""fail_fast's abort watch: a rank ends (status 1, reason printed) within seconds when another rank raises
the job's abort flag, or when the process hosting the job's TCP store dies; a clean stop never exits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from train_fixtures import REPO, free_port

from vlmtrain.train.failfast import ABORT_KEY, POLL_S, UNREACHABLE_POLLS

# A "rank 1" that only runs the watch (no process group needed: the watch talks to the store directly).
WATCHER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from vlmtrain.dist import DistContext
    from vlmtrain.train.failfast import AbortWatch
    watch = AbortWatch.start(DistContext(1, 2, 1, torch.device("cpu")))
    assert watch is not None
    print("watching", flush=True)
    if sys.argv[1] == "stop":
        watch.stop()
        time.sleep(3 * {poll})
        print("stopped cleanly", flush=True)
        sys.exit(0)
    time.sleep(60)
    print("still alive", flush=True)
    """
).format(poll=POLL_S)


def start_watcher(tmp_path: Path, port: int, mode: str) -> subprocess.Popen:
    script = tmp_path / "watcher.py"
    script.write_text(WATCHER)
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PYTHONPATH": str(REPO),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), mode],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "watching"
    return proc


def store_server(port: int) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False
    )


def test_abort_flag_ends_the_other_rank(tmp_path: Path) -> None:
    port = free_port()
    server = store_server(port)
    proc = start_watcher(tmp_path, port, "wait")
    t0 = time.monotonic()
    server.set(ABORT_KEY, "rank 0 failed: ZeroDivisionError: boom")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and time.monotonic() - t0 < 3 * POLL_S + 2
    assert "rank 1: stopping because rank 0 failed: ZeroDivisionError: boom" in out


def test_store_host_death_ends_the_other_rank(tmp_path: Path) -> None:
    port = free_port()
    server = store_server(port)
    proc = start_watcher(tmp_path, port, "wait")
    t0 = time.monotonic()
    del server  # the process hosting the store (rank 0 or the launcher's agent) is gone
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and time.monotonic() - t0 < (UNREACHABLE_POLLS + 2) * POLL_S + 2
    assert f"the job's TCP store 127.0.0.1:{port} is unreachable" in out


def test_a_stopped_watch_never_exits(tmp_path: Path) -> None:
    port = free_port()
    server = store_server(port)
    proc = start_watcher(tmp_path, port, "stop")
    time.sleep(0.5)
    del server  # the store goes away after the watch stopped: a normal end of the job
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped cleanly" in out
