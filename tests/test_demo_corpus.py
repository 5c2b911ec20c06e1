"""Demo corpus tests: every caption, recap and answer is checked against the pixels of its image.

The checker below reads shapes back from the rendered PNG (exact palette colors, its own flood fill,
fill ratio for the kind, bounding box for size and cell) and parses the written text with its own small
grammar; it shares nothing with vlmtrain.demo.text but the palette, which is the rendering spec.
"""

from __future__ import annotations

import colorsys
import json
import re
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtrain.demo import scenes
from vlmtrain.demo.corpus import CorpusPaths, write_corpus
from vlmtrain.demo.scenes import Scene, Shape

# ---------------------------------------------------------------------------------------------------
# Reading shapes back from pixels


@dataclass(frozen=True)
class Seen:
    """A shape as found in the pixels."""

    kind: str
    color: str
    size: str
    position: str


CELL_NAMES = {
    (0, 0): "top left",
    (1, 0): "top",
    (2, 0): "top right",
    (0, 1): "left",
    (1, 1): "center",
    (2, 1): "right",
    (0, 2): "bottom left",
    (1, 2): "bottom",
    (2, 2): "bottom right",
}


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask, by breadth-first flood fill."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(int(y0), int(x0))]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(pixels)
    return found


def classify(pixels: list[tuple[int, int]], color: str, image_size: int) -> Seen:
    ys = [p[0] for p in pixels]
    xs = [p[1] for p in pixels]
    w, h = max(xs) - min(xs) + 1, max(ys) - min(ys) + 1
    fill = len(pixels) / (w * h)
    # Square fills its box, a disc about pi/4 of it, a triangle about half.
    kind = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
    # Small shapes are under half a cell wide and large ones over three quarters; a fifth of the image
    # (0.6 cell) lies between.
    size = "large" if max(w, h) > 0.2 * image_size else "small"
    cell = image_size / 3
    col, row = int((min(xs) + max(xs)) / 2 // cell), int((min(ys) + max(ys)) / 2 // cell)
    return Seen(kind, color, size, CELL_NAMES[(col, row)])


def read_pixels(image: Image.Image) -> tuple[str, list[Seen]]:
    """(background name, shapes) of a rendered image; fails on any pixel outside the palette."""
    arr = np.asarray(image.convert("RGB"))
    size = arr.shape[0]
    known = {**scenes.COLORS, **scenes.BACKGROUNDS}
    covered = np.zeros(arr.shape[:2], dtype=bool)
    masks = {}
    for name, rgb in known.items():
        masks[name] = np.all(arr == np.array(rgb, dtype=arr.dtype), axis=-1)
        covered |= masks[name]
    assert covered.all(), f"{(~covered).sum()} pixels are neither background nor palette (antialiasing?)"
    backgrounds = [name for name in scenes.BACKGROUNDS if masks[name].any()]
    assert len(backgrounds) == 1, f"expected one background color, found {backgrounds}"
    shapes = []
    for color in scenes.COLORS:
        shapes += [classify(pixels, color, size) for pixels in components(masks[color])]
    return backgrounds[0], shapes


def seen_from_scene(scene: Scene) -> Counter[Seen]:
    return Counter(Seen(o.kind, o.color, o.size, o.position) for o in scene.objects)


# ---------------------------------------------------------------------------------------------------
# Parsing the text back


COLOR_WORDS = {"red", "green", "blue", "yellow", "purple"}
BACKGROUND_WORDS = {"white", "gray"}
KIND_WORDS = {
    "circle": "circle",
    "circles": "circle",
    "square": "square",
    "squares": "square",
    "triangle": "triangle",
    "triangles": "triangle",
}
ANY_SHAPE_WORDS = {"shape", "shapes", "object", "objects"}
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5}
VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
POSITION_WORDS = {"left", "right", "top", "bottom", "center", "middle", "upper", "lower"}
# Words that state a fact; "a"/"an" are left out as they also appear in "a picture".
FACT_WORDS = (
    COLOR_WORDS
    | BACKGROUND_WORDS
    | set(KIND_WORDS)
    | ANY_SHAPE_WORDS
    | set(SIZE_WORDS)
    | POSITION_WORDS
    | ({w for w in COUNT_WORDS if w not in ("a", "an")})
)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def parse_position(tokens: list[str]) -> str | None:
    found = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if t in VERTICAL and nxt in ("left", "right"):
            found.append(f"{VERTICAL[t]} {nxt}")
            i += 2
            continue
        if t in ("upper", "lower"):
            raise AssertionError(f"'{t}' without left/right in {tokens}")
        if t in ("left", "right", "top", "bottom"):
            found.append(t)
        elif t in ("center", "middle"):
            found.append("center")
        i += 1
    assert len(found) <= 1, f"several positions {found} in {tokens}"
    return found[0] if found else None


def parse_attrs(tokens: list[str]) -> dict[str, str]:
    """The shape attributes named in a phrase: color, kind, size, position."""
    attrs: dict[str, str] = {}

    def put(name: str, value: str) -> None:
        assert attrs.get(name, value) == value, f"two values for {name} in {tokens}"
        attrs[name] = value

    for t in tokens:
        if t in COLOR_WORDS:
            put("color", t)
        elif t in KIND_WORDS:
            put("kind", KIND_WORDS[t])
        elif t in SIZE_WORDS:
            put("size", SIZE_WORDS[t])
    position = parse_position(tokens)
    if position is not None:
        attrs["position"] = position
    return attrs


def count_matching(shapes: list[Seen], attrs: dict[str, str]) -> int:
    return sum(all(getattr(s, k) == v for k, v in attrs.items()) for s in shapes)


@dataclass(frozen=True)
class Claim:
    """ "exactly `count` shapes have `attrs`"."""

    count: int
    attrs: dict[str, str]


def object_claim(tokens: list[str]) -> Claim:
    nouns = [i for i, t in enumerate(tokens) if t in KIND_WORDS or t in ANY_SHAPE_WORDS]
    assert len(nouns) == 1, f"phrase {' '.join(tokens)!r} should name exactly one noun"
    counts = [COUNT_WORDS[t] for t in tokens[: nouns[0]] if t in COUNT_WORDS]
    assert counts, f"phrase {' '.join(tokens)!r} has no number"
    assert not BACKGROUND_WORDS & set(tokens), f"background color in object phrase {tokens}"
    return Claim(counts[-1], parse_attrs(tokens))


def check_statement(statement: str, background: str, shapes: list[Seen]) -> list[Claim]:
    """Assert every fact in a caption or recap against the pixels; return the object claims.

    Each sentence is cut at commas, colons, "and", "with" and "on a"; a piece naming only a position
    ("In the top left corner,") belongs to the next piece. A piece is then a background fact, one noun
    phrase meaning "exactly N shapes like this", or filler that may name no attribute at all.
    """
    claims = []
    for sentence in re.split(r"[.:]", statement.lower()):
        pending: list[str] = []
        for piece in re.split(r",| and | with | on a ", sentence):
            tokens = words(piece)
            if "background" in tokens:
                said = BACKGROUND_WORDS & set(tokens)
                assert said == {background}, f"{statement!r}: background is {background}, text says {said}"
                assert not (FACT_WORDS - BACKGROUND_WORDS) & set(tokens), f"{piece!r} mixes background"
            elif set(tokens) & (set(KIND_WORDS) | ANY_SHAPE_WORDS):
                claim = object_claim(pending + tokens)
                pending = []
                actual = count_matching(shapes, claim.attrs)
                assert actual == claim.count, (
                    f"{statement!r}: {piece.strip()!r} claims {claim.count} x {claim.attrs}, "
                    f"pixels show {actual} (shapes: {shapes})"
                )
                claims.append(claim)
            elif FACT_WORDS & set(tokens):
                assert parse_position(tokens) and not (FACT_WORDS - POSITION_WORDS) & set(tokens), (
                    f"{statement!r}: {piece!r} states a fact outside any noun phrase"
                )
                pending = tokens
        assert not pending, f"{statement!r}: position {pending} is not attached to a shape"
    return claims


def unique_shape(ref: list[str], shapes: list[Seen], question: str) -> Seen:
    attrs = parse_attrs(ref)
    matches = [s for s in shapes if all(getattr(s, k) == v for k, v in attrs.items())]
    assert len(matches) == 1, f"{question!r}: {ref} fits {len(matches)} shapes of {shapes}"
    return matches[0]


def assert_not_given_away(question: str, answer: str) -> None:
    """An open question must not name its own answer ("What color is the red shape?")."""
    if answer.isdigit():
        return
    tokens = words(question)
    if tokens[-3:] == ["small", "or", "large"]:
        tokens = tokens[:-3]
    named = set(parse_attrs(tokens).values())
    assert answer not in named, f"{question!r} gives away its answer {answer!r}"


def answer_from_pixels(question: str, background: str, shapes: list[Seen]) -> str:
    """The true answer to a demo question, worked out from the shapes found in the pixels."""
    q = question.lower().strip().rstrip("?")
    t = words(q)
    if q.startswith("how many "):
        return str(count_matching(shapes, parse_attrs(t[2:])))
    if q == "what color is the background":
        return background
    if q.startswith("what color is "):
        return unique_shape(t[3:], shapes, question).color
    if q.startswith("what shape is "):
        return unique_shape(t[3:], shapes, question).kind
    if q.startswith("where is "):
        return unique_shape(t[2:], shapes, question).position
    if q.startswith("what size is "):
        return unique_shape(t[3:], shapes, question).size
    if q.startswith("is ") and q.endswith(" small or large"):
        return unique_shape(t[1:-3], shapes, question).size
    if q.startswith(("is there ", "are there any ")):
        return "yes" if count_matching(shapes, parse_attrs(t)) > 0 else "no"
    if q.startswith("is "):
        value, ref = t[-1], t[1:-1]
        if ref and ref[-1] in ("a", "an"):
            ref = ref[:-1]
        shape = unique_shape(ref, shapes, question)
        if value in COLOR_WORDS:
            return "yes" if shape.color == value else "no"
        if value in SIZE_WORDS:
            return "yes" if shape.size == SIZE_WORDS[value] else "no"
        return "yes" if shape.kind == KIND_WORDS[value] else "no"
    raise AssertionError(f"unknown question form: {question!r}")


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusPaths:
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_train=400, n_test=150, image_size=64, seed=3)


def load(path: Path) -> object:
    return json.loads(path.read_text())


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


_pixel_cache: dict[Path, tuple[str, list[Seen]]] = {}


def pixels_of(corpus: CorpusPaths, image: str) -> tuple[str, list[Seen]]:
    path = corpus.images / image
    if path not in _pixel_cache:
        _pixel_cache[path] = read_pixels(Image.open(path))
    return _pixel_cache[path]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def yes_share(answers: list[str]) -> float:
    yes_no = [a for a in answers if a in ("yes", "no")]
    return sum(a == "yes" for a in yes_no) / len(yes_no)


# ---------------------------------------------------------------------------------------------------
# The checker itself


def test_palette_names_match_their_hues() -> None:
    expected_hue = {"red": 0, "yellow": 50, "green": 130, "blue": 225, "purple": 285}
    for name, rgb in scenes.COLORS.items():
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
        distance = min(abs(h * 360 - expected_hue[name]), 360 - abs(h * 360 - expected_hue[name]))
        assert distance < 20 and s > 0.6 and v > 0.6, f"{name} is {rgb}"
    for name, rgb in scenes.BACKGROUNDS.items():
        assert max(rgb) - min(rgb) < 10, f"background {name} {rgb} is not a neutral tone"
    assert scenes.BACKGROUNDS["white"] > scenes.BACKGROUNDS["gray"]


def test_hand_built_scene_renders_where_expected() -> None:
    scene = Scene(
        objects=(
            Shape("square", "red", "large", 0, 0),
            Shape("circle", "blue", "small", 1, 1),
            Shape("triangle", "green", "large", 2, 2),
        ),
        background="white",
    )
    arr = np.asarray(scene.render(64))
    # 64 px: cells of 21.33 px; the top-left cell's centre pixel is 10; large = 17 px, small = 9 px.
    red = np.all(arr == scenes.COLORS["red"], axis=-1)
    assert red[2:19, 2:19].all() and red.sum() == 17 * 17
    blue = np.all(arr == scenes.COLORS["blue"], axis=-1)
    ys, xs = np.nonzero(blue)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (28, 36, 28, 36)
    green = np.all(arr == scenes.COLORS["green"], axis=-1)
    ys, xs = np.nonzero(green)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (45, 61, 45, 61)
    assert green[45].sum() < 3 and green[61].sum() == 17  # apex up
    assert read_pixels(scene.render(64)) == (
        "white",
        [Seen("square", "red", "large", "top left"), Seen("triangle", "green", "large", "bottom right"),
         Seen("circle", "blue", "small", "center")],
    )  # fmt: skip


@pytest.mark.parametrize("image_size", [32, 48, 64, 96])
def test_checker_reads_back_random_scenes(image_size: int) -> None:
    rng = np.random.default_rng(image_size)
    for _ in range(150):
        scene = scenes.sample_scene(rng, max_objects=5)
        background, shapes = read_pixels(scene.render(image_size))
        assert background == scene.background
        assert Counter(shapes) == seen_from_scene(scene), scene.key()


def test_same_color_neighbours_never_touch_at_min_size() -> None:
    full = tuple(Shape("square", "red", "large", x, y) for y in range(3) for x in range(3))
    _, shapes = read_pixels(Scene(full, "gray").render(scenes.MIN_IMAGE_SIZE))
    assert len(shapes) == 9


def test_checker_rejects_false_text() -> None:
    scene = Scene((Shape("circle", "red", "small", 0, 1), Shape("circle", "red", "large", 2, 2)), "white")
    background, shapes = read_pixels(scene.render(64))
    check_statement("Two red circles on a white background.", background, shapes)
    check_statement("In the lower right corner, there is a big red circle.", background, shapes)
    false_statements = [
        "A red circle on a white background.",  # there are two
        "Two red circles on a gray background.",
        "Two blue circles.",
        "A little red circle at the top.",
        "In the center, there is a red circle.",
        "A large red square.",
        "Three shapes.",
        "A picture with red circles.",  # no number
        "A drawing in the top left.",  # a position with no shape
    ]
    for statement in false_statements:
        with pytest.raises(AssertionError):
            check_statement(statement, background, shapes)
    assert answer_from_pixels("Where is the small circle?", background, shapes) == "left"
    assert answer_from_pixels("Is the shape on the left large?", background, shapes) == "no"
    assert answer_from_pixels("Are there any red squares?", background, shapes) == "no"
    with pytest.raises(AssertionError):
        answer_from_pixels("What color is the circle?", background, shapes)  # ambiguous


# ---------------------------------------------------------------------------------------------------
# Text is true of the pixels


def test_karpathy_references_are_true(corpus: CorpusPaths) -> None:
    data = load(corpus.karpathy)
    for image in data["images"]:
        background, shapes = pixels_of(corpus, f"{image['filepath']}/{image['filename']}")
        raws = [s["raw"] for s in image["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5
        for raw in raws:
            check_statement(raw, background, shapes)


def test_recaps_are_true_and_name_every_shape(corpus: CorpusPaths) -> None:
    for record in load(corpus.recap_train):
        background, shapes = pixels_of(corpus, record["image"])
        assert record["conversations"][0]["value"] == "<image>\nDescribe the image in detail."
        claims = check_statement(record["conversations"][1]["value"], background, shapes)
        described = Counter(
            Seen(c.attrs["kind"], c.attrs["color"], c.attrs["size"], c.attrs["position"])
            for c in claims
            if set(c.attrs) == {"kind", "color", "size", "position"}
        )
        assert described == Counter(shapes), record["id"]
        assert any(c.attrs == {} and c.count == len(shapes) for c in claims), "recap must give the count"


def test_short_captions_are_true(corpus: CorpusPaths) -> None:
    references = {
        f"{im['filepath']}/{im['filename']}": {s["raw"] for s in im["sentences"]}
        for im in load(corpus.karpathy)["images"]
    }
    for record in load(corpus.short_train):
        background, shapes = pixels_of(corpus, record["image"])
        assert record["conversations"][0]["value"] == "<image>\nWrite a short caption for the image."
        caption = record["conversations"][1]["value"]
        check_statement(caption, background, shapes)
        assert caption in references[record["image"]]


def test_instruction_answers_are_true(corpus: CorpusPaths) -> None:
    n_answers = 0
    for record in load(corpus.instruct_train):
        if "image" not in record:
            continue
        background, shapes = pixels_of(corpus, record["image"])
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            prompt = human["value"].removeprefix("<image>\n")
            if prompt in ("Write a short caption for the image.", "Describe the image in detail."):
                check_statement(gpt["value"], background, shapes)
            else:
                assert gpt["value"] == answer_from_pixels(prompt, background, shapes), (record["id"], prompt)
                if gpt["value"] not in ("yes", "no"):
                    assert_not_given_away(prompt, gpt["value"])
                n_answers += 1
    assert n_answers > 2 * 400


def test_vqa_test_answers_are_true(corpus: CorpusPaths) -> None:
    rows = load_jsonl(corpus.vqa_test)
    for row in rows:
        background, shapes = pixels_of(corpus, row["image"])
        assert row["answer"] == answer_from_pixels(row["question"], background, shapes), row["id"]
        assert row["answer_type"] == ("yes/no" if row["answer"] in ("yes", "no") else "open")
        if row["answer_type"] == "open":
            assert_not_given_away(row["question"], row["answer"])
    assert {row["image"] for row in rows} == {f"test/{i:06d}.png" for i in range(150)}


def test_vqa_train_is_the_training_questions_without_context(corpus: CorpusPaths) -> None:
    """vqa_train.jsonl: every image question of the first n_test training conversations, in order, with the
    conversation's answer, as single-turn rows of vqa_test's format; the answers are true of the pixels."""
    rows = load_jsonl(corpus.vqa_train)
    n_test = len({row["image"] for row in load_jsonl(corpus.vqa_test)})
    by_image = {r["image"]: r for r in load(corpus.instruct_train) if "image" in r}
    expected = []
    for i in range(n_test):
        image = f"train/{i:06d}.png"
        turns = by_image[image]["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            prompt = human["value"].removeprefix("<image>\n")
            if prompt not in ("Write a short caption for the image.", "Describe the image in detail."):
                expected.append((image, prompt, gpt["value"]))
    assert [(r["image"], r["question"], r["answer"]) for r in rows] == expected
    assert set(rows[0]) == set(load_jsonl(corpus.vqa_test)[0])
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows[:200]:
        background, shapes = pixels_of(corpus, row["image"])
        assert row["answer"] == answer_from_pixels(row["question"], background, shapes), row["id"]


# ---------------------------------------------------------------------------------------------------
# Distribution, splits, determinism


def test_yes_and_no_are_balanced(corpus: CorpusPaths) -> None:
    vqa = [row["answer"] for row in load_jsonl(corpus.vqa_test)]
    instruct = [
        turn["value"]
        for record in load(corpus.instruct_train)
        if "image" in record
        for turn in record["conversations"][1::2]
    ]
    for answers in (vqa, instruct):
        assert 0.4 <= yes_share(answers) <= 0.6


def test_world_is_fully_covered_in_train(corpus: CorpusPaths) -> None:
    found: Counter[str] = Counter()
    counts = Counter()
    for record in load(corpus.recap_train):
        background, shapes = pixels_of(corpus, record["image"])
        found.update([background] + [v for s in shapes for v in (s.kind, s.color, s.size, s.position)])
        counts[len(shapes)] += 1
    expected = set(scenes.KINDS) | set(scenes.COLORS) | set(scenes.BACKGROUNDS) | set(scenes.SIZES)
    expected |= set(CELL_NAMES.values())
    assert set(found) == expected and min(found.values()) >= 20
    assert set(counts) == {1, 2, 3}


def test_splits_are_disjoint_in_pixels(corpus: CorpusPaths) -> None:
    def picture_set(split: str) -> set[bytes]:
        return {np.asarray(Image.open(p)).tobytes() for p in (corpus.images / split).glob("*.png")}

    train, test = picture_set("train"), picture_set("test")
    assert len(test) > 100 and not train & test


def test_same_seed_same_bytes_other_seed_other_corpus(tmp_path: Path) -> None:
    a = all_files(write_corpus(tmp_path / "a", 40, 10, seed=7).root)
    b = all_files(write_corpus(tmp_path / "b", 40, 10, seed=7).root)
    c = all_files(write_corpus(tmp_path / "c", 40, 10, seed=8).root)
    assert a == b
    assert a.keys() == c.keys()
    assert a["recap_train.json"] != c["recap_train.json"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) > 40


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    write_corpus(tmp_path, 30, 10, seed=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_corpus(tmp_path, 30, 10, seed=1)
    first = all_files(tmp_path)
    write_corpus(tmp_path, 20, 5, seed=1, overwrite=True)
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 20  # no stale images kept
    write_corpus(tmp_path, 30, 10, seed=1, overwrite=True)
    assert all_files(tmp_path) == first


def test_train_turns_set_training_conversation_lengths_only(tmp_path: Path) -> None:
    base = write_corpus(tmp_path / "base", 60, 12, seed=5)
    long = write_corpus(tmp_path / "long", 60, 12, seed=5, train_turns=(5, 7))
    turns = [len(r["conversations"]) // 2 for r in load(long.instruct_train) if "image" in r]
    assert min(turns) == 5 and max(turns) == 7, sorted(set(turns))
    base_turns = [len(r["conversations"]) // 2 for r in load(base.instruct_train) if "image" in r]
    assert max(base_turns) <= 4
    # The test split (images, references, questions) does not depend on the training conversations.
    for name in ("vqa_test.jsonl", "scenes_test.jsonl", "scenes_train.jsonl"):
        assert (base.root / name).read_bytes() == (long.root / name).read_bytes(), name
    assert load(base.karpathy) == load(long.karpathy)
    with pytest.raises(ValueError, match="train_turns"):
        write_corpus(tmp_path / "bad", 10, 2, train_turns=(1, 3))
    with pytest.raises(ValueError, match="train_turns"):
        write_corpus(tmp_path / "bad", 10, 2, train_turns=(3, 9))


def test_conversations_add_new_questions_per_training_image_and_keep_the_first(tmp_path: Path) -> None:
    one = write_corpus(tmp_path / "one", 50, 10, seed=3)
    many = write_corpus(tmp_path / "many", 50, 10, seed=3, conversations=4)
    one_recs = {r["id"]: r for r in load(one.instruct_train) if "image" in r}
    many_recs = [r for r in load(many.instruct_train) if "image" in r]
    check_llava(load(many.instruct_train), many.images)
    assert len(many_recs) == 4 * len(one_recs) == 200
    by_image: dict[str, list[dict]] = {}
    for r in many_recs:
        by_image.setdefault(r["image"], []).append(r)
    assert all(len(v) == 4 for v in by_image.values())
    # The first conversation of every image is the one conversations=1 writes; the others are new draws.
    for rid, rec in one_recs.items():
        assert next(r for r in many_recs if r["id"] == rid) == rec
    distinct = sum(len({json.dumps(r["conversations"]) for r in v}) == 4 for v in by_image.values())
    assert distinct >= 45, distinct
    # Every answer is still the true one for its scene: re-derive counts from the scenes.
    scenes = {row["image"]: row for row in map(json.loads, many.scenes_train.read_text().splitlines())}
    for r in many_recs:
        turns = r["conversations"]
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            if q["value"].replace("<image>\n", "") in (
                "How many shapes are there?",
                "How many shapes can you see?",
            ):
                assert a["value"] == str(len(scenes[r["image"]]["objects"]))
    # Text-only conversations keep their share; the test split does not change.
    n_text = sum("image" not in r for r in load(many.instruct_train))
    assert (
        n_text == 4 * sum("image" not in r for r in load(one.instruct_train)) == 4 * round(50 * 0.05 / 0.95)
    )
    for name in ("vqa_test.jsonl", "vqa_train.jsonl", "scenes_test.jsonl", "scenes_train.jsonl"):
        assert (one.root / name).read_bytes() == (many.root / name).read_bytes(), name
    counts = load(many.vqa_train_answers)["by_answer_type"]
    assert sum(sum(c.values()) for c in counts.values()) > 3 * sum(
        sum(c.values()) for c in load(one.vqa_train_answers)["by_answer_type"].values()
    )
    with pytest.raises(ValueError, match="conversations 0"):
        write_corpus(tmp_path / "bad", 10, 2, conversations=0)


def test_rejects_images_too_small_for_the_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size 16"):
        write_corpus(tmp_path, 10, 2, image_size=16)


# ---------------------------------------------------------------------------------------------------
# Formats


def check_llava(records: list[dict], images: Path) -> None:
    assert isinstance(records, list)
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        turns = r["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(isinstance(t["value"], str) and t["value"] for t in turns)
        n_tokens = sum(t["value"].count("<image>") for t in turns)
        if "image" in r:
            assert (images / r["image"]).is_file()
            assert turns[0]["value"].startswith("<image>\n") and n_tokens == 1
        else:
            assert n_tokens == 0


def test_llava_files_follow_the_format(corpus: CorpusPaths) -> None:
    for path in (corpus.recap_train, corpus.short_train, corpus.instruct_train):
        check_llava(load(path), corpus.images)
    for path in (corpus.recap_train, corpus.short_train):
        assert [r["image"] for r in load(path)] == [f"train/{i:06d}.png" for i in range(400)]
    instruct = load(corpus.instruct_train)
    turns = Counter(len(r["conversations"]) // 2 for r in instruct if "image" in r)
    assert set(turns) == {2, 3, 4}
    text_only = [r for r in instruct if "image" not in r]
    assert 0.03 <= len(text_only) / len(instruct) <= 0.07


def test_karpathy_file_follows_the_format(corpus: CorpusPaths) -> None:
    data = load(corpus.karpathy)
    assert data["dataset"] == "shapes"
    images = data["images"]
    assert Counter(im["split"] for im in images) == {"train": 400, "test": 150}
    assert [im["imgid"] for im in images] == list(range(550))
    all_sentids = [sid for im in images for sid in im["sentids"]]
    assert len(set(all_sentids)) == len(all_sentids)
    for im in images:
        assert set(im) == {"filepath", "filename", "imgid", "split", "sentences", "sentids"}
        assert im["filepath"] == im["split"] and (corpus.images / im["filepath"] / im["filename"]).is_file()
        assert [s["sentid"] for s in im["sentences"]] == im["sentids"]
        for s in im["sentences"]:
            assert s["imgid"] == im["imgid"]
            assert s["tokens"] == s["raw"].lower().replace(",", "").replace(".", "").split()


def test_answer_distribution_matches_instruction_data(corpus: CorpusPaths) -> None:
    by_type: dict[str, Counter[str]] = {"yes/no": Counter(), "open": Counter()}
    for record in load(corpus.instruct_train):
        if "image" not in record:
            continue
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            if human["value"].removeprefix("<image>\n").startswith(("Write a short", "Describe the image")):
                continue
            by_type["yes/no" if gpt["value"] in ("yes", "no") else "open"][gpt["value"]] += 1
    stored = load(corpus.vqa_train_answers)
    assert {k: Counter(v) for k, v in stored["by_answer_type"].items()} == by_type
    per_question_type = Counter()
    for counts in stored["by_question_type"].values():
        per_question_type.update(counts)
    assert per_question_type == by_type["yes/no"] + by_type["open"]


def test_scene_files_describe_the_pixels(corpus: CorpusPaths) -> None:
    for path, split, n in ((corpus.scenes_train, "train", 400), (corpus.scenes_test, "test", 150)):
        rows = load_jsonl(path)
        assert [r["image"] for r in rows] == [f"{split}/{i:06d}.png" for i in range(n)]
        for row in rows:
            background, shapes = pixels_of(corpus, row["image"])
            described = Counter(Seen(o["kind"], o["color"], o["size"], o["position"]) for o in row["objects"])
            assert row["background"] == background and described == Counter(shapes)


def _brute_ngram_f1(a: str, b: str, n: int) -> float:
    """N-gram overlap F1 by listing n-grams and matching each at most once (no Counter arithmetic)."""
    wa, wb = (re.findall(r"[a-z0-9]+", s.lower()) for s in (a, b))
    ga = [tuple(wa[i : i + n]) for i in range(len(wa) - n + 1)]
    gb = [tuple(wb[i : i + n]) for i in range(len(wb) - n + 1)]
    if not ga or not gb:
        return 0.0
    left = list(gb)
    matched = 0
    for g in ga:
        if g in left:
            left.remove(g)
            matched += 1
    return 2 * matched / (len(ga) + len(gb))


def test_consensus_caption_is_the_reference_closest_to_the_others(corpus: CorpusPaths) -> None:
    from vlmtrain.demo.text import caption_similarity, consensus_caption

    for image in load(corpus.karpathy)["images"][:30]:
        refs = [s["raw"] for s in image["sentences"]]
        sims = [[np.mean([_brute_ngram_f1(a, b, n) for n in range(1, 5)]) for b in refs] for a in refs]
        for i in range(5):
            for j in range(5):
                assert caption_similarity(refs[i], refs[j]) == pytest.approx(sims[i][j], abs=1e-12)
        totals = [sum(sims[k][j] for j in range(5) if j != k) for k in range(5)]
        assert consensus_caption(refs) == refs[int(np.argmax(totals))]
    assert caption_similarity("A small red circle.", "a small red circle") == 1.0
    assert caption_similarity("A red circle.", "a red circle") == 0.75  # no 4-gram
    assert caption_similarity("A red circle.", "Two blue squares.") == 0.0
    # Two of three references list the shapes: one of those two is the consensus, not the count caption.
    refs = (
        "Two shapes on a white background.",
        "A red circle and a blue square.",
        "There is a red circle and a blue square.",
    )
    assert consensus_caption(refs) in refs[1:]
    with pytest.raises(ValueError, match="at least one reference"):
        consensus_caption(())


def test_caption_turn_changes_only_the_caption_openings(tmp_path: Path) -> None:
    from vlmtrain.demo.text import consensus_caption

    rand = write_corpus(tmp_path / "random", 60, 10, seed=2, conversations=2)
    cons = write_corpus(tmp_path / "consensus", 60, 10, seed=2, conversations=2, caption_turn="consensus")
    refs = {
        f"train/{img['filename']}": [s["raw"] for s in img["sentences"]]
        for img in load(cons.karpathy)["images"]
        if img["split"] == "train"
    }
    openings = 0
    for a, b in zip(load(rand.instruct_train), load(cons.instruct_train), strict=True):
        assert a["id"] == b["id"]
        first_a, first_b = a["conversations"][:2], b["conversations"][:2]
        if "image" in a and first_a[0]["value"] == "<image>\nWrite a short caption for the image.":
            openings += 1
            assert first_a[1]["value"] in refs[a["image"]]
            assert first_b[1]["value"] == consensus_caption(refs[a["image"]])
            assert a["conversations"][2:] == b["conversations"][2:]
        else:
            assert a == b
    assert openings >= 5, openings
    same = (
        "vqa_test.jsonl",
        "vqa_train.jsonl",
        "karpathy_shapes.json",
        "recap_train.json",
        "short_train.json",
    )
    for name in same:
        assert (rand.root / name).read_bytes() == (cons.root / name).read_bytes(), name
    with pytest.raises(ValueError, match="caption_turn 'best'"):
        write_corpus(tmp_path / "bad", 10, 2, caption_turn="best")
