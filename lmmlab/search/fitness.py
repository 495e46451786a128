"""A low-noise fitness for the search: the KL divergence from the dense model's next-token distributions (EvoPress:
as fitness, KL beat perplexity), through the plan's KV cache.

Search windows. Drawn from the task's calibration split (never validation or test) with a seed of their own
(`FitnessWindows.from_task`), split into single rows and stripped of padding, so no pad token enters a quantization
group; rows of equal length are batched together when scored.

Dense reference, cached once (`reference`). For every scored position t of every row (each token that has a next
token) the dense model's top-k next-token log-probabilities log p_i, i ∈ I_t (|I_t| = `top_k`), and the log of the
mass outside them, log p_tail = log(1 − Σ_{i∈I_t} p_i), are kept (k = 1,024 by default: 8 bytes per entry, 2 MB per
256-token window). The fitness of a model q is the mean over scored positions of the KL divergence between the two
distributions coarsened to k + 1 outcomes (the top k tokens of the dense model, and "any other token"):

    KL_k(p ‖ q) = Σ_{i∈I} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail),   q_tail = 1 − Σ_{i∈I} q_i,

a lower bound of the full KL(p ‖ q) (the data-processing inequality) that equals it when k is the vocabulary size.

Through the cache. A row of T tokens is scored as the text task scores a window (`tasks.text`): its first
P = max(T // 2, last image token + 1) tokens are prefilled into a fresh cache from `make_cache`, then the rest is fed
`chunk` tokens at a time (64; the text task's evaluation feeds 16); every position's logits are kept. With no cache factory (a plan whose KV widths are all 16)
the row is one plain forward pass instead: the same logits up to float rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lmmlab.models import Loaded

TOP_K = 1024  # dense next-token probabilities kept per scored position
CHUNK = 64  # tokens per decode step after the prefill: each pass reads every weight, so fewer passes are faster
#            (SmolLM2, 256-token rows: 1.9 s against 2.7 s with 16 on a loaded CPU) and the prefill's keys and values,
#            flushed into the quantized store at the first step, are still read by every decoded token
BATCH_ROWS = 8  # rows of equal length scored in one forward pass


def split_rows(batches: Sequence[dict]) -> list[dict]:
    """Every row of every batch as a batch of one, its padding removed (the positions where attention_mask is 0):
    input_ids and attention_mask [1, T]; a batch's pixel_values (one image per row) go with their row."""
    rows = []
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        for r in range(ids.shape[0]):
            keep = mask[r]
            row = {"input_ids": ids[r][keep][None], "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long,
                                                                                  device=ids.device)}
            if "pixel_values" in batch:
                row["pixel_values"] = batch["pixel_values"][r:r + 1]
            rows.append(row)
    return rows


def group_rows(rows: Sequence[dict], order: Sequence[int], batch_rows: int = BATCH_ROWS) -> list[tuple[list[int], dict]]:
    """The rows of `order` in batches of at most `batch_rows` rows of one length: (their indices, the batch)."""
    by_length: dict[int, list[int]] = {}
    for r in order:
        by_length.setdefault(rows[r]["input_ids"].shape[1], []).append(r)
    groups = []
    for members in by_length.values():
        for k in range(0, len(members), batch_rows):
            part = members[k:k + batch_rows]
            groups.append((part, {key: torch.cat([rows[r][key] for r in part]) for key in rows[part[0]]}))
    return groups


def prefill_length(loaded: Loaded, ids: torch.Tensor) -> int:
    """P = T // 2, or just past the last image token when an image reaches beyond it (pixel values go with the
    prefill only)."""
    T = ids.shape[1]
    prefill = max(1, T // 2)
    token = loaded.image_token_id
    if token is not None:
        positions = (ids == token).any(0).nonzero().flatten()
        if len(positions):
            prefill = max(prefill, int(positions[-1]) + 1)
    return min(prefill, T)


@torch.no_grad()
def row_logits(loaded: Loaded, batch: dict, make_cache: Callable[[], object] | None, chunk: int = CHUNK
               ) -> torch.Tensor:
    """Logits [B, T, V] of an unpadded batch of equal-length rows: one forward pass without a cache factory, else
    the prefill + chunks protocol through a fresh cache (see the module docstring)."""
    model = loaded.model
    ids = batch["input_ids"]
    if make_cache is None:
        return model(**batch, use_cache=False).logits
    B, T = ids.shape
    prefill = prefill_length(loaded, ids)
    cache = make_cache()
    bounds = [0, prefill, *range(prefill + chunk, T, chunk), T]
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        step = {"input_ids": ids[:, start:end], "attention_mask": torch.ones(B, end, dtype=torch.long, device=ids.device),
                "position_ids": torch.arange(start, end, device=ids.device).expand(B, -1)}
        if start == 0 and "pixel_values" in batch:
            step["pixel_values"] = batch["pixel_values"]
        out.append(model(**step, cache=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


@dataclass
class DenseReference:
    """The search windows and the dense model's coarsened next-token distributions on them (`reference`)."""

    rows: list[dict]  # unpadded single-row model inputs
    top_index: list[torch.Tensor] = field(repr=False)  # per row [T − 1, k] int32: the dense model's top-k tokens
    top_logp: list[torch.Tensor] = field(repr=False)  # per row [T − 1, k] float32: their log-probabilities
    tail_logp: list[torch.Tensor] = field(repr=False)  # per row [T − 1] float32: log of the mass outside them
    top_k: int = TOP_K
    chunk: int = CHUNK

    @property
    def tokens(self) -> list[int]:
        """Scored positions per row (T − 1)."""
        return [int(t.shape[0]) for t in self.tail_logp]

    def order(self, tokens: int | None = None, *, start: int = 0) -> list[int]:
        """The rows, starting at row `start` and wrapping around, until at least `tokens` positions (all rows when
        None): a selection step's rows (EvoPress draws a fresh minibatch of a token count per step)."""
        n = len(self.rows)
        if tokens is None:
            return list(range(n))
        chosen, total = [], 0
        for k in range(n):
            if total >= tokens:
                break
            r = (start + k) % n
            chosen.append(r)
            total += self.tokens[r]
        return chosen


def coarsen(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top indices [P, k], their log-probs [P, k], log tail mass [P]) of next-token logits [P, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    k = min(top_k, logp.shape[-1])
    top, index = logp.topk(k, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1.0)) if k < logp.shape[-1] else torch.full_like(top[:, 0],
                                                                                                    -math.inf)
    return index.to(torch.int32), top, tail


@torch.no_grad()
def reference(loaded: Loaded, batches: Sequence[dict], *, top_k: int = TOP_K, chunk: int = CHUNK,
              batch_rows: int = BATCH_ROWS) -> DenseReference:
    """The dense model's coarsened next-token distributions on `batches` (split into unpadded rows), computed once
    with a plain forward pass (the model must be dense now)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (tokens kept per position); got {top_k}")
    rows = split_rows(batches)
    if not rows or any(r["input_ids"].shape[1] < 2 for r in rows):
        raise ValueError("the KL fitness needs search windows of at least 2 tokens")
    index, top, tail = [None] * len(rows), [None] * len(rows), [None] * len(rows)
    for members, batch in group_rows(rows, range(len(rows)), batch_rows):
        logits = row_logits(loaded, batch, None)
        for b, r in enumerate(members):
            index[r], top[r], tail[r] = (t.cpu() for t in coarsen(logits[b, :-1], top_k))
    return DenseReference(rows, index, top, tail, top_k=top_k, chunk=chunk)


def kl_terms(logits: torch.Tensor, index: torch.Tensor, top_logp: torch.Tensor, tail_logp: torch.Tensor
             ) -> torch.Tensor:
    """KL_k(p ‖ q) at each position (see the module docstring): logits [P, V] of q, the reference's [P, k], [P]."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    q_top = logq.gather(-1, index.long().to(logq.device))
    p_top = top_logp.to(logq.device)
    kl = (p_top.exp() * (p_top - q_top)).sum(-1)
    tail = tail_logp.to(logq.device)
    finite = torch.isfinite(tail)
    if finite.any():
        q_tail = torch.log1p(-q_top.exp().sum(-1).clamp(max=1.0 - 1e-7))
        kl = kl + torch.where(finite, tail.exp() * (tail - q_tail), torch.zeros_like(kl))
    return kl


@torch.no_grad()
def kl_divergence(loaded: Loaded, ref: DenseReference, *, make_cache: Callable[[], object] | None = None,
                  rows: Sequence[int] | None = None, batch_rows: int = BATCH_ROWS) -> float:
    """The model's mean KL_k from the dense reference over the scored positions of `rows` (all when None), through a
    cache from `make_cache` (None: plain forward passes)."""
    order = list(range(len(ref.rows))) if rows is None else list(rows)
    if not order:
        raise ValueError("no rows to score the KL fitness on")
    total, count = 0.0, 0
    for members, batch in group_rows(ref.rows, order, batch_rows):
        logits = row_logits(loaded, batch, make_cache, ref.chunk)
        for b, r in enumerate(members):
            terms = kl_terms(logits[b, :-1], ref.top_index[r], ref.top_logp[r], ref.tail_logp[r])
            total += math.fsum(terms.double().tolist())
            count += terms.numel()
    return total / count
