"""True text about a demo scene: short human-style captions, a detailed recap, and short-answer Q&A."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vlmtrain.data.answers import OPEN, YES_NO
from vlmtrain.demo.scenes import COLORS, GRID, KINDS, POSITION_NAMES, SIZES, Scene, Shape

NUMBER_WORDS: tuple[str, ...] = tuple(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
)

# Caption synonyms give the short captions the varied wording of human references; recaps and answers
# use only the canonical words, like machine-written text.
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
SHAPE_NOUNS: tuple[str, ...] = ("shape", "object")
PICTURE_NOUNS: tuple[str, ...] = ("picture", "image", "drawing")

# How each canonical position is said after a noun ("a red circle on the left"). The first phrase is the
# canonical one used in recaps and questions.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "in the upper left corner", "in the top left"),
    "top": ("at the top", "at the top of the image"),
    "top right": ("in the top right corner", "in the upper right corner", "in the top right"),
    "left": ("on the left", "on the left side"),
    "center": ("in the center", "in the middle", "in the center of the image"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("in the bottom left corner", "in the lower left corner", "in the bottom left"),
    "bottom": ("at the bottom", "at the bottom of the image"),
    "bottom right": ("in the bottom right corner", "in the lower right corner", "in the bottom right"),
}

RECAP_PROMPT = "Describe the image in detail."

# Text-only instruction turns: facts about the demo's vocabulary that hold without an image.
TEXT_ONLY_QA: tuple[tuple[str, str], ...] = (
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("How many corners does a triangle have?", "3"),
    ("How many corners does a square have?", "4"),
    ("Does a circle have corners?", "no"),
    ("Is red a color?", "yes"),
    ("Is blue a color?", "yes"),
    ("Is a circle a color?", "no"),
    ("Is a square a shape?", "yes"),
    ("Is purple a shape?", "no"),
    ("What is the opposite of small?", "large"),
    ("What is the opposite of large?", "small"),
    ("What is the opposite of left?", "right"),
    ("What is the opposite of right?", "left"),
    ("What is the opposite of top?", "bottom"),
    ("What is the opposite of bottom?", "top"),
    ("What number comes after 2?", "3"),
    ("Name a shape with three sides.", "triangle"),
    ("Name a shape with four equal sides.", "square"),
    ("Name a round shape.", "circle"),
)


@dataclass(frozen=True)
class QA:
    """One question about a scene (or about the vocabulary) with its short exact answer."""

    question: str
    """The question, self-contained (it never refers back to an earlier turn)."""
    answer: str
    """Lower-case single word or number: "red", "2", "yes", "top left"."""
    answer_type: str
    """YES_NO or OPEN, as VQA accuracy is reported per answer type."""
    question_type: str
    """What is asked: count, color, shape, position, size, background, exists, verify, text."""


# ---------------------------------------------------------------------------------------------------
# Noun phrases


def _plural(noun: str) -> str:
    return noun + "s"


def _noun(noun: str, count: int) -> str:
    return noun if count == 1 else _plural(noun)


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _count_np(count: int, words: list[str], noun: str, rng: np.random.Generator) -> str:
    """ "a red circle" / "one red circle" / "two red circles"; `words` are the adjectives."""
    if count == 1:
        det = _article((words or [noun])[0]) if rng.random() < 0.7 else "one"
        return " ".join([det, *words, noun])
    return " ".join([NUMBER_WORDS[count], *words, _plural(noun)])


def _size_word(size: str, rng: np.random.Generator) -> str:
    return _pick(rng, SIZE_SYNONYMS[size])


def _position_phrase(position: str, rng: np.random.Generator | None) -> str:
    phrases = POSITION_PHRASES[position]
    return phrases[0] if rng is None else _pick(rng, phrases)


@dataclass(frozen=True)
class _Group:
    """Shapes sharing color and kind; `size` is set when they all share it."""

    count: int
    color: str
    kind: str
    size: str | None


def _groups(scene: Scene) -> list[_Group]:
    """Shapes grouped by (color, kind), groups in order of first appearance."""
    members: dict[tuple[str, str], list[Shape]] = {}
    for shape in scene.objects:
        members.setdefault((shape.color, shape.kind), []).append(shape)
    groups = []
    for (color, kind), shapes in members.items():
        sizes = {s.size for s in shapes}
        groups.append(_Group(len(shapes), color, kind, sizes.pop() if len(sizes) == 1 else None))
    return groups


def _group_np(group: _Group, rng: np.random.Generator, with_size: bool) -> str:
    words = [group.color]
    if with_size and group.size is not None:
        words.insert(0, _size_word(group.size, rng))
    return _count_np(group.count, words, group.kind, rng)


def _join(items: list[str]) -> str:
    """ "x", "x and y", "x, y and z"."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------------------------------------------
# Short captions: several templates, so that the five references of an image differ as human ones do.


def _group_list(scene: Scene, rng: np.random.Generator, with_size: bool) -> str:
    return _join([_group_np(g, rng, with_size) for g in _groups(scene)])


def _count_shapes_np(n: int, rng: np.random.Generator) -> str:
    noun = _pick(rng, SHAPE_NOUNS)
    if n == 1:
        return f"a single {noun}"
    return f"{NUMBER_WORDS[n]} {_plural(noun)}"


def _object_np(shape: Shape, rng: np.random.Generator) -> str:
    words = [shape.color]
    if rng.random() < 0.5:
        words.insert(0, _size_word(shape.size, rng))
    return _count_np(1, words, shape.kind, rng)


def _cap_with_list(scene: Scene, rng: np.random.Generator) -> str:
    noun = _pick(rng, PICTURE_NOUNS)
    return f"{_article(noun)} {noun} with {_group_list(scene, rng, with_size=rng.random() < 0.5)}"


def _cap_there_is(scene: Scene, rng: np.random.Generator) -> str:
    # Agreement follows the first item, as in "there is a red circle and two blue squares".
    verb = "is" if _groups(scene)[0].count == 1 else "are"
    return f"there {verb} {_group_list(scene, rng, with_size=True)}"


def _cap_count_on_background(scene: Scene, rng: np.random.Generator) -> str:
    return f"{_count_shapes_np(len(scene.objects), rng)} on a {scene.background} background"


def _cap_located(scene: Scene, rng: np.random.Generator) -> str:
    n = min(len(scene.objects), int(rng.integers(1, 3)))
    chosen = sorted(int(i) for i in rng.choice(len(scene.objects), size=n, replace=False))
    shapes = [scene.objects[i] for i in chosen]
    return _join([f"{_object_np(s, rng)} {_position_phrase(s.position, rng)}" for s in shapes])


def _cap_list_on_background(scene: Scene, rng: np.random.Generator) -> str:
    return f"{_group_list(scene, rng, with_size=rng.random() < 0.5)} on a {scene.background} background"


def _cap_background_with(scene: Scene, rng: np.random.Generator) -> str:
    return f"a {scene.background} background with {_group_list(scene, rng, with_size=rng.random() < 0.5)}"


def _cap_picture_of_count(scene: Scene, rng: np.random.Generator) -> str:
    noun = _pick(rng, PICTURE_NOUNS)
    return f"{_article(noun)} {noun} of {_count_shapes_np(len(scene.objects), rng)}"


def _cap_position_first(scene: Scene, rng: np.random.Generator) -> str:
    shape = scene.objects[int(rng.integers(len(scene.objects)))]
    return f"{_position_phrase(shape.position, rng)}, there is {_object_np(shape, rng)}"


_CAPTION_TEMPLATES: tuple[Callable[[Scene, np.random.Generator], str], ...] = (
    _cap_with_list,
    _cap_there_is,
    _cap_count_on_background,
    _cap_located,
    _cap_list_on_background,
    _cap_background_with,
    _cap_picture_of_count,
    _cap_position_first,
)


def captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> tuple[str, ...]:
    """`n` distinct short reference captions, each from a different template (COCO-style references)."""
    if not 1 <= n <= len(_CAPTION_TEMPLATES):
        raise ValueError(
            f"can write 1 to {len(_CAPTION_TEMPLATES)} distinct captions per image, asked for {n}"
        )
    order = rng.permutation(len(_CAPTION_TEMPLATES))[:n]
    result = tuple(_sentence(_CAPTION_TEMPLATES[i](scene, rng)) for i in order)
    # Templates differ in their fixed words, so equal captions would mean a template bug, not bad luck.
    if len(set(result)) != n:
        raise AssertionError(f"caption templates produced duplicates for scene {scene.key()}: {result}")
    return result


def _ngrams(caption: str) -> list[Counter[tuple[str, ...]]]:
    """The caption's 1- to 4-grams of lower-cased words, one Counter per order."""
    words = re.findall(r"[a-z0-9]+", caption.lower())
    return [Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1)) for n in range(1, 5)]


def _similarity(a: list[Counter[tuple[str, ...]]], b: list[Counter[tuple[str, ...]]]) -> float:
    total = 0.0
    for ga, gb in zip(a, b, strict=True):
        if ga and gb:
            total += 2 * sum((ga & gb).values()) / (sum(ga.values()) + sum(gb.values()))
    return total / 4


def caption_similarity(a: str, b: str) -> float:
    """Mean over n = 1..4 of the n-gram overlap F1 of two captions (lower-cased words; an order either lacks
    counts 0): 1 for equal captions of four words or more, 0 for captions without a word in common."""
    return _similarity(_ngrams(a), _ngrams(b))


def consensus_caption(references: Sequence[str]) -> str:
    """The reference most like the others (highest summed caption_similarity to them; the first on a tie).

    Training on each image's consensus reference instead of a random one is consensus-based caption selection
    (Devlin et al., 2015): the model learns the description most references agree on rather than a mixture of
    styles, the way CIDEr scores a caption against all of them."""
    if not references:
        raise ValueError("consensus_caption needs at least one reference")
    grams = [_ngrams(r) for r in references]
    scores = [sum(_similarity(g, o) for j, o in enumerate(grams) if j != k) for k, g in enumerate(grams)]
    return references[max(range(len(references)), key=scores.__getitem__)]


# ---------------------------------------------------------------------------------------------------
# Recap: one long, regular, machine-style description listing every shape.


def recap(scene: Scene, rng: np.random.Generator) -> str:
    """A detailed description in the style of LLaVA-ReCap: every shape with size, color, kind and position."""
    n = len(scene.objects)
    sentences = [
        f"The image shows {NUMBER_WORDS[n]} simple {_noun('shape', n)} on a plain {scene.background} background"
    ]
    for shape in scene.objects:
        where = _position_phrase(shape.position, None)
        what = f"a {shape.size} {shape.color} {shape.kind}"
        sentences.append(f"{where}, there is {what}" if rng.random() < 0.5 else f"{what} is located {where}")
    if n == 1:
        sentences.append("there is only one shape in the image")
    else:
        groups = [f"{NUMBER_WORDS[g.count]} {g.color} {_noun(g.kind, g.count)}" for g in _groups(scene)]
        sentences.append(f"in total, there are {NUMBER_WORDS[n]} shapes: {_join(groups)}")
    sentences.append(f"the background is plain {scene.background}")
    return " ".join(_sentence(s) for s in sentences)


# ---------------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class _Ref:
    """A definite description that picks out exactly one shape of the scene."""

    text: str
    uses: frozenset[str]
    """Attributes named in the description: kind, color, size, position."""


def _matches(shape: Shape, **attrs: str) -> bool:
    return all(getattr(shape, name) == value for name, value in attrs.items())


def _count(scene: Scene, **attrs: str) -> int:
    return sum(_matches(s, **attrs) for s in scene.objects)


def _refs(scene: Scene, shape: Shape, noun: str) -> list[_Ref]:
    """All unique descriptions of `shape`, `noun` standing in for an unnamed kind ("the red object");
    "the object in the top left corner" always qualifies."""
    candidates: list[tuple[str, dict[str, str]]] = [
        (f"the {shape.kind}", {"kind": shape.kind}),
        (f"the {shape.color} {noun}", {"color": shape.color}),
        (f"the {shape.color} {shape.kind}", {"color": shape.color, "kind": shape.kind}),
        (f"the {shape.size} {shape.kind}", {"size": shape.size, "kind": shape.kind}),
        (
            f"the {shape.size} {shape.color} {shape.kind}",
            {"size": shape.size, "color": shape.color, "kind": shape.kind},
        ),
        (f"the {noun} {_position_phrase(shape.position, None)}", {"position": shape.position}),
    ]
    return [_Ref(text, frozenset(attrs)) for text, attrs in candidates if _count(scene, **attrs) == 1]


def _ref_without(scene: Scene, shape: Shape, attr: str, rng: np.random.Generator, noun: str) -> _Ref | None:
    """A random unique description of `shape` that does not name `attr`, if there is one."""
    refs = [r for r in _refs(scene, shape, noun) if attr not in r.uses]
    return refs[int(rng.integers(len(refs)))] if refs else None


def _described_shape(
    scene: Scene, attr: str, rng: np.random.Generator, noun: str | None = None
) -> tuple[Shape, _Ref] | None:
    """A random shape with a unique description that leaves `attr` unsaid (the thing asked about)."""
    noun = noun or _pick(rng, SHAPE_NOUNS)
    for index in rng.permutation(len(scene.objects)):
        shape = scene.objects[int(index)]
        ref = _ref_without(scene, shape, attr, rng, noun)
        if ref is not None:
            return shape, ref
    return None


def _random_shape(scene: Scene, rng: np.random.Generator) -> Shape:
    return scene.objects[int(rng.integers(len(scene.objects)))]


def _q_count_total(scene: Scene, rng: np.random.Generator) -> QA:
    question = _pick(
        rng,
        ("How many shapes are there?", "How many objects are in the image?", "How many shapes can you see?"),
    )
    return QA(question, str(len(scene.objects)), OPEN, "count")


def _q_count_filtered(scene: Scene, rng: np.random.Generator) -> QA:
    # Mostly ask about attributes that are present so that counts other than 0 dominate, as in VQA.
    if rng.random() < 0.7:
        shape = _random_shape(scene, rng)
        color, kind, size = shape.color, shape.kind, shape.size
    else:
        color, kind, size = _pick(rng, tuple(COLORS)), _pick(rng, KINDS), _pick(rng, SIZES)
    form = int(rng.integers(4))
    if form == 0:
        question, attrs = f"How many {color} shapes are there?", {"color": color}
    elif form == 1:
        question, attrs = f"How many {_plural(kind)} are there?", {"kind": kind}
    elif form == 2:
        question, attrs = f"How many {color} {_plural(kind)} are there?", {"color": color, "kind": kind}
    else:
        question, attrs = f"How many {size} shapes are there?", {"size": size}
    return QA(question, str(_count(scene, **attrs)), OPEN, "count")


def _q_color(scene: Scene, rng: np.random.Generator) -> QA | None:
    found = _described_shape(scene, "color", rng)
    if found is None:
        return None
    shape, ref = found
    return QA(f"What color is {ref.text}?", shape.color, OPEN, "color")


def _q_shape(scene: Scene, rng: np.random.Generator) -> QA | None:
    # "What shape is the red object?" reads better than "What shape is the red shape?".
    found = _described_shape(scene, "kind", rng, noun="object")
    if found is None:
        return None
    shape, ref = found
    if "position" in ref.uses:
        question = f"What shape is {_position_phrase(shape.position, rng)}?"
    else:
        question = f"What shape is {ref.text}?"
    return QA(question, shape.kind, OPEN, "shape")


def _q_position(scene: Scene, rng: np.random.Generator) -> QA | None:
    # Two identical shapes can only be told apart by position, so this form may not apply.
    found = _described_shape(scene, "position", rng)
    if found is None:
        return None
    shape, ref = found
    return QA(f"Where is {ref.text}?", shape.position, OPEN, "position")


def _q_size(scene: Scene, rng: np.random.Generator) -> QA | None:
    found = _described_shape(scene, "size", rng)
    if found is None:
        return None
    shape, ref = found
    question = f"What size is {ref.text}?" if rng.random() < 0.5 else f"Is {ref.text} small or large?"
    return QA(question, shape.size, OPEN, "size")


def _q_background(scene: Scene, rng: np.random.Generator) -> QA:
    return QA("What color is the background?", scene.background, OPEN, "background")


def _exists_candidates(scene: Scene, form: str) -> list[tuple[str, int]]:
    """(question, matching count) for every description of one existence-question form."""
    out: list[tuple[str, int]] = []
    positions = [POSITION_NAMES[r][c] for r in range(GRID) for c in range(GRID)]
    if form == "color_kind":
        for color in COLORS:
            for kind in KINDS:
                n = _count(scene, color=color, kind=kind)
                out.append((f"Is there a {color} {kind}?", n))
                out.append((f"Are there any {color} {_plural(kind)}?", n))
    elif form == "color":
        for color in COLORS:
            out.append((f"Is there a {color} shape?", _count(scene, color=color)))
    elif form == "kind":
        for kind in KINDS:
            out.append((f"Is there {_article(kind)} {kind}?", _count(scene, kind=kind)))
            out.append((f"Are there any {_plural(kind)}?", _count(scene, kind=kind)))
    elif form == "kind_position":
        for kind in KINDS:
            for pos in positions:
                n = _count(scene, kind=kind, position=pos)
                out.append((f"Is there {_article(kind)} {kind} {_position_phrase(pos, None)}?", n))
    elif form == "size_color_kind":
        for size in SIZES:
            for color in COLORS:
                for kind in KINDS:
                    n = _count(scene, size=size, color=color, kind=kind)
                    out.append((f"Is there a {size} {color} {kind}?", n))
    else:  # position
        for pos in positions:
            out.append((f"Is there a shape {_position_phrase(pos, None)}?", _count(scene, position=pos)))
    return out


_EXISTS_FORMS = ("color_kind", "color", "kind", "kind_position", "size_color_kind", "position")


def _q_exists(scene: Scene, rng: np.random.Generator) -> QA:
    # The answer is drawn first (a fair coin) and a matching question found after, so that "yes" and
    # "no" are equally frequent and the majority-answer baseline stays at chance.
    want_yes = rng.random() < 0.5
    for form_index in rng.permutation(len(_EXISTS_FORMS)):
        pool = [q for q, n in _exists_candidates(scene, _EXISTS_FORMS[form_index]) if (n > 0) == want_yes]
        if pool:
            return QA(_pick(rng, tuple(pool)), "yes" if want_yes else "no", YES_NO, "exists")
    raise AssertionError(f"no existence question with answer yes={want_yes} for scene {scene.key()}")


def _q_verify(scene: Scene, rng: np.random.Generator) -> QA | None:
    attr = _pick(rng, ("color", "size", "kind"))
    found = _described_shape(scene, attr, rng)
    if found is None:
        return None
    shape, ref = found
    true_value = getattr(shape, attr)
    want_yes = rng.random() < 0.5
    choices = {"color": tuple(COLORS), "size": SIZES, "kind": KINDS}[attr]
    value = true_value if want_yes else _pick(rng, tuple(c for c in choices if c != true_value))
    said = f"{_article(value)} {value}" if attr == "kind" else value
    return QA(f"Is {ref.text} {said}?", "yes" if want_yes else "no", YES_NO, "verify")


# Weights favour the yes/no forms, so that about a third of the questions are yes/no (VQAv2: 38%).
_QUESTION_TYPES: tuple[tuple[Callable[[Scene, np.random.Generator], QA | None], float], ...] = (
    (_q_count_total, 1.0),
    (_q_count_filtered, 1.0),
    (_q_color, 1.5),
    (_q_shape, 1.5),
    (_q_position, 1.5),
    (_q_size, 1.0),
    (_q_background, 0.5),
    (_q_exists, 2.5),
    (_q_verify, 1.5),
)

# Every form except the position question applies to any scene (a shape can always be named by its cell).
MAX_QUESTIONS = len(_QUESTION_TYPES) - 1


def questions(scene: Scene, rng: np.random.Generator, n: int) -> tuple[QA, ...]:
    """`n` self-contained questions about the scene, each of a different form, forms drawn by weight."""
    if not 1 <= n <= MAX_QUESTIONS:
        raise ValueError(f"can ask 1 to {MAX_QUESTIONS} questions per image, asked for {n}")
    weights = np.array([w for _, w in _QUESTION_TYPES])
    order = rng.choice(
        len(_QUESTION_TYPES), size=len(_QUESTION_TYPES), replace=False, p=weights / weights.sum()
    )
    asked: list[QA] = []
    for index in order:
        qa = _QUESTION_TYPES[int(index)][0](scene, rng)
        if qa is not None:
            asked.append(qa)
        if len(asked) == n:
            return tuple(asked)
    raise AssertionError(f"only {len(asked)} question forms apply to scene {scene.key()}, wanted {n}")


def text_only_questions(rng: np.random.Generator, n: int) -> tuple[QA, ...]:
    """`n` distinct vocabulary questions that need no image (the text-only share of instruction data)."""
    chosen = rng.choice(len(TEXT_ONLY_QA), size=n, replace=False)
    return tuple(
        QA(q, a, YES_NO if a in ("yes", "no") else OPEN, "text") for q, a in (TEXT_ONLY_QA[i] for i in chosen)
    )


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]
