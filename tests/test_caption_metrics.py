"""Caption metrics against pycocoevalcap called directly and through COCOEvalCap, plus writers, errors, Java/SPICE checks and tables."""

from __future__ import annotations

import gc
import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pycocoevalcap.eval as pycocoevalcap_eval
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.eval import COCOEvalCap
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools.coco import COCO
from rich.console import Console

from vlmtrain.eval import caption_metrics as cm
from vlmtrain.eval.caption_metrics import (
    CAPTION_METRIC_NAMES,
    CaptionInputError,
    MeteorError,
    SpiceUnavailableError,
    best_constant_caption,
    candidate_pool,
    compute_caption_metrics,
    constant_caption_cider,
    evaluate_with_coco_files,
    meteor_score,
    meteor_session,
    ptb_tokenize,
    require_spice,
    write_coco_predictions,
    write_coco_references,
    write_metrics,
)
from vlmtrain.eval.java import JavaNotFoundError, java_major_version, require_java
from vlmtrain.eval.report import metrics_table

# 20 images x 5 references: mixed case, punctuation, apostrophes, hyphens, digits, a non-ASCII word.
REFERENCES: dict[int, list[str]] = {
    391895: [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
        "A dirt path with a young person on a motor bike rests to the foreground of a verdant area.",
        "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
    ],
    522418: [
        "A woman wearing a net on her head cutting a cake.",
        "A woman cutting a large white sheet cake.",
        "A woman wearing a hair net cutting a large sheet cake.",
        "there is a woman that is cutting a white cake",
        "A woman marking a cake with the back of a chef's knife.",
    ],
    184613: [
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
        "a young boy barefoot holding an umbrella touching the horn of a cow",
        "A young boy with an umbrella who is touching the horn of a cow.",
        "A boy holding an umbrella while standing next to livestock.",
    ],
    318219: [
        "A young boy standing in front of a computer keyboard.",
        "a little boy wearing headphones and looking at a computer monitor",
        "He is listening intently to the computer at school.",
        "A young boy stares up at the computer monitor.",
        "a young kid with head phones on using a computer",
    ],
    554625: [
        "A boy wearing headphones using one computer in a long row of computers.",
        "A little boy with earphones on listening to something.",
        "A group of people sitting at desk using computers.",
        "Children sitting at computer stations on a long table.",
        "A small child wearing headphones plays on the computer.",
    ],
    397133: [
        "A man is in a kitchen making pizzas.",
        "Man in apron standing on front of oven with pans and bakeware",
        "A baker is working in the kitchen rolling dough.",
        "A person standing by a stove in a kitchen.",
        "A table with pies being made and a person standing near a wall with pots and pans hanging on the wall.",
    ],
    37777: [
        "The dining table near the kitchen has a bowl of fruit on it.",
        "A small kitchen has various appliances and a table.",
        "The kitchen is clean and ready for us to see.",
        "A kitchen and dining area decorated in white.",
        "A kitchen that has a bowl of fruit on the table.",
    ],
    252219: [
        "A person on a skateboard and bike at a red light.",
        "Three people on skateboards and a bike wait at a crosswalk.",
        "A man and a woman on skateboards wait to cross the street!",
        "People waiting at a traffic light on bikes and skateboards.",
        "Two skateboarders and a biker waiting to cross a busy street.",
    ],
    87038: [
        "A person riding a skateboard on a brick sidewalk in a crowd.",
        "A skateboarder performs a trick in front of a crowd of onlookers.",
        "A man doing a skateboard trick in the middle of a plaza.",
        "Crowd watching a skateboarder doing tricks -- in the city.",
        "A skater jumps while people watch on a sunny day.",
    ],
    174482: [
        "A bicycle replica with a clock as the front wheel.",
        "The bike has a clock as a tire.",
        "A black metal bicycle with a clock inside the front wheel.",
        "A bicycle figurine in which the front wheel is replaced with a clock",
        "A clock with the appearance of the wheel of a bicycle",
    ],
    403385: [
        "A bathroom with a toilet, sink, and shower.",
        "A white toilet sitting next to a shower in a bathroom.",
        "Bathroom with a bathtub, a toilet and a sink in it.",
        "A bathroom that has a broken wall in the shower.",
        "A clean bathroom; the shower curtain is pulled back.",
    ],
    6818: [
        "A bathroom that is clean and white with a mirror.",
        "The bathroom has a sink, a mirror, and a toilet.",
        "A small white bathroom with a pedestal sink.",
        "Bathroom sink with a large mirror above it.",
        "An all-white bathroom with a window over the sink.",
    ],
    480985: [
        "Two giraffes standing in a grassy field next to trees.",
        "A pair of giraffes eating leaves from a tall tree.",
        "2 giraffes stand near the trees at the zoo.",
        "Giraffes are standing together in an enclosure.",
        "Two tall giraffes feed on the branches of a tree.",
    ],
    458054: [
        "A plate of food with broccoli, rice and chicken.",
        "A dinner plate with chicken and broccoli on it.",
        "Chicken stir-fry with vegetables served over rice.",
        "A white plate topped with meat and green vegetables.",
        "Someone's lunch: rice, broccoli and a piece of chicken.",
    ],
    331352: [
        "A train traveling down the tracks next to a platform.",
        "A red and yellow train pulls into the station.",
        "The commuter train is stopped at the station.",
        "A passenger train parked at a train station.",
        "A train on the tracks at a busy station platform.",
    ],
    296649: [
        "A cat sleeping on top of a laptop computer.",
        "A grey cat lies on the keyboard of a laptop.",
        "The cat is napping on the owner's laptop.",
        "A kitten curled up on an open laptop.",
        "A sleepy cat resting on a computer keyboard.",
    ],
    386164: [
        "A large jetliner flying through a blue sky.",
        "An airplane flies high in the clear blue sky.",
        "A commercial airplane in the air with its landing gear down.",
        "A white plane is flying over the clouds.",
        "A passenger jet soars across a cloudless sky.",
    ],
    15335: [
        "A group of people sitting around a table eating pizza.",
        "Friends share pizza and drinks at a restaurant.",
        "Four people having dinner together at a café.",
        "People are eating at a table with pizza on it.",
        "A family enjoys a meal of pizza at a restaurant.",
    ],
    579664: [
        "A bunch of bananas sitting on top of a wooden table.",
        "Several ripe bananas lie on a table.",
        "A bunch of yellow bananas on a kitchen counter.",
        "Bananas and an apple on a wooden surface.",
        "A hand of bananas is resting on the table.",
    ],
    200365: [
        "A dog catching a frisbee in a park.",
        "A brown dog leaps to catch a flying disc.",
        "The dog jumps high for the frisbee on the grass.",
        "A dog playing with a frisbee in a field.",
        "A puppy runs after a red frisbee.",
    ],
}
# Good, poor, a newline (COCOEvalCap turns it into a space), an empty caption, odd casing and punctuation.
PREDICTIONS: dict[int, str] = {
    391895: "A man riding a motorcycle on a dirt road.",
    522418: "a woman cutting a large white cake",
    184613: "A boy holding an umbrella next to a cow.",
    318219: "A young boy looking at a computer monitor.",
    554625: "Children sitting at computers in a row",
    397133: "A MAN IN A KITCHEN MAKING PIZZA!!",
    37777: "a kitchen with a table and a bowl of fruit",
    252219: "People on skateboards waiting to cross the street.",
    87038: "a skateboarder doing a trick\nin front of a crowd",
    174482: "A bicycle with a clock as the front wheel.",
    403385: "A bathroom with a toilet and a shower.",
    6818: "",
    480985: "Two giraffes standing next to trees.",
    458054: "A plate of chicken, rice & broccoli.",
    331352: "A train at the station.",
    296649: "A cat sleeping on a laptop.",
    386164: "an airplane flying in the sky",
    15335: "People eating pizza at a café.",
    579664: "A banana.",
    200365: "A dog (brown) catching a frisbee in the park...",
}
TOL = dict(rel=1e-9, abs=1e-12)


class _NoSpice:
    """Stands in for pycocoevalcap's Spice inside COCOEvalCap.evaluate (SPICE's models are not installed)."""

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        return 0.0, [0.0] * len(gts)

    def method(self) -> str:
        return "SPICE"


def _direct_pycocoevalcap(predictions: dict, references: dict) -> dict[str, float]:
    """pycocoevalcap's scorers called one by one on PTB-tokenized input, without vlmtrain code."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in references.items()})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    meteor_value, _ = meteor.compute_score(gts, res)
    del meteor  # its __del__ ends the Java process
    return {
        "Bleu_1": bleu[0],
        "Bleu_2": bleu[1],
        "Bleu_3": bleu[2],
        "Bleu_4": bleu[3],
        "METEOR": meteor_value,
        "ROUGE_L": float(Rouge().compute_score(gts, res)[0]),
        "CIDEr": float(Cider().compute_score(gts, res)[0]),
    }


def _official_cocoevalcap(references_json: Path, predictions_json: Path) -> dict[str, float]:
    """The real COCOEvalCap.evaluate() on the written files, with only SPICE stubbed out."""
    coco = COCO(str(references_json))
    evaluator = COCOEvalCap(coco, coco.loadRes(str(predictions_json)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pycocoevalcap_eval, "Spice", _NoSpice)
        evaluator.evaluate()
    return {name: evaluator.eval[name] for name in CAPTION_METRIC_NAMES}


@pytest.fixture(scope="module")
def caption_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, float]]:
    root = tmp_path_factory.mktemp("coco")
    references_json = write_coco_references(root / "refs.json", REFERENCES)
    predictions_json = write_coco_predictions(root / "preds.json", PREDICTIONS)
    runs = {
        "ours": compute_caption_metrics(PREDICTIONS, REFERENCES),
        "files": evaluate_with_coco_files(references_json, predictions_json),
        "official": _official_cocoevalcap(references_json, predictions_json),
        "direct": _direct_pycocoevalcap(PREDICTIONS, REFERENCES),
    }
    gc.collect()
    return runs


@pytest.mark.slow
def test_compute_caption_metrics_equals_direct_pycocoevalcap(caption_runs: dict) -> None:
    ours, direct = caption_runs["ours"], caption_runs["direct"]
    assert tuple(ours) == CAPTION_METRIC_NAMES
    for name in CAPTION_METRIC_NAMES:
        assert ours[name] == pytest.approx(direct[name], **TOL), name
    # Not a degenerate corpus: every score strictly between 0 and its maximum.
    assert all(0.05 < ours[name] < 1 for name in CAPTION_METRIC_NAMES if name != "CIDEr")
    assert 0.3 < ours["CIDEr"] < 10


@pytest.mark.slow
def test_coco_files_path_equals_official_cocoevalcap_and_direct(caption_runs: dict) -> None:
    for name in CAPTION_METRIC_NAMES:
        assert caption_runs["files"][name] == pytest.approx(caption_runs["official"][name], **TOL), name
        assert caption_runs["official"][name] == pytest.approx(caption_runs["direct"][name], **TOL), name


def _meteor_children() -> list[int]:
    """Child processes of this test process that run METEOR (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"meteor-1.5.jar" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_no_meteor_process_left_after_repeated_runs(caption_runs: dict) -> None:
    assert caption_runs["ours"] == caption_runs["files"]  # two separate METEOR processes agree exactly
    assert _meteor_children() == []


@pytest.mark.slow
def test_identical_prediction_scores_perfectly() -> None:
    refs = {
        7: ["A brown horse eats green grass."] * 5,
        8: ["Two children fly kites near water"] * 5,
        9: ["one old car parked beside a yellow wall"] * 5,
    }
    metrics = compute_caption_metrics({k: v[0] for k, v in refs.items()}, refs)
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"):
        assert metrics[name] == pytest.approx(1.0, abs=1e-8)  # BLEU's smoothing epsilon keeps it just below 1
    assert metrics["METEOR"] == pytest.approx(1.0)
    assert metrics["ROUGE_L"] == pytest.approx(1.0)
    # Every n-gram order has cosine 1 and no length penalty: 10 * mean_n(1).
    assert metrics["CIDEr"] == pytest.approx(10.0)


def test_ptb_tokenize_keeps_captions_aligned_across_carriage_returns() -> None:
    # Raw PTBTokenizer would split "dog\rruns" into two lines and hand "runs" to the next caption.
    tokenized = ptb_tokenize({1: ["A dog\rruns.", "Big\u2028cat"], 2: ["Last one!"]})
    assert tokenized == {1: ["a dog runs", "big cat"], 2: ["last one"]}


# ---------------------------------------------------------------------------------------------------
# METEOR process handling
# ---------------------------------------------------------------------------------------------------


def test_meteor_session_ends_process_and_releases_lock_after_failure() -> None:
    with pytest.raises(AssertionError), meteor_session() as session:
        meteor = session.meteor
        assert meteor.meteor_p.poll() is None
        # Two hypotheses for one image: compute_score asserts after taking its lock, leaving it held.
        meteor.compute_score({1: ["a dog"]}, {1: ["a dog", "a cat"]})
    assert meteor.meteor_p.returncode is not None
    assert not meteor.lock.locked()
    # Meteor.__del__ acquires the lock; with the lock still held it would block forever.
    finisher = threading.Thread(target=meteor.__del__, daemon=True)
    finisher.start()
    finisher.join(timeout=10)
    assert not finisher.is_alive()


def test_meteor_score_timeout_kills_process() -> None:
    # The JVM needs seconds to load its paraphrase table, so 10 ms always runs out.
    with pytest.raises(MeteorError, match="no answer within"):
        meteor_score({1: ["a dog runs"]}, {1: ["a dog"]}, timeout_s=0.01)


def test_meteor_score_reports_failure() -> None:
    with pytest.raises(MeteorError, match="METEOR failed"):
        meteor_score({1: ["a dog"]}, {1: ["a dog", "a cat"]})


# ---------------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------------


def test_missing_ids_are_listed() -> None:
    refs = {1: ["a cat"], 2: ["a dog"], 3: ["a cow"]}
    with pytest.raises(CaptionInputError, match=r"1 prediction id\(s\) have no references: 99") as err:
        compute_caption_metrics({1: "a cat", 2: "a dog", 3: "a cow", 99: "x"}, refs)
    assert "reference id(s) have no prediction" not in str(err.value)
    with pytest.raises(CaptionInputError, match=r"2 reference id\(s\) have no prediction: 2, 3"):
        compute_caption_metrics({1: "a cat"}, refs)


def test_many_missing_ids_are_previewed() -> None:
    refs = {i: ["a cat"] for i in range(12)}
    with pytest.raises(
        CaptionInputError,
        match=r"12 reference id\(s\) have no prediction: 0, 1, 2, 3, 4, \.\.\. \(\+7 more\)",
    ):
        compute_caption_metrics({}, refs)


def test_empty_reference_list_is_rejected() -> None:
    with pytest.raises(CaptionInputError, match="id 2 has an empty reference list"):
        compute_caption_metrics({1: "a", 2: "b"}, {1: ["a"], 2: []})


def test_mixed_id_types_and_bare_string_references_are_rejected() -> None:
    with pytest.raises(CaptionInputError, match="mix int and str"):
        compute_caption_metrics({"1": "a cat"}, {1: ["a cat"]})
    with pytest.raises(CaptionInputError, match="must be a list of str, got str"):
        compute_caption_metrics({1: "a cat"}, {1: "a cat"})


def test_coco_file_errors_name_the_file(tmp_path: Path) -> None:
    refs = write_coco_references(tmp_path / "refs.json", {1: ["a cat"], 2: ["a dog"]})
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}]))
    with pytest.raises(CaptionInputError, match=r"dup\.json: image_id 1 has more than one caption"):
        evaluate_with_coco_files(refs, dup)
    extra = write_coco_predictions(tmp_path / "extra.json", {1: "x", 2: "y", 5: "z"})
    with pytest.raises(CaptionInputError, match=r"extra\.json vs .*refs\.json.*have no references: 5"):
        evaluate_with_coco_files(refs, extra)
    with pytest.raises(CaptionInputError, match="does not exist"):
        evaluate_with_coco_files(tmp_path / "nope.json", extra)


# ---------------------------------------------------------------------------------------------------
# Java and SPICE
# ---------------------------------------------------------------------------------------------------


def test_require_java_reports_the_installed_version() -> None:
    version = require_java()
    assert java_major_version(version) >= 8


@pytest.mark.parametrize(
    ("version", "major"), [("1.8.0_292", 8), ("17.0.15", 17), ("11", 11), ("21-ea", 21), ("1.7.0_80", 7)]
)
def test_java_major_version(version: str, major: int) -> None:
    assert java_major_version(version) == major


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match="not found on PATH") as err:
        require_java()
    message = str(err.value)
    assert "METEOR" in message and "PTBTokenizer" in message
    assert "apt-get install -y openjdk-17-jre-headless" in message and "conda install" in message
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java anywhere
    with pytest.raises(JavaNotFoundError):
        compute_caption_metrics({1: "a cat"}, {1: ["a cat"]})


def _fake_java(folder: Path, stderr: str, status: int) -> None:
    java = folder / "java"
    java.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit {status}\n")
    java.chmod(0o755)


def test_broken_or_old_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    _fake_java(tmp_path, "Error: could not open jvm.cfg", 1)
    with pytest.raises(JavaNotFoundError, match=r"exited with status 1: .*jvm\.cfg"):
        require_java()
    _fake_java(tmp_path, 'java version "1.7.0_80"', 0)
    with pytest.raises(JavaNotFoundError, match=r"is Java 1\.7\.0_80, but Java 8\+ is needed"):
        require_java()


def test_spice_without_models_says_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(SpiceUnavailableError) as err:
        require_spice(tmp_path)
    message = str(err.value)
    for name in ("spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar"):
        assert str(tmp_path / name) in message
    assert "python -m pycocoevalcap.spice.get_stanford_models" in message
    monkeypatch.setattr(cm, "SPICE_DIR", tmp_path)
    with pytest.raises(SpiceUnavailableError, match="SPICE was requested"):
        compute_caption_metrics({1: "a cat"}, {1: ["a cat"]}, spice=True)


def test_spice_rejects_java_16_and_newer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in cm.SPICE_REQUIRED_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    monkeypatch.setattr(cm, "require_java", lambda: "17.0.15")
    with pytest.raises(SpiceUnavailableError, match=r"fails on Java 17\.0\.15"):
        require_spice(tmp_path)
    monkeypatch.setattr(cm, "require_java", lambda: "1.8.0_292")
    require_spice(tmp_path)  # complete files and Java 8: no error


# ---------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------


def test_writers_produce_files_pycocotools_reads(tmp_path: Path) -> None:
    refs = {"img-b": ["A dog.", "Un café"], "img-a": ["A cat."]}
    ref_path = write_coco_references(tmp_path / "sub" / "refs.json", refs)
    pred_path = write_coco_predictions(tmp_path / "preds.json", {"img-a": "cat", "img-b": "dog"})
    coco = COCO(str(ref_path))
    assert coco.getImgIds() == ["img-b", "img-a"]
    assert [a["caption"] for a in coco.imgToAnns["img-b"]] == ["A dog.", "Un café"]
    assert sorted(a["id"] for a in coco.dataset["annotations"]) == [1, 2, 3]
    res = coco.loadRes(str(pred_path))
    assert res.imgToAnns["img-a"][0]["caption"] == "cat"
    assert json.loads(pred_path.read_text()) == [
        {"image_id": "img-a", "caption": "cat"},
        {"image_id": "img-b", "caption": "dog"},
    ]
    # Atomic writes leave no temporary files behind and replace existing files.
    write_coco_predictions(pred_path, {"img-a": "a cat"})
    assert json.loads(pred_path.read_text()) == [{"image_id": "img-a", "caption": "a cat"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.json", "sub"]


def test_write_metrics_turns_nan_into_null(tmp_path: Path) -> None:
    path = write_metrics(
        tmp_path / "metrics.json", {"CIDEr": 1.25, "yes_no_accuracy": float("nan")}, {"n": 3}
    )
    assert json.loads(path.read_text()) == {
        "metrics": {"CIDEr": 1.25, "yes_no_accuracy": None},
        "meta": {"n": 3},
    }


# ---------------------------------------------------------------------------------------------------
# Constant-caption baseline
# ---------------------------------------------------------------------------------------------------

# Already PTB-normalized (lowercase, no punctuation), so brute force needs no tokenizer.
TINY_REFS: dict[int, list[str]] = {
    1: ["a dog runs on the grass", "a brown dog running", "dog playing in a field"],
    2: ["a cat sleeps on a sofa", "a cat lying on a couch", "a sleeping cat"],
    3: ["a man rides a horse", "a person riding a brown horse", "a man on a horse in a field"],
    4: ["two dogs play in the snow", "dogs running in snow", "a dog in the snow"],
    5: ["a red car on a street", "a car parked on the street", "a red car"],
    6: ["a bowl of fruit on a table", "fruit in a bowl", "apples and bananas on a table"],
}


def _brute_force_constant_cider(refs: dict[int, list[str]], candidate: str) -> float:
    return float(Cider().compute_score(refs, {i: [candidate] for i in refs})[0])


def test_constant_caption_cider_equals_pycocoevalcap() -> None:
    candidates = [c for caps in TINY_REFS.values() for c in caps]
    candidates += ["", "a", "zebra zebra zebra", "a dog a dog a dog on a horse in the snow on a red car"]
    fast = constant_caption_cider(TINY_REFS, candidates)
    slow = [_brute_force_constant_cider(TINY_REFS, c) for c in candidates]
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)
    assert fast.max() > 0.5  # the comparison is not between zeros


def test_candidate_pool_deduplicates_and_samples_deterministically() -> None:
    tokenized = ["a", "b", "a", "c", "d", "b", "e"]
    assert candidate_pool(tokenized, None) == [0, 1, 3, 4, 6]
    sample = candidate_pool(tokenized, 3, seed=0)
    assert len(sample) == 3 and sample == sorted(sample) and set(sample) <= {0, 1, 3, 4, 6}
    assert candidate_pool(tokenized, 3, seed=0) == sample
    assert candidate_pool(tokenized, 10) == [0, 1, 3, 4, 6]


def test_candidate_pool_always_keeps_the_most_frequent() -> None:
    # 100 distinct captions, "common k" repeated 50 - k times: under a cap of 12 with 5 kept by frequency, the
    # five most repeated are in every seed's pool, and the rest is a sample of the others.
    tokenized = [f"rare {i}" for i in range(90)] + [f"common {k}" for k in range(10) for _ in range(50 - k)]
    first = {t: tokenized.index(t) for t in tokenized}
    for seed in range(5):
        pool = candidate_pool(tokenized, 12, seed=seed, most_frequent=5)
        assert len(pool) == 12 and pool == sorted(pool)
        assert {first[f"common {k}"] for k in range(5)} <= set(pool)
    assert len({tuple(candidate_pool(tokenized, 12, seed=s, most_frequent=5)) for s in range(5)}) > 1


@pytest.mark.slow
def test_best_constant_caption_matches_brute_force() -> None:
    caption, metrics = best_constant_caption(TINY_REFS)
    brute = {c: _brute_force_constant_cider(TINY_REFS, c) for caps in TINY_REFS.values() for c in caps}
    best_score = max(brute.values())
    assert brute[caption] == pytest.approx(best_score, rel=1e-12)
    assert metrics["CIDEr"] == pytest.approx(best_score, rel=1e-9)
    assert tuple(metrics) == CAPTION_METRIC_NAMES


# ---------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------


def _render(table: object) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    return console.file.getvalue()


def test_metrics_table_scales_like_table_vi() -> None:
    paper_coco = {"Bleu_1": 0.792, "Bleu_2": 0.634, "Bleu_3": 0.486, "Bleu_4": 0.367}
    paper_coco |= {"METEOR": 0.291, "ROUGE_L": 0.584, "CIDEr": 1.271}
    baseline = {name: 0.1 for name in CAPTION_METRIC_NAMES} | {"CIDEr": float("nan")}
    text = _render(metrics_table([("ours", paper_coco), ("constant", baseline)], "COCO"))
    assert "B1" in text and "ROUGE-L" in text and "SPICE" not in text
    ours_line = next(line for line in text.splitlines() if "ours" in line)
    cells = [cell.strip() for cell in ours_line.split("│")[2:9]]
    assert cells == ["79.2", "63.4", "48.6", "36.7", "29.1", "58.4", "127.1"]
    assert "–" in next(line for line in text.splitlines() if "constant" in line)
    transposed = _render(metrics_table([("COCO", paper_coco)], "Table VI", metrics_as_rows=True))
    assert any("CIDEr" in line and "127.1" in line for line in transposed.splitlines())
    with_spice = _render(metrics_table([("s", paper_coco | {"SPICE": 0.2}), ("t", paper_coco)], "x"))
    assert "SPICE" in with_spice and "20.0" in with_spice


def test_metrics_table_rejects_rows_without_known_metrics() -> None:
    with pytest.raises(ValueError, match="row 'typo' has none of the metrics"):
        metrics_table([("typo", {"bleu1": 0.5})], "x")
