"""VQA metrics: the official VQA v2 answer normalization and accuracy, PathVQA yes/no and open-ended scores, and a majority-answer baseline.

The normalization reproduces `processPunctuation` + `processDigitArticle` of the official evaluation
(GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py) including its quirks, so that scores
match the official numbers: the period regex's broken look-behind, `re.UNICODE` passed where `count`
belongs (at most 32 periods are removed), and the contraction table with its odd entries.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

QuestionId = Hashable

YES_NO = "yes/no"
OPEN = "open"
ANSWER_TYPES: tuple[str, ...] = (YES_NO, OPEN)

# Punctuation of the official eval; "'" and ":" are deliberately absent, and "." is handled separately.
VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
VQA_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# The official table, unchanged (capitalized keys never match after lowercasing; "somebody'd" maps to
# "somebodyd"): changing it would change scores.
VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

# "(?!<=\d)" was meant as a look-behind; as written it is a look-ahead that never fails before a ".".
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: the flag lands in `count`.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


class VQAInputError(ValueError):
    """Predictions/answers/answer types that cannot be scored together."""


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: drop or space out punctuation, drop periods not before a digit."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in VQA_PUNCTUATION:
        # Punctuation next to a space (or any text with a "1,000"-style number) is removed outright;
        # elsewhere it separates words ("left-upper" -> "left upper").
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lowercase, number words -> digits, drop articles, fix contractions."""
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES]
    return " ".join(words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The official normalization of a predicted answer: whitespace, punctuation, digits, articles."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


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


def infer_answer_type(answer: str) -> str:
    """ "yes/no" when the normalized answer is "yes" or "no", else "open" (PathVQA's closed/open split)."""
    return YES_NO if normalize_answer(answer) in ("yes", "no") else OPEN


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
