"""Preflight (vlmtrain.train.preflight): every problem a training command would meet after loading its models
is found before, listed one line each, and `vlmtrain train` exits 2 with no traceback and no weights read.

The checks are tested one by one in-process; the failures and a good config also run through the real
command (tests/preflight_entry.py: `vlmtrain train` whose loaders end the process with a marker).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from preflight_entry import LOAD_EXIT_CODE, MARKER
from train_fixtures import PYTHON, TrainData, free_port, tiny_stage_config, train_data, train_env

from vlmtrain.config.load import stage_config_from_dict
from vlmtrain.config.schema import StageConfig
from vlmtrain.train import preflight as pf

ENTRY = Path(__file__).resolve().parent / "preflight_entry.py"
HUB_ID = "google/siglip-so400m-patch14-224"
ROOT = os.geteuid() == 0  # chmod does not stop root from writing


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return train_data(tmp_path_factory.getbasetemp())


def good_config(data: TrainData, **changes: Any) -> dict[str, Any]:
    """Tiny stage 0 (built from `model`, DeepSpeed ZeRO-2 preset, local shards): passes every check."""
    cfg = tiny_stage_config(0, data, max_steps=2, save_every=0)
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    return cfg


def stage(cfg: dict[str, Any]) -> StageConfig:
    return stage_config_from_dict(cfg)


def lines(report: pf.Report) -> list[str]:
    return [p.line() for p in report.problems]


# ---- a good config ----------------------------------------------------------------------------------------


def test_a_good_config_passes_every_check(tmp_path: Path, data: TrainData) -> None:
    report = pf.preflight(
        [stage(good_config(data))], tmp_path / "run", world_size=1, env={"HF_HUB_OFFLINE": "1"}
    )
    assert report.problems == ()
    assert not (tmp_path / "run").exists(), "preflight creates nothing"


# ---- data -------------------------------------------------------------------------------------------------


def test_missing_manifest_and_shards_are_named(tmp_path: Path, data: TrainData) -> None:
    problems, urls, note = pf.check_data_source("s data.train", str(tmp_path / "none" / "manifest.json"))
    assert [p.line() for p in problems] == [
        f"s data.train: manifest {tmp_path / 'none' / 'manifest.json'} does not exist; write shards with "
        "`vlmtrain shard` first"
    ]
    assert urls == [] and note is None
    shards = data.recap.parent
    pattern = str(shards / "shard-{000000..000004}.tar")  # the recap set has shards 0-3
    (problem,) = pf.check_data_source("s data.train", pattern)[0]
    assert "1 of 5 shard files are missing" in problem.message and "shard-000004.tar" in problem.message
    assert pf.check_data_source("s data.train", str(shards / "shard-{000000..000003}.tar"))[0] == []
    assert pf.check_data_source("s data.train", "")[0][0].message.startswith("is empty")


def test_pipe_sources_are_not_run_and_say_so() -> None:
    problems, urls, note = pf.check_data_source("s data.train", "pipe:aws s3 cp s3://b/x-{0..9}.tar -")
    assert problems == [] and urls == []
    assert (
        note
        == "preflight: s data.train: 'pipe:aws s3 cp s3://b/x-{0..9}.tar -' is a command, not checked before it runs"
    )


def test_without_max_steps_the_manifest_must_give_a_step(tmp_path: Path, data: TrainData) -> None:
    cfg = good_config(data)
    cfg["train"]["max_steps"] = None
    cfg["batch"] = {"global_batch_size": 64, "micro_batch_size": 2}  # the recap set holds 32 samples
    (problem,) = pf.check_step_count(stage(cfg))
    assert problem.where == "stage0 train.max_steps" and "less than one global batch of 64" in problem.message
    cfg["data"]["train"] = str(data.recap.parent / "shard-{000000..000003}.tar")  # no sample counts
    (problem,) = pf.check_step_count(stage(cfg))
    assert "has no manifest with sample counts; set train.max_steps" in problem.message


class _NoHead(http.server.SimpleHTTPRequestHandler):
    """A server that refuses HEAD (as URLs signed for GET do) but serves a range GET."""

    def do_HEAD(self) -> None:
        self.send_error(405)

    def log_message(self, *args: Any) -> None:
        pass


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path, handler: type) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("handler", [_Quiet, _NoHead], ids=["head", "range-get"])
def test_remote_urls_must_answer(tmp_path: Path, handler: type) -> None:
    for i in range(5):
        (tmp_path / f"s-{i}.tar").write_bytes(b"x" * 10)
    with serve(tmp_path, handler) as base:
        problems, urls, _ = pf.check_data_source("s data.train", f"{base}/s-{{0..6}}.tar")
        assert problems == [] and urls == [f"{base}/s-0.tar", f"{base}/s-3.tar", f"{base}/s-6.tar"]
        found = pf.check_urls([("s data.train", u) for u in urls])
        assert [p.line() for p in found] == [
            f"s data.train: {base}/s-6.tar: HTTP 404 File not found; check the URL, the bucket's permissions "
            "and the network"
        ]
    dead = f"http://127.0.0.1:{free_port()}/s-0.tar"  # nothing listens there
    (problem,) = pf.check_urls([("s validation.data", dead)], timeout=2)
    assert problem.where == "s validation.data" and f"{dead}: no answer within 2 s" in problem.message


# ---- init_from, DeepSpeed config, batch -------------------------------------------------------------------


def test_init_from_must_name_an_earlier_stage_or_a_model_directory(tmp_path: Path, data: TrainData) -> None:
    s0 = stage(good_config(data))
    s1 = stage(good_config(data, name="stage1", init_from="stage0"))  # planned: stage0 runs first
    assert pf.check_init_from([s0, s1], tmp_path / "run", resume=False) == []
    (problem,) = pf.check_init_from([s1], tmp_path / "run", resume=False)
    assert problem.where == "stage1 init_from"
    assert problem.message.startswith(
        f"init_from='stage0' found no model at {tmp_path / 'run' / 'stage0' / 'final'}"
    )
    # A directory with a model config but without weights or tokenizer files is refused by name.
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "vlm_config.json").write_text("{}")
    s2 = stage(good_config(data, name="stage2", init_from=str(saved)))
    (problem,) = pf.check_init_from([s2], tmp_path / "run", resume=False)
    assert problem.line() == (
        f"stage2 init_from: {saved} lacks model.safetensors/lora.json, tokenizer_config.json/tokenizer.json; "
        "save the tokenizer there (tokenizer.save_pretrained) or re-save it"
    )
    # A stage after a failed one is not reported again (its cause is listed already).
    s3 = stage(good_config(data, name="stage3", init_from="stage2"))
    assert len(pf.check_init_from([s2, s3], tmp_path / "run", resume=False)) == 1


def test_ds_config_must_exist_parse_and_be_supported(tmp_path: Path, data: TrainData) -> None:
    (problem,) = pf.check_ds_config(stage(good_config(data, train__ds_config="no_such_preset")), 1)
    assert (
        problem.where == "stage0 train.ds_config"
        and "DeepSpeed config 'no_such_preset' not found" in problem.message
    )
    broken = tmp_path / "broken.json"
    text = '{"zero_optimization": '
    broken.write_text(text)
    (problem,) = pf.check_ds_config(stage(good_config(data, train__ds_config=str(broken))), 1)
    assert problem.message.startswith(f"{broken} is not valid JSON (line 1, column {len(text) + 1})")
    zero0 = tmp_path / "zero0.json"
    zero0.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    (problem,) = pf.check_ds_config(stage(good_config(data, train__ds_config=str(zero0))), 1)
    assert "zero_optimization.stage=0 is not supported" in problem.message
    nvme = tmp_path / "nvme.json"
    nvme.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}))
    (problem,) = pf.check_ds_config(stage(good_config(data, train__ds_config=str(nvme))), 1)
    assert "zero_optimization.offload_optimizer.device='nvme' is not supported" in problem.message
    assert pf.check_ds_config(stage(good_config(data, train__ds_config="zero1_bf16")), 1) == []
    assert (
        pf.check_ds_config(stage(good_config(data, train__engine="fsdp", train__ds_config="nope")), 1) == []
    )


def test_batch_must_split_over_the_world(data: TrainData) -> None:
    (problem,) = pf.check_batch(stage(good_config(data)), world_size=3)  # 8 samples, micro 2
    assert problem.line() == (
        "stage0 batch.global_batch_size: 8 gives not a whole number of samples per rank (8 / 3). Options: run on a "
        "world size that divides it (e.g. 1, 2 GPUs), or set batch.global_batch_size to a multiple of 3 (e.g. 9) "
        "and say how the learning rates follow it with optim.lr_scaling (none | linear | sqrt against "
        "optim.lr_reference_batch = 128; now 'none') (3 ranks)"
    )
    assert (
        pf.check_batch(stage(good_config(data)), world_size=2) == []
    )  # 4 samples each: 2 micro-batches of 2
    (problem,) = pf.check_batch(
        stage(good_config(data)), world_size=8
    )  # 1 sample each: a micro-batch of 2 cannot
    assert problem.line() == (
        "stage0 batch.global_batch_size: 8 is not divisible by micro_batch_size x world size = 16 (8 ranks)"
    )
    auto = stage(good_config(data, batch__micro_batch_size="auto"))
    assert pf.check_batch(auto, world_size=8) == []  # `auto` takes the 1 sample each


def test_stage_names_must_be_unique(data: TrainData) -> None:
    s = stage(good_config(data))
    assert [p.line() for p in pf.check_stage_names([s, s])] == [
        "stage0 name: two stages of this command share the name; rename one"
    ]


def test_optional_loggers_must_be_installed(data: TrainData, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = good_config(data)
    cfg["train"].update(wandb={"project": "p"}, tensorboard=True)
    assert pf.check_loggers(stage(cfg)) == []  # both installed here (the dev setup installs the extras)
    monkeypatch.setitem(sys.modules, "wandb", None)  # now neither can be found
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert [p.line() for p in pf.check_loggers(stage(cfg))] == [
        "stage0 train.wandb: the wandb package is not installed: pip install 'vlmtrain[wandb]' "
        "(or set train.wandb to null)",
        "stage0 train.tensorboard: the tensorboard package is not installed: pip install "
        "'vlmtrain[tensorboard]' (or set train.tensorboard to false)",
    ]


# ---- run directory ----------------------------------------------------------------------------------------


def test_run_dir_under_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    (problem,) = pf.check_run_dir(tmp_path / "afile" / "run")
    assert (
        problem.line()
        == f"--run-dir: {tmp_path / 'afile'} is a file, so {tmp_path / 'afile' / 'run'} cannot be created; choose another"
    )
    assert pf.check_run_dir(tmp_path / "new" / "deeper") == [] and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"], "the probe file is removed"


@pytest.mark.skipif(ROOT, reason="root writes into a read-only directory; the regular-file case covers it")
def test_read_only_run_dir_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (problem,) = pf.check_run_dir(locked / "run")
    finally:
        locked.chmod(0o700)
    assert problem.where == "--run-dir" and f"cannot write in {locked}" in problem.message


# ---- model sources and the hub cache ----------------------------------------------------------------------


def fake_hub_cache(cache: Path, repo: str, files: list[str]) -> None:
    """The layout huggingface_hub writes: models--org--name/refs/main -> a commit, snapshots/<commit>/files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}")


def test_offline_hub_ids_must_be_in_the_cache(tmp_path: Path, data: TrainData) -> None:
    cfg = good_config(data)
    cfg["model"].update(
        vision=HUB_ID, vision_config=None, language="Qwen/Qwen2.5-0.5B", language_config=None, tokenizer=None
    )
    sources = pf.model_sources(stage(cfg))
    assert [(m.where, m.source) for m in sources] == [
        ("stage0 model.vision", HUB_ID),
        ("stage0 model.language", "Qwen/Qwen2.5-0.5B"),  # the tokenizer's files are asked of it too
    ]
    problems, hub = pf.check_model_sources(sources)
    assert problems == [] and hub == sources
    cache = tmp_path / "hub"
    fake_hub_cache(cache, HUB_ID, ["config.json", "model.safetensors"])
    fake_hub_cache(cache, "Qwen/Qwen2.5-0.5B", ["config.json", "model.safetensors"])  # no tokenizer files
    (problem,) = pf.check_hub_cache(hub, cache_dir=cache)
    assert problem.line().startswith(
        "stage0 model.language: Qwen/Qwen2.5-0.5B is not in the local Hugging Face cache "
        "(no tokenizer_config.json/tokenizer.json) and the run is offline"
    )
    assert [p.where for p in pf.check_hub_cache(hub, cache_dir=tmp_path / "empty")] == [m.where for m in hub]


def test_local_model_directories_and_impossible_names(tmp_path: Path) -> None:
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text("{}")
    items = [
        pf.ModelSource("s model.language", str(tmp_path / "lm"), pf.MODEL_FILES),
        pf.ModelSource("s model.vision", str(tmp_path / "no" / "such" / "dir"), pf.MODEL_FILES),
    ]
    problems, hub = pf.check_model_sources(items)
    assert hub == []
    assert [p.line() for p in problems] == [
        f"s model.language: {tmp_path / 'lm'} lacks model.safetensors/model.safetensors.index.json/"
        "pytorch_model.bin; point it at a saved checkpoint",
        f"s model.vision: '{tmp_path / 'no' / 'such' / 'dir'}' is neither an existing directory nor a hub id "
        "(org/name); fix the path",
    ]


def test_offline_is_the_switch_or_an_unreachable_hub() -> None:
    def unreachable() -> str:
        return "no answer within 3 s (timed out)"

    def reachable() -> None:
        return None

    assert pf.offline_reason({"HF_HUB_OFFLINE": "1"}, reachable) == "HF_HUB_OFFLINE=1"
    assert pf.offline_reason({"TRANSFORMERS_OFFLINE": "true"}, reachable) == "TRANSFORMERS_OFFLINE=true"
    assert pf.offline_reason({"HF_HUB_OFFLINE": "0"}, reachable) is None
    assert (
        pf.offline_reason({}, unreachable)
        == "the Hugging Face hub does not answer (no answer within 3 s (timed out))"
    )


def test_every_problem_is_listed_not_just_the_first(tmp_path: Path, data: TrainData) -> None:
    cfg = good_config(data, train__ds_config="no_such_preset", init_from="stage_x")
    cfg["data"]["train"] = str(tmp_path / "missing.json")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(pf.PreflightError) as err:
        pf.require_preflight([stage(cfg)], tmp_path / "afile" / "run", world_size=1)
    assert [p.where for p in err.value.problems] == [
        "stage0 data.train",
        "stage0 train.ds_config",
        "stage0 init_from",
        "--run-dir",
    ]
    text = str(err.value).splitlines()
    assert text[0] == "4 problems found before loading anything:" and len(text) == 5


# ---- through the command ---------------------------------------------------------------------------------
# In-process (typer's CliRunner) with the loaders patched to fail the test, the process group left out and
# fail_fast's os._exit turned into SystemExit; the offline-hub case and the good config run the real command
# in a subprocess (HF_HOME is read when huggingface_hub is imported; the good run ends at its first load).


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    """`vlmtrain train ARGS` in this process: (exit code, stderr). Any load fails the test."""
    import torch
    from typer.testing import CliRunner

    from vlmtrain import dist
    from vlmtrain.cli import app
    from vlmtrain.models.vlm import VisionLanguageModel
    from vlmtrain.train import failfast, run

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a model or tokenizer load before the preflight failed: {args[:1]}")

    monkeypatch.setattr(VisionLanguageModel, "from_pretrained", classmethod(lambda cls, *a, **k: refuse(*a)))
    monkeypatch.setattr(VisionLanguageModel, "from_config", classmethod(lambda cls, *a, **k: refuse(*a)))
    monkeypatch.setattr(run.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(run, "load_model_and_tokenizer", refuse)
    world = dist.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(dist, "init_distributed", lambda *a, **k: world)

    def exit_(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(failfast, "_hard_exit", exit_)

    def invoke(tmp: Path, cfg: dict[str, Any], run_dir: Path, *extra: str) -> tuple[int, str]:
        config = tmp / "stage.json"
        config.write_text(json.dumps(cfg))
        args = ["train", "--config", str(config), "--run-dir", str(run_dir), *extra]
        result = CliRunner().invoke(app, args)
        return result.exit_code, result.stderr

    return invoke


def failures(data: TrainData, tmp: Path) -> dict[str, tuple[dict[str, Any], Path, str]]:
    """name -> (config, run dir, the start of the one problem line expected)."""
    (tmp / "afile").write_text("x")
    missing = good_config(data)
    missing["data"]["train"] = str(tmp / "no_shards" / "manifest.json")
    return {
        "missing manifest": (
            missing,
            tmp / "run",
            f"stage0 data.train: manifest {tmp / 'no_shards' / 'manifest.json'} does not exist",
        ),
        "bad init_from": (
            good_config(data, init_from="stage_x"),
            tmp / "run",
            "stage0 init_from: init_from='stage_x' found no model at",
        ),
        "missing ds_config": (
            good_config(data, train__ds_config="no_such_preset"),
            tmp / "run",
            "stage0 train.ds_config: DeepSpeed config 'no_such_preset' not found",
        ),
        "unwritable run dir": (
            good_config(data),
            tmp / "afile" / "run",
            f"--run-dir: {tmp / 'afile'} is a file",
        ),
    }


def assert_one_line(code: int, stderr: str, expected: str, run_dir: Path) -> None:
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.splitlines() == [stderr.splitlines()[0]], f"one line, got:\n{stderr}"
    assert stderr.startswith(f"config error: {expected}"), stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "name", ["missing manifest", "bad init_from", "missing ds_config", "unwritable run dir"]
)
def test_train_command_exits_2_with_one_line_before_any_load(
    tmp_path: Path, data: TrainData, cli, name: str
) -> None:
    cfg, run_dir, expected = failures(data, tmp_path)[name]
    code, stderr = cli(tmp_path, cfg, run_dir)
    assert_one_line(code, stderr, expected, run_dir)


def test_debug_shows_the_tracebacks(tmp_path: Path, data: TrainData, cli) -> None:
    code, stderr = cli(
        tmp_path, good_config(data, train__ds_config="no_such_preset"), tmp_path / "run", "--debug"
    )
    assert code == 2
    assert "Traceback" in stderr and "PreflightError" in stderr
    assert "FileNotFoundError: DeepSpeed config 'no_such_preset' not found" in stderr  # the check's own


def run_command(
    tmp_path: Path, cfg: dict[str, Any], run_dir: Path, **env: str
) -> subprocess.CompletedProcess:
    config = tmp_path / "stage.json"
    config.write_text(json.dumps(cfg))
    return subprocess.run(
        [PYTHON, str(ENTRY), "--config", str(config), "--run-dir", str(run_dir)],
        env={**train_env(), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_offline_uncached_hub_id_exits_2_before_any_load(tmp_path: Path, data: TrainData) -> None:
    """The real command, offline, with HF_HOME an empty folder: the hub-id tower is named, nothing loads."""
    cfg = good_config(data)
    cfg["model"].update(vision=HUB_ID, vision_config=None)
    (tmp_path / "empty_hf_home").mkdir()
    proc = run_command(
        tmp_path, cfg, tmp_path / "run", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty_hf_home")
    )
    out = proc.stdout + proc.stderr
    assert MARKER not in out, "a model, tokenizer or weights file was loaded before the preflight failed"
    expected = f"stage0 model.vision: {HUB_ID} is not in the local Hugging Face cache"
    assert_one_line(proc.returncode, proc.stderr, expected, tmp_path / "run")
    assert "Traceback" not in out and list((tmp_path / "empty_hf_home").iterdir()) == []


@pytest.mark.slow
def test_train_command_with_a_good_config_gets_to_the_first_load(tmp_path: Path, data: TrainData) -> None:
    proc = run_command(tmp_path, good_config(data), tmp_path / "run")
    assert proc.returncode == LOAD_EXIT_CODE, (proc.stdout + proc.stderr)[-3000:]
    assert f"{MARKER}: load_model_and_tokenizer" in proc.stderr and "config error" not in proc.stderr


# ---- /dev/shm of the DataLoader workers --------------------------------------------------------------------


def test_shm_need_is_the_collated_item_at_its_largest(data: TrainData) -> None:
    """An item's bytes are what the collator builds from full-length samples that all have an image."""
    import torch

    from vlmtrain.data.collate import MODEL_KEYS, pad_collate
    from vlmtrain.data.process import ProcessedSample

    cfg = stage(good_config(data))  # micro-batch 2, max_length 256 (a multiple of the flex tile), 32 px
    size, n = 32, cfg.data.max_length
    need = pf.shm_need(cfg, world_size=1, ranks=3, image_size=size)
    gen = torch.Generator().manual_seed(0)
    samples = [
        ProcessedSample(
            input_ids=torch.randint(0, 100, (n,), generator=gen),
            labels=torch.randint(0, 100, (n,), generator=gen),
            image_flags=torch.arange(n) < 16,
            pixel_values=torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen),
            key=str(i),
            shard="s",
            index=i,
        )
        for i in range(cfg.batch.micro_batch_size)
    ]
    batch = pad_collate(samples, pad_token_id=0, image_size=size)
    assert batch["pixel_values"].dtype == torch.uint8
    assert need.item_bytes == sum(batch[k].nbytes for k in MODEL_KEYS)
    assert need.total == 3 * cfg.data.num_workers * 2 * need.item_bytes  # ranks x workers x prefetch x item


def test_too_little_shm_is_an_error_naming_the_fix(
    tmp_path: Path, data: TrainData, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = stage(good_config(data, data__num_workers=4))
    need = pf.shm_need(cfg, world_size=1, ranks=1, image_size=32).total
    assert pf.check_shm(cfg, [cfg], 1, 1, need) == ([], None)
    problems, _ = pf.check_shm(cfg, [cfg], 1, 1, need - 1)
    assert [p.where for p in problems] == ["stage0 data.num_workers"]
    message = problems[0].message
    assert "--shm-size=1g" in message and "set data.num_workers to 3 or fewer" in message
    # preflight runs the check with the node's ranks from the launcher and /dev/shm's free bytes
    monkeypatch.setattr(pf, "shm_free_bytes", lambda: 2 * need - 1)
    env = {"HF_HUB_OFFLINE": "1", "LOCAL_WORLD_SIZE": "2"}
    report = pf.preflight([cfg], tmp_path / "run", world_size=1, env=env)
    assert [p.where for p in report.problems] == ["stage0 data.num_workers"]
    assert "(2 rank(s) x 4 workers x 2 prefetched" in report.problems[0].message
    # no workers: batches are made in the training process, nothing goes through /dev/shm
    idle = stage(good_config(data, data__num_workers=0))
    assert pf.check_shm(idle, [idle], 1, 1, 0) == ([], None)
    # micro_batch_size auto is chosen when the stage starts: its largest need is a warning, not an error
    batch = {"global_batch_size": 8, "micro_batch_size": "auto"}
    auto = stage(good_config(data, data__num_workers=4, batch=batch))
    problems, note = pf.check_shm(auto, [auto], 1, 1, 0)
    assert problems == [] and note is not None and "warning: stage0 data.num_workers" in note
