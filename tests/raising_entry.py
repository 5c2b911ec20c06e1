"""Test entry point: `launch/train.py` whose sample processor raises in the DataLoader workers of one rank.

    python tests/raising_entry.py FAIL_RANK AFTER_SAMPLES <launch/train.py arguments>

The patch is made before the training command builds its loaders, so the workers it forks inherit it; the
library itself has no fault hook.
"""

from __future__ import annotations

import os
import sys

from vlmtrain.data.process import SampleProcessor

INJECTED = "injected failure in a DataLoader worker"


def main() -> None:
    fail_rank, after = int(sys.argv[1]), int(sys.argv[2])
    del sys.argv[1:3]
    original = SampleProcessor.__call__
    calls = [0]  # per process: each forked worker counts its own samples

    def failing(self: SampleProcessor, raw):
        calls[0] += 1
        if int(os.environ.get("RANK", "0")) == fail_rank and calls[0] > after:
            raise ZeroDivisionError(f"{INJECTED} at sample {raw.key} of {raw.shard}")
        return original(self, raw)

    SampleProcessor.__call__ = failing  # type: ignore[method-assign]
    from vlmtrain.cli import train_entry

    train_entry()


if __name__ == "__main__":
    main()
