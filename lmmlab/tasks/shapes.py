"""The `shapes` task: a generated visual-QA quiz — scenes of simple shapes, questions about them, splits, batching,
and exact-match evaluation through any KV cache. The embedded toy LLaVA is trained on it.

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
split can appear in training, whatever the seeds. Within the calibration, validation and test splits every item is
distinct: a (scene, kind, question) already yielded is skipped (a scene as a set of shapes), so each question counts
once in an interval or a paired test. The train split is an endless stream and keeps its repeats.

Evaluation protocol: the image and the question, all but the prompt's last token, are prefilled into the cache; every
answer token, the first included, is then produced by a decode step whose query reads the cache, so whatever the cache
does to the keys and values it stores (quantization, say) shows in the answers. Batches hold questions of one token
length only (`base.buckets`): no pad token enters a quantization group, a scale or the byte count, so a question's
answer and loss do not depend on which questions share its batch.
"""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Sequence

from PIL import Image, ImageDraw

from lmmlab.tasks.base import (CacheFactory, Metrics, Task, answer_items, answer_nll, check_split, greedy_answers,
                               peak_memory, register, reset_peak_memory, token_lengths)

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
    """Yield `n` samples of a split (endless if n is None), kinds in turn, deterministic from `seed`. Every split but
    train yields distinct items: a (scene as a set of shapes, kind, question) already yielded is skipped."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed * 7919 + SPLIT_SEEDS[split])
    hash_buckets = SPLITS[split]
    seen: set | None = None if split == "train" else set()  # train stays as the cached default model saw it
    i = 0
    while n is None or i < n:
        kind = KINDS[i % len(KINDS)]
        scene = random_scene(rng)
        if scene_bucket(scene) not in hash_buckets:
            continue
        qa = ask(scene, kind, rng)
        if qa is None:
            continue
        if seen is not None:
            key = (frozenset(scene), kind, qa[0])
            if key in seen:
                continue
            seen.add(key)
        yield Sample(scene, kind, *qa)
        i += 1


def split(name: str, n: int | None = None, seed: int | None = None) -> list[Sample]:
    """A fixed list of samples from a split (the split's default size when n is None)."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
    if n is None:
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


def texts(processor, batch: Sequence[Sample], with_answers: bool = False) -> list[str]:
    """Each sample's prompt, with its answer and the end token appended when asked."""
    return [s.prompt + (f" {s.answer}{processor.tokenizer.eos_token}" if with_answers else "") for s in batch]


def collate(processor, batch: Sequence[Sample], with_answers: bool = False):
    """Processor inputs for a batch: prompts (left-padded) and images; with answers appended when asked."""
    return processor(images=[s.image() for s in batch], text=texts(processor, batch, with_answers), return_tensors="pt",
                     padding=True)


# --- evaluation --------------------------------------------------------------------------------------------------

def model_inputs(loaded, batch: Sequence[Sample], with_answers: bool = False) -> dict:
    """Processor inputs for a batch on the model's device, pixel values in the model's dtype."""
    inputs = collate(loaded.processor, batch, with_answers=with_answers).to(loaded.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
    return dict(inputs)


def batches(loaded, samples: Sequence[Sample], batch_size: int = 32) -> list[dict]:
    """Processor inputs (image + question prompt, attention mask) for consecutive batches of `samples`."""
    return [model_inputs(loaded, samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def generate_answers(loaded, batch: Sequence[Sample], make_cache: CacheFactory | None = None,
                     max_new_tokens: int = 3) -> tuple[list[str], int]:
    """Greedy answers for a batch, decoded from the cache; returns the answers and the bytes the cache holds."""
    return greedy_answers(loaded, model_inputs(loaded, batch), make_cache, max_new_tokens)


def answer_lengths(tokenizer, batch: Sequence[Sample]) -> list[int]:
    """Tokens of each sample's answer (answer word + end token)."""
    return [len(tokenizer(f" {s.answer}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"]) for s in batch]


def answer_loss(loaded, batch: Sequence[Sample], make_cache: CacheFactory | None = None) -> list[float]:
    """Teacher-forced cross-entropy per sample, averaged over the answer's tokens (answer word + end token)."""
    return answer_nll(loaded, model_inputs(loaded, batch, with_answers=True), answer_lengths(loaded.tokenizer, batch),
                      make_cache)


def sample_lengths(processor, samples: Sequence[Sample], with_answers: bool = False) -> list[int]:
    """Each sample's exact token count as the processor builds it (image tokens expanded), for `buckets`."""
    return token_lengths(processor, texts(processor, samples, with_answers), [(IMAGE_SIZE, IMAGE_SIZE)] * len(samples))


def evaluate(loaded, samples: Sequence[Sample], make_cache: CacheFactory | None = None, batch_size: int = 64,
             with_loss: bool = True, progress: bool = False, max_new_tokens: int = 3) -> Metrics:
    """Exact-match accuracy (overall and per kind), answer loss, latency, peak memory and KV bytes on `samples`.
    Answers come from batches of prompts of one token length, losses from batches of one (prompt, answer) length
    (`base.buckets`: no padding, so no result depends on the batch); results are in the order of `samples`."""
    if not loaded.is_multimodal:
        raise ValueError(f"{loaded.name!r} is a text-only model; the shapes task needs a Llava model")
    if not samples:
        raise ValueError("no samples to evaluate")
    reset_peak_memory(loaded.device)
    processor = loaded.processor
    done = answer_items(loaded, samples, lengths=lambda items, answers: sample_lengths(processor, items, answers),
                        inputs=lambda batch, answers: model_inputs(loaded, batch, with_answers=answers),
                        answer_lengths=lambda batch: answer_lengths(loaded.tokenizer, batch), make_cache=make_cache,
                        batch_size=batch_size, max_new_tokens=max_new_tokens, with_loss=with_loss,
                        progress=progress)
    predictions, losses, seconds, kv = done.predictions, done.losses, done.seconds, done.kv_bytes
    correct = [float(p == s.answer) for p, s in zip(predictions, samples)]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for ok, s in zip(correct, samples):
        by_kind[s.kind].append(ok)
    accuracy = sum(correct) / len(correct)
    return Metrics(
        primary_metric="accuracy", primary=accuracy, direction="maximize",
        loss=sum(losses) / len(losses) if losses else float("nan"),
        latency_s=seconds / len(samples), peak_mem_bytes=peak_memory(loaded.device), kv_bytes=kv / len(samples),
        n=len(samples),
        values={"accuracy": accuracy, **{f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())}},
        per_item=correct, per_item_metric="correct", predictions=predictions, per_item_loss=losses,
    )


@register
class ShapesTask(Task):
    """The generated shapes quiz: exact one-word match, questions of four kinds (see the module docstring)."""

    name = "shapes"
    primary_metric = "accuracy"
    direction = "maximize"
    needs_images = True

    def __init__(self, batch_size: int = 64, max_new_tokens: int = 3):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1; got {batch_size}, {max_new_tokens}")
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def items(self, split_name: str, n: int | None = None, seed: int = 0) -> list[Sample]:
        check_split(split_name)
        return split(split_name, n, seed=seed)

    def calibration_batches(self, loaded, *, n: int | None = None, seed: int = 0,
                            batch_size: int | None = None) -> list[dict]:
        self.check_model(loaded)
        return batches(loaded, self.items("calibration", n, seed), batch_size or 32)

    def evaluate(self, loaded, *, split: str = "test", make_cache: CacheFactory | None = None, n: int | None = None,
                 with_loss: bool = True, progress: bool = False) -> Metrics:
        self.check_model(loaded)
        return evaluate(loaded, self.items(split, n), make_cache, self.batch_size, with_loss, progress,
                        self.max_new_tokens)

    def describe(self) -> str:
        return "shapes (generated visual QA; exact-match accuracy)"


def gallery(samples: Sequence[Sample], predictions: Sequence[str] | None = None) -> tuple[list[Image.Image], list[str]]:
    """Images and captions (question, answer, the model's prediction) for `plots.gallery_figure`."""
    captions = [f"{s.question}\nanswer: {s.answer}" + (f"\nmodel: {predictions[i]}" if predictions else "")
                for i, s in enumerate(samples)]
    return [s.image() for s in samples], captions
