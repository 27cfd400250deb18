"""A synthetic visual-question task whose answers depend on a few image regions.

Coloured shapes on a noisy grey background, in the cells of a 3 x 3 grid of a 336 x 336 image
(LLaVA-1.5's resolution: 576 patches of 14 px, so an object covers a few dozen of them).
Questions about one object's colour, an object's shape, presence (yes / no), counting, and
position (column); every answer is one word. A word-level vocabulary keeps the tokenizer
offline and tiny.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

SIZE = 336
GRID = 3
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three", "four")
COLUMNS = ("left", "middle", "right")
QUESTION_TYPES = ("color", "shape", "presence", "count", "position")
# every answer is one of these words (and the demo model's generation ends after any of them)
ANSWER_WORDS = (*COLORS, *SHAPES, *COUNTS, *COLUMNS, "yes", "no")

SPECIAL = ["<pad>", "<image>", "<unk>"]
WORDS = sorted(
    set(COLORS) | set(SHAPES) | set(COUNTS) | set(COLUMNS)
    | {"yes", "no", "what", "color", "is", "the", "shape", "there", "a", "how", "many", "shapes",
       "where", "?", "answer", ";"}
)
VOCAB = SPECIAL + WORDS


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    row: int
    col: int


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


def random_scene(rng: random.Random, n_objects: int) -> list[Obj]:
    """``n_objects`` objects in distinct grid cells, with distinct (shape, colour) pairs."""
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n_objects)
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLORS], n_objects)
    return [Obj(shape=s, color=c, row=r, col=col) for (s, c), (r, col) in zip(pairs, cells)]


def render(objects: list[Obj], rng: random.Random, blank: bool = False) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: grey noise, then each object (random size and offset in its cell)."""
    return render_with_owner(objects, rng, blank)[0]


def render_with_owner(objects: list[Obj], rng: random.Random, blank: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render` plus (SIZE, SIZE) int: the index of the object painted at each pixel, -1
    for background (the same random draws as :func:`render`, so the images are identical)."""
    nrng = np.random.default_rng(rng.randrange(2**32))
    img = np.clip(nrng.normal(128, 18, (SIZE, SIZE, 3)), 0, 255)
    owner = np.full((SIZE, SIZE), -1, dtype=np.int64)
    if blank:
        return img.astype(np.uint8), owner
    cell = SIZE // GRID
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for o in objects:
        half = rng.randint(22, 38)
        cy = o.row * cell + cell // 2 + rng.randint(-12, 12)
        cx = o.col * cell + cell // 2 + rng.randint(-12, 12)
        dy, dx = yy - cy, xx - cx
        if o.shape == "circle":
            mask = dy**2 + dx**2 <= half**2
        elif o.shape == "square":
            mask = (np.abs(dy) <= half) & (np.abs(dx) <= half)
        else:  # triangle pointing up
            mask = (dy <= half) & (dy >= -half) & (np.abs(dx) <= (dy + half) / 2)
        img[mask] = COLORS[o.color]
        owner[mask] = objects.index(o)
    return img.astype(np.uint8), owner


def patch_owner(owner: np.ndarray, patch: int = 14) -> np.ndarray:
    """(n_patches,) int, row-major patches: the index of the object that covers at least a
    third of the patch, -1 for background (objects sit in distinct grid cells: no overlaps)."""
    side = owner.shape[0] // patch
    blocks = owner[: side * patch, : side * patch].reshape(side, patch, side, patch).transpose(0, 2, 1, 3)
    cells = blocks.reshape(side * side, patch * patch)
    out = np.full(side * side, -1, dtype=np.int64)
    for k in range(int(owner.max()) + 1):
        out[(cells == k).mean(1) >= 1 / 3] = k
    return out


def patch_labels(objects: list[Obj], owner: np.ndarray, patch: int = 14) -> np.ndarray:
    """(3, n_patches) int, row-major patches: colour, shape and column of the object under
    each patch (:func:`patch_owner`; 1-based class indices, 0 = background). Dense targets for
    an auxiliary loss that teaches a tiny vision tower what the questions ask about."""
    index = patch_owner(owner, patch)
    labels = np.zeros((3, index.shape[0]), dtype=np.int64)
    colors, shapes = list(COLORS), list(SHAPES)
    for k, o in enumerate(objects):
        covered = index == k
        labels[0, covered] = colors.index(o.color) + 1
        labels[1, covered] = shapes.index(o.shape) + 1
        labels[2, covered] = o.col + 1
    return labels


def question_objects(qa: QA, objects: list[Obj]) -> list[int]:
    """Indices of the objects a question is about: every object for counting, none for an
    absent one ("is there a ... ?" answered no), else those matching its colour / shape words."""
    if qa.kind == "count":
        return list(range(len(objects)))
    words = set(qa.question.split())
    return [k for k, o in enumerate(objects)
            if (o.shape in words or not words & set(SHAPES)) and (o.color in words or not words & set(COLORS))]


def questions(objects: list[Obj], rng: random.Random) -> list[QA]:
    """One question of each type about the scene (types that apply)."""
    out = []
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]
    unique_shape = [o for o in objects if shapes.count(o.shape) == 1]
    unique_color = [o for o in objects if colors.count(o.color) == 1]
    if unique_shape:
        o = rng.choice(unique_shape)
        out.append(QA("color", f"what color is the {o.shape} ?", o.color))
    if unique_color:
        o = rng.choice(unique_color)
        out.append(QA("shape", f"what shape is the {o.color} ?", o.shape))
    if rng.random() < 0.5 and objects:
        o = rng.choice(objects)
        out.append(QA("presence", f"is there a {o.color} {o.shape} ?", "yes"))
    else:
        present = {(o.shape, o.color) for o in objects}
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        s, c = rng.choice(absent)
        out.append(QA("presence", f"is there a {c} {s} ?", "no"))
    out.append(QA("count", "how many shapes ?", COUNTS[len(objects) - 1]))
    if objects:
        o = rng.choice(objects)
        out.append(QA("position", f"where is the {o.color} {o.shape} ?", COLUMNS[o.col]))
    return out


def qa_text(qa: QA, with_answer: bool) -> str:
    """Prompt text of one question; ``with_answer`` appends the answer and a separator."""
    base = f"{qa.question} answer"
    return f"{base} {qa.answer} ;" if with_answer else base
