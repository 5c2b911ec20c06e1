"""torchrun that exits with the status of the first worker that failed, so a preempted rank's 75 reaches SLURM.

Plain `torchrun` raises ChildFailedError when any worker exits non-zero and so always ends with status 1;
a batch script then cannot tell a preemption checkpoint (75, requeue) from a crash (no requeue). This
entry point takes exactly torchrun's arguments and runs torchrun's own `run`, then maps the failure to
the root-cause worker's status: the earliest failure, which is the one that made the agent stop the
others (those are reported too, with -15 after its SIGTERM). A worker killed by signal N gives 128 + N,
as a shell would report it.

    python launch/slurm/torchrun_exitcode.py --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint host:29500 --rdzv_id 42 launch/train.py --stage 0-3 --run-dir runs/x --resume auto
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def failure_exit_status(err: ChildFailedError) -> int:
    """Shell-style exit status of the root-cause worker of a failed torchrun."""
    _, first = err.get_first_failure()
    code = int(first.exitcode)
    if code > 0:
        return min(code, 255)
    if code < 0:
        return 128 + (-code)  # a worker killed by a signal (subprocess reports -signum)
    return 1  # failed without a status (e.g. an error file only): a plain failure


def main(argv: list[str]) -> int:
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        status = failure_exit_status(err)
        print(err.format_msg(), file=sys.stderr)
        print(f"torchrun_exitcode: exiting with the first failed worker's status {status}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
