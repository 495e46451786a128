"""Ablations evaluated on one split of a task, as tidy tables: pruning (every method × sparsity × allocation, and N:M
patterns) and KV-cache widths (uniform and mixed per-layer bits).

One row per run with the columns every lmmlab results table shares (task, method, allocation, pattern, target and
achieved sparsity, KV bits per layer and their mean, weight bytes, KV bytes, the primary metric and the task's other
metrics by name, loss, split, seed).
"""
from __future__ import annotations

import logging
from typing import Sequence

from lmmlab.progress import bar
from lmmlab.kv.budget import KIVI_GROUP_SIZE, KIVI_RESIDUAL, KV_CONTEXT
from lmmlab.kv.cache import KVCacheFactory, kv_cache_for, window_warning
from lmmlab.lab.stats import annotate
from lmmlab.models import Loaded
from lmmlab.plan import METHODS, CompressionPlan
from lmmlab.prune.export import weight_format_bytes
from lmmlab.prune.pruner import SEQUENTIAL_METHODS, Pruner, calibration_of
from lmmlab.prune.scores import sparsity_of
from lmmlab.tasks import Metrics, Task

log = logging.getLogger(__name__)

SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
PATTERNS = ("2:4", "4:8")


def weight_bytes(loaded: Loaded, pattern: str = "unstructured") -> dict[str, int]:
    """The model's weight bytes as it holds them now: in the format an export stores (compressed-tensors' bitmask,
    `weight_bytes`), every weight dense, and non-zero values only (no index: a bound no format reaches)."""
    return {"weight_bytes": weight_format_bytes(loaded, "bitmask", pattern=pattern),
            "weight_bytes_dense": weight_format_bytes(loaded, "dense"),
            "weight_bytes_nonzeros": weight_format_bytes(loaded, "nonzeros")}


def row(plan: CompressionPlan, allocation: str, target: float, loaded: Loaded, metrics: Metrics, task: Task,
        split: str, seed: int, *, sequential: bool = False, kv_context: int = KV_CONTEXT,
        calibration: str | None = None) -> dict:
    """One tidy results row: the plan, what it achieved, and the task's metrics (primary first, then by name), with
    the per-item values (`per_item`, kept out of the CSVs) that intervals and paired tests are computed from. KV
    widths are shown nominal and effective (bits per element stored at `kv_context` tokens, fp16 for 16 bits)."""
    return {
        "task": task.name, "method": plan.method, "allocation": allocation, "pattern": plan.pattern,
        "calibration": calibration or calibration_of(plan.method, sequential),
        "target_sparsity": target, "achieved_sparsity": round(sparsity_of(loaded), 6),
        "kv_bits": "-".join(map(str, plan.kv_bits)),
        "value_bits": "-".join(map(str, plan.value_widths)) if plan.value_bits else "", "mean_kv_bits": plan.mean_kv_bits,
        "mean_kv_bits_effective": round(plan.mean_effective_kv_bits(loaded.head_dim, kv_context), 4),
        "kv_context": kv_context, **weight_bytes(loaded, plan.pattern), "kv_bytes": metrics.kv_bytes,
        "primary_metric": metrics.primary_metric, "primary": metrics.primary, **metrics.values,
        "loss": metrics.loss, "latency_s": metrics.latency_s, "n": metrics.n, "split": split, "seed": seed,
        "per_item_metric": metrics.per_item_metric, "per_item": metrics.per_item,
    }


def ablate_prune(loaded: Loaded, task: Task, methods: Sequence[str] = METHODS,
                 sparsities: Sequence[float] = SPARSITIES, allocations: Sequence[str] = ("uniform", "owl"),
                 patterns: Sequence[str] = PATTERNS, split: str = "test", n: int | None = None, seed: int = 0,
                 pruner: Pruner | None = None, sequential: bool = True) -> list[dict]:
    """Evaluate every method × sparsity × allocation, plus every method at each N:M pattern; the dense model first.
    The methods run as published (`sequential`: Wanda and RIA calibrate layer by layer, as SparseGPT does). Each row
    carries its interval and a paired test against the best row at its (pattern, sparsity) (`stats.annotate`)."""
    pruner = pruner or Pruner.for_task(loaded, task, seed=seed)
    pruner.restore()
    dense_plan = CompressionPlan.uniform(loaded.num_layers, 0.0, method="magnitude")
    rows = [row(dense_plan, "dense", 0.0, loaded, task.evaluate(loaded, split=split, n=n), task, split, seed)]
    runs = [(m, a, t, "unstructured") for m in methods for a in allocations for t in sparsities]
    runs += [(m, "uniform", 0.5, p) for m in methods for p in patterns]
    try:
        for method, alloc, target, pattern in bar(runs, desc="ablate-prune (plans)", unit="plan"):
            plan = pruner.plan(method, alloc, target, pattern=pattern)
            pruner.apply(plan, sequential=sequential)
            rows.append(row(plan, alloc, target, loaded, task.evaluate(loaded, split=split, n=n), task, split, seed,
                            sequential=sequential, calibration=pruner.calibration(method, sequential)))
            log.info("%s %s %s %.2f: %s %.4f", method, alloc, pattern, target, task.primary_metric,
                     rows[-1]["primary"])
    finally:
        pruner.restore()
    return annotate(rows, direction=task.direction, group_by=("pattern", "target_sparsity"), label=label)


def label(r: dict) -> str:
    """A row's name in tables and tests: method-allocation[-pattern][-KV plan, when not uniform]."""
    name = f"{r['method']}-{r['allocation']}" + ("" if r.get("pattern", "unstructured") == "unstructured"
                                                 else f"-{r['pattern']}")
    return name + ("" if r.get("kv_plan") in (None, "", "uniform") else f"-{r['kv_plan']}")


def ablate_calibration(loaded: Loaded, task: Task, methods: Sequence[str] = SEQUENTIAL_METHODS,
                       sparsities: Sequence[float] = (0.5, 0.7), split: str = "test", n: int | None = None,
                       seed: int = 0, pruner: Pruner | None = None) -> list[dict]:
    """Sequential against one-pass calibration: every method × sparsity (uniform) pruned both ways and evaluated on
    the same items; each sequential row carries its paired test against the one-pass row of its method and sparsity.
    SparseGPT is one-pass only with the pruner's layer database (stitched from solutions on the dense model's
    inputs), so `methods=("sparsegpt",)` with a database measures the database's choice of inputs."""
    pruner = pruner or Pruner.for_task(loaded, task, seed=seed)
    rows = []
    try:
        settings = [(m, t, s) for m in methods for t in sparsities for s in (False, True)]
        for method, target, sequential in bar(settings, desc="ablate-calibration (plans)", unit="plan"):
            plan = pruner.plan(method, "uniform", target)
            pruner.apply(plan, sequential=sequential)
            rows.append(row(plan, "uniform", target, loaded, task.evaluate(loaded, split=split, n=n), task,
                            split, seed, sequential=sequential, calibration=pruner.calibration(method, sequential)))
            log.info("%s %.2f %s: %s %.4f", method, target, rows[-1]["calibration"], task.primary_metric,
                     rows[-1]["primary"])
    finally:
        pruner.restore()
    return annotate(rows, direction=task.direction, group_by=("method", "target_sparsity"),
                    is_baseline=lambda r: r["calibration"] == "one-pass",
                    label=lambda r: f"{r['method']}-{r['calibration']}")


KV_WIDTHS = (16, 8, 6, 4, 3, 2)


def mixed_kv_plans(num_layers: int) -> dict[str, list[int]]:
    """Per-layer widths that spend bits unevenly: the first half of the layers high and the second low, and back."""
    half = (num_layers + 1) // 2

    def halves(first: int, second: int) -> list[int]:
        return [first] * half + [second] * (num_layers - half)
    return {"early-8-late-2": halves(8, 2), "early-2-late-8": halves(2, 8),
            "early-6-late-3": halves(6, 3), "early-3-late-6": halves(3, 6)}


def ablate_kv(loaded: Loaded, task: Task, widths: Sequence[int] = KV_WIDTHS, mixed: bool = True,
              group_size: int = KIVI_GROUP_SIZE, residual_length: int = KIVI_RESIDUAL, split: str = "test",
              n: int | None = None, seed: int = 0) -> list[dict]:
    """Evaluate the dense model with a KV cache at every uniform width (and the mixed plans): the task's metric vs
    KV bytes.

    `kv_ratio` is the cache's bytes over those of an fp16 `DynamicCache` holding the same tokens."""
    named = {f"uniform-{b}": [b] * loaded.num_layers for b in widths}
    if mixed:
        named.update(mixed_kv_plans(loaded.num_layers))
    plans = {name: CompressionPlan([0.0] * loaded.num_layers, bits, kv_group_size=group_size,
                                   kv_residual=residual_length) for name, bits in named.items()}
    for plan in plans.values():
        kv_cache_for(plan, loaded)  # every plan's layout is checked before the first evaluation
    rows, warned = [], False
    for name, plan in bar(plans.items(), total=len(plans), desc="ablate-kv (plans)", unit="plan"):
        make_cache = KVCacheFactory(plan, loaded)
        metrics = task.evaluate(loaded, split=split, n=n, make_cache=make_cache)
        cache = make_cache.last
        if not warned and (warning := window_warning(cache)):
            warned = True
            log.warning(warning)
        rows.append({**row(plan, "dense", 0.0, loaded, metrics, task, split, seed), "method": "dense", "kv_plan": name,
                     "kv_group_size": group_size, "kv_residual": residual_length,
                     "kv_ratio": cache.nbytes() / cache.fp16_nbytes()})
        log.info("kv %s: %s %.4f, %.0f bytes/item", name, metrics.primary_metric, metrics.primary, metrics.kv_bytes)
    return annotate(rows, direction=task.direction, group_by=(), label=lambda r: r["kv_plan"])
