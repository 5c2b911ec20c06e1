"""Reading below the shard (vlmtrain.data.slots units): with fewer shards than slots every slot reads.

Simulated as pure functions at 1 to 1,024 ranks x 1-8 workers over 1 to 10,000 shards (each position exactly
once per epoch, slots within one sample of each other, resumes on any slot count), then through the loader on
real shards: every sample once, a same-topology resume bitwise, world-size changes read the rest once.
"""

# ruff: noqa: F811  (the fixtures of test_stream are imported and used as parameters)
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_stream import GOOD_KEYS, batches, dataset, flat, loader, proc, run_ranks, tok  # noqa: F401

from vlmtrain.data.process import SampleProcessor
from vlmtrain.data.slots import (
    Unit,
    deal_pieces,
    epoch_units,
    key_start,
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
