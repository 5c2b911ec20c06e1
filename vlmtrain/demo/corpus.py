"""Write the demo corpus: PNG images plus LLaVA JSON, Karpathy-split JSON and VQA JSONL files about them."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmtrain.data.answers import YES_NO
from vlmtrain.data.prompt import CAPTION_PROMPT
from vlmtrain.demo import text
from vlmtrain.demo.scenes import MIN_IMAGE_SIZE, Scene, sample_scene, scene_split

SPLITS: tuple[str, ...] = ("train", "test")
CAPTIONS_PER_IMAGE = 5
# Questions per image (a caption opening counts as one): the test split's always, the train split's by default.
MIN_TURNS, MAX_TURNS = 2, 4

# One drawn scene in TEST_EVERY (by content hash) belongs to the test split; see scenes.scene_split.
TEST_EVERY = 8
# Share of image conversations in the instruction set that open with a caption request (short or
# detailed), so that a stage-3 model keeps captioning, as in LLaVA-Next's mixture.
CAPTION_TURN_SHARE = 0.2
# Text-only conversations make up this share of the instruction set (LLaVA-Next mixes in text-only data).
TEXT_ONLY_SHARE = 0.05

# Independent random streams, so e.g. the scene of test image 7 does not depend on how text was drawn.
_STREAM_SCENES = {"train": 0, "test": 1}
_STREAM_TEXT = {"train": 2, "test": 3}
_STREAM_TEXT_ONLY = 4
_STREAM_INSTRUCT_ORDER = 5


@dataclass(frozen=True)
class CorpusPaths:
    """Where write_corpus put each file; image paths in the JSON files are relative to `images`."""

    root: Path
    """The output folder."""
    images: Path
    """Image root holding train/NNNNNN.png and test/NNNNNN.png."""
    recap_train: Path
    """LLaVA JSON: one detailed recap per train image (stages 0-2)."""
    short_train: Path
    """LLaVA JSON: one short human-style caption per train image (recap vs short comparison)."""
    instruct_train: Path
    """LLaVA JSON: multi-turn Q&A on train images plus text-only conversations (stage 3)."""
    karpathy: Path
    """Karpathy-split JSON over all images, five reference captions each."""
    vqa_test: Path
    """JSONL: single-turn questions on test images with exact answers."""
    vqa_train: Path
    """JSONL: the questions of the first n_test train images, single-turn and in vqa_test's format, to score
    how well a model answers the questions it was trained on (fit) next to the test ones (generalisation)."""
    vqa_train_answers: Path
    """JSON: answer counts of the train questions, for the majority-answer baseline."""
    scenes_train: Path
    """JSONL: the scene behind every train image."""
    scenes_test: Path
    """JSONL: the scene behind every test image."""
    info: Path
    """JSON: generation parameters and counts."""


_Conversation = tuple[tuple[str, str] | None, tuple[text.QA, ...]]
"""(optional caption opening as (prompt, answer), questions) of one instruction conversation."""


@dataclass(frozen=True)
class _Sample:
    """Everything written about one image."""

    split: str
    index: int
    scene: Scene
    captions: tuple[str, ...]
    recap: str
    questions: tuple[text.QA, ...]
    opening: tuple[str, str] | None
    """An optional (prompt, answer) caption request that opens the instruction conversation."""
    more: tuple[_Conversation, ...] = ()
    """Further (opening, questions) conversations about the same image (train only, `conversations` > 1)."""

    @property
    def conversations(self) -> tuple[_Conversation, ...]:
        """All (opening, questions) conversations about the image, the first one first."""
        return ((self.opening, self.questions), *self.more)

    @property
    def id(self) -> str:
        return f"{self.split}-{self.index:06d}"

    @property
    def image(self) -> str:
        return f"{self.split}/{self.index:06d}.png"


def corpus_paths(out: Path) -> CorpusPaths:
    """The paths write_corpus uses under `out`."""
    return CorpusPaths(
        root=out,
        images=out / "images",
        recap_train=out / "recap_train.json",
        short_train=out / "short_train.json",
        instruct_train=out / "instruct_train.json",
        karpathy=out / "karpathy_shapes.json",
        vqa_test=out / "vqa_test.jsonl",
        vqa_train=out / "vqa_train.jsonl",
        vqa_train_answers=out / "vqa_train_answers.json",
        scenes_train=out / "scenes_train.jsonl",
        scenes_test=out / "scenes_test.jsonl",
        info=out / "corpus_info.json",
    )


def draw_scenes(split: str, n: int, seed: int) -> tuple[list[Scene], int]:
    """The first `n` scenes of `split` for `seed`, and how many draws were rejected as the other split's."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, _STREAM_SCENES[split]])
    scenes: list[Scene] = []
    rejected = 0
    while len(scenes) < n:
        scene = sample_scene(rng)
        if scene_split(scene, TEST_EVERY) == split:
            scenes.append(scene)
        else:
            rejected += 1
    return scenes, rejected


def check_conversations(n: int) -> None:
    """Raise unless `n` is a usable number of conversations per training image."""
    if n < 1:
        raise ValueError(f"conversations {n}: need at least one conversation per training image")


CAPTION_TURNS: tuple[str, ...] = ("random", "consensus")
"""How a training conversation's short-caption opening picks its answer among the image's references."""


def check_caption_turn(caption_turn: str) -> None:
    """Raise unless `caption_turn` is one of CAPTION_TURNS."""
    if caption_turn not in CAPTION_TURNS:
        raise ValueError(f"caption_turn {caption_turn!r}: use one of {', '.join(CAPTION_TURNS)}")


def check_train_turns(turns: tuple[int, int]) -> None:
    """Raise unless `turns` bounds a training conversation: a caption opening takes one of at least 2 turns, and
    an image has at most text.MAX_QUESTIONS question forms."""
    if len(turns) != 2 or not 2 <= turns[0] <= turns[1] <= text.MAX_QUESTIONS:
        raise ValueError(
            f"train_turns {turns}: need min,max with 2 <= min <= max <= {text.MAX_QUESTIONS} (question forms per image)"
        )


def write_corpus(
    out: Path,
    n_train: int,
    n_test: int,
    image_size: int = 64,
    seed: int = 0,
    *,
    train_turns: tuple[int, int] = (MIN_TURNS, MAX_TURNS),
    conversations: int = 1,
    caption_turn: str = "random",
    overwrite: bool = False,
) -> CorpusPaths:
    """Generate the demo corpus under `out`; the same arguments always give byte-identical files.

    `train_turns` bounds the turns of a training image's conversation (stage 3's data); test images keep
    MIN_TURNS..MAX_TURNS questions, so the VQA test set does not depend on it. Each training image gets
    `conversations` independently drawn conversations in the instruction set (the first one is the same for
    any value), so that stage 3 can see new questions about an image instead of repeating one conversation.
    `caption_turn` (CAPTION_TURNS) picks the short caption a conversation's caption opening answers with:
    `random`, one of the image's references, or `consensus`, the one most like the others
    (text.consensus_caption).

    Refuses to write over an earlier corpus in `out` unless `overwrite`, which then deletes only the
    files and the image folder this function writes.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(
            f"need at least one train and one test image, got n_train={n_train}, n_test={n_test}"
        )
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size {image_size} is below {MIN_IMAGE_SIZE}; shapes would merge at that size"
        )
    check_train_turns(train_turns)
    check_conversations(conversations)
    check_caption_turn(caption_turn)
    paths = corpus_paths(Path(out))
    _prepare_output(paths, overwrite)

    samples: dict[str, list[_Sample]] = {}
    rejected: dict[str, int] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        scenes, rejected[split] = draw_scenes(split, n, seed)
        turns = train_turns if split == "train" else (MIN_TURNS, MAX_TURNS)
        more = conversations - 1 if split == "train" else 0
        samples[split] = [
            _describe(split, i, scene, seed, turns, more, caption_turn) for i, scene in enumerate(scenes)
        ]
        _write_images(paths.images / split, samples[split], image_size)

    instruct = _instruct_records(samples["train"], seed)
    _write_json(paths.recap_train, [_caption_record(s, text.RECAP_PROMPT, s.recap) for s in samples["train"]])
    _write_json(paths.short_train, [_short_record(s, seed) for s in samples["train"]])
    _write_json(paths.instruct_train, instruct)
    _write_json(paths.karpathy, _karpathy(samples["train"] + samples["test"]))
    vqa_rows = [_vqa_row(s, k, qa) for s in samples["test"] for k, qa in enumerate(s.questions)]
    _write_jsonl(paths.vqa_test, vqa_rows)
    # The questions of the training conversations without their context (no caption opening, no earlier
    # turns): the same form as a test question, so the two accuracies compare fit with generalisation.
    _write_jsonl(
        paths.vqa_train,
        [_vqa_row(s, k, qa) for s in samples["train"][:n_test] for k, qa in enumerate(s.questions)],
    )
    _write_json(paths.vqa_train_answers, _answer_counts(samples["train"]))
    _write_jsonl(paths.scenes_train, [_scene_row(s) for s in samples["train"]])
    _write_jsonl(paths.scenes_test, [_scene_row(s) for s in samples["test"]])
    _write_json(paths.info, _info(n_train, n_test, image_size, seed, rejected, instruct, vqa_rows))
    return paths


# ---------------------------------------------------------------------------------------------------
# Text for one image


def _describe(
    split: str,
    index: int,
    scene: Scene,
    seed: int,
    turns: tuple[int, int],
    more: int = 0,
    caption_turn: str = "random",
) -> _Sample:
    rng = np.random.default_rng([seed, _STREAM_TEXT[split], index])
    captions = text.captions(scene, rng, CAPTIONS_PER_IMAGE)
    recap = text.recap(scene, rng)
    # Once per image: every conversation about it that opens with a short caption answers with this one.
    consensus = text.consensus_caption(captions) if caption_turn == "consensus" and split == "train" else None
    opening, questions = _conversation(split, scene, captions, recap, turns, rng, consensus)
    extra = tuple(
        _conversation(
            split,
            scene,
            captions,
            recap,
            turns,
            np.random.default_rng([seed, _STREAM_TEXT[split], index, 2 + k]),
            consensus,
        )
        for k in range(more)
    )
    return _Sample(split, index, scene, captions, recap, questions, opening, extra)


def _conversation(
    split: str,
    scene: Scene,
    captions: tuple[str, ...],
    recap: str,
    turns: tuple[int, int],
    rng: np.random.Generator,
    consensus: str | None,
) -> _Conversation:
    """One conversation about the scene: an optional caption opening (answered with `consensus` if given, else
    with one of `captions` at random), then questions of different forms."""
    n_turns = int(rng.integers(turns[0], turns[1] + 1))
    opening: tuple[str, str] | None = None
    # Test images get no caption opening: their questions become the single-turn VQA set.
    if split == "train" and rng.random() < CAPTION_TURN_SHARE:
        if rng.random() < 0.5:
            drawn = captions[int(rng.integers(len(captions)))]  # drawn either way: the same later draws
            opening = (CAPTION_PROMPT, consensus or drawn)
        else:
            opening = (text.RECAP_PROMPT, recap)
        n_turns -= 1
    return opening, text.questions(scene, rng, n_turns)


# ---------------------------------------------------------------------------------------------------
# Records in the public formats


def _caption_record(sample: _Sample, prompt: str, answer: str) -> dict[str, object]:
    return {
        "id": sample.id,
        "image": sample.image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": answer},
        ],
    }


def _short_record(sample: _Sample, seed: int) -> dict[str, object]:
    # Which of the five references is used is drawn per image from its own stream, so it is stable.
    rng = np.random.default_rng([seed, _STREAM_TEXT["train"], sample.index, 1])
    caption = sample.captions[int(rng.integers(len(sample.captions)))]
    return _caption_record(sample, CAPTION_PROMPT, caption)


def _turns(pairs: list[tuple[str, str]], with_image: bool) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(pairs):
        value = f"<image>\n{question}" if with_image and i == 0 else question
        turns.append({"from": "human", "value": value})
        turns.append({"from": "gpt", "value": answer})
    return turns


MORE_SUFFIX = "-more"
"""Ends the id of every instruction record that `conversations` > 1 adds (see is_first_conversation)."""


def is_first_conversation(record_id: str) -> bool:
    """Whether an instruction record is one that `conversations=1` writes too: the warm starts read only
    those, so that more conversations change stage 3's data and nothing before it."""
    return MORE_SUFFIX not in record_id


def _instruct_records(train: list[_Sample], seed: int) -> list[dict[str, object]]:
    """The conversations=1 records in their fixed order, then the extra conversations (image and text-only
    at the same share) in an order of their own, so the first part does not depend on how many there are."""
    rng = np.random.default_rng([seed, _STREAM_TEXT_ONLY])
    parts: list[list[dict[str, object]]] = []
    for k in range(len(train[0].conversations) if train else 1):  # every training sample has as many
        suffix = "" if k == 0 else f"{MORE_SUFFIX}{k}"
        records: list[dict[str, object]] = []
        for s in train:
            opening, questions = s.conversations[k]
            pairs = [opening] if opening is not None else []
            pairs += [(qa.question, qa.answer) for qa in questions]
            records.append(
                {"id": s.id + suffix, "image": s.image, "conversations": _turns(pairs, with_image=True)}
            )
        # n_text / (n_image + n_text) = TEXT_ONLY_SHARE
        n_text = max(1, round(len(records) * TEXT_ONLY_SHARE / (1 - TEXT_ONLY_SHARE)))
        for i in range(n_text):
            qas = text.text_only_questions(rng, int(rng.integers(1, 3)))
            pairs = [(qa.question, qa.answer) for qa in qas]
            records.append({"id": f"text-{i:06d}{suffix}", "conversations": _turns(pairs, with_image=False)})
        stream = [seed, _STREAM_INSTRUCT_ORDER] if k == 0 else [seed, _STREAM_INSTRUCT_ORDER, k]
        order = np.random.default_rng(stream).permutation(len(records))
        parts.append([records[int(i)] for i in order])
    return [r for part in parts for r in part]


def _karpathy_tokens(sentence: str) -> list[str]:
    # Karpathy's files hold lower-cased words with punctuation removed.
    return re.findall(r"[a-z0-9]+", sentence.lower())


def _karpathy(samples: list[_Sample]) -> dict[str, object]:
    images = []
    for imgid, s in enumerate(samples):
        sentids = [imgid * CAPTIONS_PER_IMAGE + k for k in range(len(s.captions))]
        sentences = [
            {"tokens": _karpathy_tokens(c), "raw": c, "imgid": imgid, "sentid": sentid}
            for c, sentid in zip(s.captions, sentids, strict=True)
        ]
        images.append(
            {
                "filepath": s.split,
                "filename": f"{s.index:06d}.png",
                "imgid": imgid,
                "split": s.split,
                "sentences": sentences,
                "sentids": sentids,
            }
        )
    return {"dataset": "shapes", "images": images}


def _vqa_row(sample: _Sample, k: int, qa: text.QA) -> dict[str, object]:
    return {
        "id": f"{sample.id}-q{k}",
        "image": sample.image,
        "question": qa.question,
        "answer": qa.answer,
        "answer_type": qa.answer_type,
        "question_type": qa.question_type,
    }


def _answer_counts(train: list[_Sample]) -> dict[str, object]:
    by_answer_type: dict[str, Counter[str]] = {}
    by_question_type: dict[str, Counter[str]] = {}
    for s in train:
        for qa in (qa for _, questions in s.conversations for qa in questions):
            by_answer_type.setdefault(qa.answer_type, Counter())[qa.answer] += 1
            by_question_type.setdefault(qa.question_type, Counter())[qa.answer] += 1
    return {
        "source": "instruct_train.json (image questions; caption openings and text-only turns excluded)",
        "by_answer_type": _sorted_counts(by_answer_type),
        "by_question_type": _sorted_counts(by_question_type),
    }


def _sorted_counts(table: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
    return {key: dict(sorted(table[key].items())) for key in sorted(table)}


def _scene_row(sample: _Sample) -> dict[str, object]:
    return {"id": sample.id, "image": sample.image, **sample.scene.to_json()}


def _info(
    n_train: int,
    n_test: int,
    image_size: int,
    seed: int,
    rejected: dict[str, int],
    instruct: list[dict[str, object]],
    vqa_rows: list[dict[str, object]],
) -> dict[str, object]:
    yes_no = Counter(str(r["answer"]) for r in vqa_rows if r["answer_type"] == YES_NO)
    return {
        "generator": "vlmtrain.demo.corpus.write_corpus",
        "n_train": n_train,
        "n_test": n_test,
        "image_size": image_size,
        "seed": seed,
        "test_every": TEST_EVERY,
        "scene_draws_rejected_as_other_split": rejected,
        "instruct_records": {
            "with_image": sum("image" in r for r in instruct),
            "text_only": sum("image" not in r for r in instruct),
        },
        "vqa_test_questions": len(vqa_rows),
        "vqa_test_yes_no_answers": dict(sorted(yes_no.items())),
    }


# ---------------------------------------------------------------------------------------------------
# Files


def _prepare_output(paths: CorpusPaths, overwrite: bool) -> None:
    ours = [
        paths.images,
        paths.recap_train,
        paths.short_train,
        paths.instruct_train,
        paths.karpathy,
        paths.vqa_test,
        paths.vqa_train,
        paths.vqa_train_answers,
        paths.scenes_train,
        paths.scenes_test,
        paths.info,
    ]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{paths.root} already holds a demo corpus ({existing[0].name} exists); "
            "choose another folder or pass overwrite=True to replace it"
        )
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    paths.root.mkdir(parents=True, exist_ok=True)


def _write_images(folder: Path, samples: list[_Sample], image_size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in samples:
        s.scene.render(image_size).save(folder / f"{s.index:06d}.png", format="PNG")


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
