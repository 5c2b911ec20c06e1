"""Reading below the shard (vlmtrain.data.slots units): with fewer shards than slots every slot reads.

Simulated as pure functions at 1 to 1,024 ranks x 1-8 workers over 1 to 10,000 shards (each position exactly
once per epoch, slots within one sample of each other, resumes on any slot count), then through the loader on
real shards: every sample once, a same-topology resume bitwise, world-size changes read the rest once.
"""

# ruff: noqa: F811  (the fixtures of test_stream are imported and used as parameters)
from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
from test_stream import GOOD_KEYS, batches, dataset, flat, loader, proc, run_ranks, tok  # noqa: F401

from vlmtrain.data.process import SampleProcessor
from vlmtrain.data.slots import (
    DEFAULT_OPEN_SHARDS,
    STATE_VERSION,
    Unit,
    assigned_units,
    deal_pieces,
    epoch_units,
    key_start,
    merge_states,
    redeal_epochs,
    redeal_units,
    remaining_pieces,
    shard_order,
    splits_shards,
)

RANKS = (1, 8, 64, 256, 1024)
WORKERS = tuple(range(1, 9))
SHARDS = (1, 2, 3, 7, 119, 1000, 10_000)


def sizes_for(n: int, rng: random.Random) -> list[int]:
    """Shards of 1,000 samples as `vlmtrain shard` writes them, a shorter last one, and some odd ones."""
    sizes = [1000] * n
    sizes[-1] = rng.randint(1, 1000)
    for i in rng.sample(range(n), min(n, 3)):
        sizes[i] = rng.randint(0, 1500)
    return sizes


def coverage(units: list[list[Unit]], sizes: list[int]) -> dict[int, list[tuple[int, int]]]:
    """Per shard, the sorted [lo, hi) runs the units cover."""
    runs: dict[int, list[tuple[int, int]]] = {}
    for slot_units in units:
        for u in slot_units:
            assert u.hi is not None and 0 <= u.lo < u.hi <= sizes[u.shard]
            runs.setdefault(u.shard, []).append((u.lo, u.hi))
    return {s: sorted(r) for s, r in runs.items()}


def assert_partition(
    runs: dict[int, list[tuple[int, int]]], wanted: dict[int, list[tuple[int, int]]]
) -> None:
    """The runs cover exactly the wanted positions of every shard, each once (no overlap, no gap)."""
    for shard in set(runs) | set(wanted):
        got, at = [], None
        for lo, hi in runs.get(shard, []):
            assert at is None or lo >= at, f"shard {shard}: positions read twice"
            if got and got[-1][1] == lo:
                got[-1] = (got[-1][0], hi)  # adjacent units of one shard (several slots) join
            else:
                got.append((lo, hi))
            at = hi
        want = [(lo, hi) for lo, hi in wanted.get(shard, []) if hi > lo]
        assert got == want, f"shard {shard}: covered {got[:4]}, expected {want[:4]}"


def test_every_position_once_and_slots_within_one_at_every_scale() -> None:
    rng = random.Random(0)
    checked = 0
    for shards in SHARDS:
        sizes = sizes_for(shards, rng)
        names = [f"s-{i:06d}.tar" for i in range(shards)]
        for ranks in RANKS:
            for workers in WORKERS:
                slots = ranks * workers
                if not splits_shards(shards, slots, sizes_known=True):
                    continue  # enough shards: whole shards round-robin (the fast path, unchanged)
                epoch = rng.randint(0, 5)
                units = epoch_units(names, sizes, slots, seed=3, epoch=epoch, shuffle=True)
                assert len(units) == slots
                assert_partition(coverage(units, sizes), {i: [(0, n)] for i, n in enumerate(sizes)})
                per_slot = [sum(u.hi - u.lo for u in us) for us in units]
                assert max(per_slot) - min(per_slot) <= 1
                assert sum(per_slot) == sum(sizes)
                # a slot's units follow the epoch's shard order
                place = {s: k for k, s in enumerate(shard_order(shards, 3, epoch, True))}
                for us in units:
                    assert [place[u.shard] for u in us] == sorted(place[u.shard] for u in us)
                checked += 1
    assert checked > 60


def consume_some(units: list[list[Unit]], rng: random.Random, consumed: dict[str, int]) -> None:
    """Each slot consumed a random prefix of each of its units (as slots do: in order, partly)."""
    for us in units:
        for u in us:
            length = u.hi - u.lo  # type: ignore[operator]
            done = rng.choice([0, length, rng.randint(0, length)])
            if done:
                consumed[u.key] = consumed.get(u.key, 0) + done


def consumed_runs(consumed: dict[str, int], names: list[str]) -> dict[int, list[tuple[int, int]]]:
    index = {n: i for i, n in enumerate(names)}
    runs: dict[int, list[tuple[int, int]]] = {}
    for key, n in consumed.items():
        name, lo = key_start(key)
        runs.setdefault(index[name], []).append((lo, lo + n))
    return runs


@pytest.mark.parametrize(
    ("shards", "slots", "then", "again"), [(3, 8, 5, 64), (7, 64, 1024, 2), (119, 256, 8, 4096)]
)
def test_resumes_on_other_slot_counts_read_the_rest_once(
    shards: int, slots: int, then: int, again: int
) -> None:
    """Consume part of an epoch, deal the rest to another slot count, consume part again, deal it again."""
    rng = random.Random(shards)
    sizes = sizes_for(shards, rng)
    names = [f"s-{i:06d}.tar" for i in range(shards)]
    units = epoch_units(names, sizes, slots, seed=1, epoch=2, shuffle=True)
    consumed: dict[str, int] = {}
    consume_some(units, rng, consumed)
    for count in (then, again):
        dealt = redeal_units(names, sizes, consumed, seed=1, epoch=2, shuffle=True, num_slots=count)
        index = {n: i for i, n in enumerate(names)}
        new = [[] for _ in range(count)]  # type: list[list[Unit]]
        for key, (slot, hi) in dealt.items():
            name, lo = key_start(key)
            new[slot].append(Unit(index[name], lo, hi, key))
        # the new units and what was consumed before cover every position exactly once
        together = coverage(new, sizes)
        for shard, runs in consumed_runs(consumed, names).items():
            together.setdefault(shard, []).extend(runs)
        assert_partition(
            {s: sorted(r) for s, r in together.items()}, {i: [(0, n)] for i, n in enumerate(sizes)}
        )
        left = [sum(u.hi - u.lo for u in us) for us in new]  # type: ignore[operator]
        assert max(left) - min(left) <= 1
        # a new unit starts at an unconsumed position: its key never holds earlier consumption
        assert not any(consumed.get(k) for k in dealt)
        consume_some(new, rng, consumed)


def test_remaining_pieces_are_the_complement_of_the_consumed_prefixes() -> None:
    names = ["a.tar", "b.tar"]
    consumed = {"a.tar": 3, "a.tar@5": 2, "b.tar@4": 4}
    assert remaining_pieces(names, [10, 8], [1, 0], consumed) == [(1, 0, 4), (0, 3, 5), (0, 7, 10)]
    assert deal_pieces([(1, 0, 4), (0, 3, 5), (0, 7, 10)], names, 3) == [
        [Unit(1, 0, 3, "b.tar")],
        [Unit(1, 3, 4, "b.tar@3"), Unit(0, 3, 5, "a.tar@3")],
        [Unit(0, 7, 10, "a.tar@7")],
    ]


# --- through the loader, on real shards ----------------------------------------------------------------------
# The shared 7-shard manifest (49 samples, 3 of them bad) on 8 or 12 ranks of one in-process slot each.


def per_rank_positions(ranks: list) -> list[int]:
    return [sum(r.state_dict()["epoch_consumed"].get("0", {}).values()) for r in ranks]


def test_more_slots_than_shards_every_slot_reads_each_sample_once(
    dataset: Path, proc: SampleProcessor
) -> None:
    ranks = [loader(dataset, proc, rank=r, world_size=8, num_workers=0) for r in range(8)]
    keys = [flat(batches(r)) for r in ranks]
    assert all(keys), "a rank read nothing"
    assert sorted(k for ks in keys for k in ks) == GOOD_KEYS  # each sample once, none lost
    positions = per_rank_positions(ranks)
    assert sum(positions) == 49 and max(positions) - min(positions) <= 1  # 6 or 7 each, bad ones included


def test_split_same_topology_resume_is_exact(dataset: Path, proc: SampleProcessor) -> None:
    kw = {"num_workers": 0, "resample": True}
    full, _ = run_ranks(dataset, proc, world=8, limit=6, **kw)
    head, state = run_ranks(dataset, proc, world=8, limit=2, **kw)
    tail, _ = run_ranks(dataset, proc, world=8, state=json.loads(json.dumps(state)), limit=4, **kw)
    assert [h + t for h, t in zip(head, tail, strict=True)] == full


@pytest.mark.parametrize("worlds", [(8, 3, 12), (12, 5, 2)])
def test_split_world_size_changes_read_the_rest_once(dataset: Path, proc: SampleProcessor, worlds) -> None:
    first, second, third = worlds
    kw = {"num_workers": 0}
    head, state = run_ranks(dataset, proc, world=first, limit=1, **kw)
    mid, state2 = run_ranks(dataset, proc, world=second, state=json.loads(json.dumps(state)), limit=1, **kw)
    assert state2["epoch_units"]["0"]["slots"] == second  # the interrupted epoch was dealt below the shard
    tail, _ = run_ranks(dataset, proc, world=third, state=json.loads(json.dumps(state2)), **kw)
    keys = flat([b for r in head + mid + tail for b in r])
    assert sorted(keys) == GOOD_KEYS


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core runner is fine here
def test_split_with_dataloader_workers_reads_once_and_resumes_exactly(
    dataset: Path, proc: SampleProcessor
) -> None:
    """2 ranks x 4 workers = 8 slots over 7 shards: workers of one rank share shards."""
    kw = {"num_workers": 4, "resample": False}
    full, _ = run_ranks(dataset, proc, world=2, **kw)
    assert sorted(flat([b for r in full for b in r])) == GOOD_KEYS
    head, state = run_ranks(dataset, proc, world=2, limit=3, **kw)
    tail, _ = run_ranks(dataset, proc, world=2, state=json.loads(json.dumps(state)), **kw)
    assert [h + t for h, t in zip(head, tail, strict=True)] == full


# --- the trainer's view: whole global batches, then a resume on another topology -----------------------------
# A pure simulation of what the loader and the trainer do, with the loader's own deal functions: each slot reads
# its units epoch after epoch, up to DEFAULT_OPEN_SHARDS open at once and drawn in any order (a random one here:
# the state only counts prefixes, so every interleaving must resume correctly); a rank hands out micro-batches of
# `micro` samples round-robin over its workers (a micro-batch may span two epochs); a step takes `accum` of them
# from every rank. The states of all ranks are merged with merge_states, as the trainer merges them at a save.


class Run:
    """One topology's slots reading from a (merged) consumed state, as StreamLoader/ShardStream do."""

    def __init__(
        self,
        names: list[str],
        sizes: list[int],
        ranks: int,
        workers: int,
        consumed: dict[int, dict[str, int]],
        rng: random.Random,
        redealt: bool,
    ) -> None:
        self.names, self.sizes, self.ranks, self.workers, self.rng = names, sizes, ranks, workers, rng
        self.slots = ranks * workers
        self.split = splits_shards(len(names), self.slots, sizes_known=True)
        self.consumed = {e: dict(d) for e, d in consumed.items()}
        self.dealt_slots: dict[int, dict[str, int]] = {}
        self.dealt_units: dict[int, dict[str, tuple[int, int]]] = {}
        if redealt:  # a world-size change: StreamLoader._redeal_all
            known = dict(zip(names, sizes, strict=True))
            self.dealt_slots, self.dealt_units = redeal_epochs(
                names, self.consumed, known, SEED, True, self.slots, self.split
            )
        self.streams = [self.slot_samples(k) for k in range(self.slots)]
        self.next_role = [0] * ranks
        self.read: list[tuple[int, int, int]] = []  # (epoch, shard, position) in the order handed out

    def slot_samples(self, slot: int):
        """(epoch, unit key, shard, position) of every sample the slot draws, as ShardStream._epoch_samples."""
        for epoch in range(EPOCHS):
            units = assigned_units(
                self.names, self.sizes, self.slots, slot, epoch, SEED, True, self.split,
                self.dealt_slots, self.dealt_units,
            )  # fmt: skip
            done = self.consumed.get(epoch, {})
            left = []  # [unit, next position, end]
            for u in units:
                hi = u.hi if u.hi is not None else self.sizes[u.shard]
                if u.lo + done.get(u.key, 0) < hi:
                    left.append([u, u.lo + done.get(u.key, 0), hi])
            while left:
                opened = left[:DEFAULT_OPEN_SHARDS]
                pick = opened[self.rng.randrange(len(opened))]
                yield epoch, pick[0].key, pick[0].shard, pick[1]
                pick[1] += 1
                if pick[1] == pick[2]:
                    left.remove(pick)

    def step(self, micro: int, accum: int) -> None:
        for rank in range(self.ranks):
            for _ in range(accum):
                slot = rank * self.workers + self.next_role[rank]
                self.next_role[rank] = (self.next_role[rank] + 1) % self.workers
                for _ in range(micro):
                    epoch, key, shard, pos = next(self.streams[slot])
                    per_epoch = self.consumed.setdefault(epoch, {})
                    per_epoch[key] = per_epoch.get(key, 0) + 1
                    self.read.append((epoch, shard, pos))

    def rank_states(self, base: dict[int, dict[str, int]]) -> list[dict]:
        """Every rank's state_dict(): the loaded consumption plus what its own slots consumed since."""
        mine: list[dict[int, dict[str, int]]] = [
            {e: dict(d) for e, d in base.items()} for _ in range(self.ranks)
        ]
        owner = {}
        for slot in range(self.slots):
            for epoch in self.consumed:
                for u in assigned_units(
                    self.names, self.sizes, self.slots, slot, epoch, SEED, True, self.split,
                    self.dealt_slots, self.dealt_units,
                ):  # fmt: skip
                    owner[(epoch, u.key)] = slot // self.workers
        for epoch, per_key in self.consumed.items():
            for key, n in per_key.items():
                grown = n - base.get(epoch, {}).get(key, 0)
                if grown:
                    d = mine[owner[(epoch, key)]].setdefault(epoch, {})
                    d[key] = d.get(key, 0) + grown
        return [
            {
                "version": STATE_VERSION,
                "seed": SEED,
                "shuffle": True,
                "world_size": self.ranks,
                "workers_per_rank": self.workers,
                "ranks": [r],
                "epoch_consumed": {str(e): d for e, d in mine[r].items()},
                "shard_samples": dict(zip(self.names, self.sizes, strict=True)),
                "counters": {},
                "base_counters": {},
                "next_role": {str(r): 0},
                "batches_delivered": {str(r): 0},
            }
            for r in range(self.ranks)
        ]


SEED = 5
EPOCHS = 1000  # endless, as a resampling loader (never reached)


def resume_case(
    sizes: list[int], before: tuple[int, int], after: tuple[int, int], steps: int, micro: int, seed: int
) -> tuple[Run, Run]:
    """`steps` global batches on `before` (ranks, workers), states merged, then `after` until epochs 0 and 1 are
    read (or for long enough that a sample they never read shows)."""
    names = [f"s-{i:06d}.tar" for i in range(len(sizes))]
    rng = random.Random(seed)
    batch = micro * math.lcm(before[0], after[0])
    first = Run(names, sizes, *before, {}, rng, redealt=False)
    for _ in range(steps):
        first.step(micro, batch // (micro * before[0]))
    merged = merge_states(first.rank_states({}))
    consumed = {int(e): d for e, d in merged["epoch_consumed"].items()}
    second = Run(names, sizes, *after, consumed, rng, redealt=before != after)
    owed = 2 * sum(sizes) - sum(1 for e, _, _ in first.read if e < 2)
    for _ in range(4 * sum(sizes)):  # a slot with much more per epoch than the others holds the rest back
        if sum(1 for e, _, _ in second.read if e < 2) >= owed:
            break
        second.step(micro, batch // (micro * after[0]))
    return first, second


def assert_epochs_read_once(first: Run, second: Run, sizes: list[int], epochs: int) -> None:
    """Every position of each of the first `epochs` epochs read exactly once by the two runs together."""
    for epoch in range(epochs):
        got = Counter((s, p) for e, s, p in first.read + second.read if e == epoch)
        twice = {k: c for k, c in got.items() if c > 1}
        assert not twice, f"epoch {epoch}: read twice {sorted(twice)[:4]}"
        missing = [(s, p) for s, n in enumerate(sizes) for p in range(n) if (s, p) not in got]
        assert not missing, f"epoch {epoch}: never read {missing[:4]}"


def test_two_ranks_half_an_epoch_then_four_ranks_read_the_rest_in_the_same_steps() -> None:
    """The case test_fsdp_runs runs end to end: 32 samples in 4 shards, global batch 8 in micro-batches of 2,
    two steps on 2 ranks x 1 worker, then two steps on 4 ranks x 1 worker: exactly the epoch's other 16."""
    sizes = [8, 8, 8, 8]
    for seed in range(20):  # 20 interleavings of the open shards
        first, second = resume_case(sizes, (2, 1), (4, 1), steps=2, micro=2, seed=seed)
        head, tail = first.read, second.read[:16]
        assert len(head) == 16 and all(e == 0 for e, _, _ in head + tail)
        assert sorted((s, p) for _, s, p in head + tail) == [(s, p) for s in range(4) for p in range(8)]
        assert_epochs_read_once(first, second, sizes, epochs=2)


def test_any_world_size_change_after_any_step_reads_each_remaining_sample_once() -> None:
    """Ranks a -> b in {1,2,3,4,8} x workers {1,2}, 1-9 shards, stopped after any step up to past the first
    epoch's end: epochs 0 and 1 are each read exactly once by the two runs together; and with one worker per
    rank after the resume and a whole number of global batches left in a started epoch 0, the next steps read
    exactly those (no slot runs into epoch 1 while another still owes epoch 0). A fresh epoch is dealt in whole
    shards when there are enough (the fast path), so its slots may end it at different steps."""
    rng = random.Random(11)
    micro, cases, exact = 2, 0, 0
    topologies = [(r, w) for r in (1, 2, 3, 4, 8) for w in (1, 2)]
    for shards in range(1, 10):
        sizes = [rng.randint(1, 12) for _ in range(shards)]
        total = sum(sizes)
        for before in topologies:
            for after in topologies:
                if before == after or total < max(before[0] * before[1], after[0] * after[1]):
                    continue  # same topology: replayed, not re-dealt (test_stream); or an idle slot
                batch = micro * math.lcm(before[0], after[0])
                for steps in range(total // batch + 2):  # every stop up to one step past epoch 0's end
                    first, second = resume_case(sizes, before, after, steps, micro, seed=cases)
                    assert_epochs_read_once(first, second, sizes, epochs=2)
                    left = total - sum(1 for e, _, _ in first.read if e == 0)
                    if after[1] == 1 and 0 < left < total and left % batch == 0:  # 0 < left < total: re-dealt
                        assert all(e == 0 for e, _, _ in second.read[:left]), (sizes, before, after, steps)
                        exact += 1
                    cases += 1
    assert cases > 4000 and exact > 200  # 4,350 and 253


def test_a_slot_left_nothing_of_the_resumed_epoch_goes_on_to_the_next(
    dataset: Path, proc: SampleProcessor
) -> None:
    """1 rank stops with 1-3 samples of epoch 0 left; on 4 ranks most slots get none of them and must start epoch 1
    (they used to stop: their ranks handed out nothing more while the others trained)."""
    kw = {"num_workers": 0, "resample": True}
    head, state = run_ranks(dataset, proc, world=1, limit=15, **kw)  # 45 of the 46 good samples
    left = 49 - sum(state["epoch_consumed"]["0"].values())
    assert 1 <= left <= 3
    tail, after = run_ranks(dataset, proc, world=4, state=json.loads(json.dumps(state)), limit=2, **kw)
    assert all(len(r) == 2 for r in tail), [len(r) for r in tail]
    assert sum(after["epoch_consumed"]["0"].values()) == 49  # epoch 0's rest was read, once
    seen = flat(head[0])
    assert len(seen) == len(set(seen)) == 45
    assert set(GOOD_KEYS) - set(seen) <= set(flat([b for r in tail for b in r]))
