"""The order and the slots: which slot reads which shard in an epoch, in which order, and the resume state.

A rank's DataLoader workers are *slots* (slot id = rank * workers_per_rank + role). Epoch e orders all shards
by a permutation seeded by (seed, e) and deals them to slots round-robin; an epoch interrupted and resumed on
another world size is re-dealt (redeal_epochs): below the shard when every size is known, so each new slot owes
the same number of samples within one. A shard's samples are visited in a permutation seeded by (seed, e, shard
name). The resume state counts, per epoch and shard, the samples that
reached the trainer; every rank's state merges into one that any world size resumes from. Pure functions of
their arguments (vlmtrain.data.order's PRNG), so they never change with a numpy or Python upgrade.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlmtrain.data.order import permutation

STATE_VERSION = 1
# Counter families carried in batches and in the state; all add up exactly once per consumed sample.
COUNTER_KINDS = ("skipped", "truncated", "ignored_members")
DEFAULT_OPEN_SHARDS = 4
UNIT_SEP = "@"


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Indices of all shards in epoch ``epoch``'s reading order."""
    return permutation(num_shards, "shards", seed, epoch) if shuffle else list(range(num_shards))


def slot_shards(
    num_shards: int, num_slots: int, slot: int, seed: int, epoch: int, shuffle: bool
) -> list[int]:
    """Shard indices slot ``slot`` reads in epoch ``epoch``: round-robin over that epoch's order."""
    return shard_order(num_shards, seed, epoch, shuffle)[slot::num_slots]


def balanced_slots(order: Sequence[str], remaining: Mapping[str, int], num_slots: int) -> dict[str, int]:
    """Slot of every shard of an interrupted epoch resumed on ``num_slots`` slots, balancing what is left.

    After a world-size change the old slots have read different amounts of their shards (several are open
    at once), so round-robin would leave some new slots more samples than others, and those would still be
    in this epoch while the rest start the next one. Largest remainder first, each to the least loaded
    slot (ties: the epoch order, then the lowest slot): the remainders differ by at most one shard's.
    """
    load = [0] * num_slots
    out: dict[str, int] = {}
    for name in sorted(order, key=lambda n: -remaining[n]):  # stable: ties keep the epoch order
        slot = min(range(num_slots), key=lambda k: (load[k], k))
        out[name] = slot
        load[slot] += remaining[name]
    return out


# ---- reading below the shard: units --------------------------------------------------------------------------
# With fewer shards than slots, shard-level dealing would leave slots idle (a whole rank without data at 64
# ranks x 4 workers over COCO's 119 shards). Then an epoch is dealt in *units*: a unit is positions [lo, hi) of
# one shard's epoch sample order, several slots read one shard (each reads the whole tar and takes its own
# positions), and every slot gets the same number of samples, within one. A unit's consumption is a prefix of its
# positions, counted under its key: the shard's name for lo = 0 (as shard-level reading counts it), else
# "name@lo". So the positions an epoch consumed are a union of prefixes, whatever topology dealt them, and the
# rest can be dealt again to any number of slots.


@dataclass(frozen=True)
class Unit:
    """Positions [lo, hi) of shard `shard`'s epoch sample order that one slot reads; `key` counts its progress."""

    shard: int
    lo: int
    hi: int | None
    """None: to the shard's end (shard-level reading, where a shard's size may be unknown until it is read)."""
    key: str


def unit_key(name: str, lo: int) -> str:
    """The state key of a unit starting at position `lo` of shard `name` (the bare name when lo = 0)."""
    return name if lo == 0 else f"{name}{UNIT_SEP}{lo}"


def key_start(key: str) -> tuple[str, int]:
    """(shard name, first position) of a unit key (manifest shard names never contain UNIT_SEP)."""
    name, sep, lo = key.rpartition(UNIT_SEP)
    return (name, int(lo)) if sep and lo.isdigit() else (key, 0)


def splits_shards(num_shards: int, num_slots: int, sizes_known: bool) -> bool:
    """Whether epochs are dealt in units below the shard: fewer shards than slots, and every size known."""
    return num_shards < num_slots and sizes_known


def deal_pieces(
    pieces: Sequence[tuple[int, int, int]], names: Sequence[str], num_slots: int
) -> list[list[Unit]]:
    """Units of every slot: the pieces (shard, lo, hi), concatenated in order, cut into `num_slots` contiguous
    runs of floor/ceil(total / slots) samples. Each position lands in exactly one unit; slots differ by one
    sample at most; a slot's units are in piece order."""
    total = sum(hi - lo for _, lo, hi in pieces)
    out: list[list[Unit]] = [[] for _ in range(num_slots)]
    at = 0  # global offset of the current piece
    for shard, lo, hi in pieces:
        length = hi - lo
        # the slots whose runs [k * total // S, (k + 1) * total // S) meet [at, at + length)
        first = (at * num_slots) // total if total else 0
        for slot in range(first, num_slots):
            begin, end = slot * total // num_slots, (slot + 1) * total // num_slots
            if begin >= at + length:
                break
            a, b = max(begin, at), min(end, at + length)
            if a < b:
                start = lo + a - at
                out[slot].append(Unit(shard, start, lo + b - at, unit_key(names[shard], start)))
        at += length
    return out


def epoch_units(
    names: Sequence[str], sizes: Sequence[int], num_slots: int, seed: int, epoch: int, shuffle: bool
) -> list[list[Unit]]:
    """A fresh epoch's units for every slot: the shards in the epoch's order, cut into equal runs."""
    order = shard_order(len(names), seed, epoch, shuffle)
    return deal_pieces([(i, 0, sizes[i]) for i in order], names, num_slots)


def remaining_pieces(
    names: Sequence[str], sizes: Sequence[int], order: Sequence[int], consumed: Mapping[str, int]
) -> list[tuple[int, int, int]]:
    """(shard, lo, hi) runs of positions an epoch has not consumed, in the epoch's shard order: each shard's
    positions [0, size) less the consumed prefix [lo, lo + n) of every unit key of it."""
    taken: dict[str, list[tuple[int, int]]] = {}
    for key, n in consumed.items():
        name, lo = key_start(key)
        if n:
            taken.setdefault(name, []).append((lo, lo + n))
    pieces = []
    for i in order:
        at = 0
        for lo, hi in sorted(taken.get(names[i], [])):
            if lo > at:
                pieces.append((i, at, lo))
            at = max(at, hi)
        if at < sizes[i]:
            pieces.append((i, at, sizes[i]))
    return pieces


def redeal_units(
    names: Sequence[str],
    sizes: Sequence[int],
    consumed: Mapping[str, int],
    seed: int,
    epoch: int,
    shuffle: bool,
    num_slots: int,
) -> dict[str, tuple[int, int]]:
    """An interrupted epoch's remaining positions dealt to `num_slots` slots: unit key -> (slot, hi)."""
    order = shard_order(len(names), seed, epoch, shuffle)
    dealt = deal_pieces(remaining_pieces(names, sizes, order, consumed), names, num_slots)
    return {u.key: (slot, u.hi) for slot, units in enumerate(dealt) for u in units if u.hi is not None}


def sample_order(num_samples: int, seed: int, epoch: int, shard: str, shuffle: bool) -> list[int]:
    """Natural-order indices of a shard's samples in the order epoch ``epoch`` visits them."""
    return permutation(num_samples, "samples", seed, epoch, shard) if shuffle else list(range(num_samples))


def redeal(
    names: Sequence[str],
    consumed: Mapping[int, Mapping[str, int]],
    known: Mapping[str, int],
    seed: int,
    shuffle: bool,
    slots: int,
) -> dict[int, dict[str, int]]:
    """Balanced slots for every epoch a saved run had started, resumed on ``slots`` slots (world size changed).

    ``names``: every shard's name in source order; ``consumed``: epoch -> shard -> samples delivered;
    ``known``: shard sizes known so far.
    """
    out: dict[int, dict[str, int]] = {}
    for epoch, done in consumed.items():
        if not any(done.values()):
            continue
        order = [names[i] for i in shard_order(len(names), seed, epoch, shuffle)]
        # A shard never read has an unknown size until opened: count it as the largest known one.
        typical = max(known.values(), default=1)
        left = {n: max(0, known.get(n, typical) - done.get(n, 0)) for n in order}
        out[epoch] = balanced_slots(order, left, slots)
    return out


def redeal_epochs(
    names: Sequence[str],
    consumed: Mapping[int, Mapping[str, int]],
    known: Mapping[str, int],
    seed: int,
    shuffle: bool,
    num_slots: int,
    split: bool,
) -> tuple[dict[int, dict[str, int]], dict[int, dict[str, tuple[int, int]]]]:
    """Every epoch a saved run had started, dealt to ``num_slots`` slots (the world size changed): (epoch ->
    shard -> slot for epochs dealt in whole shards, epoch -> unit key -> (slot, end) for epochs dealt in units).

    Whole shards cannot balance what the old slots left: each had read a different share of its open shards, so
    new slots would get different remainders, and one that ran dry first would start the next epoch while the
    others still read this one; the trainer's steps would then read some samples twice and others not in the
    same stretch of steps (2 -> 4 ranks over 4 shards did). So with every size known (a manifest, or sizes the
    saved state recorded) the rest is dealt below the shard, each slot within one sample of the others; whole
    shards balanced by what is left (``redeal``) remain only for sources whose sizes are unknown. ``split``:
    fresh epochs are dealt in units (``splits_shards``), so resumed ones must be too.
    """
    sizes_known = all(n in known for n in names)
    by_units = {
        e: done
        for e, done in consumed.items()
        if any(done.values()) and (sizes_known or split or any(key_start(k)[1] for k in done))
    }
    shard_level = {e: done for e, done in consumed.items() if e not in by_units}
    if by_units and not sizes_known:
        missing = [n for n in names if n not in known]
        raise ValueError(
            f"resuming an epoch read below the shard on {num_slots} slots needs every shard's sample count; "
            f"{len(missing)} are unknown (e.g. {missing[:3]}): train from the manifest"
        )
    sizes = [known[n] for n in names] if sizes_known else []
    units = {e: redeal_units(names, sizes, done, seed, e, shuffle, num_slots) for e, done in by_units.items()}
    return redeal(names, shard_level, known, seed, shuffle, num_slots), units


def assigned_units(
    names: Sequence[str],
    sizes: Sequence[int | None],
    num_slots: int,
    slot: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    split: bool,
    dealt_slots: Mapping[int, Mapping[str, int]],
    dealt_units: Mapping[int, Mapping[str, tuple[int, int]]],
) -> list[Unit]:
    """The units ``slot`` reads in ``epoch``, in the epoch's order: as re-dealt (``dealt_units`` below the shard,
    ``dealt_slots`` whole shards; see ``redeal_epochs``) for epochs a world-size change re-dealt, else the fresh deal (in units when
    ``split``, which needs every size, else whole shards round-robin)."""
    order = shard_order(len(names), seed, epoch, shuffle)
    stored = dealt_units.get(epoch)
    if stored is not None:
        index = {name: i for i, name in enumerate(names)}
        place = {shard: at for at, shard in enumerate(order)}
        units = []
        for key, (owner, hi) in stored.items():
            if owner == slot:
                name, lo = key_start(key)
                units.append(Unit(index[name], lo, hi, key))
        return sorted(units, key=lambda u: (place[u.shard], u.lo))
    dealt = dealt_slots.get(epoch)
    if dealt is not None:
        return [Unit(i, 0, None, names[i]) for i in order if dealt[names[i]] == slot]
    if split:
        return epoch_units(names, [int(n) for n in sizes], num_slots, seed, epoch, shuffle)[slot]  # type: ignore[arg-type]
    return [Unit(i, 0, None, names[i]) for i in order[slot::num_slots]]


def epoch_slots_json(epoch_slots: dict[int, dict[str, int]], slots: int) -> dict[str, Any]:
    return {
        str(e): {"slots": slots, "shards": dict(sorted(d.items()))} for e, d in sorted(epoch_slots.items())
    }


def epoch_units_json(epoch_units: dict[int, dict[str, tuple[int, int]]], slots: int) -> dict[str, Any]:
    return {
        str(e): {"slots": slots, "units": {k: list(v) for k, v in sorted(d.items())}}
        for e, d in sorted(epoch_units.items())
    }


def check_state(state: dict[str, Any]) -> None:
    required = (
        "version", "seed", "shuffle", "world_size", "workers_per_rank", "ranks", "epoch_consumed",
        "shard_samples", "counters", "base_counters", "next_role", "batches_delivered",
    )  # fmt: skip
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"resume state lacks {missing}; it was not written by StreamLoader.state_dict()")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"resume state version {state['version']} is not {STATE_VERSION}")


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine every rank's ``state_dict()`` into one state that any world size can resume from.

    Each shard is read by one slot at a time, so a shard's consumption is the largest any rank reports;
    counters add each rank's growth over the common loaded base.
    """
    if not states:
        raise ValueError("merge_states needs at least one state")
    for s in states:
        check_state(s)
    first = states[0]
    for key in (
        "version",
        "seed",
        "shuffle",
        "world_size",
        "workers_per_rank",
        "base_counters",
        "epoch_slots",
        "epoch_units",
    ):
        values = {json.dumps(s.get(key), sort_keys=True) for s in states}
        if len(values) > 1:
            raise ValueError(
                f"states disagree on {key!r} ({sorted(values)}); they come from different runs or resumes"
            )
    ranks = [r for s in states for r in s["ranks"]]
    if len(ranks) != len(set(ranks)):
        raise ValueError(f"states repeat ranks: {sorted(ranks)}")
    consumed: dict[str, dict[str, int]] = {}
    for s in states:
        for epoch, per_shard in s["epoch_consumed"].items():
            merged = consumed.setdefault(str(epoch), {})
            for shard, n in per_shard.items():
                merged[shard] = max(merged.get(shard, 0), int(n))
    shard_samples: dict[str, int] = {}
    for s in states:
        for shard, n in s["shard_samples"].items():
            if shard_samples.setdefault(shard, int(n)) != int(n):
                raise ValueError(f"states disagree on the size of shard {shard}")
    counters = {}
    for kind in COUNTER_KINDS:
        base = Counter(first["base_counters"].get(kind, {}))
        total = Counter(base)
        for s in states:
            total.update(Counter(s["counters"].get(kind, {})) - base)
        counters[kind] = dict(sorted(total.items()))
    return {
        "version": first["version"],
        "seed": first["seed"],
        "shuffle": first["shuffle"],
        "world_size": first["world_size"],
        "workers_per_rank": first["workers_per_rank"],
        "ranks": sorted(ranks),
        "epoch_consumed": {
            e: dict(sorted(d.items())) for e, d in sorted(consumed.items(), key=lambda x: int(x[0]))
        },
        "shard_samples": dict(sorted(shard_samples.items())),
        "counters": counters,
        "base_counters": counters,
        "next_role": {r: n for s in states for r, n in s["next_role"].items()},
        "batches_delivered": {r: n for s in states for r, n in s["batches_delivered"].items()},
        "open_shards": first.get("open_shards", DEFAULT_OPEN_SHARDS),
        "corrupt_shards": dict(
            sorted({k: v for s in states for k, v in s.get("corrupt_shards", {}).items()}.items())
        ),
        "epoch_slots": first.get("epoch_slots", {}),
        "epoch_units": first.get("epoch_units", {}),
    }


def merge_data_faults(faults: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The job's skips by reason and corrupt shard names from every rank's ``data_faults()``.

    Skips add each rank's growth over the common loaded base (as merge_states does).
    """
    base = Counter(faults[0]["base"]) if faults else Counter()
    total = Counter(base)
    for f in faults:
        total.update(Counter(f["skipped"]) - base)
    corrupt = sorted({name for f in faults for name in f["corrupt_shards"]})
    return {"data_skipped": dict(sorted(total.items())), "corrupt_shards": corrupt}
