"""Seeded orders that never change with a Python or numpy upgrade: SplitMix64 and a Fisher-Yates over it.

Shared by the shard writer (record order in the shards) and the reader (shard, sample and mixing orders),
so a saved resume state or a re-run of ``vlmtrain shard`` always sees the same permutations. Pinned by
reference vectors in tests/test_stream.py.
"""

from __future__ import annotations

import hashlib

_MASK64 = (1 << 64) - 1


def seed64(*parts: object) -> int:
    """A 64-bit seed from any printable parts (blake2b of their text, joined by a unit separator)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def splitmix64(state: int) -> tuple[int, int]:
    """One step of Vigna's SplitMix64: (next state, 64-bit output)."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def permutation(n: int, *seed_parts: object) -> list[int]:
    """Fisher-Yates permutation of range(n) driven by SplitMix64 seeded from ``seed_parts``."""
    state = seed64(*seed_parts)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        state, z = splitmix64(state)
        j = z % (i + 1)  # modulo bias < n / 2**64: negligible
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def draw(bound: int, *seed_parts: object) -> int:
    """One value in [0, bound) from SplitMix64 seeded by ``seed_parts`` (a pure function of them)."""
    if bound < 1:
        raise ValueError(f"draw needs a positive bound, got {bound}")
    return splitmix64(seed64(*seed_parts))[1] % bound
