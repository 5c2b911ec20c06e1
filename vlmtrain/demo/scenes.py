"""The demo's visual world: colored shapes on a 3x3 grid, sampled from a seed and rendered crisply with PIL."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

KINDS: tuple[str, ...] = ("circle", "square", "triangle")

# Saturated, mutually distant RGB values; none is close to a background. Rendering is not antialiased,
# so every shape pixel carries exactly one of these values (the tests find shapes by exact color).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 180),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (200, 200, 200),
}

SIZES: tuple[str, ...] = ("small", "large")

# Shape extent as a fraction of a grid cell's side; the gap left between neighbours keeps shapes of the
# same color in adjacent cells from touching down to MIN_IMAGE_SIZE.
SIZE_FRACTION: dict[str, float] = {"small": 0.45, "large": 0.8}

GRID = 3
MIN_IMAGE_SIZE = 32
MAX_OBJECTS = GRID * GRID

# Canonical position names, indexed [row][column]; these are also the exact VQA answers.
POSITION_NAMES: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)


@dataclass(frozen=True)
class Shape:
    """One filled shape occupying one cell of the 3x3 grid."""

    kind: str
    """One of KINDS."""
    color: str
    """A key of COLORS."""
    size: str
    """One of SIZES."""
    x: int
    """Grid column, 0 (left) to 2 (right)."""
    y: int
    """Grid row, 0 (top) to 2 (bottom)."""

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        _check_choice("color", self.color, tuple(COLORS))
        _check_choice("size", self.size, SIZES)
        if not (0 <= self.x < GRID and 0 <= self.y < GRID):
            raise ValueError(f"Shape cell ({self.x}, {self.y}) is outside the {GRID}x{GRID} grid")

    @property
    def position(self) -> str:
        """Canonical position name of the shape's cell, e.g. "top left" or "center"."""
        return POSITION_NAMES[self.y][self.x]


@dataclass(frozen=True)
class Scene:
    """A picture: up to nine shapes, at most one per grid cell, on a plain background."""

    objects: tuple[Shape, ...]
    """The shapes in reading order (row by row, left to right)."""
    background: str
    """A key of BACKGROUNDS."""

    def __post_init__(self) -> None:
        _check_choice("background", self.background, tuple(BACKGROUNDS))
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} shapes, got {len(self.objects)}")
        cells = [(o.y, o.x) for o in self.objects]
        if cells != sorted(set(cells)):
            raise ValueError(f"scene shapes must sit in distinct cells in reading order, got cells {cells}")

    def key(self) -> str:
        """Canonical text identity of the scene: equal keys mean identical pictures at any size."""
        parts = [f"{o.x}{o.y}:{o.size}:{o.color}:{o.kind}" for o in self.objects]
        return f"{self.background}|" + "|".join(parts)

    def render(self, size: int) -> Image.Image:
        """Draw the scene as a `size` x `size` RGB image with no antialiasing."""
        if size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image size {size} is below {MIN_IMAGE_SIZE}: shapes would touch and lose their form; "
                f"use an image size of at least {MIN_IMAGE_SIZE}"
            )
        image = Image.new("RGB", (size, size), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(image)
        for shape in self.objects:
            _draw_shape(draw, shape, size)
        return image

    def to_json(self) -> dict[str, object]:
        """Plain JSON form (with position names) for the scenes_*.jsonl debug files."""
        return {
            "background": self.background,
            "objects": [
                {
                    "kind": o.kind,
                    "color": o.color,
                    "size": o.size,
                    "x": o.x,
                    "y": o.y,
                    "position": o.position,
                }
                for o in self.objects
            ],
        }


def shape_box(shape: Shape, image_size: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of a shape: an odd extent centred on its cell's centre pixel."""
    cell = image_size / GRID
    extent = _odd_extent(SIZE_FRACTION[shape.size] * cell)
    half = (extent - 1) // 2
    cx = math.floor((shape.x + 0.5) * cell)
    cy = math.floor((shape.y + 0.5) * cell)
    return cx - half, cy - half, cx + half, cy + half


def sample_scene(rng: np.random.Generator, max_objects: int = 3, repeat_prob: float = 0.3) -> Scene:
    """Draw a random scene: 1..max_objects shapes in distinct cells.

    With probability `repeat_prob` a shape after the first copies the kind and color of an earlier one, so
    that captions such as "two red circles" occur often enough to be learned.
    """
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    n = int(rng.integers(1, max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(MAX_OBJECTS, size=n, replace=False))
    color_names = tuple(COLORS)
    kinds_colors: list[tuple[str, str]] = []
    for i in range(n):
        if i > 0 and rng.random() < repeat_prob:
            kinds_colors.append(kinds_colors[int(rng.integers(i))])
        else:
            kinds_colors.append(
                (KINDS[rng.integers(len(KINDS))], color_names[rng.integers(len(color_names))])
            )
    # Attributes are drawn before being matched to cells, so shuffle the pairing to keep repeats anywhere.
    order = rng.permutation(n)
    objects = tuple(
        Shape(
            kind=kinds_colors[order[i]][0],
            color=kinds_colors[order[i]][1],
            size=SIZES[rng.integers(len(SIZES))],
            x=cell % GRID,
            y=cell // GRID,
        )
        for i, cell in enumerate(cells)
    )
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return Scene(objects=objects, background=background)


def scene_split(scene: Scene, test_every: int) -> str:
    """The split a scene belongs to, from a stable hash of its content: "test" for 1 in `test_every`.

    Deciding the split from content (not from the draw) makes train and test disjoint by construction:
    an identical picture can never appear in both, whatever the seed or the split sizes.
    """
    digest = hashlib.blake2b(scene.key().encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % test_every == 0 else "train"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, image_size: int) -> None:
    x0, y0, x1, y1 = shape_box(shape, image_size)
    fill = COLORS[shape.color]
    if shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    else:  # triangle, apex up
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def _odd_extent(length: float) -> int:
    # An odd number of pixels centres the shape exactly on a pixel, so circles and triangles come out
    # symmetric; below 5 pixels the three kinds are no longer told apart by their form.
    return max(5, 2 * round((length - 1) / 2) + 1)


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {field} {value!r}; expected one of {', '.join(allowed)}")
