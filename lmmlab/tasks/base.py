"""The task seam: what a model is scored on, apart from the engine that compresses it.

A `Task` knows its data, prompts and metric. It yields calibration batches (model inputs with an attention mask) and
evaluates a `Loaded` model on a split, with an optional KV-cache factory, returning `Metrics`: one primary metric and
its direction (accuracy ↑, perplexity ↓), a loss, KV bytes, latency, peak memory, the task's own named metrics, and a
value per item (a question's correctness, a window's NLL) so that tables can carry intervals and paired tests.

The engine (calibrate, prune, allocate, kvcache, search) never looks inside a task: it calls `calibration_batches`
and `evaluate`, and optimises `Metrics.primary` in `Metrics.direction` (or `Metrics.loss`).
"""
from __future__ import annotations

import inspect
import time
import resource
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Hashable, Sequence, TypeVar

import torch

CacheFactory = Callable[[], object]
T = TypeVar("T")
SPLITS = ("calibration", "validation", "test")  # calibration: scores; validation: the search; test: final reports
DIRECTIONS = ("maximize", "minimize")


@dataclass
class Metrics:
    """What `Task.evaluate` returns. `values` holds the task's own metrics by name, the primary one included, so
    `metrics.accuracy` or `metrics.perplexity` read them directly."""

    primary_metric: str
    primary: float
    direction: str  # "maximize" or "minimize"
    loss: float  # mean token cross-entropy the task defines (answer tokens, or every predicted token of a window)
    latency_s: float  # wall seconds per item
    peak_mem_bytes: int
    kv_bytes: float  # bytes the KV cache holds per item at the end of its evaluation
    n: int
    values: dict[str, float] = field(default_factory=dict)
    per_item: list[float] = field(default_factory=list, repr=False)  # one value per item, in the task's item order
    per_item_metric: str = ""  # what per_item holds: "correct" (0/1), "nll" (mean NLL of a window), "vqa_score"...
    predictions: list[str] = field(default_factory=list, repr=False)
    per_item_loss: list[float] = field(default_factory=list, repr=False)  # each item's `loss`, item order (if kept)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; got {self.direction!r}")

    def __getattr__(self, name: str):
        values = self.__dict__.get("values") or {}
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} has no metric {name!r} (it has {', '.join(values) or 'none'})")

    def to_dict(self, with_items: bool = False) -> dict:
        """Flat JSON-ready dict: primary_metric, primary, direction, the task's metrics by name, loss, timing, bytes."""
        d = asdict(self)
        values = d.pop("values")
        if not with_items:
            d.pop("per_item")
            d.pop("predictions")
            d.pop("per_item_loss")
        return {"primary_metric": d.pop("primary_metric"), "primary": d.pop("primary"),
                "direction": d.pop("direction"), **values, **d}


class Task(ABC):
    """A scoring target. Subclasses set the class attributes and implement the two methods."""

    name: ClassVar[str]
    primary_metric: ClassVar[str]
    direction: ClassVar[str]
    needs_images: ClassVar[bool] = False

    def check_model(self, loaded) -> None:
        """One clear error when the model cannot take this task (images on a text-only model)."""
        if self.needs_images and not loaded.is_multimodal:
            raise ValueError(f"task {self.name!r} needs images, and {loaded.name!r} is a text-only model; "
                             "pass a Llava model or a text task (--task text)")

    @abstractmethod
    def calibration_batches(self, loaded, *, n: int | None = None, seed: int = 0,
                            batch_size: int | None = None) -> list[dict]:
        """Model inputs (with an attention_mask) for `n` calibration items, on the model's device."""

    @abstractmethod
    def evaluate(self, loaded, *, split: str = "test", make_cache: CacheFactory | None = None, n: int | None = None,
                 with_loss: bool = True, progress: bool = False) -> Metrics:
        """Score `loaded` on `split` (calibration / validation / test), each item through a fresh cache from
        `make_cache` (a plain DynamicCache when None)."""

    def better(self, a: float, b: float) -> bool:
        """Whether primary value `a` is better than `b` in this task's direction."""
        return a > b if self.direction == "maximize" else a < b

    def describe(self) -> str:
        return self.name


# --- registry ------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available to `get_task` under its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def task_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def task_options(name: str) -> list[str]:
    """The keyword options a task accepts (its constructor's parameters)."""
    cls = _task_class(name)
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def get_task(name: str, **options) -> Task:
    """The task registered as `name`, built with `options` (e.g. data=PATH, seqlen=256); None-valued options are
    left at their defaults. Unknown names and options fail with one line naming what is allowed."""
    cls = _task_class(name)
    allowed = task_options(name)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for task {name!r}; allowed: {', '.join(allowed)}")
    return cls(**options)


def _task_class(name: str) -> type[Task]:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _load_builtin() -> None:
    import importlib

    for module in ("shapes", "text", "vqa"):
        try:
            importlib.import_module(f"lmmlab.tasks.{module}")
        except ModuleNotFoundError as err:  # a task module not written yet must not hide the others
            if err.name != f"lmmlab.tasks.{module}":
                raise


# --- helpers every task's evaluation shares ----------------------------------------------------------------------

def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def check_data_path(data: str | Path) -> Path:
    """An existing, non-empty file or folder, else one clear error."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    if path.is_file() and path.stat().st_size == 0 or path.is_dir() and not any(path.iterdir()):
        raise ValueError(f"--data {path} is empty")
    return path


def new_cache(loaded, make_cache: CacheFactory | None):
    """A fresh cache from the factory, or transformers' plain DynamicCache."""
    if make_cache is not None:
        return make_cache()
    from transformers import DynamicCache

    return DynamicCache(config=loaded.model.config)


def cache_bytes(cache) -> int:
    """Bytes a cache really stores: its own count when it keeps one (quantized caches), else its tensors' sizes."""
    from lmmlab.kv.cache import layer_nbytes

    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(layer_nbytes(layer) for layer in cache.layers)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: the device allocator's on CUDA, the process's resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


# --- unpadded batches ----------------------------------------------------------------------------------------------
# A quantized cache groups keys per channel over G consecutive tokens: a left-padded row would put its pad tokens into
# its first key groups, their scales and the byte count, so an item's answer would depend on which items share its
# batch. Evaluation therefore batches only items of exactly the same token length (no padding at all).

def buckets(lengths: Sequence[Hashable], batch_size: int) -> list[list[int]]:
    """Item indices grouped by equal `lengths[i]` (any hashable key: a token count, or a (prompt, answer) pair of
    counts), groups in order of their first item, each group cut into batches of at most `batch_size` indices in
    ascending order. Items of one batch have equal token lengths, so the batch needs no padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(lengths):
        groups.setdefault(key, []).append(i)
    return [idx[s : s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]


def in_item_order(batches: Sequence[Sequence[int]], results: Sequence[Sequence[T]]) -> list[T]:
    """Per-batch results put back in item order: out[batches[b][j]] = results[b][j] (the inverse of `buckets`)."""
    out: list = [None] * sum(len(b) for b in batches)
    for idx, values in zip(batches, results, strict=True):
        if len(idx) != len(values):
            raise ValueError(f"a batch of {len(idx)} items returned {len(values)} results")
        for i, value in zip(idx, values):
            out[i] = value
    return out


def token_lengths(processor, texts: Sequence[str], image_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Exact number of tokens the processor makes of each text with its one image (the image token expanded), as in
    a batch: the text's tokens plus what the image token expands to, which depends only on the image's (width,
    height) and is measured once per size by the processor itself on a blank image of that size. Fast: one
    tokenizer call for all texts, no image decoded or preprocessed per item."""
    from PIL import Image

    ids = processor.tokenizer(list(texts))["input_ids"]
    extra: dict[tuple[int, int], int] = {}
    lengths = []
    for text, size, row in zip(texts, image_sizes, ids, strict=True):
        size = tuple(size)
        if size not in extra:
            built = processor(images=[Image.new("RGB", size)], text=[text], return_tensors="pt")["input_ids"]
            extra[size] = built.shape[1] - len(row)
        lengths.append(len(row) + extra[size])
    return lengths


def check_unpadded(inputs: dict) -> None:
    """Fail loudly if a batch that `buckets` built has padding: its token lengths were not exact."""
    mask = inputs["attention_mask"]
    if not bool(mask.all()):
        raise RuntimeError(f"a bucketed batch is padded ({int((mask == 0).sum())} pad tokens): the token lengths "
                           "used to bucket it differ from the processor's")


def prefill_then_read(model, inputs: dict, cache, tail: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill all but the last `tail` tokens (any image among them) into `cache`, then run those `tail` tokens
    against it, so that every one of them reads the stored (possibly quantized) states. Left-padded batches get
    positions from their attention mask. Returns the tail's logits [B, tail, vocab], the mask and the positions."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    head = ids.shape[1] - tail
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}  # pixel_values, ...
    model(input_ids=ids[:, :head], attention_mask=mask[:, :head], position_ids=position_ids[:, :head], cache=cache,
          use_cache=True, logits_to_keep=1, **extra)  # the prefill only fills the cache: no full-vocabulary logits
    logits = model(input_ids=ids[:, head:], attention_mask=mask, position_ids=position_ids[:, head:], cache=cache,
                   use_cache=True).logits
    return logits, mask, position_ids


@torch.no_grad()
def greedy_answers(loaded, inputs: dict, make_cache: CacheFactory | None = None,
                   max_new_tokens: int = 3) -> tuple[list[str], int]:
    """Greedy answers for a batch of prompts (left-padded, or unpadded as `buckets` builds them): prefill all but the
    prompt's last token into a fresh cache, then produce every answer token, the first included, by a decode step
    that reads the cache (so whatever the cache does to what it stores shows in the answers). Returns the answers
    and the bytes the cache holds per row summed over the rows, each row's counted when its answer ends (EOS or
    `max_new_tokens`): the filler tokens that rows already done feed while others decode are not counted, so in an
    unpadded batch a row's bytes are what it holds evaluated alone."""
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cache = new_cache(loaded, make_cache)
    logits, mask, position_ids = prefill_then_read(model, inputs, cache, tail=1)
    logits = logits[:, -1]
    rows = len(mask)
    generated, done = [], torch.zeros(rows, dtype=torch.bool, device=device)
    row_bytes = [0.0] * rows
    for step in range(max_new_tokens):
        next_token = logits.argmax(-1)
        next_token = torch.where(done, torch.full_like(next_token, pad), next_token)
        generated.append(next_token)
        ended = ~done & (next_token == tok.eos_token_id) if step < max_new_tokens - 1 else ~done
        if ended.any():  # every row stores the same number of tokens: a row's share is an equal part of the total
            share = cache_bytes(cache) / rows
            for r in ended.nonzero().flatten().tolist():
                row_bytes[r] = share
        done |= ended
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
        logits = model(input_ids=next_token[:, None], attention_mask=mask, position_ids=position_ids,
                       cache=cache, use_cache=True).logits[:, -1]
    answers = []
    for row in torch.stack(generated, 1).tolist():
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        answers.append(tok.decode([t for t in row if t != pad], skip_special_tokens=True).strip())
    total = sum(row_bytes)
    return answers, int(total) if total == int(total) else total


@torch.no_grad()
def answer_nll(loaded, inputs: dict, answer_lengths: list[int], make_cache: CacheFactory | None = None) -> list[float]:
    """Teacher-forced cross-entropy per row of a batch whose rows end with their answer's tokens (`answer_lengths[i]`
    of them), averaged over those tokens; the last max(answer_lengths) + 1 tokens read the cache, as in
    `greedy_answers`. A row's value is independent of its batch only when the batch is unpadded and every row has
    the same answer length (so the prefill / read split is the row's own): evaluation buckets by (prompt length,
    answer length) for that; a left-padded batch still works, with pads in the cache."""
    ids = inputs["input_ids"]
    tail = max(answer_lengths) + 1
    logits = prefill_then_read(loaded.model, inputs, new_cache(loaded, make_cache), tail)[0].float()
    losses = []
    for i, n_answer in enumerate(answer_lengths):
        # Left padding: the answer's tokens are the last n_answer of the row, predicted by the positions before them.
        losses.append(torch.nn.functional.cross_entropy(logits[i, -n_answer - 1 : -1], ids[i, -n_answer:]).item())
    return losses


@dataclass
class Answers:
    """What `answer_items` returns: greedy answers and answer losses in item order, the seconds the answers took
    (prefill and decoding), and the KV bytes the caches held at the end of each batch, summed."""

    predictions: list[str]
    losses: list[float]
    seconds: float
    kv_bytes: int


def answer_items(loaded, items: Sequence, *, lengths: Callable[[Sequence, bool], list], inputs: Callable,
                 answer_lengths: Callable[[Sequence], list[int]], make_cache: CacheFactory | None, batch_size: int,
                 max_new_tokens: int, with_loss: bool, progress: bool = False, desc: str = "evaluate") -> Answers:
    """The answer-and-loss loop every question-answering task shares: greedy answers (`greedy_answers`) from batches
    of prompts of one token length, and each item's answer loss (`answer_nll`) from batches of one (prompt + answer,
    answer) length (`buckets`: nothing is padded, so no result depends on the batch). `lengths(items, with_answers)`,
    `inputs(batch, with_answers)` and `answer_lengths(batch)` are the task's."""
    from tqdm.auto import tqdm

    answers_by_batch, seconds, kv = [], 0.0, 0
    order = buckets(lengths(items, False), batch_size)
    for idx in tqdm(order, desc=desc, disable=not progress):
        batch = inputs([items[i] for i in idx], False)
        check_unpadded(batch)
        start = time.perf_counter()
        answers, nbytes = greedy_answers(loaded, batch, make_cache, max_new_tokens)
        synchronize(loaded.device)
        seconds += time.perf_counter() - start
        answers_by_batch.append(answers)
        kv += nbytes
    losses = []
    if with_loss:
        loss_order = buckets(list(zip(lengths(items, True), answer_lengths(items))), batch_size)
        by_batch = []
        for idx in loss_order:
            part = [items[i] for i in idx]
            batch = inputs(part, True)
            check_unpadded(batch)
            by_batch.append(answer_nll(loaded, batch, answer_lengths(part), make_cache))
        losses = in_item_order(loss_order, by_batch)
    return Answers(in_item_order(order, answers_by_batch), losses, seconds, kv)
