"""Metrics on a split of the visual-QA task, with any KV cache.

Protocol: the image and the question, all but the prompt's last token, are prefilled into the cache; every answer
token, the first included, is then produced by a decode step whose query reads the cache. So whatever the cache does to
the keys and values it stores (quantization, say) shows in the answers; a single prefill would instead predict the
first answer token from the full-precision states of its own forward pass. Evaluation does not know about bits: it is
handed a function that makes a fresh cache.
"""
from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from lmmlab import data
from lmmlab.kvcache import layer_nbytes
from lmmlab.models import Loaded

CacheFactory = Callable[[], object]


@dataclass
class Metrics:
    accuracy: float
    accuracy_by_kind: dict[str, float]
    loss: float
    latency_s: float  # wall seconds per sample (prefill + decode, batched)
    peak_mem_bytes: int
    kv_bytes: float  # bytes the cache holds per sample at the end of generation
    n: int
    predictions: list[str] = field(default_factory=list, repr=False)

    def to_dict(self, with_predictions: bool = False) -> dict:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return d


def cache_bytes(cache) -> int:
    """Bytes a cache really stores: its own count when it keeps one (quantized caches), else its tensors' sizes."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(layer_nbytes(layer) for layer in cache.layers)


def _new_cache(loaded: Loaded, make_cache: CacheFactory | None):
    if make_cache is not None:
        return make_cache()
    from transformers import DynamicCache

    return DynamicCache(config=loaded.model.config)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _prefill_then_read(model, inputs: dict, mask: torch.Tensor, position_ids: torch.Tensor, cache,
                       tail: int) -> torch.Tensor:
    """Prefill all but the last `tail` tokens (the image among them) into `cache`, then run those `tail` tokens
    against it. Returns the logits of the tail, [B, tail, vocab]."""
    ids = inputs["input_ids"]
    head = ids.shape[1] - tail
    model(input_ids=ids[:, :head], pixel_values=inputs["pixel_values"], attention_mask=mask[:, :head],
          position_ids=position_ids[:, :head], cache=cache, use_cache=True)
    return model(input_ids=ids[:, head:], attention_mask=mask, position_ids=position_ids[:, head:], cache=cache,
                 use_cache=True).logits


@torch.no_grad()
def generate_answers(loaded: Loaded, batch: Sequence[data.Sample], make_cache: CacheFactory | None = None,
                     max_new_tokens: int = 3) -> tuple[list[str], int]:
    """Greedy answers for a batch: prefill image + question into a cache, then decode step by step from it.

    Returns the answers and the bytes the cache holds at the end.
    """
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    inputs = data.collate(loaded.processor, batch).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    mask = inputs.pop("attention_mask")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _new_cache(loaded, make_cache)
    logits = _prefill_then_read(model, inputs, mask, position_ids, cache, tail=1)[:, -1]
    generated, done = [], torch.zeros(len(batch), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_token = logits.argmax(-1)
        next_token = torch.where(done, torch.full_like(next_token, tok.pad_token_id), next_token)
        generated.append(next_token)
        done |= next_token == tok.eos_token_id
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
        logits = model(input_ids=next_token[:, None], attention_mask=mask, position_ids=position_ids,
                       cache=cache, use_cache=True).logits[:, -1]
    tokens = torch.stack(generated, 1).tolist()
    answers = []
    for row in tokens:
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        answers.append(tok.decode([t for t in row if t != tok.pad_token_id], skip_special_tokens=True).strip())
    return answers, cache_bytes(cache)


@torch.no_grad()
def answer_loss(loaded: Loaded, batch: Sequence[data.Sample], make_cache: CacheFactory | None = None) -> list[float]:
    """Teacher-forced cross-entropy per sample, averaged over the answer's tokens (answer word + end token)."""
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    inputs = data.collate(loaded.processor, batch, with_answers=True).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    answer_lengths = [len(tok(f" {s.answer}{tok.eos_token}", add_special_tokens=False)["input_ids"]) for s in batch]
    ids = inputs["input_ids"]
    mask = inputs.pop("attention_mask")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    tail = max(answer_lengths) + 1  # the answers and the prompt's last token read the cache, as in generation
    logits = _prefill_then_read(model, inputs, mask, position_ids, _new_cache(loaded, make_cache), tail).float()
    losses = []
    for i, n_answer in enumerate(answer_lengths):
        # Left padding: the answer's tokens are the last n_answer of the row, predicted by the positions before them.
        target = ids[i, -n_answer:]
        pred = logits[i, -n_answer - 1 : -1]
        losses.append(nn.functional.cross_entropy(pred, target).item())
    return losses


def evaluate(loaded: Loaded, samples: Sequence[data.Sample], make_cache: CacheFactory | None = None,
             batch_size: int = 64, with_loss: bool = True, progress: bool = False) -> Metrics:
    """Exact-match accuracy (overall and per kind), answer loss, latency, peak memory and KV bytes on `samples`."""
    if not loaded.is_multimodal:
        raise ValueError(f"{loaded.name!r} is a text-only model; the visual-QA evaluation needs a Llava model")
    if not samples:
        raise ValueError("no samples to evaluate")
    from tqdm.auto import tqdm

    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)
    predictions, losses, kv = [], [], 0
    seconds = 0.0
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    for batch in tqdm(batches, desc="evaluate", disable=not progress):
        start = time.perf_counter()
        answers, nbytes = generate_answers(loaded, batch, make_cache)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)
        seconds += time.perf_counter() - start
        predictions += answers
        kv += nbytes
        if with_loss:
            losses += answer_loss(loaded, batch, make_cache)
    correct = [p == s.answer for p, s in zip(predictions, samples)]
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for ok, s in zip(correct, samples):
        by_kind[s.kind].append(ok)
    return Metrics(
        accuracy=sum(correct) / len(correct),
        accuracy_by_kind={k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        loss=sum(losses) / len(losses) if losses else float("nan"),
        latency_s=seconds / len(samples),
        peak_mem_bytes=_peak_memory(loaded.device),
        kv_bytes=kv / len(samples),
        n=len(samples),
        predictions=predictions,
    )
