"""End every rank of a training job promptly, with a non-zero status, when any rank or worker fails.

Without this, an exception on one rank (e.g. from a DataLoader worker) left that rank hanging at interpreter
exit, where multiprocessing joins DataLoader workers that ignore SIGTERM, while the other ranks waited in
their next collective (gloo until the peer's sockets close, NCCL up to the process-group timeout).

``fail_fast`` wraps the training command:

- An exception (or a SystemExit other than 0 and the preemption status 75) prints its traceback, sets an
  abort flag in the job's TCP store, SIGKILLs the rank's DataLoader workers and leaves with ``os._exit``,
  so no worker join, atexit hook or collective can hold the process.
- On every rank of a multi-rank job a daemon thread polls that store once a second; it ends its rank
  (status 1) when the flag is set, or when the store has been unreachable for a few polls, which means the
  rank or launcher hosting it (rank 0, or torchrun's agent) has died.
- A clean end or a preemption stops the thread on every rank and passes a barrier before any rank exits,
  so a rank whose exit takes the store down never looks like a crash to the others.

Launchers add their own stop on top: torchrun's agent and DeepSpeed's launcher terminate the other ranks
when one fails; plain ``srun`` (``--kill-on-bad-exit=0`` in launch/slurm) relies on the flag alone.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import traceback
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist

from vlmtrain.config.load import ConfigError
from vlmtrain.dist import DistContext, barrier

ABORT_KEY = "vlmtrain/abort"
POLL_S = 1.0
UNREACHABLE_POLLS = 3  # consecutive failed polls before the store counts as gone (not a hiccup)
STORE_TIMEOUT = timedelta(seconds=10)
FAILED_EXIT_CODE = 1
CONFIG_EXIT_CODE = 2  # as for a config error found before the run starts (the CLI's usage errors)
CLEAN_EXIT_CODES = (None, 0, 75)  # 75: trainer.PREEMPTED_EXIT_CODE (checkpoint written, requeue)


@contextlib.contextmanager
def fail_fast(ctx: DistContext, debug: bool = False) -> Iterator[None]:
    """Run the body; any failure on this rank ends it at once and, through the abort flag, every rank.

    A ConfigError is reported as its message alone (no traceback) unless `debug` (`vlmtrain train --debug`).
    """
    watch = AbortWatch.start(ctx)
    try:
        yield
    except SystemExit as exit_:
        if exit_.code not in CLEAN_EXIT_CODES:
            abort(ctx, exit_, watch, exit_.code if isinstance(exit_.code, int) else FAILED_EXIT_CODE)
        _stop_together(watch)
        raise
    except ConfigError as err:  # a user error found once the run started (e.g. init_from): one line, exit 2
        abort(ctx, err, watch, CONFIG_EXIT_CODE, show_traceback=debug)
    except BaseException as err:  # KeyboardInterrupt included: a rank must never linger in a collective
        abort(ctx, err, watch, FAILED_EXIT_CODE)
    else:
        _stop_together(watch)


def abort(
    ctx: DistContext, err: BaseException, watch: AbortWatch | None, code: int, show_traceback: bool = True
) -> None:
    """Report ``err``, raise the job's abort flag, kill this rank's workers and exit with ``code``."""
    if show_traceback:
        traceback.print_exception(err, file=sys.stderr)
        for cause in getattr(err, "causes", ()):  # preflight.PreflightError: what each check caught
            traceback.print_exception(cause, file=sys.stderr)
    else:
        print(f"config error: {err}", file=sys.stderr)
    first = str(err).splitlines()[0] if str(err) else ""
    reason = f"rank {ctx.rank} failed: {type(err).__name__}: {first}"
    if show_traceback or ctx.world_size > 1:  # a config error of one process: its message says it all
        print(f"vlmtrain: {reason}; ending this rank (exit {code}) and the job", file=sys.stderr)
    if watch is not None:
        watch.raise_flag(reason)
    _hard_exit(code)


def _stop_together(watch: AbortWatch | None) -> None:
    if watch is None:
        return
    watch.stop()
    with contextlib.suppress(Exception):  # a peer already gone: its own exit status tells the story
        barrier()


def _hard_exit(code: int) -> None:
    # DataLoader workers ignore SIGTERM (preemption is the trainer's business): SIGKILL them, then leave
    # without atexit hooks or finalizers, which are where a failing process used to hang.
    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.kill()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class AbortWatch:
    """A daemon thread that ends this rank when another rank raised the job's abort flag."""

    def __init__(self, store: dist.Store, rank: int, where: str) -> None:
        self.store, self.rank, self.where = store, rank, where
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlmtrain-abort-watch", daemon=True)

    @classmethod
    def start(cls, ctx: DistContext) -> AbortWatch | None:
        """The watch of a multi-rank job, connected to its store at MASTER_ADDR:MASTER_PORT (None: one rank)."""
        if ctx.world_size == 1:
            return None
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        try:
            store = dist.TCPStore(
                host or "", int(port or 0), is_master=False, timeout=STORE_TIMEOUT, wait_for_workers=False
            )
        except (RuntimeError, ValueError, OSError) as err:
            print(
                f"vlmtrain: rank {ctx.rank}: no abort flag ({host}:{port} is not a TCP store: {err}); after a "
                "failure the other ranks stop through the launcher or their collective timeout",
                file=sys.stderr,
            )
            return None
        watch = cls(store, ctx.rank, f"{host}:{port}")
        watch._thread.start()
        return watch

    def raise_flag(self, reason: str) -> None:
        with contextlib.suppress(Exception):  # the store may be what failed
            self.store.set(ABORT_KEY, reason)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(POLL_S):
            try:
                flagged = self.store.check([ABORT_KEY])
                reason = self.store.get(ABORT_KEY).decode(errors="replace") if flagged else None
                failures = 0
            except Exception as err:  # the store's errors are RuntimeError subclasses or OSError
                failures += 1
                if failures < UNREACHABLE_POLLS or self._stop.is_set():
                    continue
                reason = (
                    f"the job's TCP store {self.where} is unreachable ({err}): the process hosting it died"
                )
            if reason is not None and not self._stop.is_set():
                print(f"vlmtrain: rank {self.rank}: stopping because {reason}", file=sys.stderr)
                _hard_exit(FAILED_EXIT_CODE)
