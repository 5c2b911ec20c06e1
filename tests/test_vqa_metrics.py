"""VQA metrics on hand-checked cases: official VQA v2 normalization and accuracy, PathVQA scores, majority baseline, table."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from vlmtrain.data.answers import OPEN, YES_NO, infer_answer_type, normalize_answer, process_punctuation
from vlmtrain.eval.report import vqa_table
from vlmtrain.eval.vqa_metrics import (
    VQAInputError,
    majority_answer_baseline,
    pathvqa_metrics,
    token_f1,
    vqa_accuracy,
    vqa_item_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("the cat.", "cat"),
        ("An apple", "apple"),
        ("isnt", "isn't"),
        ("isn't", "isn't"),  # apostrophes are not punctuation in the official list
        ("dont know", "don't know"),
        ("Yes!", "yes"),
        ("yes, it is", "yes it is"),  # "," next to a space is removed
        ("left-upper lobe", "left upper lobe"),  # "-" between words becomes a space
        ("left - upper", "left upper"),  # "-" next to a space is removed
        ("1,000 cells", "1000 cells"),  # a digit comma removes all punctuation outright
        ("3.5 cm", "3.5 cm"),  # a period before a digit stays
        ("  A   dog\tbarks\n", "dog barks"),
        ("(a) red", "red"),
        ("U.S.A", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_period_strip_stops_after_32_like_the_official_eval() -> None:
    # The official code passes re.UNICODE (32) where `count` goes.
    assert process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize(
    ("prediction", "reference", "f1"),
    [
        ("left upper lobe", "upper lobe", 0.8),  # P = 2/3, R = 1
        ("The collagen", "collagen", 1.0),
        ("kidney", "liver", 0.0),
        ("cells cells", "cells", 2 / 3),  # P = 1/2, R = 1
        ("the", "", 1.0),  # both empty after normalization
        ("a cat", "", 0.0),
        ("two nuclei", "2 nuclei", 1.0),
    ],
)
def test_token_f1(prediction: str, reference: str, f1: float) -> None:
    assert token_f1(prediction, reference) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("matching_humans", "accuracy"),
    [
        (0, 0.0),
        # 1 of the 9 leave-one-out subsets drop the match (0/3), the other 9 keep it (1/3): 9 * (1/3) / 10.
        (1, 0.3),
        # 2 subsets lose a match (1/3), 8 keep both (2/3): (2/3 + 16/3) / 10.
        (2, 0.6),
        # 3 subsets keep 2 matches (2/3), 7 keep 3 (1): (2 + 7) / 10.
        (3, 0.9),
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_item_accuracy_over_leave_one_out_subsets(matching_humans: int, accuracy: float) -> None:
    others = ["blue", "green", "red", "white", "black", "pink", "gray", "brown", "tan", "gold"]
    humans = ["2"] * matching_humans + others[: 10 - matching_humans]
    assert vqa_item_accuracy("Two.", humans) == pytest.approx(accuracy)


def test_vqa_accuracy_keeps_the_official_normalization_asymmetry() -> None:
    # Humans that agree are compared raw, as the official eval does (its answers are pre-normalized).
    assert vqa_item_accuracy("two", ["Two"] * 10) == 0.0
    assert vqa_item_accuracy("two", ["2"] * 10) == 1.0
    # Disagreeing humans get process_punctuation only: "yes." matches a normalized "yes", but "yes!"
    # becomes "yes " (the "!" turns into a space that nothing strips) and matches nothing.
    assert vqa_item_accuracy("Yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_item_accuracy("Yes", ["yes!"] * 3 + ["no"] * 7) == 0.0
    predictions = {1: "2", 2: "red", 3: "no"}
    answers = {1: ["2"] * 10, 2: ["red"] * 2 + ["blue"] * 8, 3: ["yes"] * 10}
    assert vqa_accuracy(predictions, answers) == pytest.approx((1.0 + 0.6 + 0.0) / 3)


def test_vqa_accuracy_rejects_mismatched_ids_and_bare_strings() -> None:
    with pytest.raises(VQAInputError, match=r"1 only in answers \(2\)"):
        vqa_accuracy({1: "a"}, {1: ["a"], 2: ["b"]})
    with pytest.raises(VQAInputError, match="must be a list of human answers"):
        vqa_accuracy({1: "a"}, {1: "a"})


PATH_ANSWERS = {1: "yes", 2: "no", 3: "yes", 4: "no", 5: "upper lobe", 6: "collagen"}
PATH_TYPES = {1: YES_NO, 2: YES_NO, 3: YES_NO, 4: YES_NO, 5: OPEN, 6: OPEN}
PATH_PREDICTIONS = {1: "Yes.", 2: "yes", 3: "yes", 4: "maybe", 5: "left upper lobe", 6: "The collagen"}


def test_pathvqa_metrics_hand_checked() -> None:
    metrics = pathvqa_metrics(PATH_PREDICTIONS, PATH_ANSWERS, PATH_TYPES)
    assert metrics["yes_no_accuracy"] == pytest.approx(2 / 4)  # items 1 and 3
    assert metrics["open_exact_match"] == pytest.approx(1 / 2)  # item 6
    assert metrics["open_token_f1"] == pytest.approx((0.8 + 1.0) / 2)
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert (metrics["n_items"], metrics["n_yes_no"], metrics["n_open"]) == (6, 4, 2)
    assert metrics["n_yes_no_invalid"] == 1  # "maybe"


def test_pathvqa_metrics_type_without_items_is_nan() -> None:
    metrics = pathvqa_metrics({1: "yes", 2: "no"}, {1: "yes", 2: "yes"}, {1: YES_NO, 2: YES_NO})
    assert metrics["yes_no_accuracy"] == 0.5 and metrics["accuracy"] == 0.5
    assert math.isnan(metrics["open_exact_match"]) and math.isnan(metrics["open_token_f1"])
    assert metrics["n_open"] == 0


def test_pathvqa_metrics_errors() -> None:
    with pytest.raises(VQAInputError, match=r"1 only in answers \(6\)"):
        pathvqa_metrics({k: v for k, v in PATH_PREDICTIONS.items() if k != 6}, PATH_ANSWERS, PATH_TYPES)
    with pytest.raises(VQAInputError, match=r"question 1 has 'closed'.*infer_answer_type"):
        pathvqa_metrics(PATH_PREDICTIONS, PATH_ANSWERS, PATH_TYPES | {1: "closed"})
    with pytest.raises(VQAInputError, match="predictions is empty"):
        pathvqa_metrics({}, {}, {})


def test_infer_answer_type() -> None:
    assert [infer_answer_type(a) for a in ("Yes", "no.", "yes, it is", "collagen")] == [
        YES_NO,
        YES_NO,
        OPEN,
        OPEN,
    ]


def test_majority_answer_baseline_per_answer_type() -> None:
    train = {1: "yes", 2: "Yes", 3: "no", 4: "yes", 5: "no", 6: "collagen", 7: "Collagen.", 8: "lung"}
    train_types = {k: infer_answer_type(v) for k, v in train.items()}
    test = {10: "yes", 11: "no", 12: "yes", 13: "collagen", 14: "liver"}
    test_types = {k: infer_answer_type(v) for k, v in test.items()}
    chosen, metrics = majority_answer_baseline(train, train_types, test, test_types)
    assert chosen == {YES_NO: "yes", OPEN: "collagen"}
    assert metrics["yes_no_accuracy"] == pytest.approx(2 / 3)
    assert metrics["open_exact_match"] == pytest.approx(1 / 2)
    assert metrics["accuracy"] == pytest.approx(3 / 5)


def test_majority_answer_ties_and_unseen_types() -> None:
    chosen, _ = majority_answer_baseline({1: "no", 2: "yes"}, {1: YES_NO, 2: YES_NO}, {3: "yes"}, {3: YES_NO})
    assert chosen == {YES_NO: "no"}  # a tie goes to the alphabetically first answer
    with pytest.raises(
        VQAInputError, match=r"answer type\(s\) \['open'\] occur in the test answers but never"
    ):
        majority_answer_baseline({1: "yes"}, {1: YES_NO}, {3: "lung"}, {3: OPEN})


def test_vqa_table() -> None:
    metrics = pathvqa_metrics(PATH_PREDICTIONS, PATH_ANSWERS, PATH_TYPES)
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(vqa_table([("ours", metrics)], "PathVQA"))
    line = next(line for line in console.file.getvalue().splitlines() if "ours" in line)
    assert [cell.strip() for cell in line.split("│")[2:8]] == ["50.0", "50.0", "50.0", "90.0", "4", "2"]
