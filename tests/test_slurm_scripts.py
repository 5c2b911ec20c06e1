"""SLURM launch scripts: syntax, launch command lines, stop-signal forwarding and requeue-on-75.

The sbatch scripts run under plain bash in a temporary checkout (the real launch/slurm files plus a
stand-in launch/train.py) with fake `srun`, `scontrol` and `deepspeed` on PATH; the fakes record their
argv and exit with a chosen status. One test runs the real DeepSpeed launcher, the torchrun tests run
real torchrun (via launch/slurm/torchrun_exitcode.py), both on CPU with stand-in workers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "launch" / "slurm"
SCRIPTS = ("single_node.sbatch", "multi_node.sbatch", "multi_node_torchrun.sbatch")
PREEMPTED = 75
JOB_ID = 4242
PORT = str(10000 + JOB_ID % 20000)  # the job-id-derived MASTER_PORT of common.sh
IGNORE_USR1 = ["bash", "-c", 'trap "" USR1; exec "$@"', "vlmtrain-ignore-usr1"]
DEFAULT_TRAIN_ARGS = ["--run-dir", f"runs/slurm-{JOB_ID}", "--resume", "auto", "--stage", "0-3"]

FAKE_SRUN = r"""#!/usr/bin/env bash
# Fake srun. Records argv (one per line) and MASTER_*; FAKE_SRUN_MODE:
#   exit  exit with FAKE_STATUS at once
#   wait  wait for SIGUSR1 (as srun forwarding it), then exit with FAKE_STATUS
#   exec  run the task command (after the --options) as one task in its own process group and send
#         SIGUSR1 to that whole group, as slurmstepd signals every process of a step
printf '%s\n' "$@" > "$FAKE_OUT/srun.argv"
printf 'MASTER_ADDR=%s\nMASTER_PORT=%s\n' "${MASTER_ADDR:-}" "${MASTER_PORT:-}" > "$FAKE_OUT/srun.env"
case "${FAKE_SRUN_MODE:-exit}" in
exit) exit "${FAKE_STATUS:-0}" ;;
wait)
    trap 'echo USR1 >> "$FAKE_OUT/srun.signals"; exit "${FAKE_STATUS:-0}"' USR1
    touch "$FAKE_OUT/ready-srun"
    while :; do sleep 0.05; done ;;
exec)
    while [[ $# -gt 0 && $1 == -* ]]; do shift; done
    export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0
    setsid "$@" &
    child=$!
    trap 'kill -s USR1 -- "-$child"' USR1
    while kill -0 "$child" 2>/dev/null; do wait "$child"; done
    wait "$child"
    exit $? ;;
esac
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
case "$1 $2" in
"show hostnames") printf '%s\n' node-a node-b ;;
requeue*) echo "requeue $2" >> "$FAKE_OUT/scontrol.requeue"; exit "${FAKE_REQUEUE_STATUS:-0}" ;;
*) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""

FAKE_DEEPSPEED = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$FAKE_OUT/deepspeed.argv"
exit "${FAKE_STATUS:-0}"
"""

# Stand-in for launch/train.py (and torchrun workers): records how it was started, then behaves like the
# trainer: with FAKE_TRAIN_MODE=wait_signal it installs a SIGUSR1 handler (after FAKE_HANDLER_DELAY s),
# waits for the signal and exits with FAKE_STATUS.
FAKE_TRAIN = r"""
import json, os, signal, sys, time
from pathlib import Path

out = Path(os.environ["FAKE_OUT"])
me = f"{os.environ.get('LOCAL_RANK', 'x')}-{os.getpid()}"
(out / f"train-{me}.json").write_text(json.dumps({
    "argv": sys.argv[1:],
    "usr1_ignored_at_start": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
}))
(out / f"started-{me}").touch()
if os.environ.get("FAKE_TRAIN_MODE") == "wait_signal":
    time.sleep(float(os.environ.get("FAKE_HANDLER_DELAY", "0")))
    got = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    (out / f"ready-{me}").touch()
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    (out / f"stopped-{me}").write_text("signal" if got else "timeout")
sys.exit(int(os.environ.get("FAKE_STATUS", "0")))
"""


@dataclass(frozen=True)
class Cluster:
    """A temporary checkout and fake Slurm tools; `out` collects what the fakes record."""

    repo: Path
    fakes: Path
    out: Path

    def env(self, path_first: Path | None = None, **extra: str) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        path = [str(p) for p in (path_first, self.fakes) if p is not None]
        env = {
            "PATH": os.pathsep.join([*path, venv_bin, "/usr/bin", "/bin"]),
            "HOME": str(self.repo.parent),
            "SLURM_JOB_ID": str(JOB_ID),
            "SLURM_SUBMIT_DIR": str(self.repo),
            "SLURM_JOB_NODELIST": "node-[a-b]",
            "SLURM_NNODES": "2",
            "SLURM_GPUS_ON_NODE": "8",
            "SLURM_CPUS_PER_TASK": "8",
            "FAKE_OUT": str(self.out),
            "DS_ACCELERATOR": "cpu",
        }
        env.update(extra)
        return env

    def lines(self, name: str) -> list[str]:
        path = self.out / name
        return path.read_text().splitlines() if path.is_file() else []

    def requeues(self) -> list[str]:
        return self.lines("scontrol.requeue")


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    repo, fakes, out = tmp_path / "repo", tmp_path / "bin", tmp_path / "out"
    shutil.copytree(SLURM_DIR, repo / "launch" / "slurm", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "launch" / "train.py").write_text(FAKE_TRAIN)
    fakes.mkdir()
    out.mkdir()
    _write_exe(fakes / "srun", FAKE_SRUN)
    _write_exe(fakes / "scontrol", FAKE_SCONTROL)
    _write_exe(fakes / "deepspeed", FAKE_DEEPSPEED)
    return Cluster(repo, fakes, out)


def _run(cluster: Cluster, script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(cluster.repo / "launch" / "slurm" / script)],
        env=env,
        cwd=cluster.repo,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _signal_and_finish(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str) -> tuple[int, str]:
    """Send SIGUSR1 to the batch shell once `ready`, as `--signal=B:USR1` does; return (status, log)."""
    try:
        _wait_for(ready, what)
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, output


def _popen(cluster: Cluster, script: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["bash", str(cluster.repo / "launch" / "slurm" / script)],
        env=env,
        cwd=cluster.repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _launch_argv(cluster: Cluster, script: str) -> list[str]:
    return cluster.lines("deepspeed.argv" if script == "single_node.sbatch" else "srun.argv")


# ---- syntax -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*SCRIPTS, "common.sh"])
def test_bash_syntax(name: str) -> None:
    result = subprocess.run(["bash", "-n", str(SLURM_DIR / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_sbatch_header_asks_for_warning_signal_requeue_and_appended_logs(name: str) -> None:
    directives = [
        line.split(None, 1)[1]
        for line in (SLURM_DIR / name).read_text().splitlines()
        if line.startswith("#SBATCH ")
    ]
    assert "--signal=B:USR1@300" in directives
    assert "--requeue" in directives
    assert "--open-mode=append" in directives


# ---- requeue logic: the training command's status decides -------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("status", [0, 1, 2, PREEMPTED, 137])
def test_requeue_exactly_on_75(cluster: Cluster, script: str, status: int) -> None:
    result = _run(cluster, script, cluster.env(FAKE_STATUS=str(status)))
    assert result.returncode == status, result.stdout + result.stderr
    assert cluster.requeues() == ([f"requeue {JOB_ID}"] if status == PREEMPTED else [])
    assert _launch_argv(cluster, script), "the launch command was not run"


def test_failed_requeue_still_reports_75(cluster: Cluster) -> None:
    env = cluster.env(FAKE_STATUS=str(PREEMPTED), FAKE_REQUEUE_STATUS="1")
    result = _run(cluster, "multi_node.sbatch", env)
    assert result.returncode == PREEMPTED
    assert cluster.requeues() == [f"requeue {JOB_ID}"]
    assert "resubmit with the same RUN_DIR" in result.stdout


# ---- launch command lines ---------------------------------------------------------------------------


def test_single_node_command_line(cluster: Cluster) -> None:
    assert _run(cluster, "single_node.sbatch", cluster.env()).returncode == 0
    assert cluster.lines("deepspeed.argv") == [
        "--num_gpus", "8", "--master_port", PORT, "launch/train.py", *DEFAULT_TRAIN_ARGS,
    ]  # fmt: skip


def test_multi_node_command_line_and_master(cluster: Cluster) -> None:
    assert _run(cluster, "multi_node.sbatch", cluster.env()).returncode == 0
    assert cluster.lines("srun.argv") == [
        "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=0", "--cpus-per-task=8",
        *IGNORE_USR1, "python", "launch/train.py", *DEFAULT_TRAIN_ARGS,
    ]  # fmt: skip
    assert cluster.lines("srun.env") == ["MASTER_ADDR=node-a", f"MASTER_PORT={PORT}"]


def test_torchrun_command_line(cluster: Cluster) -> None:
    from torch.distributed.run import parse_args

    assert _run(cluster, "multi_node_torchrun.sbatch", cluster.env()).returncode == 0
    argv = cluster.lines("srun.argv")
    head = ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--cpus-per-task=8", *IGNORE_USR1]
    assert argv[: len(head) + 2] == [*head, "python", "launch/slurm/torchrun_exitcode.py"]
    torchrun_argv = argv[len(head) + 2 :]
    assert torchrun_argv == [
        "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"node-a:{PORT}", "--rdzv_id", str(JOB_ID), "--max_restarts", "0",
        "launch/train.py", *DEFAULT_TRAIN_ARGS,
    ]  # fmt: skip
    args = parse_args(torchrun_argv)  # torchrun itself accepts them
    assert (args.nnodes, args.nproc_per_node, args.rdzv_endpoint) == ("2", "8", f"node-a:{PORT}")
    assert args.training_script == "launch/train.py"


def test_knobs_become_train_arguments_the_cli_accepts(cluster: Cluster) -> None:
    from typer.main import get_command

    from vlmtrain.cli import app

    env = cluster.env(
        RUN_DIR="/shared/runs/exp 1",
        STAGES="0,1 3",
        CONFIGS="my/stage4.json my/stage5.json",
        DS_CONFIG="zero3_bf16",
        ENGINE="deepspeed",
        OVERRIDES="optim.weight_decay=0.1 train.save_every=50",
        MASTER_PORT="31000",
        GPUS_PER_NODE="4",
    )
    assert _run(cluster, "single_node.sbatch", env).returncode == 0
    argv = cluster.lines("deepspeed.argv")
    train_args = [
        "--run-dir", "/shared/runs/exp 1", "--resume", "auto", "--stage", "0,1", "--stage", "3",
        "--config", "my/stage4.json", "--config", "my/stage5.json", "--set", "train.ds_config=zero3_bf16",
        "--engine", "deepspeed", "--set", "optim.weight_decay=0.1", "--set", "train.save_every=50",
    ]  # fmt: skip
    assert argv == ["--num_gpus", "4", "--master_port", "31000", "launch/train.py", *train_args]
    # The real CLI parses them (without running): the scripts and `vlmtrain train` agree on options.
    train = get_command(app).commands["train"]  # type: ignore[attr-defined]
    ctx = train.make_context("train", list(train_args))
    assert ctx.params["run_dir"] == Path("/shared/runs/exp 1")
    assert ctx.params["resume"] == "auto"
    assert ctx.params["stage"] == ["0,1", "3"]
    assert ctx.params["set_"] == [
        "train.ds_config=zero3_bf16",
        "optim.weight_decay=0.1",
        "train.save_every=50",
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"SLURM_GPUS_ON_NODE": ""}, "GPUs per node unknown"),
        ({"STAGES": "", "CONFIGS": ""}, "nothing to train"),
        ({"VENV": "/nonexistent/venv"}, "has no bin/activate"),
    ],
)
def test_bad_settings_fail_before_launching(
    cluster: Cluster, overrides: dict[str, str], message: str
) -> None:
    result = _run(cluster, "multi_node.sbatch", cluster.env(**overrides))
    assert result.returncode == 2
    assert message in result.stderr
    assert not (cluster.out / "srun.argv").exists()
    assert cluster.requeues() == []


def test_checkout_without_launch_script_is_refused(cluster: Cluster) -> None:
    (cluster.repo / "launch" / "train.py").unlink()
    result = _run(cluster, "single_node.sbatch", cluster.env())
    assert result.returncode == 2
    assert "no launch/train.py" in result.stderr


# ---- the stop signal: batch shell -> training processes -> exit 75 -> requeue -------------------------


def _files(cluster: Cluster, prefix: str) -> list[Path]:
    return sorted(cluster.out.glob(f"{prefix}-*"))


@pytest.mark.parametrize("script", ["multi_node.sbatch", "multi_node_torchrun.sbatch"])
def test_signal_is_forwarded_to_srun_and_75_requeues(cluster: Cluster, script: str) -> None:
    env = cluster.env(FAKE_SRUN_MODE="wait", FAKE_STATUS=str(PREEMPTED))
    status, log = _signal_and_finish(
        _popen(cluster, script, env), lambda: (cluster.out / "ready-srun").exists(), "fake srun"
    )
    assert cluster.lines("srun.signals") == ["USR1"], log
    assert status == PREEMPTED, log
    assert cluster.requeues() == [f"requeue {JOB_ID}"]


@pytest.mark.parametrize("status", [PREEMPTED, 1, 0])
def test_srun_step_gets_signal_while_rank_ignores_it_until_its_handler(cluster: Cluster, status: int) -> None:
    """The rank starts with SIGUSR1 ignored (the wrapper) and exits `status` on the signal."""
    env = cluster.env(FAKE_SRUN_MODE="exec", FAKE_TRAIN_MODE="wait_signal", FAKE_STATUS=str(status))
    code, log = _signal_and_finish(
        _popen(cluster, "multi_node.sbatch", env), lambda: bool(_files(cluster, "ready")), "the rank"
    )
    assert code == status, log
    assert [p.read_text() for p in _files(cluster, "stopped")] == ["signal"]
    (record,) = [json.loads(p.read_text()) for p in _files(cluster, "train")]
    assert record["usr1_ignored_at_start"] is True
    assert record["argv"] == DEFAULT_TRAIN_ARGS
    assert cluster.requeues() == ([f"requeue {JOB_ID}"] if status == PREEMPTED else [])


def test_signal_before_the_handler_is_installed_is_sent_again(cluster: Cluster) -> None:
    """A stop signal during start-up is ignored by the rank; the batch shell repeats it until it lands."""
    env = cluster.env(
        FAKE_SRUN_MODE="exec",
        FAKE_TRAIN_MODE="wait_signal",
        FAKE_HANDLER_DELAY="1.5",
        FAKE_STATUS=str(PREEMPTED),
        VLM_RESIGNAL_EVERY="1",
    )
    status, log = _signal_and_finish(
        _popen(cluster, "multi_node.sbatch", env), lambda: bool(_files(cluster, "started")), "rank start"
    )
    assert status == PREEMPTED, log
    assert log.count("forwarded SIGUSR1") >= 2, log
    assert [p.read_text() for p in _files(cluster, "stopped")] == ["signal"]
    assert cluster.requeues() == [f"requeue {JOB_ID}"]


@pytest.mark.slow
def test_single_node_real_deepspeed_launcher_passes_signal_and_75(cluster: Cluster) -> None:
    """The real `deepspeed` launcher with 2 stand-in ranks: the launchers survive SIGUSR1 (ignored),
    both ranks get it, and the launcher's exit status 75 makes the script requeue."""
    if shutil.which("deepspeed", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("deepspeed launcher not installed next to this interpreter")
    no_fake_deepspeed = cluster.fakes.parent / "bin-real-deepspeed"
    no_fake_deepspeed.mkdir()
    for tool in ("srun", "scontrol"):
        shutil.copy2(cluster.fakes / tool, no_fake_deepspeed / tool)
    env = cluster.env(FAKE_TRAIN_MODE="wait_signal", FAKE_STATUS=str(PREEMPTED), GPUS_PER_NODE="2")
    env["PATH"] = env["PATH"].replace(str(cluster.fakes), str(no_fake_deepspeed))
    status, log = _signal_and_finish(
        _popen(cluster, "single_node.sbatch", env), lambda: len(_files(cluster, "ready")) == 2, "2 ranks"
    )
    assert status == PREEMPTED, log
    assert [p.read_text() for p in _files(cluster, "stopped")] == ["signal", "signal"]
    records = [json.loads(p.read_text()) for p in _files(cluster, "train")]
    assert all(r["usr1_ignored_at_start"] for r in records)
    assert sorted(r["argv"][0] for r in records) == ["--local_rank=0", "--local_rank=1"]
    assert all(r["argv"][1:] == DEFAULT_TRAIN_ARGS for r in records)
    assert cluster.requeues() == [f"requeue {JOB_ID}"]


# ---- torchrun_exitcode.py ---------------------------------------------------------------------------


def _load_torchrun_exitcode():
    spec = importlib.util.spec_from_file_location("torchrun_exitcode", SLURM_DIR / "torchrun_exitcode.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _failure(local_rank: int, exitcode: int, timestamp: int):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failure = ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file="")
    failure.timestamp = timestamp
    return failure


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        # rank 1 exited 75 first; the agent then stopped rank 0 with SIGTERM (-15): 75 is the cause
        ({1: (75, 100), 0: (-15, 101)}, 75),
        # same second: the first failure the agent recorded wins (torchelastic's own rule)
        ({1: (75, 100), 0: (-15, 100)}, 75),
        ({0: (-15, 100), 1: (75, 101)}, 128 + 15),  # a worker killed by SIGTERM first
        ({0: (1, 100), 1: (-15, 100)}, 1),  # a crash: not 75, so no requeue
        ({0: (300, 100)}, 255),  # statuses above 255 do not exist for a shell
    ],
)
def test_failure_exit_status_is_the_root_cause_status(
    failures: dict[int, tuple[int, int]], expected: int
) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    module = _load_torchrun_exitcode()
    err = ChildFailedError("launch/train.py", {r: _failure(r, c, t) for r, (c, t) in failures.items()})
    assert module.failure_exit_status(err) == expected


WORKER = r"""
import os, sys, time
rank = int(os.environ["LOCAL_RANK"])
codes = [int(c) for c in os.environ["WORKER_CODES"].split(",")]
delays = [float(d) for d in os.environ["WORKER_DELAYS"].split(",")]
time.sleep(delays[rank])
sys.exit(codes[rank])
"""


def _torchrun_cmd(worker: Path, prefix: Sequence[str] = ()) -> list[str]:
    return [
        *prefix,
        sys.executable, str(SLURM_DIR / "torchrun_exitcode.py"),
        "--standalone", "--nproc_per_node", "2", "--max_restarts", "0", str(worker),
    ]  # fmt: skip


@pytest.mark.slow
def test_real_torchrun_passes_75_where_plain_torchrun_gives_1(tmp_path: Path) -> None:
    """Rank 0 exits 75, rank 1 is still running and gets stopped by the agent: the status is 75."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "WORKER_CODES": "75,75", "WORKER_DELAYS": "0,2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(_torchrun_cmd(worker), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == PREEMPTED, result.stderr[-3000:]
    assert "exitcode  : -15" in result.stderr  # rank 1 was stopped, yet 75 is reported


@pytest.mark.slow
def test_real_torchrun_agent_survives_usr1_and_workers_exit_75(tmp_path: Path) -> None:
    """As in multi_node_torchrun.sbatch: the agent starts with SIGUSR1 ignored, Slurm signals every process
    of the step (torchrun puts each worker in its own session, so here: every descendant); the workers
    checkpoint and exit 75, and the agent reports 75."""
    import psutil

    out = tmp_path / "out"
    out.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_TRAIN)
    env = {
        **os.environ,
        "FAKE_OUT": str(out),
        "FAKE_TRAIN_MODE": "wait_signal",
        "FAKE_STATUS": str(PREEMPTED),
    }
    proc = subprocess.Popen(
        _torchrun_cmd(worker, IGNORE_USR1),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: len(list(out.glob("ready-*"))) == 2, "2 torchrun workers")
        agent = psutil.Process(proc.pid)
        for p in [agent, *agent.children(recursive=True)]:
            p.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == PREEMPTED, output[-3000:]
    assert sorted(p.read_text() for p in out.glob("stopped-*")) == ["signal", "signal"]
    assert all(json.loads(p.read_text())["usr1_ignored_at_start"] for p in out.glob("train-*"))
