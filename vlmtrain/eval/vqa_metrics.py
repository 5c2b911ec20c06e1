"""VQA metrics: the official VQA v2 accuracy, PathVQA yes/no and open-ended scores, and a majority-answer baseline.

Answers are normalised by `vlmtrain.data.answers` (the official VQA v2 normalisation), the same module sharding
types answers with.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from vlmtrain.data.answers import (
    ANSWER_TYPES,
    OPEN,
    YES_NO,
    normalize_answer,
    process_punctuation,
)

QuestionId = Hashable


class VQAInputError(ValueError):
    """Predictions/answers/answer types that cannot be scored together."""


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between two normalized answers (1.0 when both are empty)."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _preview(ids: Sequence[QuestionId], k: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:k])
    return shown + (f", ... (+{len(ids) - k} more)" if len(ids) > k else "")


def _check_same_ids(named: Mapping[str, Mapping[QuestionId, object]]) -> None:
    (first_name, first), *others = named.items()
    if not first:
        raise VQAInputError(f"{first_name} is empty: nothing to score")
    for name, other in others:
        only_first = [i for i in first if i not in other]
        only_other = [i for i in other if i not in first]
        if only_first or only_other:
            raise VQAInputError(
                f"{first_name} and {name} must have the same question ids: "
                f"{len(only_first)} only in {first_name} ({_preview(only_first)}), "
                f"{len(only_other)} only in {name} ({_preview(only_other)})"
            )


def _check_answer_types(answer_types: Mapping[QuestionId, str]) -> None:
    bad = [i for i, t in answer_types.items() if t not in ANSWER_TYPES]
    if bad:
        raise VQAInputError(
            f"answer types must be one of {ANSWER_TYPES}; question {bad[0]!r} has {answer_types[bad[0]]!r} "
            f"({len(bad)} bad in total). infer_answer_type(answer) derives them from the answers."
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def vqa_item_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official VQA v2 accuracy of one answer: min(#matching humans / 3, 1) averaged over leave-one-out subsets.

    As in the official eval, the prediction is fully normalized, while the human answers (already
    normalized when the dataset was built) only get `process_punctuation`, and only when they disagree.
    """
    if not human_answers:
        raise VQAInputError("vqa_item_accuracy: no human answers")
    pred = normalize_answer(prediction)
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [process_punctuation(a) for a in humans]
    per_subset = []
    for k in range(len(humans)):
        others = humans[:k] + humans[k + 1 :]
        per_subset.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(per_subset) / len(per_subset)


def vqa_accuracy(predictions: Mapping[QuestionId, str], answers: Mapping[QuestionId, Sequence[str]]) -> float:
    """Mean official VQA v2 accuracy over questions; `answers[qid]` holds the (usually 10) human answers."""
    _check_same_ids({"predictions": predictions, "answers": answers})
    for qid, humans in answers.items():
        if isinstance(humans, str):
            raise VQAInputError(f"answers[{qid!r}] must be a list of human answers, got a str")
    return _mean([vqa_item_accuracy(predictions[q], answers[q]) for q in answers])


def pathvqa_metrics(
    predictions: Mapping[QuestionId, str],
    answers: Mapping[QuestionId, str],
    answer_types: Mapping[QuestionId, str],
) -> dict[str, float]:
    """PathVQA scores on normalized answers; a type with no items scores NaN.

    Keys: accuracy (exact match over all items), yes_no_accuracy, open_exact_match, open_token_f1, and the
    counts n_items, n_yes_no, n_open, n_yes_no_invalid (yes/no items answered with neither yes nor no).
    """
    _check_same_ids({"predictions": predictions, "answers": answers, "answer_types": answer_types})
    _check_answer_types(answer_types)
    exact: dict[str, list[float]] = {YES_NO: [], OPEN: []}
    open_f1: list[float] = []
    invalid = 0
    for qid, answer in answers.items():
        pred = normalize_answer(predictions[qid])
        kind = answer_types[qid]
        exact[kind].append(float(pred == normalize_answer(answer)))
        if kind == OPEN:
            open_f1.append(token_f1(predictions[qid], answer))
        elif pred not in ("yes", "no"):
            invalid += 1
    return {
        "accuracy": _mean(exact[YES_NO] + exact[OPEN]),
        "yes_no_accuracy": _mean(exact[YES_NO]),
        "open_exact_match": _mean(exact[OPEN]),
        "open_token_f1": _mean(open_f1),
        "n_items": len(answers),
        "n_yes_no": len(exact[YES_NO]),
        "n_open": len(exact[OPEN]),
        "n_yes_no_invalid": invalid,
    }


def majority_answers(
    answers: Mapping[QuestionId, str], answer_types: Mapping[QuestionId, str]
) -> dict[str, str]:
    """The most frequent normalized answer per answer type; ties go to the alphabetically first answer."""
    _check_same_ids({"answers": answers, "answer_types": answer_types})
    counts: dict[str, Counter[str]] = {}
    for qid, answer in answers.items():
        counts.setdefault(answer_types[qid], Counter())[normalize_answer(answer)] += 1
    return {kind: min(c.items(), key=lambda item: (-item[1], item[0]))[0] for kind, c in counts.items()}


def majority_answer_baseline(
    train_answers: Mapping[QuestionId, str],
    train_answer_types: Mapping[QuestionId, str],
    test_answers: Mapping[QuestionId, str],
    test_answer_types: Mapping[QuestionId, str],
) -> tuple[dict[str, str], dict[str, float]]:
    """Score always answering the most frequent training answer of the question's type (e.g. "yes" for yes/no).

    Returns the chosen answer per type and `pathvqa_metrics` of that constant-per-type prediction on test.
    """
    _check_same_ids({"test_answers": test_answers, "test_answer_types": test_answer_types})
    _check_answer_types(train_answer_types)
    _check_answer_types(test_answer_types)
    chosen = majority_answers(train_answers, train_answer_types)
    unseen = sorted({t for t in test_answer_types.values() if t not in chosen})
    if unseen:
        raise VQAInputError(
            f"answer type(s) {unseen} occur in the test answers but never in the training answers, so they "
            "have no majority answer; use a training split that covers every answer type"
        )
    predictions = {qid: chosen[test_answer_types[qid]] for qid in test_answers}
    return chosen, pathvqa_metrics(predictions, test_answers, test_answer_types)
