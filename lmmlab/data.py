"""The generated visual-QA task: scenes of simple shapes, questions about them, splits, batching.

A scene is 1-4 distinct shapes placed in the cells of a 3x3 grid (16-px cells, a 48x48 image), each with a colour and
one of two sizes. Cells are aligned with the vision tower's 16-px patches, so every image token sees at most one shape:
the model has to bind a word ("circle") to the image token that holds it, which is the part of the task that makes
multimodal models fragile under compression.

Question kinds (all answers are one word):
  colour    "what colour is the circle ?"            -> red / green / ...
  count     "how many shapes are there ?"           -> 1 / 2 / 3 / 4
  exists    "is there a triangle ?"                  -> yes / no
  position  "is the square on the left or the right ?" / "... at the top or the bottom ?"
                                                    -> left / right / top / bottom

Splits are disjoint by construction: a scene belongs to the split its content hash falls in, so no image of the test
split can appear in training, whatever the seeds.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

from PIL import Image, ImageDraw

TASK_VERSION = 1  # bump when scenes, questions or splits change: the cached default model is retrained
GRID = 3
CELL = 16
IMAGE_SIZE = GRID * CELL
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
SIZES = {"small": 4, "large": 6}  # half-width in pixels, inside a 16-px cell
BACKGROUND = (30, 30, 30)
KINDS = ("colour", "count", "exists", "position")
MAX_SHAPES = 4

# Share of scene-hash buckets (out of 100) per split.
SPLITS = {"train": range(0, 80), "calibration": range(80, 85), "validation": range(85, 92), "test": range(92, 100)}
SPLIT_SEEDS = {"train": 0, "calibration": 1, "validation": 2, "test": 3}
DEFAULT_SIZES = {"train": None, "calibration": 128, "validation": 512, "test": 1000}

PROMPT = "USER: <image> {question} ASSISTANT:"


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    row: int
    col: int


@dataclass(frozen=True)
class Sample:
    """One question about one scene; `image()` renders it."""

    scene: tuple[Shape, ...]
    kind: str
    question: str
    answer: str

    def image(self) -> Image.Image:
        return render(self.scene)

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)

    def __str__(self) -> str:
        shapes = ", ".join(f"{s.size} {s.colour} {s.shape} at ({s.row},{s.col})" for s in self.scene)
        return f"[{self.kind}] {self.question} -> {self.answer}   scene: {shapes}"


def render(scene: Sequence[Shape]) -> Image.Image:
    """Draw a scene as a 48x48 RGB image."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in scene:
        cx, cy, r = s.col * CELL + CELL // 2, s.row * CELL + CELL // 2, SIZES[s.size]
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=fill)
        elif s.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=fill)
        elif s.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r - 1), (cx - r, cy + r - 1)], fill=fill)
        elif s.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif s.shape == "cross":
            w = max(1, r // 2)
            draw.rectangle([cx - r, cy - w, cx + r - 1, cy + w - 1], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w - 1, cy + r - 1], fill=fill)
    return image


def scene_bucket(scene: Sequence[Shape]) -> int:
    """A stable 0-99 bucket from the scene's content (order-independent); decides the scene's split."""
    key = "|".join(sorted(f"{s.shape},{s.colour},{s.size},{s.row},{s.col}" for s in scene))
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 100


def random_scene(rng: random.Random) -> tuple[Shape, ...]:
    n = rng.randint(1, MAX_SHAPES)
    cells = rng.sample(range(GRID * GRID), n)
    shapes = rng.sample(SHAPES, n)
    return tuple(
        Shape(shape, rng.choice(list(COLOURS)), rng.choice(list(SIZES)), cell // GRID, cell % GRID)
        for shape, cell in zip(shapes, cells)
    )


def ask(scene: Sequence[Shape], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """A (question, answer) of the given kind about the scene; None when the scene allows no such question."""
    if kind == "colour":
        s = rng.choice(scene)
        return f"what colour is the {s.shape} ?", s.colour
    if kind == "count":
        return "how many shapes are there ?", str(len(scene))
    if kind == "exists":
        present = {s.shape for s in scene}
        absent = [x for x in SHAPES if x not in present]
        if absent and rng.random() < 0.5:
            return f"is there a {rng.choice(absent)} ?", "no"
        return f"is there a {rng.choice(sorted(present))} ?", "yes"
    if kind == "position":
        # Only ask what is unambiguous: a shape in the middle column has no left/right answer.
        options = [(s, "col") for s in scene if s.col != 1] + [(s, "row") for s in scene if s.row != 1]
        if not options:  # one shape, in the centre cell: no unambiguous position
            return None
        s, axis = rng.choice(options)
        if axis == "col":
            return f"is the {s.shape} on the left or the right ?", "left" if s.col == 0 else "right"
        return f"is the {s.shape} at the top or the bottom ?", "top" if s.row == 0 else "bottom"
    raise ValueError(f"unknown question kind {kind!r}; allowed: {', '.join(KINDS)}")


def samples(split: str, n: int | None = None, seed: int | None = None) -> Iterator[Sample]:
    """Yield `n` samples of a split (endless if n is None), kinds in turn, deterministic from `seed`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed * 7919 + SPLIT_SEEDS[split])
    buckets = SPLITS[split]
    i = 0
    while n is None or i < n:
        kind = KINDS[i % len(KINDS)]
        scene = random_scene(rng)
        if scene_bucket(scene) not in buckets:
            continue
        qa = ask(scene, kind, rng)
        if qa is None:
            continue
        yield Sample(scene, kind, *qa)
        i += 1


def split(name: str, n: int | None = None, seed: int | None = None) -> list[Sample]:
    """A fixed list of samples from a split (the split's default size when n is None)."""
    if name in DEFAULT_SIZES and n is None:
        n = DEFAULT_SIZES[name]
        if n is None:
            raise ValueError("the train split is endless: pass n")
    return list(samples(name, n, seed))


def vocabulary() -> list[str]:
    """Every word the task can use, for building the default model's word-level tokenizer."""
    words = set(PROMPT.replace("{question}", "").split())
    words |= set(SHAPES) | set(COLOURS) | {"left", "right", "top", "bottom", "yes", "no"}
    words |= {str(k) for k in range(MAX_SHAPES + 1)} | set(SIZES) | {"nothing"}
    for template in ("what colour is the ?", "how many shapes are there ?", "is there a ?",
                     "is the on the left or the right ?", "is the at the top or the bottom ?"):
        words |= set(template.split())
    return sorted(words - {"<image>"})


def collate(processor, batch: Sequence[Sample], with_answers: bool = False):
    """Processor inputs for a batch: prompts (left-padded) and images; with answers appended when asked."""
    texts = [s.prompt + (f" {s.answer}{processor.tokenizer.eos_token}" if with_answers else "") for s in batch]
    return processor(images=[s.image() for s in batch], text=texts, return_tensors="pt", padding=True)
