"""``vlmtrain shard``: turn an annotation file and its images into WebDataset tar shards plus a manifest.

Records are written in a seeded random order by default: position ``p`` of a SplitMix64 permutation of ALL
input records (seeded by ``--seed``) goes to shard ``p // shard_size``, so every shard is a random draw of
the whole corpus even when the input is ordered by source. ``--keep-order`` keeps input order (shard ``i``
then holds input records ``[i * shard_size, (i + 1) * shard_size)``). Either way skipped records leave gaps
instead of moving later records, so which shard a record lands in never depends on skips or on worker
timing; sample keys stay the records' input indices. Tars are written with webdataset's ``TarWriter``,
one member per ``write`` (so each sample's ``.json`` precedes its image) with fixed headers (mtime 0,
uid/gid 0, no owner names, mode 0444), so the same input and options always give byte-identical shards.
Each finished shard gets a sidecar ``{prefix}-{i:06d}.done.json``; a re-run keeps shards whose sidecar,
size and sha256 still match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from webdataset import TarWriter

from vlmtrain import __version__
from vlmtrain.data.formats import FormatSpec, Invalid, Item, ReadOptions, ReadStats, Record, get_format
from vlmtrain.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DROP_REASONS,
    SKIP_REASONS,
    SampleError,
    load_image_bytes,
    pil_limits,
    resolve_image_path,
    set_pil_limits,
    validate_and_maybe_resize,
)
from vlmtrain.data.order import permutation
from vlmtrain.data.prompt import CAPTION_PROMPT as DEFAULT_CAPTION_PROMPT
from vlmtrain.data.sources import SHARD_NAME_RULE, check_shard_name
from vlmtrain.logging import make_console

# Version of the shard sample and manifest layout described in docs/data_format.md.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Skipped records remembered in the manifest, so users can find them: the first ones in input order. A
# shard keeps its EXAMPLES_IN_MANIFEST lowest-index ones, so the manifest's are exact in any record order.
EXAMPLES_IN_MANIFEST = 20

# Shards a worker pool may have queued or in flight per worker: bounds memory held by pending jobs.
JOBS_PER_WORKER = 2

_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardOptions:
    """Every option that decides what the shards contain (stored in manifest.json["options"])."""

    shard_size: int
    """Input records per shard (before skips)."""
    image_size: int | None
    """Downscale so the shorter side is this many pixels and store RGB JPEG; None keeps original bytes."""
    caption_prompt: str
    """Human turn of caption samples."""
    image_column: str
    """jsonl/csv: image path column."""
    text_columns: tuple[str, ...]
    """jsonl/csv: caption columns."""
    question_column: str | None
    """jsonl/csv: question column (vqa mode with answer_column)."""
    answer_column: str | None
    """jsonl/csv: answer column."""
    max_image_pixels: int
    """Images with more pixels are skipped as decompression bombs."""
    seed: int = 0
    """Seed of the record order (a permutation of all input records); ignored with keep_order."""
    keep_order: bool = False
    """Write records in input order instead of the seeded random order."""


@dataclass(frozen=True)
class WrittenShard:
    """One written shard, as listed in the manifest."""

    name: str
    """File name inside the output folder."""
    samples: int
    """Samples in the shard."""
    sha256: str
    """Hex digest of the whole tar file."""
    bytes: int
    """Size of the tar file."""


@dataclass(frozen=True)
class SkipExample:
    """One skipped record, reported so users can find and fix it."""

    index: int
    """0-based position among the input records (the sample key it would have had)."""
    id: str | None
    """The record's id, when it could be read."""
    where: str
    """File and line/index/row of the record."""
    reason: str
    """Skip reason (a key of SKIP_REASONS)."""
    detail: str
    """What exactly was wrong."""


@dataclass(frozen=True)
class ShardResult:
    """What writing (or keeping) one shard produced."""

    info: WrittenShard
    skipped: dict[str, int]
    dropped: dict[str, int]
    examples: tuple[SkipExample, ...]
    reused: bool
    """True when a finished shard from an earlier run was verified and kept."""


@dataclass(frozen=True)
class ShardSummary:
    """The outcome of a ``shard`` run."""

    samples: int
    """Samples written over all shards."""
    skipped: dict[str, int]
    """Skipped records by reason."""
    shards: list[WrittenShard]
    """All shards in order."""
    out: Path
    """Output folder (holds the shards and manifest.json)."""
    dropped: dict[str, int]
    """Captions left out of written samples, by reason."""
    reused: int
    """Shards kept from an earlier, interrupted run."""
    skipped_examples: list[SkipExample]
    """The first few skipped records, in input order."""


@dataclass(frozen=True)
class _ShardJob:
    """Everything a worker needs to write one shard."""

    name: str
    out: Path
    fmt: str
    images: Path | None
    options: ShardOptions
    fingerprint: str
    """Digest of the options and the records; a kept shard must have been written from the same."""
    items: tuple[tuple[int, Item], ...]
    """(input index, item) for each record of the shard's index range."""


def shard(
    input: Path,
    fmt: str,
    images: Path | None,
    out: Path,
    split: str | None = None,
    shard_size: int = 1000,
    image_size: int | None = None,
    workers: int = 1,
    caption_prompt: str = DEFAULT_CAPTION_PROMPT,
    image_column: str = "image",
    text_columns: tuple[str, ...] = ("caption",),
    question_column: str | None = None,
    answer_column: str | None = None,
    progress: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    seed: int = 0,
    keep_order: bool = False,
) -> ShardSummary:
    """Write ``out/{split or 'shard'}-{i:06d}.tar`` shards and ``out/manifest.json`` from ``input``.

    Records go in a permutation seeded by ``seed`` (``keep_order``: input order). Bad records are skipped
    and counted by reason; an input that is not ``fmt`` at all is an error.
    """
    spec = get_format(fmt)
    options = ShardOptions(
        shard_size=shard_size,
        image_size=image_size,
        caption_prompt=caption_prompt,
        image_column=image_column,
        text_columns=tuple(text_columns),
        question_column=question_column,
        answer_column=answer_column,
        max_image_pixels=max_image_pixels,
        seed=seed,
        keep_order=keep_order,
    )
    _validate(spec, input, images, split, options, workers)
    input = input.resolve()
    images = images.resolve() if images is not None else None
    source = {
        "input": str(input),
        "format": fmt,
        "images": None if images is None else str(images),
        "split": split,
    }
    read_options = ReadOptions(
        caption_prompt=caption_prompt,
        split=split,
        image_column=image_column,
        text_columns=tuple(text_columns),
        question_column=question_column,
        answer_column=answer_column,
    )
    stats = ReadStats()
    chunks = _chunks(_ordered(spec.read(input, read_options, stats), options), shard_size)
    # Pull the first chunk before touching the output: a file in the wrong format fails here.
    first = next(chunks, None)
    chunks = chain([first], chunks) if first is not None else iter(())
    out.mkdir(parents=True, exist_ok=True)
    _check_same_source(out / MANIFEST_NAME, source)
    prefix = split or "shard"
    jobs = (
        _make_job(f"{prefix}-{i:06d}.tar", out, fmt, images, options, items) for i, items in enumerate(chunks)
    )
    results = _run(jobs, workers, max_image_pixels, progress)
    summary = _summarize(results, out, stats)
    _write_json_atomic(out / MANIFEST_NAME, _manifest(summary, source, options))
    _warn_stale(out, prefix, {r.info.name for r in results})
    return summary


def _validate(
    spec: FormatSpec, input: Path, images: Path | None, split: str | None, options: ShardOptions, workers: int
) -> None:
    if not input.exists():
        raise FileNotFoundError(f"{input}: input does not exist")
    if spec.needs_images:
        if images is None:
            raise ValueError(
                f"--format {spec.name} reads image paths relative to --images; pass --images DIR"
            )
        if not images.is_dir():
            raise NotADirectoryError(f"--images {images} is not a directory")
    if split is not None and not _PREFIX_RE.match(split):
        raise ValueError(f"--split {split!r} must be letters, digits, '_' or '-' (it names the shard files)")
    for name, value in (
        ("shard_size", options.shard_size),
        ("workers", workers),
        ("max_image_pixels", options.max_image_pixels),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(options.seed, int) or options.seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {options.seed!r}")
    if options.image_size is not None and (not isinstance(options.image_size, int) or options.image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {options.image_size!r}")
    if "<image>" in options.caption_prompt or not options.caption_prompt.strip():
        raise ValueError(
            f"caption_prompt must be non-empty text without '<image>', got {options.caption_prompt!r}"
        )


def _ordered(items: Iterable[Item], options: ShardOptions) -> Iterator[tuple[int, Item]]:
    """(input index, item) in the order the shards hold them: input order, or the seeded permutation.

    A permutation of the whole input needs every record at hand: the parsed records are held in memory
    (about the size of the annotation file for text formats; embedded images, e.g. PathVQA parquet, are
    held too). The SplitMix64 permutation is pure Python: about 1 s per million records.
    """
    if options.keep_order:
        yield from enumerate(items)
        return
    everything = list(items)
    for index in permutation(len(everything), "shard-records", options.seed):
        yield index, everything[index]


def _chunks(numbered: Iterable[tuple[int, Item]], size: int) -> Iterator[tuple[tuple[int, Item], ...]]:
    """Consecutive runs of ``size`` (input index, item) pairs: one shard's records each."""
    numbered = iter(numbered)
    while chunk := tuple(islice(numbered, size)):
        yield chunk


def _make_job(
    name: str,
    out: Path,
    fmt: str,
    images: Path | None,
    options: ShardOptions,
    items: tuple[tuple[int, Item], ...],
) -> _ShardJob:
    digest = hashlib.sha256()
    header = {
        "format_version": FORMAT_VERSION,
        "vlmtrain_version": __version__,
        "format": fmt,
        "images": None if images is None else str(images),
        "options": dataclasses.asdict(options),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for index, item in items:
        fields = {"index": index, "kind": type(item).__name__, **dataclasses.asdict(item)}
        digest.update(json.dumps(fields, sort_keys=True, default=_bytes_digest).encode())
    return _ShardJob(name, out, fmt, images, options, digest.hexdigest(), items)


def _bytes_digest(value: Any) -> str:
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    raise TypeError(f"cannot fingerprint {type(value).__name__}")


def _run(jobs: Iterator[_ShardJob], workers: int, max_pixels: int, show_progress: bool) -> list[ShardResult]:
    """Write (or keep) every shard, in-process or on a process pool; results come back in shard order."""
    results: list[ShardResult] = []
    with _progress(show_progress) as bar:
        records = bar.add_task("records", total=None)
        shards = bar.add_task("shards", total=None)

        def collect(result: ShardResult, size: int) -> None:
            results.append(result)
            _log_examples(result.examples, already=sum(len(r.examples) for r in results[:-1]))
            bar.advance(records, size)
            bar.advance(shards, 1)

        if workers == 1:
            with pil_limits(max_pixels):
                for job in jobs:
                    collect(process_shard(job), len(job.items))
        else:
            # spawn: forking a parent that runs rich's refresh thread can deadlock the children.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(max_pixels,)
            ) as pool:
                pending: dict[Future[ShardResult], int] = {}
                for job in jobs:
                    pending[pool.submit(process_shard, job)] = len(job.items)
                    if len(pending) >= JOBS_PER_WORKER * workers:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            collect(future.result(), pending.pop(future))
                for future in wait(pending).done:
                    collect(future.result(), pending[future])
    return sorted(results, key=lambda r: (len(r.info.name), r.info.name))


def _progress(enabled: bool) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed:>9.0f}"),
        TaskProgressColumn(show_speed=True),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def _init_worker(max_pixels: int) -> None:
    # A worker process does nothing else, so PIL's limits are set for its lifetime.
    set_pil_limits(max_pixels)


def process_shard(job: _ShardJob) -> ShardResult:
    """Keep the shard if an earlier run finished it from the same records, else write it."""
    return _reuse(job) or _write(job)


def _write(job: _ShardJob) -> ShardResult:
    tar_path = job.out / job.name
    done_path = _sidecar(tar_path)
    tmp_path = tar_path.with_name(tar_path.name + ".tmp")
    # Drop the old sidecar first: an interruption from here on must not leave a sidecar that vouches
    # for a half-written tar.
    done_path.unlink(missing_ok=True)
    skipped: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    examples: list[SkipExample] = []
    samples = 0
    with open(tmp_path, "wb") as stream, _tar_writer(stream) as tar:
        for index, item in job.items:
            try:
                members = build_sample(item, index, job.fmt, job.images, job.options)
            except SampleError as e:
                skipped[e.reason] += 1
                examples.append(SkipExample(index, item.id, item.where, e.reason, e.detail))
                continue
            for member_name, data in members:
                _add_member(tar, member_name, data)
            samples += 1
            dropped.update(item.dropped)
    os.replace(tmp_path, tar_path)
    info = WrittenShard(job.name, samples, _sha256_file(tar_path), tar_path.stat().st_size)
    examples = sorted(examples, key=lambda e: e.index)[:EXAMPLES_IN_MANIFEST]
    result = ShardResult(info, dict(skipped), dict(dropped), tuple(examples), reused=False)
    sidecar = {
        **dataclasses.asdict(info),
        "fingerprint": job.fingerprint,
        "skipped": result.skipped,
        "dropped": result.dropped,
        "examples": [dataclasses.asdict(e) for e in examples],
    }
    _write_json_atomic(done_path, sidecar)
    return result


def _reuse(job: _ShardJob) -> ShardResult | None:
    """The earlier result for this shard if its sidecar matches the job and the tar's size and sha256."""
    tar_path = job.out / job.name
    try:
        sidecar = json.loads(_sidecar(tar_path).read_text(encoding="utf-8"))
        if sidecar["fingerprint"] != job.fingerprint or tar_path.stat().st_size != sidecar["bytes"]:
            return None
        if _sha256_file(tar_path) != sidecar["sha256"]:
            return None
        info = WrittenShard(job.name, int(sidecar["samples"]), sidecar["sha256"], int(sidecar["bytes"]))
        examples = tuple(SkipExample(**e) for e in sidecar["examples"])
        return ShardResult(info, dict(sidecar["skipped"]), dict(sidecar["dropped"]), examples, reused=True)
    except (OSError, ValueError, KeyError, TypeError):
        # No sidecar, or one from an interrupted or older run: the shard is written again.
        return None


def build_sample(
    item: Item, index: int, fmt: str, images: Path | None, options: ShardOptions
) -> list[tuple[str, bytes]]:
    """Tar members (name, bytes) of one sample: ``{key}.json`` then the image; SampleError if it is skipped."""
    if isinstance(item, Invalid):
        raise SampleError(item.reason, item.detail)
    key = f"{index:010d}"
    members = [(f"{key}.json", json.dumps(sample_json(item, fmt), ensure_ascii=False).encode("utf-8"))]
    data = _image_data(item, images, options.max_image_pixels)
    if data is not None:
        name = item.image or f"embedded image of {item.where}"
        image, ext = validate_and_maybe_resize(data, options.image_size, options.max_image_pixels, name=name)
        members.append((f"{key}.{ext}", image))
    return members


def sample_json(record: Record, fmt: str) -> dict[str, Any]:
    """The ``{key}.json`` object of a sample (layout in docs/data_format.md)."""
    sample: dict[str, Any] = {
        "id": record.id,
        "source": fmt,
        "task": record.task,
        "conversations": [{"from": turn.role, "value": turn.value} for turn in record.conversations],
    }
    if record.references is not None:
        sample["references"] = list(record.references)
    sample["image_id"] = record.image_id
    if record.answer_type is not None:
        sample["answer_type"] = record.answer_type
    sample["image"] = record.image
    return sample


def _image_data(record: Record, images: Path | None, max_pixels: int) -> bytes | None:
    if record.image_bytes is not None:
        return record.image_bytes
    if record.image is None:
        return None
    if images is None:
        raise SampleError("missing_image", f"{record.image!r} is a path but no --images folder was given")
    data, _ = load_image_bytes(resolve_image_path(images, record.image), max_pixels)
    return data


def _tar_writer(stream: Any) -> TarWriter:
    """webdataset's writer with reproducible headers (its defaults stamp the current time and "bigdata").

    ``encoder=False``: members are written as the bytes build_sample made, never re-encoded by extension.
    The tar format is tarfile's default (PAX), which writes plain ustar headers for these short ASCII
    member names: the bytes equal a USTAR-format tar's.
    """
    return TarWriter(stream, user="", group="", mode=0o444, mtime=0, encoder=False)


def _add_member(tar: TarWriter, name: str, data: bytes) -> None:
    # One write per member: TarWriter sorts a sample's extensions ("jpg" before "json"), and the layout
    # (docs/data_format.md) puts the json first. uid/gid stay TarInfo's 0.
    key, ext = name.split(".", 1)
    tar.write({"__key__": key, ext: data})


def _sidecar(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name.removesuffix(".tar") + ".done.json")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _summarize(results: list[ShardResult], out: Path, stats: ReadStats) -> ShardSummary:
    skipped: Counter[str] = Counter()
    dropped: Counter[str] = Counter(stats.dropped)
    for result in results:
        skipped.update(result.skipped)
        dropped.update(result.dropped)
    examples = sorted((e for r in results for e in r.examples), key=lambda e: e.index)
    return ShardSummary(
        samples=sum(r.info.samples for r in results),
        skipped=dict(sorted(skipped.items())),
        shards=[r.info for r in results],
        out=out,
        dropped=dict(sorted((k, v) for k, v in dropped.items() if v)),
        reused=sum(r.reused for r in results),
        skipped_examples=examples[:EXAMPLES_IN_MANIFEST],
    )


def _manifest(summary: ShardSummary, source: dict[str, Any], options: ShardOptions) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "samples": summary.samples,
        "skipped": summary.skipped,
        "dropped": summary.dropped,
        "shards": [dataclasses.asdict(s) for s in summary.shards],
        "source": source,
        "options": {**dataclasses.asdict(options), "text_columns": list(options.text_columns)},
        "vlmtrain_version": __version__,
        "skipped_examples": [dataclasses.asdict(e) for e in summary.skipped_examples],
    }


def _check_same_source(manifest_path: Path, source: dict[str, Any]) -> None:
    """Refuse to mix two inputs in one output folder (they would share, and overwrite, manifest.json)."""
    if not manifest_path.exists():
        return
    old = load_manifest(manifest_path)["source"]
    if old != source:
        raise ValueError(
            f"{manifest_path.parent} already holds shards of another input ({old}); this run is {source}. "
            "Use another --out folder, or delete that one."
        )


def _warn_stale(out: Path, prefix: str, names: set[str]) -> None:
    stale = sorted(p.name for p in out.glob(f"{prefix}-*.tar") if p.name not in names)
    if stale:
        log.warning(
            "%s holds %d shard file(s) from an earlier, larger run that manifest.json does not list "
            "(e.g. %s); readers use the manifest, delete them to save space",
            out,
            len(stale),
            stale[0],
        )


def _log_examples(examples: Iterable[SkipExample], already: int) -> None:
    for example in islice(examples, max(0, EXAMPLES_IN_MANIFEST - already)):
        log.warning(
            "skipped record %d (%s, id %s): %s: %s",
            example.index,
            example.where,
            example.id,
            example.reason,
            example.detail,
        )


class ManifestError(ValueError):
    """manifest.json is missing, unreadable or inconsistent."""


def load_manifest(path: Path) -> dict[str, Any]:
    """Read and validate a shard manifest; ``path`` is the file or the folder holding manifest.json."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no shard manifest here; run `vlmtrain shard` to write one") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: not a readable JSON manifest ({e})") from None
    problems = _manifest_problems(manifest)
    if problems:
        raise ManifestError(f"{path}: invalid shard manifest: {'; '.join(problems)}")
    return manifest


def _manifest_problems(manifest: Any) -> list[str]:
    if not isinstance(manifest, dict):
        return [f"expected a JSON object, found {type(manifest).__name__}"]
    if manifest.get("format_version") != FORMAT_VERSION:
        return [f"format_version is {manifest.get('format_version')!r}; this vlmtrain reads {FORMAT_VERSION}"]
    problems = []
    types = {
        "samples": int,
        "skipped": dict,
        "shards": list,
        "source": dict,
        "options": dict,
        "vlmtrain_version": str,
    }
    for key, kind in types.items():
        if not isinstance(manifest.get(key), kind):
            problems.append(f"{key!r} must be a {kind.__name__}")
    if problems:
        return problems
    names: set[str] = set()
    for i, entry in enumerate(manifest["shards"]):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and check_shard_name(entry["name"]) is None
            and isinstance(entry.get("samples"), int)
            and entry["samples"] >= 0
            and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str)
            and _SHA256_RE.match(entry["sha256"])
        ):
            problems.append(
                f"shards[{i}] must have name (a plain shard file name: {SHARD_NAME_RULE}), samples >= 0, bytes "
                "and a sha256 hex digest"
            )
        elif entry["name"] in names:
            problems.append(f"shards[{i}] repeats the name {entry['name']!r}")
        else:
            names.add(entry["name"])
    if not problems and sum(s["samples"] for s in manifest["shards"]) != manifest["samples"]:
        problems.append("'samples' is not the sum of the shards' samples")
    if any(not isinstance(v, int) or v < 0 for v in manifest["skipped"].values()):
        problems.append("'skipped' must map reasons to counts")
    return problems


def print_summary(summary: ShardSummary, console: Console | None = None) -> None:
    """Print samples, skips by reason (with what each means), shards and where they are."""
    console = console or make_console()
    table = Table(title="vlmtrain shard", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("samples written", f"{summary.samples:,}")
    table.add_row("records skipped", f"{sum(summary.skipped.values()):,}")
    table.add_row("shards", f"{len(summary.shards)} ({summary.reused} kept from an earlier run)")
    table.add_row("output", str(summary.out))
    table.add_row("manifest", str(summary.out / MANIFEST_NAME))
    console.print(table)
    if summary.skipped or summary.dropped:
        reasons = Table(title="Skipped records and dropped captions")
        reasons.add_column("kind")
        reasons.add_column("reason")
        reasons.add_column("count", justify="right")
        reasons.add_column("meaning")
        for reason, count in summary.skipped.items():
            reasons.add_row("record", reason, f"{count:,}", SKIP_REASONS.get(reason, ""))
        for reason, count in summary.dropped.items():
            reasons.add_row("caption", reason, f"{count:,}", DROP_REASONS.get(reason, ""))
        console.print(reasons)
    if summary.skipped_examples:
        first = Table(title=f"First {len(summary.skipped_examples)} skipped records")
        for column in ("index", "where", "id", "reason", "detail"):
            first.add_column(column)
        for e in summary.skipped_examples:
            first.add_row(str(e.index), e.where, str(e.id), e.reason, e.detail)
        console.print(first)
