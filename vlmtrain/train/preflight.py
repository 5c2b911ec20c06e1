"""Check everything a training command needs before it loads a model, a tokenizer or a shard.

`run_stages` calls `require_preflight` first. Each check below returns the problems it finds (one line each,
naming the config key or file and the fix) instead of raising at the first one, so a user fixes every
problem in one go; `PreflightError` (a ConfigError) then ends the command with exit 2 and no traceback
(vlmtrain.train.failfast; `vlmtrain train --debug` shows the tracebacks). Errors a check does not expect
are not caught: they keep their traceback.

What is checked, per stage unless said otherwise:
- the batch splits over the world size; stage names are unique in the command;
- `data.train` and `validation.data`: a local manifest or brace pattern names shards that exist (and, with
  no `train.max_steps`, sample counts for at least one step); a manifest's shard names are plain file names
  (vlmtrain.data.sources.check_shard_name; local and http(s) manifests here, a `pipe:` manifest's when it is
  loaded, before any shard command runs); `http(s)://` URLs (a few per source: first, middle and last shard)
  answer a HEAD request, or a one-byte range GET where HEAD is refused, within URL_TIMEOUT_S; `pipe:`
  commands are not run (a note says so);
- `init_from`: an earlier stage of this command, or a directory holding the model, config and tokenizer
  files, whose `model` block agrees with the stage's (vlmtrain.train.init_check);
- with `--resume auto`, a stage whose output is complete (and would be skipped) was trained with the config
  it has now (`final/stage_config.json`; the changed keys are named);
- `train.ds_config` (DeepSpeed stages): the named preset or file exists, parses, and is supported;
- the run directory can be written: a probe file is created and removed in it, or in its nearest existing
  parent (nothing is left behind, and no folder is created);
- `model.vision` / `language` / `tokenizer` of stages built from `model`: an existing directory with the
  files `from_pretrained` reads (a tower's config.json naming a supported vision family), or a valid hub id;
  when offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set, or the hub endpoint does not answer), that the hub
  id is in the local Hugging Face cache;
- `train.wandb` / `train.tensorboard`: the optional package is installed;
- `/dev/shm` has room for the batches the DataLoader workers of the node's ranks prepare ahead
  (`shm_need`: ranks per node x data.num_workers x PREFETCH_FACTOR x one item's pixels and token tensors);
  too little is an error naming docker's `--shm-size` and `data.num_workers` (the workers would die with a
  bus error or "No space left on device" mid-run).

Cost: file stats (one per local shard), one statvfs of /dev/shm, a few HTTP requests per remote source (for an http(s) manifest, one
GET of the manifest itself, a few kilobytes, which loading fetches again) and one to the hub endpoint
when hub ids are named and HF_HUB_OFFLINE is unset; every rank runs the checks (ranks may not share a file
system), in well under a second for local data.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand

from vlmtrain.config.load import ConfigError
from vlmtrain.config.schema import ModelConfig, StageConfig, ValidationError
from vlmtrain.data.sources import load_source, names_manifest
from vlmtrain.logging import wandb_missing_message
from vlmtrain.train.batching import resolve_micro_batch
from vlmtrain.train.steps import total_steps_for

URL_TIMEOUT_S = 5.0
HUB_PROBE_TIMEOUT_S = 3.0
URLS_PER_SOURCE = 3  # first, middle and last shard of a remote source; all of them would cost N requests
REMOTE = ("http://", "https://")
PIPE = "pipe:"
TRUE_VALUES = {"1", "on", "yes", "true"}  # huggingface_hub's reading of HF_HUB_OFFLINE
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HF_TOKENIZER = ("tokenizer_config.json", "tokenizer.json")
TOKENIZER_FIX = "save the tokenizer there (tokenizer.save_pretrained)"


@dataclass(frozen=True)
class Problem:
    """One thing that would stop the run, with the key or file it is about and the fix."""

    where: str
    """The stage and config key (`stage0 data.train`), or the option (`--run-dir`)."""
    message: str
    """What is wrong and how to fix it."""
    cause: BaseException | None = None
    """The exception the check caught, shown with `--debug`."""

    def line(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Report:
    """What preflight found: problems stop the run, notes are printed."""

    problems: tuple[Problem, ...]
    notes: tuple[str, ...]


class PreflightError(ConfigError):
    """Problems found before loading anything: one line each."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        lines = [p.line() for p in problems]
        head = [] if len(lines) == 1 else [f"{len(lines)} problems found before loading anything:"]
        super().__init__("\n".join(head + lines))
        self.problems = tuple(problems)
        self.causes = tuple(p.cause for p in problems if p.cause is not None)


def require_preflight(
    stages: Sequence[StageConfig], run_dir: Path, world_size: int, resume: bool = False
) -> Report:
    """Run every check; raise PreflightError listing all problems, else return the notes to print."""
    report = preflight(stages, run_dir, world_size, resume)
    if report.problems:
        raise PreflightError(report.problems)
    return report


def preflight(
    stages: Sequence[StageConfig],
    run_dir: Path,
    world_size: int,
    resume: bool = False,
    env: Mapping[str, str] | None = None,
) -> Report:
    """Every check over every stage of the command, without loading a model, tokenizer or shard."""
    env = os.environ if env is None else env
    problems: list[Problem] = [*check_stage_names(stages)]
    notes: list[str] = []
    remote: list[tuple[str, str]] = []  # (where, url) to ask, all at once
    for stage in stages:
        problems += check_batch(stage, world_size)
        for key, source in (("data.train", stage.data.train), ("validation.data", stage.validation.data)):
            if source is None:
                continue
            where = f"{stage.name} {key}"
            found, urls, note = check_data_source(where, source)
            problems += found
            remote += [(where, u) for u in urls]
            notes += [note] if note else []
        if not problems_for(problems, stage.name, "data.train"):
            problems += check_step_count(stage)
        if not any(p.where.startswith(f"{stage.name} batch.") for p in problems):
            problems += check_ds_config(resolve_micro_batch(stage, world_size, None), world_size)
        problems += check_loggers(stage)
        if not any(p.where.startswith(f"{stage.name} batch.") for p in problems):
            found, note = check_shm(stage, stages, world_size, node_ranks(env, world_size), shm_free_bytes())
            problems += found
            notes += [note] if note else []
    problems += check_urls(remote)
    problems += check_init_from(stages, run_dir, resume)
    problems += check_completed_stages(stages, run_dir, resume)
    problems += check_run_dir(run_dir)
    found, hub_ids = check_model_sources([m for s in stages for m in model_sources(s)])
    problems += found
    if hub_ids:
        offline = offline_reason(env)
        if offline is not None:
            notes.append(f"preflight: {offline}: checking {len(hub_ids)} hub id(s) against the local cache")
            problems += check_hub_cache(hub_ids)
    return Report(tuple(problems), tuple(notes))


def problems_for(problems: Sequence[Problem], stage: str, key: str) -> bool:
    return any(p.where == f"{stage} {key}" for p in problems)


# ---- stage configs --------------------------------------------------------------------------------------


def check_stage_names(stages: Sequence[StageConfig]) -> list[Problem]:
    """Each stage writes RUN_DIR/<name>/: two stages of one command with one name would share it."""
    seen: set[str] = set()
    out = []
    for s in stages:
        if s.name in seen:
            out.append(Problem(f"{s.name} name", "two stages of this command share the name; rename one"))
        seen.add(s.name)
    return out


def check_batch(stage: StageConfig, world_size: int) -> list[Problem]:
    try:
        resolve_micro_batch(stage, world_size, None)  # `auto`'s memory fit is chosen when the stage starts
    except ValidationError as err:
        return [
            Problem(
                f"{stage.name} {err.path}", f"{str(err).removeprefix(err.path + ': ')} ({world_size} ranks)"
            )
        ]
    return []


def check_loggers(stage: StageConfig) -> list[Problem]:
    out = []
    if stage.train.wandb is not None:
        missing = wandb_missing_message()
        if missing is not None:
            out.append(Problem(f"{stage.name} train.wandb", missing.split(" is set but ", 1)[1]))
    if stage.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        out.append(
            Problem(
                f"{stage.name} train.tensorboard",
                "the tensorboard package is not installed: pip install 'vlmtrain[tensorboard]' "
                "(or set train.tensorboard to false)",
            )
        )
    return out


# ---- shared memory of the DataLoader workers ------------------------------------------------------------

SHM_PATH = Path("/dev/shm")
TOKEN_BYTES_PER_POSITION = 4 * 8 + 1
"""A collated row position: input_ids, labels, sample_ids and position_ids (int64) and image_flags (bool)."""
PIXEL_BYTES = 1
"""Bytes per pixel channel the workers hand out: uint8 (vlmtrain.data.image_transform.ImageTransform.pixels)."""


@dataclass(frozen=True)
class ShmNeed:
    """What one node's DataLoader workers hold in /dev/shm at most for a stage: every worker of every rank with
    PREFETCH_FACTOR items ready."""

    ranks: int  # ranks on the node (each has its own workers)
    workers: int  # data.num_workers per rank
    prefetch: int
    samples: int  # per item: a micro-batch, or with a token budget the rank's share of the step
    image_size: int
    row: int  # the widest row a sample takes (pack_length or max_length, rounded up to the flex tile)

    @property
    def item_bytes(self) -> int:
        """One item at its largest: every sample with an image and a full row."""
        return self.samples * (3 * self.image_size**2 * PIXEL_BYTES + self.row * TOKEN_BYTES_PER_POSITION)

    @property
    def total(self) -> int:
        return self.ranks * self.workers * self.prefetch * self.item_bytes


def shm_need(stage: StageConfig, world_size: int, ranks: int, image_size: int) -> ShmNeed:
    """The /dev/shm the stage's training loader needs on one node of `ranks` ranks (an upper bound: all
    samples with images, rows at their widest; `micro_batch_size: auto` at its largest, the rank's share)."""
    from vlmtrain.data.stream import PREFETCH_FACTOR
    from vlmtrain.models.masks import FLEX_BLOCK_SIZE
    from vlmtrain.train.batching import per_rank_samples

    if stage.data.token_budget is not None:
        samples = per_rank_samples(stage, world_size)
    else:
        samples = int(resolve_micro_batch(stage, world_size, None).batch.micro_batch_size)
    row = stage.data.pack_length or stage.data.max_length
    row = -(-row // FLEX_BLOCK_SIZE) * FLEX_BLOCK_SIZE
    return ShmNeed(ranks, stage.data.num_workers, PREFETCH_FACTOR, samples, image_size, row)


def node_ranks(env: Mapping[str, str], world_size: int) -> int:
    """Ranks sharing this node's /dev/shm: the launcher's count (LOCAL_WORLD_SIZE, SLURM_NTASKS_PER_NODE), else
    the whole world up to one node's GPUs."""
    from vlmtrain.train.engines.fsdp import ranks_per_node
    from vlmtrain.train.plan import GPUS_PER_NODE

    try:
        return ranks_per_node(None, env)
    except ValueError:
        return min(world_size, GPUS_PER_NODE)


def shm_free_bytes(path: Path = SHM_PATH) -> int | None:
    """Bytes free in /dev/shm, or None where there is none (not Linux)."""
    if not path.is_dir():
        return None
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_shm(
    stage: StageConfig,
    stages: Sequence[StageConfig],
    world_size: int,
    ranks: int,
    free: int | None,
) -> tuple[list[Problem], str | None]:
    """(a problem when the workers' prefetched batches would not fit /dev/shm, a note when it is not checked)."""
    if stage.data.num_workers == 0:
        return [], None  # batches are made in the training process: no shared memory
    if free is None:
        return [], None  # no /dev/shm (not Linux): PyTorch shares tensors another way
    from vlmtrain.train.plan import resolve_model, vision_spec

    try:
        image_size = vision_spec(resolve_model(stage, {s.name: s for s in stages})).transform.image_size
    except (ValueError, OSError) as err:
        return [], f"preflight: {stage.name}: /dev/shm not checked: the image size is not known here ({err})"
    need = shm_need(stage, world_size, ranks, image_size)
    if need.total <= free:
        return [], None
    fits = free // (ranks * need.prefetch * need.item_bytes)
    fewer = f"{fits} or fewer" if fits else "0 (batches made in the training process, slower)"
    message = (
        f"the DataLoader workers need up to {need.total / 2**20:,.0f} MiB of /dev/shm ({ranks} rank(s) x "
        f"{need.workers} workers x {need.prefetch} prefetched x {need.item_bytes / 2**20:.1f} MiB per item of "
        f"{need.samples} samples at {image_size} px) but {free / 2**20:,.0f} MiB is free; in docker run with "
        f"--shm-size={math.ceil(need.total * 1.25 / 2**30)}g (or --ipc=host), or set data.num_workers to {fewer}"
    )
    if stage.data.token_budget is None and stage.batch.micro_batch_size == "auto":
        # `auto` is chosen when the stage starts, from the device's memory: the need above is its largest
        return (
            [],
            f"preflight: warning: {stage.name} data.num_workers: with micro_batch_size auto at its largest, {message}",
        )
    return [Problem(f"{stage.name} data.num_workers", message)], None


# ---- data -----------------------------------------------------------------------------------------------


def is_http(location: str) -> bool:
    """An http(s) URL: the sources preflight can ask without reading them (pipe: commands are not run)."""
    return location.startswith(REMOTE)


def check_data_source(where: str, source: str) -> tuple[list[Problem], list[str], str | None]:
    """(problems, remote URLs to ask, a note) for one manifest or brace pattern."""
    if source.startswith(PIPE):
        return [], [], f"preflight: {where}: {source!r} is a command, not checked before it runs"
    if is_http(source):
        return (
            check_http_manifest(where, source)
            if names_manifest(source)
            else ([], sample(list(braceexpand.braceexpand(source))), None)
        )
    if not source:
        return [Problem(where, "is empty; set it to a manifest.json or a brace pattern of shards")], [], None
    try:
        shards = load_source(source)
    except (FileNotFoundError, ValueError) as err:
        return [Problem(where, str(err), err)], [], None
    locations = [str(s.path) for s in shards]
    return [], sample([loc for loc in locations if is_http(loc)]), None


def check_http_manifest(where: str, source: str) -> tuple[list[Problem], list[str], None]:
    """A manifest URL: its shard names are checked (one GET of the manifest, within URL_TIMEOUT_S), and a few
    of its shard URLs are asked. When the manifest does not answer, the URL check names it."""
    from vlmtrain.data.sources import manifest_shards

    try:
        with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as answer:
            data = answer.read()
    except (urllib.error.URLError, TimeoutError, OSError):
        return [], [source], None
    try:
        shards = manifest_shards(source, data)
    except ValueError as err:
        return [Problem(where, str(err), err)], [], None
    return [], sample([str(s.path) for s in shards]), None


def sample(urls: list[str]) -> list[str]:
    """First, middle and last (without repeats): a missing prefix or bucket shows in any of them."""
    if len(urls) <= URLS_PER_SOURCE:
        return urls
    return list(dict.fromkeys([urls[0], urls[len(urls) // 2], urls[-1]]))


def check_step_count(stage: StageConfig) -> list[Problem]:
    """Without train.max_steps the step count comes from the manifest's sample counts (local data only)."""
    if stage.train.max_steps is not None or is_http(stage.data.train) or stage.data.train.startswith(PIPE):
        return []
    try:
        total_steps_for(stage)
    except ValueError as err:
        return [Problem(f"{stage.name} train.max_steps", str(err).removeprefix(f"stage {stage.name}: "), err)]
    return []


def url_problem(url: str, timeout: float = URL_TIMEOUT_S) -> str | None:
    """None when `url` answers; else why not. HEAD first; a server refusing HEAD gets a one-byte GET."""
    for method, headers in (("HEAD", {}), ("GET", {"Range": "bytes=0-0"})):
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return None
        except urllib.error.HTTPError as err:
            if method == "HEAD" and err.code in (403, 405, 501):  # e.g. a URL signed for GET only
                continue
            return f"HTTP {err.code} {err.reason}"
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            return f"no answer within {timeout:g} s ({reason})"
    return None


def check_urls(items: Sequence[tuple[str, str]], timeout: float = URL_TIMEOUT_S) -> list[Problem]:
    """Ask every URL at once (threads), so the checks take one timeout at most, not one per URL."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(items))) as pool:
        answers = list(pool.map(lambda item: url_problem(item[1], timeout), items))
    return [
        Problem(where, f"{url}: {answer}; check the URL, the bucket's permissions and the network")
        for (where, url), answer in zip(items, answers, strict=True)
        if answer is not None
    ]


# ---- init_from and DeepSpeed ----------------------------------------------------------------------------


def check_init_from(stages: Sequence[StageConfig], run_dir: Path, resume: bool) -> list[Problem]:
    """Every init_from names an earlier stage of this command or a model directory, and agrees with it.

    Stages skipped by `--resume auto` (their output is complete) are read from disk like any directory.
    """
    from vlmtrain.models.lora import RECORD_NAME as LORA_RECORD
    from vlmtrain.models.vlm import CONFIG_NAME, WEIGHTS_NAME
    from vlmtrain.train.init_check import resolve_init, resolve_model
    from vlmtrain.train.trainer import is_stage_complete

    planned: dict[str, ModelConfig] = {}
    failed: set[str] = set()  # a stage after one of these has its cause listed already
    out: list[Problem] = []
    for stage in stages:
        if resume and is_stage_complete(run_dir / stage.name):
            continue
        where = f"{stage.name} init_from"
        if stage.init_from in failed:
            failed.add(stage.name)
            continue
        failed.add(stage.name)  # until it resolves
        try:
            if stage.init_from is not None and stage.init_from not in planned:
                directory = resolve_init(stage, run_dir)
                assert directory is not None  # init_from is set
                missing = missing_files(
                    directory, ((CONFIG_NAME,), (WEIGHTS_NAME, LORA_RECORD), HF_TOKENIZER)
                )
                if missing:
                    out.append(Problem(where, f"{directory} lacks {missing}; {TOKENIZER_FIX} or re-save it"))
                    continue
            planned[stage.name] = resolve_model(stage, run_dir, planned).model
            failed.discard(stage.name)
        except FileNotFoundError as err:
            out.append(Problem(where, str(err).removeprefix(f"stage {stage.name}: "), err))
        except ConfigError as err:  # InitFromMismatch: the model block disagrees with the checkpoint
            out.append(Problem(where, one_line(str(err).removeprefix(f"stage {stage.name}: ")), err))
    return out


def completed_stage_changes(stage_dir: Path, stage: StageConfig) -> list[str]:
    """How `stage` differs from the config a completed stage in `stage_dir` was trained with (empty: same)."""
    from vlmtrain.config.load import STAGE_CONFIG_NAME, config_changes, stage_config_to_dict
    from vlmtrain.train.trainer import FINAL

    saved = json.loads((stage_dir / FINAL / STAGE_CONFIG_NAME).read_text())
    current = stage_config_to_dict(stage)
    if current["batch"]["micro_batch_size"] == "auto":  # the saved number is what `auto` chose then
        current["batch"]["micro_batch_size"] = saved.get("batch", {}).get("micro_batch_size")
    return config_changes(saved, known_keys(current, saved))


def known_keys(current: Any, saved: Any) -> Any:
    """`current` without the keys `saved` lacks, at every depth: settings added to vlmtrain after a stage was
    trained (e.g. train.checkpoint_format) are not changes to that stage, so its --resume still skips it."""
    if not (isinstance(current, dict) and isinstance(saved, dict)):
        return current
    return {k: known_keys(v, saved[k]) for k, v in current.items() if k in saved}


def check_completed_stages(stages: Sequence[StageConfig], run_dir: Path, resume: bool) -> list[Problem]:
    """A stage `--resume auto` would skip as complete was trained with the config it has now.

    Otherwise a changed step count or LR would be skipped silently, and every later stage would build on the
    old output."""
    from vlmtrain.train.trainer import FINAL, is_stage_complete

    out: list[Problem] = []
    for stage in stages:
        stage_dir = run_dir / stage.name
        if not (resume and is_stage_complete(stage_dir)):
            continue
        changes = completed_stage_changes(stage_dir, stage)
        if changes:
            more = "; ..." if len(changes) > 5 else ""
            out.append(
                Problem(
                    f"{stage.name} (--resume)",
                    f"{stage_dir / FINAL} was trained with another config ({'; '.join(changes[:5])}{more}); "
                    f"resume it with the config it was trained with, or train into a new run dir "
                    f"(or delete {stage_dir})",
                )
            )
    return out


def one_line(message: str) -> str:
    """A multi-line message (a header, then one line per item) as one line: `header item; item; ...`."""
    head, *items = message.splitlines()
    return " ".join([head, "; ".join(i.strip() for i in items)]) if items else head


def missing_files(directory: Path, alternatives: Sequence[Sequence[str]]) -> str:
    """Each group of alternative file names (`a/b`) none of which is in `directory`, comma-separated."""
    gone = ["/".join(names) for names in alternatives if not any((directory / n).is_file() for n in names)]
    return ", ".join(gone)


def check_ds_config(stage: StageConfig, world_size: int) -> list[Problem]:
    if stage.train.engine != "deepspeed":
        return []
    from vlmtrain.train.engines.deepspeed import ds_config_path, resolve_ds_config

    where = f"{stage.name} train.ds_config"
    try:
        path = ds_config_path(stage.train.ds_config)
    except FileNotFoundError as err:
        return [Problem(where, str(err), err)]
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return [
            Problem(where, f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}")
        ]
    try:
        resolve_ds_config(stage, world_size)
    except (ConfigError, ValueError) as err:
        return [Problem(where, str(err), err)]
    return []


# ---- run directory --------------------------------------------------------------------------------------


def check_run_dir(run_dir: Path) -> list[Problem]:
    """The run directory, or the parent it would be created in, takes a new file (created, then removed)."""
    existing = run_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [Problem("--run-dir", f"{existing} is a file, so {run_dir} cannot be created; choose another")]
    probe = existing / f".vlmtrain-preflight-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        target = "" if existing == run_dir.absolute() else f" (where {run_dir} would be created)"
        return [
            Problem(
                "--run-dir",
                f"cannot write in {existing}{target}: {err.strerror or err}; choose a writable --run-dir "
                "or fix its permissions",
                err,
            )
        ]
    return []


# ---- model sources and the hub cache --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint a stage built from `model` loads, and the files `from_pretrained` needs from it."""

    where: str
    """`<stage> model.<key>`."""
    source: str
    """Directory or hub id."""
    files: tuple[tuple[str, ...], ...]
    """Groups of alternative file names; each group needs one present."""


MODEL_FILES = (("config.json",), HF_WEIGHTS)


def model_sources(stage: StageConfig) -> list[ModelSource]:
    """Towers and tokenizer of a stage built from `model` (a stage with init_from loads its checkpoint).

    The tokenizer defaults to the language model's checkpoint: then its files are asked of that entry.
    """
    if stage.init_from is not None:
        return []
    m, where = stage.model, f"{stage.name} model"
    out = []
    if m.vision is not None:
        out.append(ModelSource(f"{where}.vision", m.vision, MODEL_FILES))
    tokenizer = m.tokenizer if m.tokenizer != m.language else None  # None: the language checkpoint's
    if m.language is not None:
        files = MODEL_FILES if tokenizer is not None else (*MODEL_FILES, HF_TOKENIZER)
        out.append(ModelSource(f"{where}.language", m.language, files))
    if tokenizer is not None:
        out.append(ModelSource(f"{where}.tokenizer", tokenizer, (HF_TOKENIZER,)))
    return out


def check_model_sources(items: Sequence[ModelSource]) -> tuple[list[Problem], list[ModelSource]]:
    """(problems of local directories and impossible names, the sources left to the hub)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problems, hub = [], []
    for item in items:
        if Path(item.source).exists():
            missing = missing_files(Path(item.source), item.files)
            if missing:
                problems.append(
                    Problem(item.where, f"{item.source} lacks {missing}; point it at a saved checkpoint")
                )
            elif item.where.endswith(".vision"):
                problems += tower_family_problems(item)
            continue
        try:
            validate_repo_id(item.source)
        except HFValidationError:
            problems.append(
                Problem(
                    item.where,
                    f"{item.source!r} is neither an existing directory nor a hub id (org/name); fix the path",
                )
            )
            continue
        hub.append(item)
    return problems, hub


def tower_family_problems(item: ModelSource) -> list[Problem]:
    """A local tower directory whose config.json `model_type` no vision family reads (one JSON read)."""
    from vlmtrain.models.backbones.vision import family_for_model_type

    try:
        model_type = json.loads((Path(item.source) / "config.json").read_text()).get("model_type")
        family_for_model_type(str(model_type), f"{item.source} (config.json)")
    except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
        return [Problem(item.where, str(err))]
    return []


def offline_reason(env: Mapping[str, str], probe: Callable[[], str | None] | None = None) -> str | None:
    """Why downloads cannot happen (an offline switch, or the hub not answering), or None when they can."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if env.get(name, "").strip().lower() in TRUE_VALUES:
            return f"{name}={env[name]}"
    problem = (probe or hub_probe)()
    return None if problem is None else f"the Hugging Face hub does not answer ({problem})"


def hub_probe() -> str | None:
    from huggingface_hub import constants

    answer = url_problem(constants.ENDPOINT, HUB_PROBE_TIMEOUT_S)
    return None if answer is None or answer.startswith("HTTP ") else answer  # any HTTP answer: reachable


def check_hub_cache(items: Sequence[ModelSource], cache_dir: Path | None = None) -> list[Problem]:
    """Hub ids whose config, weights or tokenizer files are not in the local cache (HF_HOME / HF_HUB_CACHE)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(repo: str, names: Sequence[str]) -> bool:
        return any(isinstance(try_to_load_from_cache(repo, n, cache_dir=cache_dir), str) for n in names)

    out = []
    for item in items:
        missing = ["/".join(names) for names in item.files if not cached(item.source, names)]
        if missing:
            out.append(
                Problem(
                    item.where,
                    f"{item.source} is not in the local Hugging Face cache (no {', '.join(missing)}) and the "
                    f"run is offline; download it first (hf download {item.source}, with the same HF_HOME) "
                    f"or point {item.where.split(' ', 1)[1]} at a local directory",
                )
            )
    return out
