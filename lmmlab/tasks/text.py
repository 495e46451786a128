"""Text perplexity in non-overlapping windows, fed through the KV cache (the seed paper's objective, as Wanda and
SparseGPT score it).

Metric (Wanda, Sun et al. 2023; SparseGPT, Frantar & Alistarh 2023): the split's text is joined, tokenised once
(no special tokens; no BOS inside or at the start of windows) and cut into non-overlapping windows of `seqlen` tokens;
PPL = exp(mean NLL) over every predicted token, i.e. tokens 2..N of each window, each predicted from its own prefix.

KV-aware protocol (why this task exists): a window's first `prefill` tokens are prefilled into a fresh cache, then
the rest is fed `chunk` tokens at a time, each chunk attending to the earlier tokens through the cache (positions
continue, no padding: every window is exactly `seqlen` tokens). The NLL is read from the prefill's logits and every
chunk's logits, so a quantized cache changes the score; with a 16-bit cache it equals the plain full-window NLL.
With lmmlab's KIVI cache the quantized store is read only after the residual window has filled once (keys flush
once R = residual tokens have gathered, values once more than R have): with the defaults (seqlen 256, prefill 128,
residual 128) the prefill's keys are flushed into the store and all 128 decoded predictions read them (and the
values older than the newest 128); with seqlen 128 pass kv_residual 32 or 64 (kv_group_size 32), else the window
first flushes on the last pass and the score equals the 16-bit one (`evaluate` logs a warning then: `unread_store`).

`chunk` defaults to 16, not 1: token-by-token decoding was ~4x slower on 2 CPU cores (SmolLM2-135M, 8 windows of
256: 10.5 s against 2.8 s; 12.6 s against 2.8 s with a 2-bit cache) and gave the same perplexity. chunk=1 is exactly
KIVI's decoding. With chunks, keys are read as token by token whenever every key flush falls on a chunk boundary
(`chunk` divides the residual length and prefill mod residual, as for the defaults and residual 32 / 64); `evaluate`
logs a warning when it does not (`chunk_mismatch`). Values cannot match exactly: KIVI's value window slides by one
token per decoded token, while a chunk's tokens all read the window as it was before the chunk, so each token reads
up to chunk − 1 of its oldest window values in full precision where token-by-token decoding reads them quantized.

Data (`data=`):
  None          the offline default corpus: the Python reference documentation that ships with CPython as plain
                English text (`pydoc_data.topics`: 79 topics, ~465k characters in 3.11; the text, and so the numbers,
                follow the Python version). Whole topics go to splits: topics are ordered by a stable hash of their
                name (blake2b) and walked with a running character count; a topic whose middle falls in the first 20 %
                goes to calibration, the next 20 % to validation, the rest (60 %) to test.
  a dataset     a folder of parquet files with a "text" column as a dataset repository is published (e.g.
  folder        wikitext's wikitext-2-raw-v1/{train,validation,test}-00000-of-00001.parquet; `lmmlab.tasks.layout`):
                train -> calibration, validation -> validation, test -> test, as "wikitext2" below.
  a folder      its .txt / .md files (recursively). With at least MIN_FILES files they are split by file exactly like
                the topics above (relative path as the name); with fewer, they are joined and cut like one file.
  a file        tokenised once and cut into windows; the windows go to splits in three contiguous runs:
                the first 20 % calibration, the next 20 % validation, the last 60 % test.
  "wikitext2"   wikitext-2-raw-v1 (as Wanda): train -> calibration, validation -> validation, test -> test.
  "c4"          allenai/c4 (as the seed code / Wanda): the first C4_TRAIN_DOCS documents of train shard 0 ->
                calibration; validation shard 0, documents [:1100] (SparseGPT/Wanda's evaluation text) -> test,
                documents [1100:2200] -> validation. Both through the optional `datasets` package (not a dependency).
Splits never share text: documents (topics, files) belong to one split, and a single text's runs do not overlap.

Evaluation takes DEFAULT_SIZES[split] windows unless told otherwise (never more than the split has), drawn with the
task's `seed` and kept in text order; `calibration_batches` draws its windows with its own `seed` argument.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmmlab.tasks.base import (SPLITS, CacheFactory, Metrics, Task, cache_bytes, check_data_path, check_split,
                               new_cache, peak_memory, register, reset_peak_memory, synchronize)
from lmmlab.tasks.layout import split_files, splits

log = logging.getLogger(__name__)

DEFAULT_SIZES = {"calibration": 32, "validation": 16, "test": 64}  # windows; SmolLM2-135M, 2 CPU cores: test ~22 s
SHARES = {"calibration": 0.2, "validation": 0.2, "test": 0.6}  # of characters (documents) or of windows (one text)
DATASETS = ("wikitext2", "c4")
MIN_FILES = 5  # a folder with at least this many .txt/.md files is split by file; fewer are joined into one text
TEXT_SUFFIXES = (".txt", ".md")
SEPARATOR = "\n\n"  # between documents, as Wanda joins wikitext
DEFAULT_CHUNK = 16  # ~4x faster than token by token on CPU, and equal to it for every aligned KIVI layout
C4_TRAIN_DOCS = 5000  # calibration text: the first documents of C4's train shard 0
C4_EVAL_DOCS = 1100  # SparseGPT / Wanda evaluate on the first 1100 documents of C4's validation shard 0


# --- where the text comes from -----------------------------------------------------------------------------------

def stable_hash(name: str) -> int:
    """A hash of a document's name that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def split_documents(docs: dict[str, str]) -> dict[str, list[str]]:
    """Document names per split: ordered by stable hash, then cut by running character share (20/20/60 %)."""
    order = sorted(docs, key=lambda name: (stable_hash(name), name))
    total = sum(len(docs[name]) for name in order)
    bounds = [("calibration", SHARES["calibration"]), ("validation", SHARES["calibration"] + SHARES["validation"])]
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    seen = 0
    for name in order:
        middle = (seen + len(docs[name]) / 2) / total
        names[next((s for s, b in bounds if middle < b), "test")].append(name)
        seen += len(docs[name])
    return names


def default_corpus() -> dict[str, str]:
    """The Python reference documentation, one document per topic (ships with CPython: no download)."""
    from pydoc_data.topics import topics

    return dict(topics)


def read_folder(path: Path) -> dict[str, str]:
    """The folder's .txt / .md files by relative path (recursively); one clear error when there are none."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    docs = {str(p.relative_to(path)): p.read_text(encoding="utf-8", errors="replace") for p in files}
    docs = {name: text for name, text in docs.items() if text.strip()}
    if not docs:
        raise ValueError(f"--data {path} holds no non-empty {' or '.join(TEXT_SUFFIXES)} file; "
                         "pass a text file or a folder of text files")
    return docs


HUB_SPLITS = {"calibration": "train", "validation": "validation", "test": "test"}  # ours <- the published one


def read_parquet_splits(path: Path, config: str | None = None) -> dict[str, str]:
    """The joined "text" column of each published split of a dataset folder (see `lmmlab.tasks.layout`)."""
    import pandas as pd

    out = {}
    for ours, published in HUB_SPLITS.items():
        frames = [pd.read_parquet(f) for f in split_files(path, published, config=config)]
        if any("text" not in f.columns for f in frames):
            raise ValueError(f"--data {path}: the {published!r} parquet files need a 'text' column")
        out[ours] = SEPARATOR.join(t for f in frames for t in f["text"].tolist() if isinstance(t, str))
    return out


def load_hub(name: str) -> dict[str, str]:
    """wikitext2 / c4 through `datasets` (cached or downloaded): the joined text of each split."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError(f"--data {name} needs the optional `datasets` package (pip install datasets); "
                         "or pass a text file, a folder of text files, or no data for the offline corpus") from None
    try:
        if name == "wikitext2":
            parts = {s: load_dataset("wikitext", "wikitext-2-raw-v1", split=hub)["text"]
                     for s, hub in (("calibration", "train"), ("validation", "validation"), ("test", "test"))}
            return {s: SEPARATOR.join(texts) for s, texts in parts.items()}
        train = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        val = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                           split="validation")
        return {"calibration": " ".join(train[:C4_TRAIN_DOCS]["text"]),
                "validation": " ".join(val[C4_EVAL_DOCS:2 * C4_EVAL_DOCS]["text"]),
                "test": " ".join(val[:C4_EVAL_DOCS]["text"])}
    except Exception as err:  # the hub unreachable and nothing cached, or a broken cache: one line, not a trace
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load --data {name} through `datasets` ({first}); it needs the hub or a cached copy; "
                         "pass a local text file or folder, or no data for the offline corpus") from None


# --- tokens and windows ------------------------------------------------------------------------------------------

def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one stream of token ids, without special tokens (Wanda tokenises the joined text once)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows [W, seqlen] from the start of the stream; the tail shorter than a window is dropped."""
    count = ids.numel() // seqlen
    return ids[: count * seqlen].reshape(count, seqlen)


def split_runs(windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """One text's windows in three contiguous runs: 20 % calibration, 20 % validation, the rest test."""
    total = windows.shape[0]
    calibration = round(SHARES["calibration"] * total)
    validation = round(SHARES["validation"] * total)
    return {"calibration": windows[:calibration], "validation": windows[calibration:calibration + validation],
            "test": windows[calibration + validation:]}


# --- the KV-aware protocol ---------------------------------------------------------------------------------------

def steps(seqlen: int, *, prefill: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) tokens of each forward pass over a window: the prefill, then chunks (the last may be short)."""
    bounds = [0, prefill, *range(prefill + chunk, seqlen, chunk), seqlen]
    return list(zip(bounds[:-1], bounds[1:]))


def _step(model, ids: torch.Tensor, start: int, end: int, cache) -> torch.Tensor:
    """Logits [B, end-start, V] of tokens start..end-1, attending to tokens 0..start-1 through `cache`."""
    batch = ids.shape[0]
    positions = torch.arange(start, end, device=ids.device).expand(batch, -1)
    mask = torch.ones(batch, end, dtype=torch.long, device=ids.device)
    return model(input_ids=ids[:, start:end], attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True).logits


def window_nll(model, ids: torch.Tensor, cache, *, prefill: int, chunk: int) -> torch.Tensor:
    """Mean NLL of tokens 2..N of each window [B, N] (float64 [B]): prefill `prefill` tokens into `cache`, then
    feed the rest `chunk` tokens at a time through it, scoring each piece's next-token predictions."""
    batch, seqlen = ids.shape
    total = torch.zeros(batch, dtype=torch.float64, device=ids.device)
    for start, end in steps(seqlen, prefill=prefill, chunk=chunk):
        logits = _step(model, ids, start, end, cache)
        targets = ids[:, start + 1: end + 1]  # the last window token predicts nothing inside the window
        logits = logits[:, : targets.shape[1]].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        total += nll.view(batch, -1).sum(1, dtype=torch.float64)
    return total / (seqlen - 1)


def unread_store(cache, *, seqlen: int, prefill: int, chunk: int) -> str | None:
    """Why no scored prediction reads this KIVI cache's quantized store, or None when some do.

    The key window first flushes in the pass whose end reaches `residual_length` tokens (the value window one token
    later); only later passes read the store, so when that pass is the window's last one the score equals the 16-bit
    score."""
    residual = getattr(cache, "residual_length", None)
    if residual is None or all(b == 16 for b in getattr(cache, "bits", [16]) + getattr(cache, "value_bits", [])):
        return None
    last_start = steps(seqlen, prefill=prefill, chunk=chunk)[-1][0]
    if residual <= last_start:  # some pass before the last one ends at or past `residual` tokens
        return None
    return (f"no scored token reads the quantized KV cache: its {residual}-token residual window first flushes on "
            f"the last pass over a {seqlen}-token window; pass a kv residual of at most {last_start} or a longer "
            "seqlen")


def chunk_mismatch(cache, *, prefill: int, chunk: int) -> str | None:
    """Why feeding `chunk` tokens at a time reads this KIVI cache's keys differently from token-by-token decoding,
    or None.

    Tokens of one forward pass see each other in full precision; token by token, they would read whatever the key
    window flushed into the quantized store in between. Both agree exactly when every key flush falls on a chunk
    boundary: `chunk` divides the residual length and the prefill's leftover in the key window (prefill mod
    residual). Values are not checked: their window slides every token, so any chunk > 1 past residual + 1 tokens
    lets a token read up to chunk − 1 values in full precision that token-by-token decoding reads quantized (a
    bounded, documented difference; chunk=1 is exact)."""
    residual = getattr(cache, "residual_length", None)
    if residual is None or chunk == 1 or all(b == 16 for b in getattr(cache, "bits", [16]) + getattr(cache, "value_bits", [])):
        return None
    if residual % chunk == 0 and prefill % residual % chunk == 0:
        return None
    return (f"chunk {chunk} is not aligned with the KV cache's {residual}-token residual window (prefill {prefill}): "
            "some tokens may see in full precision what token-by-token decoding reads quantized; pass a chunk that "
            f"divides {residual} and {prefill % residual}")


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"text task {name}={value!r} is out of range; allowed: {allowed}")
    return value


# --- the task ------------------------------------------------------------------------------------------------------

@register
class TextTask(Task):
    """Perplexity in non-overlapping `seqlen`-token windows, each prefilled then decoded through the cache."""

    name = "text"
    primary_metric = "perplexity"
    direction = "minimize"
    needs_images = False

    def __init__(self, *, data: str | Path | None = None, seqlen: int = 256, prefill: int | None = None,
                 chunk: int | None = None, batch_size: int = 8, seed: int = 0):
        self.seqlen = _check_int("seqlen", seqlen, 2)
        self.prefill = _check_int("prefill", seqlen // 2 if prefill is None else prefill, 1, seqlen - 1)
        default_chunk = min(DEFAULT_CHUNK, seqlen - self.prefill)
        self.chunk = _check_int("chunk", default_chunk if chunk is None else chunk, 1, seqlen - self.prefill)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.data = self._check_data(data)
        self._texts: dict[str, str] | str | None = None  # per split (documents), or one text cut by windows
        self._windows: dict[tuple, dict[str, torch.Tensor]] = {}  # per tokenizer

    @staticmethod
    def _check_data(data: str | Path | None) -> str | Path | None:
        if data is None or str(data) in DATASETS:
            return None if data is None else str(data)
        path = Path(data)
        if not path.exists() and "/" not in str(data) and not path.suffix:
            raise ValueError(f"unknown data {str(data)!r}: pass a text file, a folder of .txt/.md files, "
                             f"one of {', '.join(DATASETS)}, or nothing for the offline corpus")
        return check_data_path(path)

    def describe(self) -> str:
        source = "pydoc" if self.data is None else str(self.data)
        return f"text({source}, seqlen={self.seqlen}, prefill={self.prefill}, chunk={self.chunk})"

    # -- data

    def texts(self) -> dict[str, str] | str:
        """The joined text of each split, or (a single text) the whole text, to be cut into runs of windows."""
        if self._texts is None:
            self._texts = self._read()
        return self._texts

    def _read(self) -> dict[str, str] | str:
        if isinstance(self.data, str):
            return load_hub(self.data)
        if self.data is None:
            docs = default_corpus()
        elif self.data.is_dir() and splits(self.data):
            return read_parquet_splits(self.data)
        elif self.data.is_dir():
            docs = read_folder(self.data)
            if len(docs) < MIN_FILES:
                return SEPARATOR.join(docs[name] for name in sorted(docs))
        else:
            return self.data.read_text(encoding="utf-8", errors="replace")
        names = split_documents(docs)
        return {s: SEPARATOR.join(docs[name] for name in names[s]) for s in SPLITS}

    def windows(self, tokenizer, split: str) -> torch.Tensor:
        """Every window [W, seqlen] of a split, in text order (tokenised once per tokenizer)."""
        check_split(split)
        key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))
        if key not in self._windows:
            self._windows[key] = self._cut(tokenizer)
        return self._windows[key][split]

    def _cut(self, tokenizer) -> dict[str, torch.Tensor]:
        texts = self.texts()
        source = "the offline corpus" if self.data is None else f"--data {self.data}"
        if isinstance(texts, str):
            ids = tokenize(tokenizer, texts)
            if ids.numel() < self.seqlen:
                raise ValueError(f"{source} is shorter than one window: {ids.numel()} tokens, seqlen {self.seqlen}; "
                                 "pass more text or a smaller seqlen")
            cut = cut_windows(ids, self.seqlen)
            windows = split_runs(cut)
            why = {s: f"the text has {ids.numel()} tokens, {cut.shape[0]} windows of {self.seqlen}, cut 20/20/60 %"
                   for s in SPLITS}
        else:
            streams = {s: tokenize(tokenizer, text) for s, text in texts.items()}
            windows = {s: cut_windows(ids, self.seqlen) for s, ids in streams.items()}
            why = {s: f"its text has {streams[s].numel()} tokens, seqlen {self.seqlen}" for s in SPLITS}
        for s in SPLITS:
            if windows[s].shape[0] == 0:
                raise ValueError(f"the {s} split of {source} has no window ({why[s]}); "
                                 "pass more text or a smaller seqlen")
        counts = ", ".join(f"{s} {w.shape[0]}" for s, w in windows.items())
        log.info("text windows of %d tokens: %s", self.seqlen, counts)
        return windows

    def _pick(self, windows: torch.Tensor, n: int | None, split: str, seed: int, keep_order: bool) -> torch.Tensor:
        """`n` windows (the split's default when None, at most all of them) drawn with `seed`."""
        available = windows.shape[0]
        wanted = DEFAULT_SIZES[split] if n is None else _check_int("n", n, 1)
        if n is not None and n > available:
            log.warning("the %s split has %d windows of %d tokens; using all of them, not %d",
                        split, available, self.seqlen, n)
        count = min(wanted, available)
        chosen = random.Random(seed).sample(range(available), count)
        return windows[sorted(chosen) if keep_order else chosen]

    # -- the seam

    def calibration_batches(self, loaded, *, n: int | None = None, seed: int = 0,
                            batch_size: int | None = None) -> list[dict]:
        """`n` calibration windows drawn with `seed`: {"input_ids", "attention_mask"} batches on the model's device."""
        windows = self._pick(self.windows(loaded.tokenizer, "calibration"), n, "calibration", seed, keep_order=False)
        size = self.batch_size if batch_size is None else _check_int("batch_size", batch_size, 1)
        device = loaded.device
        return [{"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
                for ids in windows.split(size)]

    @torch.no_grad()
    def evaluate(self, loaded, *, split: str = "test", make_cache: CacheFactory | None = None, n: int | None = None,
                 with_loss: bool = True, progress: bool = False) -> Metrics:
        """Perplexity of `n` windows of `split`, each batch through a fresh cache from `make_cache`. The loss is the
        metric here, so `with_loss` changes nothing."""
        check_split(split)
        self.check_model(loaded)
        windows = self._pick(self.windows(loaded.tokenizer, split), n, split, self.seed, keep_order=True)
        device = loaded.device
        reset_peak_memory(device)
        per_item: list[float] = []
        kv_total, warned = 0, False
        started = time.perf_counter()
        for ids in tqdm(windows.split(self.batch_size), desc=f"text {split}", disable=not progress):
            cache = new_cache(loaded, make_cache)
            nll = window_nll(loaded.model, ids.to(device), cache, prefill=self.prefill, chunk=self.chunk)
            per_item += nll.tolist()
            kv_total += cache_bytes(cache)
            if not warned:
                for warning in (unread_store(cache, seqlen=self.seqlen, prefill=self.prefill, chunk=self.chunk),
                                chunk_mismatch(cache, prefill=self.prefill, chunk=self.chunk)):
                    if warning:
                        log.warning(warning)
                warned = True
        synchronize(device)
        elapsed = time.perf_counter() - started
        count = len(per_item)
        mean_nll = math.fsum(per_item) / count  # every window scores seqlen - 1 tokens: the token mean
        perplexity = math.exp(mean_nll)
        return Metrics(primary_metric=self.primary_metric, primary=perplexity, direction=self.direction,
                       loss=mean_nll, latency_s=elapsed / count, peak_mem_bytes=peak_memory(device),
                       kv_bytes=kv_total / count, n=count, values={"perplexity": perplexity, "nll": mean_nll},
                       per_item=per_item, per_item_metric="nll")
