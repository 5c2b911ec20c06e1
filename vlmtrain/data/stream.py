"""The loader: a rank's DataLoader workers stream their slots' samples as collated, resumable batches.

This module is the data pipeline's front (docs/data_pipeline.md has the long form); its parts live beside it:
``vlmtrain.data.sources`` (where shards are, shard-name checks, remote reads), ``vlmtrain.data.shard_reader``
(one tar into samples, damage), ``vlmtrain.data.slots`` (epoch order, slot split, re-deal, resume state).

- A slot keeps up to ``open_shards`` of its shards open (the first K unfinished ones of its list) and
  interleaves them: each sample comes from an open shard drawn with probability proportional to its
  remaining samples, by a PRNG seeded with (seed, e, slot, samples the slot drew so far in e).
- The state counts, per epoch and shard, how many samples of that permuted order reached the trainer.
  A slot skips that many (before decoding) on start; the open set and every draw are pure functions of
  those counts, so a resumed run continues exactly where the saved one stopped, and a different world
  size still reads every remaining sample once.
- A damaged shard yields the samples it still holds; the lost ones are consumed as ``corrupt_shard`` skips
  when it is opened, and the shard is named in the state. Beyond ``max_corrupt_shards`` the loader raises.
- The DataLoader hands out batches round-robin over workers starting at worker 0; the state records
  which role comes next and resumed workers take rotated roles, so the same topology replays the
  uninterrupted order exactly.
- With a token budget, an item is a *step group*: a rank's whole share of an optimizer step's samples,
  laid by the worker into token-budget micro-batches (collate.budget_collate). The state still counts
  delivered items, each one a whole step, so a checkpoint (always between steps) resumes exactly.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import signal
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlmtrain.data.collate import Batch, make_collate
from vlmtrain.data.order import draw, permutation, splitmix64  # noqa: F401  (re-exported)
from vlmtrain.data.process import ProcessedSample, RawSample, SampleProcessor, Skip
from vlmtrain.data.shard_reader import ShardSamples, read_shard, split_member_name  # noqa: F401  (re-exported)
from vlmtrain.data.slots import (  # noqa: F401  (re-exported: merge_states, merge_data_faults, balanced_slots)
    COUNTER_KINDS,
    DEFAULT_OPEN_SHARDS,
    STATE_VERSION,
    Unit,
    assigned_units,
    balanced_slots,
    check_state,
    epoch_slots_json,
    epoch_units_json,
    key_start,
    merge_data_faults,
    merge_states,
    redeal_epochs,
    sample_order,
    shard_order,
    splits_shards,
)
from vlmtrain.data.sources import (  # noqa: F401  (re-exported: the names callers used before the split)
    PIPE,
    RemoteReadError,
    ShardInfo,
    ShardNameError,
    fetch,
    is_remote,
    load_source,
)

logger = logging.getLogger(__name__)

CORRUPT = "corrupt_shard"  # the skip reason of samples lost with a damaged shard


class ShardError(RuntimeError):
    """The shards cannot give a usable stream (e.g. a slot's whole epoch yields no sample)."""


class TooManyCorruptShards(ShardError):
    """More damaged shards than ``max_corrupt_shards`` allows."""


# ---------------------------------------------------------------------------------------------------------
# The per-worker stream
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    """Samples and accounting gathered for the next batch of one slot."""

    samples: list[ProcessedSample] = field(default_factory=list)
    advance: dict[tuple[int, str], tuple[str, int, list[int]]] = field(default_factory=dict)
    counters: dict[str, Counter[str]] = field(default_factory=lambda: {k: Counter() for k in COUNTER_KINDS})
    corrupt: dict[str, str] = field(default_factory=dict)

    def consume(self, epoch: int, key: str, shard: str, total: int, n: int = 1) -> None:
        """`n` more positions of unit `key` (of shard `shard`, `total` positions in all) consumed."""
        self.advance.setdefault((epoch, key), (shard, total, [0]))[2][0] += n

    def meta(self, slot: int, role: int) -> dict[str, Any]:
        return {
            "slot": slot,
            "role": role,
            "advance": [(e, k, s, n, total) for (e, k), (s, total, (n,)) in self.advance.items()],
            **{k: dict(c) for k, c in self.counters.items()},
            "corrupt": dict(self.corrupt),
        }


@dataclass(frozen=True)
class _Draw:
    """One sample a slot reads next."""

    epoch: int
    raw: RawSample
    key: str
    """The unit's state key (the shard's name when the slot reads the whole shard)."""
    total: int
    """Positions of the shard's epoch order (its manifest size)."""
    ignored: list[str]


@dataclass(frozen=True)
class _Lost:
    """A damaged shard just opened: its lost samples, consumed at once as corrupt_shard skips."""

    epoch: int
    key: str
    shard: str
    total: int
    lost: int
    """The unit's lost positions not consumed yet (0 when an earlier run already consumed them)."""
    damage: str


@dataclass
class _OpenShard:
    """A unit a slot is reading: its shard's samples in memory and how far the unit's positions have got.

    Positions ``[0, lost)`` of the shard's epoch order are the samples the shard lost (they come first so they
    are consumed the moment the damage is seen); position ``p >= lost`` is sample ``order[p - lost]``. The unit
    reads positions ``[lo, lo + size)``; ``done`` of them are consumed.
    """

    info: ShardInfo
    contents: ShardSamples
    order: list[int]
    lost: int
    lo: int
    size: int
    done: int
    total: int
    """Positions of the whole shard (its manifest size)."""
    key: str

    @property
    def unread_lost(self) -> int:
        """Lost positions of the unit not consumed yet."""
        return max(0, min(self.lost, self.lo + self.size) - (self.lo + self.done))

    @property
    def remaining(self) -> int:
        return self.size - self.done


class ShardStream(IterableDataset):
    """The dataset each DataLoader worker iterates: its slot's samples, processed and collated.

    Yields batch dicts whose ``"stream"`` entry says which samples they consumed (epoch, shard, count,
    shard size), what was skipped or truncated, which members were ignored and which shards were found
    damaged. A batch may have ``num_samples == 0`` when only skipped samples remained; StreamLoader absorbs
    those.
    """

    def __init__(
        self,
        shards: Sequence[ShardInfo],
        processor: Callable[[RawSample], ProcessedSample | Skip],
        collate: Callable[[list[ProcessedSample]], Batch],
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        workers_per_rank: int,
        seed: int,
        shuffle: bool,
        resample: bool,
        consumed: dict[int, dict[str, int]],
        known_samples: dict[str, int],
        role_offset: int,
        open_shards: int = DEFAULT_OPEN_SHARDS,
        epoch_slots: dict[int, dict[str, int]] | None = None,
        split: bool = False,
        epoch_units: dict[int, dict[str, tuple[int, int]]] | None = None,
    ) -> None:
        """``epoch_slots``: epoch -> shard -> slot for epochs re-dealt by a world-size change; ``epoch_units``:
        epoch -> unit key -> (slot, end) for epochs re-dealt below the shard; ``split``: fresh epochs are dealt
        in units (slots.splits_shards). Other epochs are round-robin over the epoch's shard order."""
        super().__init__()
        self.shards = list(shards)
        self.processor = processor
        self.collate = collate
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.workers_per_rank = workers_per_rank
        self.seed = seed
        self.shuffle = shuffle
        self.resample = resample
        self.consumed = consumed
        self.known_samples = known_samples
        self.role_offset = role_offset
        self.open_shards = open_shards
        self.epoch_slots = epoch_slots or {}
        self.split = split
        self.epoch_units = epoch_units or {}
        self.names = [s.name for s in self.shards]

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers_per_rank

    def assigned(self, slot: int, epoch: int) -> list[Unit]:
        """The units ``slot`` reads in ``epoch``, in the epoch's order (whole shards unless split)."""
        sizes = [s.samples for s in self.shards]
        return assigned_units(
            self.names, sizes, self.num_slots, slot, epoch, self.seed, self.shuffle, self.split,
            self.epoch_slots, self.epoch_units,
        )  # fmt: skip

    def __iter__(self) -> Generator[Batch, None, None]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        role = (worker + self.role_offset) % self.workers_per_rank
        return self.batches(self.rank * self.workers_per_rank + role, role)

    def batches(self, slot: int, role: int) -> Iterator[Batch]:
        """Collated batches of ``micro_batch_size`` samples of one slot; a final partial one if finite."""
        pending = _Pending()
        warned: set[str] = set()
        kept = [0]  # shared with _raw_samples, which runs interleaved with this loop
        for item in self._raw_samples(slot, kept):
            if isinstance(item, _Lost):
                pending.consume(item.epoch, item.key, item.shard, item.total, item.lost)
                if item.lost:
                    pending.counters["skipped"][CORRUPT] += item.lost
                pending.corrupt[item.shard] = item.damage
                continue
            raw = item.raw
            pending.consume(item.epoch, item.key, raw.shard, item.total)
            pending.counters["ignored_members"].update(item.ignored)
            result = self.processor(raw)
            if isinstance(result, Skip):
                pending.counters["skipped"][result.reason] += 1
                self._warn_first(warned, result, raw, slot)
                continue
            if result.truncation is not None:
                pending.counters["truncated"][result.truncation] += 1
                pending.counters["truncated"]["dropped_pairs"] += result.dropped_pairs
            pending.samples.append(result)
            kept[0] += 1
            if len(pending.samples) == self.micro_batch_size:
                yield self._emit(pending, slot, role)
                pending = _Pending()
        if pending.advance or pending.corrupt:
            yield self._emit(pending, slot, role)

    def _emit(self, pending: _Pending, slot: int, role: int) -> Batch:
        batch = self.collate(pending.samples) if pending.samples else {"num_samples": 0}
        batch["stream"] = pending.meta(slot, role)
        return batch

    @staticmethod
    def _warn_first(warned: set[str], skip: Skip, raw: RawSample, slot: int) -> None:
        if skip.reason not in warned:
            warned.add(skip.reason)
            logger.warning(
                "slot %d: skipping sample %s of %s (%s: %s); further %r skips are only counted",
                slot, raw.key, raw.shard, skip.reason, skip.detail, skip.reason,
            )  # fmt: skip

    def _raw_samples(self, slot: int, kept: list[int]) -> Iterator[_Draw | _Lost]:
        """Every sample the slot still owes, epoch after epoch, and the damaged shards it meets.

        ``kept`` counts samples the consumer kept; an endless stream whose whole epoch kept none would spin
        forever without yielding a batch, so that is an error.
        """
        epoch = 0
        while True:
            assigned = self.assigned(slot, epoch)
            # A re-dealt epoch may leave a slot nothing (it was finished, or fewer samples are left than slots):
            # the slot goes on to the next epoch. Only a fresh deal that gives a slot nothing makes it idle.
            redealt = epoch in self.epoch_units or epoch in self.epoch_slots
            if not assigned and not redealt:
                return  # an idle slot: fewer shards than slots
            fresh = not redealt and not any(self.consumed.get(epoch, {}).get(u.key) for u in assigned)
            kept_before = kept[0]
            yield from self._epoch_samples(slot, epoch, assigned)
            if not self.resample:
                return
            if fresh and kept[0] == kept_before:
                raise ShardError(
                    f"slot {slot}: no usable sample in its shards {[u.key for u in assigned]} in "
                    f"epoch {epoch} (empty, or every sample skipped: see the skip warnings); an endless "
                    "(resample=True) stream would never yield a batch"
                )
            epoch += 1

    def _epoch_samples(self, slot: int, epoch: int, units: list[Unit]) -> Iterator[_Draw | _Lost]:
        """One epoch of a slot: its first K unfinished units open, each draw weighted by what they have left.

        The open set (the first ``open_shards`` unfinished units in list order) and the draw (seeded by the
        samples the slot drew so far this epoch) depend only on the consumed counts, which the state saves:
        a loader resumed from any state continues with exactly the draws the saved one would have made.
        """
        consumed = self.consumed.get(epoch, {})
        drawn = sum(consumed.get(u.key, 0) for u in units)
        width = self.open_shards if self.shuffle else 1  # shuffle=False (evaluation): list order, tar order
        queue = iter(units)
        opened: list[_OpenShard] = []
        while True:
            while len(opened) < width and (unit := next(queue, None)) is not None:
                shard = self._open(unit, epoch, consumed.get(unit.key, 0))
                if shard is None:
                    continue
                if shard.contents.damage is not None:
                    lost = shard.unread_lost
                    damage = f"{shard.info.path}: {shard.contents.damage}"
                    yield _Lost(epoch, unit.key, shard.info.name, shard.total, lost, damage)
                    shard.done += lost
                    drawn += lost
                if shard.remaining > 0:
                    opened.append(shard)
            if not opened:
                return
            pick = opened[0]
            if len(opened) > 1:
                r = draw(sum(s.remaining for s in opened), "mix", self.seed, epoch, slot, drawn)
                for pick in opened:
                    if r < pick.remaining:
                        break
                    r -= pick.remaining
            i = pick.order[pick.lo + pick.done - pick.lost]
            pick.done += 1
            drawn += 1
            if pick.remaining == 0:
                opened.remove(pick)
            contents = pick.contents
            raw = RawSample(contents.keys[i], pick.info.name, i, contents.members[i], epoch)
            yield _Draw(epoch, raw, pick.key, pick.total, contents.ignored[i])

    def _open(self, unit: Unit, epoch: int, done: int) -> _OpenShard | None:
        """The unit's shard read into memory with its epoch order, or None when this epoch already finished it.

        A shard holding fewer samples than its known size lost the difference; one of unknown size that is
        damaged counts one lost sample (a position of its own, so resume never counts it twice).
        """
        shard = self.shards[unit.shard]
        expected = shard.samples if shard.samples is not None else self.known_samples.get(shard.name)
        end = unit.hi if unit.hi is not None else expected
        if end is not None and done >= end - unit.lo:
            return None  # fully consumed: not even read
        contents = read_shard(shard.path, shard.sha256)
        readable = len(contents)
        if expected is not None and readable != expected:
            mismatch = f"holds {readable} readable samples, the manifest/resume state says {expected}"
            damage = mismatch if contents.damage is None else f"{contents.damage}; {mismatch}"
            contents = dataclasses.replace(contents, damage=damage)
        if expected is None:
            expected = readable + (contents.damage is not None)
        readable = min(
            readable, expected
        )  # a shard with more samples than its manifest: the extra are unused
        order = sample_order(readable, self.seed, epoch, shard.name, self.shuffle)
        end = unit.hi if unit.hi is not None else expected
        return _OpenShard(
            shard, contents, order, expected - readable, unit.lo, end - unit.lo, done, expected, unit.key
        )


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the trainer, which checkpoints and exits; they die with their parent.

    Ignoring SIGTERM means nobody but the rank can stop a worker, so a rank that dies without shutting its
    DataLoader down (a hard exit after an error) would leave it running: PR_SET_PDEATHSIG has the kernel
    SIGKILL the worker when its rank dies (Linux; elsewhere the DataLoader's watchdog ends an orphaned
    worker within about 5 s).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def _identity(batch: Batch) -> Batch:
    return batch


# ---------------------------------------------------------------------------------------------------------
# The loader the trainer holds
# ---------------------------------------------------------------------------------------------------------


PREFETCH_FACTOR = 2
"""Batches each DataLoader worker prepares ahead (PyTorch's default); they wait in /dev/shm until handed out."""


class StreamLoader:
    """Iterable over batch dicts for one rank, with a resumable ``state_dict()``.

    Consumption is recorded when a batch is handed out, not when a worker reads it, so the state never
    counts prefetched batches. Iterating again (e.g. after ``break``) resumes from the current state.
    """

    def __init__(
        self,
        shards: Sequence[ShardInfo],
        processor: SampleProcessor,
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        pad_token_id: int,
        shuffle: bool = True,
        resample: bool = True,
        pack_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        state: dict[str, Any] | None = None,
        prefetch_factor: int = PREFETCH_FACTOR,
        pin_memory: bool = False,
        open_shards: int = DEFAULT_OPEN_SHARDS,
        max_corrupt_shards: int | None = None,
        token_budget: int | None = None,
    ) -> None:
        """``token_budget`` (tokens per micro-batch) turns every item into a step group of ``micro_batch_size``
        samples (then the rank's share of the global batch) in budget micro-batches of packed rows of
        ``pack_length`` (or max_length) tokens; None keeps one collated micro-batch per item."""
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if open_shards < 1:
            raise ValueError(f"open_shards must be >= 1, got {open_shards}")
        if max_corrupt_shards is not None and max_corrupt_shards < 0:
            raise ValueError(f"max_corrupt_shards must be >= 0 or None, got {max_corrupt_shards}")
        self.shards = list(shards)
        self.processor = processor
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.workers_per_rank = max(1, num_workers)  # num_workers=0 reads in the main process: one slot
        self.seed = seed
        self.shuffle = shuffle
        self.resample = resample
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.open_shards = open_shards
        self.max_corrupt_shards = max_corrupt_shards
        self.token_budget = token_budget
        self.collate = self._collate_fn(pack_length, pad_token_id, pad_to_multiple_of)
        self._consumed: dict[int, dict[str, int]] = {}
        self._known = {s.name: s.samples for s in self.shards if s.samples is not None}
        self._counters: dict[str, Counter[str]] = {k: Counter() for k in COUNTER_KINDS}
        self._base_counters: dict[str, dict[str, int]] = {k: {} for k in COUNTER_KINDS}
        self._next_role = 0
        self._batches = 0
        self._corrupt: dict[str, str] = {}
        self._epoch_slots: dict[int, dict[str, int]] = {}
        self._epoch_units: dict[int, dict[str, tuple[int, int]]] = {}
        # Below the shard only with every size known up front (a manifest): the deal is then a pure function of
        # the sizes, the same on every rank and in every resume.
        self._split = splits_shards(
            len(self.shards),
            self.world_size * self.workers_per_rank,
            all(s.samples is not None for s in self.shards),
        )
        if state is not None:
            self._load(state)
        self._check_slots()

    def _collate_fn(
        self, pack_length: int | None, pad_token_id: int, pad_to_multiple_of: int | None
    ) -> Callable[[list[ProcessedSample]], Batch]:
        return make_collate(
            pad_token_id=pad_token_id,
            max_length=self.processor.config.max_length,
            image_size=self.processor.transform.image_size,
            pack_length=pack_length,
            token_budget=self.token_budget,
            width_multiple=pad_to_multiple_of,
        )

    def _check_slots(self) -> None:
        slots = self.world_size * self.workers_per_rank
        if len(self.shards) >= slots:
            return
        first = self.rank * self.workers_per_rank
        mine = range(first, first + self.workers_per_rank)
        if self._split:
            # Every slot reads its own positions of the shards; a slot is idle only with fewer samples than slots.
            total = sum(int(s.samples) for s in self.shards)  # type: ignore[arg-type]
            idle_here = sum(1 for k in mine if (k + 1) * total // slots == k * total // slots)
            if not idle_here:
                return
            message = (
                f"{total} samples in {len(self.shards)} shards for {slots} slots ({self.world_size} ranks x "
                f"{self.workers_per_rank} workers): {idle_here} of rank {self.rank}'s slots read nothing. Use fewer "
                "workers or ranks, or more data."
            )
        else:
            idle_here = sum(1 for k in mine if k >= len(self.shards))
            message = (
                f"{len(self.shards)} shards for {self.world_size} ranks x {self.workers_per_rank} workers = {slots} "
                f"slots: {slots - len(self.shards)} slot(s) read nothing ({idle_here} of rank {self.rank}'s "
                f"{self.workers_per_rank}). With a manifest (sample counts known) the slots would share shards; "
                "with a pattern, write more, smaller shards or use fewer workers."
            )
        if idle_here == self.workers_per_rank and self.resample:
            raise ValueError(message + " This rank would get no data at all while the others train.")
        warnings.warn(message, stacklevel=3)

    # -- iteration ------------------------------------------------------------------------------------

    def dataset(self) -> ShardStream:
        """The worker-side stream, starting from the current state."""
        return ShardStream(
            self.shards,
            self.processor,
            self.collate,
            micro_batch_size=self.micro_batch_size,
            rank=self.rank,
            world_size=self.world_size,
            workers_per_rank=self.workers_per_rank,
            seed=self.seed,
            shuffle=self.shuffle,
            resample=self.resample,
            consumed={e: dict(d) for e, d in self._consumed.items()},
            known_samples=dict(self._known),
            role_offset=self._next_role,
            open_shards=self.open_shards,
            epoch_slots={e: dict(d) for e, d in self._epoch_slots.items()},
            split=self._split,
            epoch_units={e: dict(d) for e, d in self._epoch_units.items()},
        )

    def __iter__(self) -> Generator[Batch, None, None]:
        # The DataLoader's default in-order delivery takes one batch from each live worker in turn, starting
        # at worker 0; the role rotation (role_offset) relies on exactly that.
        loader = DataLoader(
            self.dataset(),
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals if self.num_workers > 0 else None,
        )
        iterator = iter(loader)
        try:
            for batch in iterator:
                self._absorb(batch["stream"])
                if batch["num_samples"] == 0:
                    continue  # only skipped samples were left in that slot; their accounting is absorbed
                self._batches += 1
                yield batch
        finally:
            # An exception's traceback keeps the DataLoader iterator alive (its own frames hold it), so its
            # __del__ would not run: shut the workers down now. Left to interpreter exit, multiprocessing
            # would join workers that were never told to stop and ignore SIGTERM, and hang there for good.
            shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator
            if shutdown is not None:
                shutdown()

    def _absorb(self, meta: dict[str, Any]) -> None:
        for epoch, key, shard, n, total in meta["advance"]:
            per_shard = self._consumed.setdefault(int(epoch), {})
            per_shard[key] = per_shard.get(key, 0) + int(n)
            if self._known.setdefault(shard, int(total)) != int(total):
                raise ShardError(
                    f"shard {shard} changed size while being read ({self._known[shard]} -> {total})"
                )
        for kind in COUNTER_KINDS:
            self._counters[kind].update(meta[kind])
        self._next_role = (int(meta["role"]) + 1) % self.workers_per_rank
        for shard, damage in meta["corrupt"].items():
            self._note_corrupt(shard, damage)

    def _note_corrupt(self, shard: str, damage: str) -> None:
        if shard in self._corrupt:
            return
        self._corrupt[shard] = damage
        lost = self._counters["skipped"][CORRUPT] + self._base_counters["skipped"].get(CORRUPT, 0)
        logger.warning(
            "rank %d: corrupt shard %s: %s; its readable samples are used, the lost ones skipped as %r "
            "(%d lost so far on this rank); training goes on",
            self.rank, shard, damage, CORRUPT, lost,
        )  # fmt: skip
        limit = self.max_corrupt_shards
        if limit is not None and len(self._corrupt) > limit:
            listing = "; ".join(f"{name}: {why}" for name, why in sorted(self._corrupt.items()))
            raise TooManyCorruptShards(
                f"{len(self._corrupt)} corrupt shards, more than data.max_corrupt_shards={limit}: {listing}. "
                "Re-copy or re-write them (`vlmtrain shard` keeps intact shards and rewrites damaged ones), "
                "or raise data.max_corrupt_shards to train on without their lost samples"
            )

    # -- state ----------------------------------------------------------------------------------------

    def _redeal_all(self, slots: int) -> None:
        """Deal every epoch the saved run had started to ``slots`` slots (the world size changed)."""
        self._epoch_slots, self._epoch_units = redeal_epochs(
            [s.name for s in self.shards],
            self._consumed,
            self._known,
            self.seed,
            self.shuffle,
            slots,
            self._split,
        )

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason (SAMPLE_SKIP_REASONS), over the whole run including the loaded state."""
        return self._totals("skipped")

    def corrupt_shards(self) -> dict[str, str]:
        """Damaged shards met so far (this rank and the loaded state): name -> what is wrong with it."""
        return dict(sorted(self._corrupt.items()))

    def data_faults(self) -> dict[str, Any]:
        """This rank's skips and corrupt shards, for merge_data_faults() over every rank's."""
        return {
            "skipped": self._totals("skipped"),
            "base": dict(self._base_counters["skipped"]),
            "corrupt_shards": self.corrupt_shards(),
        }

    def truncation_counts(self) -> dict[str, int]:
        """Shortened samples: truncated_turns, truncated_answer, and dropped_pairs (pairs removed)."""
        return self._totals("truncated")

    def ignored_member_counts(self) -> dict[str, int]:
        """Tar members that are not sample data (e.g. .pth, .pickle), by extension: never decoded."""
        return self._totals("ignored_members")

    @property
    def batches_delivered(self) -> int:
        """Non-empty batches this rank handed out (cumulative across a same-topology resume)."""
        return self._batches

    def _totals(self, kind: str) -> dict[str, int]:
        totals = Counter(self._base_counters[kind])
        totals.update(self._counters[kind])
        return dict(sorted(totals.items()))

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state: this rank's consumption merged with the loaded state. Merge all ranks'."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "world_size": self.world_size,
            "workers_per_rank": self.workers_per_rank,
            "ranks": [self.rank],
            "epoch_consumed": {str(e): dict(sorted(d.items())) for e, d in sorted(self._consumed.items())},
            "shard_samples": dict(sorted(self._known.items())),
            "counters": {k: self._totals(k) for k in COUNTER_KINDS},
            "base_counters": {k: dict(sorted(v.items())) for k, v in self._base_counters.items()},
            "next_role": {str(self.rank): self._next_role},
            "batches_delivered": {str(self.rank): self._batches},
            "open_shards": self.open_shards,
            "corrupt_shards": self.corrupt_shards(),
            "epoch_slots": epoch_slots_json(self._epoch_slots, self.world_size * self.workers_per_rank),
            "epoch_units": epoch_units_json(self._epoch_units, self.world_size * self.workers_per_rank),
        }

    def _load(self, state: dict[str, Any]) -> None:
        check_state(state)
        if state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ValueError(
                f"resume state was saved with seed={state['seed']} shuffle={state['shuffle']}, this loader has "
                f"seed={self.seed} shuffle={self.shuffle}; the sample orders would differ, so the offsets mean nothing"
            )
        if sorted(state["ranks"]) != list(range(state["world_size"])):
            raise ValueError(
                f"resume state covers ranks {sorted(state['ranks'])} of world size {state['world_size']}; "
                "save merge_states() of every rank's state_dict(), not one rank's"
            )
        names = {s.name for s in self.shards}
        unknown = sorted({key_start(k)[0] for d in state["epoch_consumed"].values() for k in d} - names)
        if unknown:
            raise ValueError(
                f"resume state names {len(unknown)} shards this source lacks (e.g. {unknown[:3]}); resume on the "
                "same shards"
            )
        for name, n in state["shard_samples"].items():
            if name in names and self._known.setdefault(name, int(n)) != int(n):
                raise ValueError(
                    f"shard {name}: the manifest says {self._known[name]} samples, the state {n}"
                )
        self._consumed = {
            int(e): {s: int(n) for s, n in d.items()} for e, d in state["epoch_consumed"].items()
        }
        self._base_counters = {
            k: {r: int(n) for r, n in state["counters"].get(k, {}).items()} for k in COUNTER_KINDS
        }
        same_topology = (state["world_size"], state["workers_per_rank"]) == (
            self.world_size,
            self.workers_per_rank,
        )
        slots = self.world_size * self.workers_per_rank
        saved = state.get("epoch_slots", {})
        if same_topology:
            self._next_role = int(state["next_role"][str(self.rank)])
            self._batches = int(state["batches_delivered"][str(self.rank)])
            self._epoch_slots = {
                int(e): {k: int(v) for k, v in d["shards"].items()} for e, d in saved.items()
            }
            self._epoch_units = {
                int(e): {k: (int(v[0]), int(v[1])) for k, v in d["units"].items()}
                for e, d in state.get("epoch_units", {}).items()
            }
        else:
            self._redeal_all(slots)
        self._corrupt = {str(k): str(v) for k, v in state.get("corrupt_shards", {}).items()}


def build_loader(source: str | Path, processor: SampleProcessor, **options: Any) -> StreamLoader:
    """The rank's loader over the shards of ``source`` (a manifest.json or a brace pattern).

    ``options`` are StreamLoader's keyword arguments (micro_batch_size, rank, world_size, num_workers, seed,
    pad_token_id, shuffle, resample, pack_length, pad_to_multiple_of, state, prefetch_factor, pin_memory,
    open_shards, max_corrupt_shards, token_budget).
    """
    return StreamLoader(load_source(source), processor, **options)
