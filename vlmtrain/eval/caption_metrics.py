"""Caption metrics computed exactly as pycocoevalcap's COCOEvalCap does, COCO-format writers, and a constant-caption baseline.

Scores (keys as pycocoevalcap names them): `Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr` and, on
request, `SPICE`; all are fractions (the paper's Table VI prints them x100). Captions are PTB-tokenized
first, as COCOEvalCap does. PTBTokenizer, METEOR and SPICE are Java programs (see vlmtrain.eval.java).

Deviations from calling `COCOEvalCap.evaluate()` directly, none of which changes a score on inputs the
official path handles:
- line breaks other than "\\n" (which COCOEvalCap already replaces) are turned into spaces too: the Java
  tokenizer splits lines on "\\r", U+2028, ..., which silently shifts every later caption onto the wrong
  image;
- SPICE runs only when asked (COCOEvalCap always runs it, downloading Stanford CoreNLP on first use);
- METEOR's Java process is always ended, also after an error, and is given a time limit.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import threading
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pycocoevalcap.spice.spice as _spice_module
import pycocoevalcap.tokenizer.ptbtokenizer as _ptb_module
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import precook
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice
from pycocotools.coco import COCO

from vlmtrain.eval.java import java_major_version, require_java

CaptionId = int | str

BLEU_NAMES: tuple[str, ...] = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
CAPTION_METRIC_NAMES: tuple[str, ...] = (*BLEU_NAMES, "METEOR", "ROUGE_L", "CIDEr")

# Generous for a 25k-caption test split (METEOR takes well under a minute there); a JVM that stops
# answering would otherwise block the eval forever.
METEOR_TIMEOUT_S = 900.0

TOKENIZER_DIR = Path(_ptb_module.__file__).resolve().parent
SPICE_DIR = Path(_spice_module.__file__).resolve().parent
# SPICE's own jar ships with pycocoevalcap; the Stanford CoreNLP 3.6.0 jars are downloaded on first use.
SPICE_REQUIRED_FILES: tuple[str, ...] = (
    "spice-1.0.jar",
    "lib/stanford-corenlp-3.6.0.jar",
    "lib/stanford-corenlp-3.6.0-models.jar",
)
# From Java 16 on, SPICE's cache serializer (FST 2.47) dies with InaccessibleObjectException.
SPICE_MAX_JAVA_MAJOR = 15

# Characters Java treats as line ends; each caption must stay on its own line for the tokenizer.
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
_PREVIEW = 5


class CaptionInputError(ValueError):
    """Predictions/references that cannot be scored: missing ids, empty reference lists, wrong types."""


class SpiceUnavailableError(RuntimeError):
    """SPICE was requested but its Stanford CoreNLP jars (or a Java it runs on) are missing."""


class MeteorError(RuntimeError):
    """METEOR's Java process failed or stopped answering."""


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def _preview(ids: Sequence[Any]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_PREVIEW])
    return shown + (f", ... (+{len(ids) - _PREVIEW} more)" if len(ids) > _PREVIEW else "")


def _check_id_types(ids: Sequence[Any], what: str) -> None:
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int | str)]
    if bad:
        raise CaptionInputError(
            f"{what}: ids must be int or str (they are written to COCO JSON); got {_preview(bad)} "
            f"of type {type(bad[0]).__name__}. Convert them, e.g. with int(...) or str(...)."
        )
    kinds = {type(i) for i in ids}
    if len(kinds) > 1:
        raise CaptionInputError(
            f"{what}: ids mix int and str ({sorted(k.__name__ for k in kinds)}); use one type so that "
            "1 and '1' cannot be mistaken for each other."
        )


def validate_references(references: Mapping[CaptionId, Sequence[str]], source: str = "") -> None:
    """Raise CaptionInputError unless `references` maps int/str ids to non-empty lists of str."""
    where = f" ({source})" if source else ""
    if not references:
        raise CaptionInputError(f"no references to score against{where}")
    _check_id_types(list(references), f"references{where}")
    for image_id, captions in references.items():
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise CaptionInputError(
                f"references for id {image_id!r}{where} must be a list of str, got {type(captions).__name__}"
            )
        if len(captions) == 0:
            raise CaptionInputError(
                f"id {image_id!r}{where} has an empty reference list; every scored image needs >= 1 "
                "reference caption (drop the image from the evaluation set)."
            )
        if not all(isinstance(c, str) for c in captions):
            raise CaptionInputError(f"references for id {image_id!r}{where} contain a non-str caption")


def validate_caption_inputs(
    predictions: Mapping[CaptionId, str],
    references: Mapping[CaptionId, Sequence[str]],
    source: str = "",
) -> None:
    """Raise CaptionInputError unless every prediction has >= 1 reference caption and vice versa."""
    where = f" ({source})" if source else ""
    validate_references(references, source)
    _check_id_types([*predictions, *references], f"captions{where}")
    missing_refs = [i for i in predictions if i not in references]
    missing_preds = [i for i in references if i not in predictions]
    if missing_refs or missing_preds:
        problems = []
        if missing_refs:
            problems.append(
                f"{len(missing_refs)} prediction id(s) have no references: {_preview(missing_refs)}"
            )
        if missing_preds:
            problems.append(
                f"{len(missing_preds)} reference id(s) have no prediction: {_preview(missing_preds)}"
            )
        raise CaptionInputError(
            f"predictions and references must cover the same ids{where}; "
            + "; ".join(problems)
            + ". Generate a caption for every evaluated image, or restrict the references to the predicted ids."
        )
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise CaptionInputError(
                f"prediction for id {image_id!r}{where} must be a str, got {type(caption).__name__}"
            )


def spice_missing_files(spice_dir: Path | None = None) -> list[Path]:
    """The files SPICE needs that are absent from pycocoevalcap's spice folder (or `spice_dir`)."""
    root = SPICE_DIR if spice_dir is None else Path(spice_dir)
    return [root / name for name in SPICE_REQUIRED_FILES if not (root / name).is_file()]


def require_spice(spice_dir: Path | None = None) -> None:
    """Raise SpiceUnavailableError, saying what is missing and how to get it, unless SPICE can run."""
    root = SPICE_DIR if spice_dir is None else Path(spice_dir)
    missing = spice_missing_files(root)
    if missing:
        listed = "\n".join(f"  {path}" for path in missing)
        raise SpiceUnavailableError(
            "SPICE was requested, but these files are missing:\n"
            f"{listed}\n"
            "SPICE needs Stanford CoreNLP 3.6.0 (about 400 MB, downloaded once). On a machine with internet "
            "access run\n"
            "  python -m pycocoevalcap.spice.get_stanford_models\n"
            "or download http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip and copy "
            f"stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar from it into {root / 'lib'}. "
            "SPICE also needs about 8 GB of Java heap. Or evaluate without SPICE."
        )
    version = require_java()
    if java_major_version(version) > SPICE_MAX_JAVA_MAJOR:
        raise SpiceUnavailableError(
            f"SPICE 1.0 fails on Java {version} (its cache serializer raises InaccessibleObjectException "
            f"on Java 16+). Put a Java 8-{SPICE_MAX_JAVA_MAJOR} first on PATH (e.g. apt-get install "
            "openjdk-8-jre-headless, or conda install -c conda-forge openjdk=11), or evaluate without SPICE."
        )


# ---------------------------------------------------------------------------------------------------
# Tokenization and scoring
# ---------------------------------------------------------------------------------------------------


def ptb_tokenize(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """PTB-tokenize (lowercase, split, drop punctuation tokens) with pycocoevalcap's PTBTokenizer."""
    if not os.access(TOKENIZER_DIR, os.W_OK):
        raise RuntimeError(
            f"pycocoevalcap's PTBTokenizer writes its input to a temporary file next to its jar, in "
            f"{TOKENIZER_DIR}, which is not writable. Install vlmtrain into a virtual environment you own, "
            "or make that folder writable."
        )
    empty = [key for key, caps in captions.items() if len(caps) == 0]
    if empty:
        raise CaptionInputError(f"ptb_tokenize: no captions for key(s) {_preview(empty)}")
    data = {key: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in caps] for key, caps in captions.items()}
    tokenized = _ptb_module.PTBTokenizer().tokenize(data)
    # The tokenizer pairs output lines with captions by position; a lost line would shift captions.
    misaligned = [key for key, caps in captions.items() if len(tokenized.get(key, ())) != len(caps)]
    if misaligned:
        raise RuntimeError(
            f"PTBTokenizer returned a different number of captions for key(s) {_preview(misaligned)}; "
            "check that `java -cp stanford-corenlp-3.4.1.jar edu.stanford.nlp.process.PTBTokenizer` runs "
            f"in {TOKENIZER_DIR}"
        )
    return tokenized


@dataclass
class _MeteorSession:
    """A pycocoevalcap Meteor plus the tail of what its Java process wrote to stderr."""

    meteor: Meteor
    # Drained continuously so a chatty JVM cannot fill the pipe and block; kept for error messages.
    stderr_tail: deque[str]


def _drain(stream: IO[bytes], sink: deque[str]) -> None:
    for line in iter(stream.readline, b""):
        sink.append(line.decode("utf-8", errors="replace"))


def _shutdown_meteor(meteor: Meteor) -> None:
    proc = meteor.meteor_p
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        # Closing stdin of a killed process can flush into a broken pipe; the process is gone either way.
        with contextlib.suppress(OSError):
            stream.close()
    # Meteor.compute_score takes its lock without try/finally, so a failure inside it leaves the lock held
    # and Meteor.__del__ (run later by the garbage collector) would block forever acquiring it.
    if meteor.lock.locked():
        meteor.lock.release()


@contextlib.contextmanager
def meteor_session() -> Iterator[_MeteorSession]:
    """A pycocoevalcap Meteor whose Java process is always ended on exit, also after an error."""
    meteor = Meteor()
    session = _MeteorSession(meteor=meteor, stderr_tail=deque(maxlen=50))
    drainer = threading.Thread(
        target=_drain, args=(meteor.meteor_p.stderr, session.stderr_tail), name="meteor-stderr", daemon=True
    )
    drainer.start()
    try:
        yield session
    finally:
        _shutdown_meteor(meteor)
        drainer.join(timeout=10)
        with contextlib.suppress(OSError):
            meteor.meteor_p.stderr.close()


def meteor_score(
    gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]], timeout_s: float = METEOR_TIMEOUT_S
) -> float:
    """Corpus METEOR of tokenized captions via pycocoevalcap, in a Java process that is always ended."""
    with meteor_session() as session:
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["score"] = session.meteor.compute_score(gts, res)[0]
            except Exception as exc:  # re-raised below in the caller's thread
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="meteor", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            # Killing the JVM closes its stdout, so the worker's blocked read returns and the thread ends.
            session.meteor.meteor_p.kill()
            worker.join(timeout=30)
            raise MeteorError(
                f"METEOR gave no answer within {timeout_s:.0f} s for {len(gts)} images; its Java process "
                f"was killed. Java stderr: {''.join(session.stderr_tail)[-2000:]!r}"
            )
        if "error" in outcome:
            session.meteor.meteor_p.kill()
            session.meteor.meteor_p.wait()
            raise MeteorError(
                f"METEOR failed ({outcome['error']!r}). Java stderr: {''.join(session.stderr_tail)[-2000:]!r}"
            ) from outcome["error"]
        return float(outcome["score"])


def score_tokenized(
    gts: Mapping[Any, list[str]],
    res: Mapping[Any, list[str]],
    spice: bool = False,
    meteor_timeout_s: float = METEOR_TIMEOUT_S,
) -> dict[str, float]:
    """Run COCOEvalCap's scorers, in its order, on PTB-tokenized references `gts` and predictions `res`."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics = {name: float(value) for name, value in zip(BLEU_NAMES, bleu, strict=True)}
    metrics["METEOR"] = meteor_score(gts, res, timeout_s=meteor_timeout_s)
    metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        metrics["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return metrics


def compute_caption_metrics(
    predictions: Mapping[CaptionId, str],
    references: Mapping[CaptionId, Sequence[str]],
    spice: bool = False,
    meteor_timeout_s: float = METEOR_TIMEOUT_S,
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE if asked) of one prediction per image vs its references."""
    require_java()
    validate_caption_inputs(predictions, references)
    if spice:
        require_spice()
    # Images in the references' order, as COCOEvalCap walks the annotation file's images.
    ids = list(references)
    gts = ptb_tokenize({i: list(references[i]) for i in ids})
    res = ptb_tokenize({i: [predictions[i]] for i in ids})
    return score_tokenized(gts, res, spice=spice, meteor_timeout_s=meteor_timeout_s)


# ---------------------------------------------------------------------------------------------------
# Files: COCO results / annotations / metrics
# ---------------------------------------------------------------------------------------------------


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        # ASCII escapes keep the file readable by pycocotools, which opens it in the locale's encoding.
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=True, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_coco_predictions(path: str | os.PathLike[str], predictions: Mapping[CaptionId, str]) -> Path:
    """Write `[{"image_id": id, "caption": text}, ...]`, the COCO results format `COCO.loadRes` reads."""
    _check_id_types(list(predictions), f"predictions for {path}")
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise CaptionInputError(
                f"prediction for id {image_id!r} must be a str, got {type(caption).__name__}"
            )
    return atomic_write_json(path, [{"image_id": i, "caption": c} for i, c in predictions.items()])


def write_coco_references(
    path: str | os.PathLike[str],
    references: Mapping[CaptionId, Sequence[str]],
    description: str = "vlmtrain caption references",
) -> Path:
    """Write a COCO captions annotation file that `pycocotools.coco.COCO(path)` loads."""
    validate_references(references, source=str(path))
    annotations = [
        {"image_id": image_id, "id": ann_id, "caption": caption}
        for ann_id, (image_id, caption) in enumerate(
            ((i, c) for i, captions in references.items() for c in captions), start=1
        )
    ]
    return atomic_write_json(
        path,
        {
            "info": {"description": description},
            "licenses": [],
            "type": "captions",
            "images": [{"id": image_id} for image_id in references],
            "annotations": annotations,
        },
    )


def write_metrics(
    path: str | os.PathLike[str], metrics: Mapping[str, float], meta: Mapping[str, Any]
) -> Path:
    """Write `{"metrics": ..., "meta": ...}`; NaN (a metric with no items) becomes null."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    return atomic_write_json(path, {"metrics": clean, "meta": dict(meta)})


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CaptionInputError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CaptionInputError(f"{what} file {path} is not valid JSON: {exc}") from None


def _check_reference_file(path: Path) -> None:
    data = _read_json(path, "references")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CaptionInputError(
            f"references file {path} must be a COCO captions annotation object with an 'images' list "
            "(see write_coco_references)"
        )
    if not isinstance(data.get("annotations"), list):
        raise CaptionInputError(f"references file {path} has no 'annotations' list")
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"image_id", "id", "caption"} <= ann.keys():
            raise CaptionInputError(
                f"references file {path}: annotation #{k} must have 'image_id', 'id' and 'caption', got {ann!r}"
            )


def _read_prediction_file(path: Path) -> list[dict[str, Any]]:
    data = _read_json(path, "predictions")
    if not isinstance(data, list) or not data:
        raise CaptionInputError(f"predictions file {path} must be a non-empty JSON list of results")
    seen: set[Any] = set()
    for k, item in enumerate(data):
        if not isinstance(item, dict) or not {"image_id", "caption"} <= item.keys():
            raise CaptionInputError(
                f"predictions file {path}: result #{k} must have 'image_id' and 'caption', got {item!r}"
            )
        if item["image_id"] in seen:
            raise CaptionInputError(
                f"predictions file {path}: image_id {item['image_id']!r} has more than one caption; "
                "keep one per image"
            )
        seen.add(item["image_id"])
    return data


def evaluate_with_coco_files(
    references_json: str | os.PathLike[str],
    predictions_json: str | os.PathLike[str],
    spice: bool = False,
    meteor_timeout_s: float = METEOR_TIMEOUT_S,
) -> dict[str, float]:
    """Score a COCO results file against a COCO captions annotation file, loaded with pycocotools.

    Follows COCOEvalCap.evaluate step by step (COCO + loadRes, images in annotation-file order, their
    captions via imgToAnns, PTBTokenizer, Bleu(4), Meteor, Rouge, Cider) with the deviations listed in the
    module docstring; `COCOEvalCap.evaluate()` itself always runs SPICE and never ends METEOR's JVM.
    """
    require_java()
    references_path, predictions_path = Path(references_json), Path(predictions_json)
    _check_reference_file(references_path)
    results = _read_prediction_file(predictions_path)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco = COCO(str(references_path))
    image_ids = coco.getImgIds()
    references = {i: [ann["caption"] for ann in coco.imgToAnns[i]] for i in image_ids}
    predicted = {item["image_id"]: item["caption"] for item in results}
    validate_caption_inputs(predicted, references, source=f"{predictions_path} vs {references_path}")
    if spice:
        require_spice()
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes only accepts a str path (a Path object would be taken for an in-memory result list).
        coco_res = coco.loadRes(str(predictions_path))
    gts = ptb_tokenize(references)
    res = ptb_tokenize({i: [ann["caption"] for ann in coco_res.imgToAnns[i]] for i in image_ids})
    return score_tokenized(gts, res, spice=spice, meteor_timeout_s=meteor_timeout_s)


# ---------------------------------------------------------------------------------------------------
# Constant-caption baseline
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CiderRefIndex:
    """pycocoevalcap's CIDEr reference side, precomputed once and stored per n-gram for fast lookups."""

    n: int
    sigma: float
    # log(number of images): the idf numerator.
    ref_len: float
    # n-gram -> number of images whose references contain it.
    document_frequency: dict[tuple[str, ...], float]
    # n-gram -> (rows of the references containing it, their tf-idf weights for it).
    postings: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]
    # [n, R] L2 norm of each reference's tf-idf vector per n-gram order.
    ref_norms: np.ndarray
    # [R] reference "length": pycocoevalcap counts bigram occurrences here, kept as is.
    ref_lengths: np.ndarray
    # [R] 10 / (n * refs of its image * images): turns summed similarities into the corpus mean CIDEr.
    ref_weights: np.ndarray


def _build_cider_index(tokenized_refs: Mapping[Any, Sequence[str]], n: int, sigma: float) -> _CiderRefIndex:
    ref_counts = [[precook(ref, n) for ref in refs] for refs in tokenized_refs.values()]
    document_frequency: dict[tuple[str, ...], float] = defaultdict(float)
    for refs in ref_counts:
        for ngram in {ngram for ref in refs for ngram in ref}:
            document_frequency[ngram] += 1
    ref_len = float(np.log(float(len(ref_counts))))
    total_refs = sum(len(refs) for refs in ref_counts)
    rows: dict[tuple[str, ...], list[int]] = defaultdict(list)
    weights: dict[tuple[str, ...], list[float]] = defaultdict(list)
    norms = np.zeros((n, total_refs))
    lengths = np.zeros(total_refs)
    ref_weights = np.zeros(total_refs)
    row = 0
    for refs in ref_counts:
        for ref in refs:
            for ngram, term_freq in ref.items():
                weight = float(term_freq) * (ref_len - np.log(max(1.0, document_frequency[ngram])))
                rows[ngram].append(row)
                weights[ngram].append(weight)
                norms[len(ngram) - 1, row] += weight**2
                if len(ngram) == 2:
                    lengths[row] += term_freq
            ref_weights[row] = 10.0 / (n * len(refs) * len(ref_counts))
            row += 1
    postings = {g: (np.asarray(rows[g], dtype=np.int64), np.asarray(weights[g])) for g in rows}
    return _CiderRefIndex(
        n, sigma, ref_len, dict(document_frequency), postings, np.sqrt(norms), lengths, ref_weights
    )


def _constant_cider(index: _CiderRefIndex, candidate: str) -> float:
    num = np.zeros_like(index.ref_norms)  # [n, R] clipped dot products
    cand_sq_norm = np.zeros(index.n)
    cand_length = 0
    for ngram, term_freq in precook(candidate, index.n).items():
        df = index.document_frequency.get(ngram, 0.0)
        weight = float(term_freq) * (index.ref_len - np.log(max(1.0, df)))
        cand_sq_norm[len(ngram) - 1] += weight**2
        if len(ngram) == 2:
            cand_length += term_freq
        posting = index.postings.get(ngram)
        if posting is not None:
            ref_rows, ref_weights = posting  # rows are unique within one n-gram's posting
            num[len(ngram) - 1, ref_rows] += np.minimum(weight, ref_weights) * ref_weights
    denom = np.sqrt(cand_sq_norm)[:, None] * index.ref_norms
    cosine = np.divide(num, denom, out=num.copy(), where=denom != 0)
    penalty = np.exp(-((cand_length - index.ref_lengths) ** 2) / (2 * index.sigma**2))  # [R]
    return float(np.sum(cosine * (penalty * index.ref_weights)[None, :]))


def constant_caption_cider(
    tokenized_refs: Mapping[Any, Sequence[str]],
    tokenized_candidates: Sequence[str],
    n: int = 4,
    sigma: float = 6.0,
) -> np.ndarray:
    """CIDEr (pycocoevalcap's, with its clipping and length penalty) of predicting each candidate for every image.

    Equal to `Cider().compute_score(tokenized_refs, {i: [c] for i in tokenized_refs})[0]` per candidate,
    but the reference side is indexed once, so thousands of candidates take seconds. Inputs must already be
    PTB-tokenized.
    """
    index = _build_cider_index(tokenized_refs, n, sigma)
    return np.array([_constant_cider(index, c) for c in tokenized_candidates], dtype=np.float64)


def candidate_pool(
    tokenized: Sequence[str], max_candidates: int | None, seed: int = 0, most_frequent: int = 40
) -> list[int]:
    """Indices of each distinct tokenized caption's first occurrence, in order, capped to `max_candidates`.

    Under a cap, the `most_frequent` distinct captions (by count; ties: first seen) are always kept, since a
    caption repeated across images is where a constant prediction scores best, and a seeded random sample of
    the others fills the rest. The kept indices are returned in order.
    """
    first_of: dict[str, int] = {}
    counts: Counter[str] = Counter(tokenized)
    for k, tokens in enumerate(tokenized):
        first_of.setdefault(tokens, k)
    keep = list(first_of.values())
    if max_candidates is None or len(keep) <= max_candidates:
        return keep
    by_count = sorted(keep, key=lambda k: (-counts[tokenized[k]], k))
    frequent = by_count[: min(most_frequent, max_candidates)]
    rest = sorted(set(keep) - set(frequent))
    sample = random.Random(seed).sample(rest, max_candidates - len(frequent))
    return sorted(frequent + sample)


def best_constant_caption(
    references: Mapping[CaptionId, Sequence[str]],
    candidates: Sequence[str] | None = None,
    max_candidates: int = 200,
    seed: int = 0,
    meteor_timeout_s: float = METEOR_TIMEOUT_S,
) -> tuple[str, dict[str, float]]:
    """The one caption that, predicted for every image, scores the highest CIDEr, and its full metrics.

    Candidates default to the reference captions themselves, deduplicated after tokenization; when more
    than `max_candidates` remain, the 40 most frequent and a random sample of the others (fixed `seed`),
    `max_candidates` in all, are searched. Explicit
    `candidates` are all searched. Ties go to the earliest candidate.
    """
    require_java()
    validate_references(references)
    tokenized_refs = ptb_tokenize({i: list(caps) for i, caps in references.items()})
    if candidates is None:
        raw = [c for caps in references.values() for c in caps]
        tokenized = [t for toks in tokenized_refs.values() for t in toks]
    else:
        raw = list(candidates)
        if not raw:
            raise CaptionInputError("best_constant_caption: `candidates` is empty")
        tokenized_map = ptb_tokenize({k: [c] for k, c in enumerate(raw)})
        tokenized = [tokenized_map[k][0] for k in range(len(raw))]
    keep = candidate_pool(tokenized, max_candidates if candidates is None else None, seed)
    scores = constant_caption_cider(tokenized_refs, [tokenized[k] for k in keep])
    best = raw[keep[int(np.argmax(scores))]]
    metrics = compute_caption_metrics(
        dict.fromkeys(references, best), references, meteor_timeout_s=meteor_timeout_s
    )
    return best, metrics
