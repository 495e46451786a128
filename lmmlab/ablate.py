"""Pruning ablations: every method × sparsity × allocation (and N:M patterns) evaluated on one split, as a tidy table.

One row per run with the columns every lmmlab results table shares (method, allocation, pattern, target and achieved
sparsity, mean KV bits, weight bytes, KV bytes, accuracy, accuracy per kind, loss, split, seed).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

from lmmlab import allocate, data
from lmmlab.calibrate import Stats, calibrate, sample_batches
from lmmlab.evaluate import Metrics, evaluate
from lmmlab.models import Loaded
from lmmlab.plan import CompressionPlan
from lmmlab.prune import DenseWeights, Scores, apply_plan, apply_sparsegpt, scores, sparsity_of

log = logging.getLogger(__name__)

SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
METHODS = ("magnitude", "wanda", "ria", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")
PATTERNS = ("2:4", "4:8")


@dataclass
class Pruner:
    """A model with its dense weights, calibration and cached scores: applies any plan without recalibrating."""

    loaded: Loaded
    batches: list[dict]
    stats: Stats
    dense: DenseWeights
    cache: dict[str, Scores] = field(default_factory=dict)

    @classmethod
    def calibrated(cls, loaded: Loaded, samples: Sequence[data.Sample], batch_size: int = 32) -> "Pruner":
        batches = sample_batches(loaded, samples, batch_size)
        return cls(loaded, batches, calibrate(loaded, batches, vision=loaded.is_multimodal), DenseWeights(loaded))

    def apply(self, plan: CompressionPlan) -> None:
        """Prune the model to `plan` (from the dense weights; SparseGPT re-solves, the others re-mask)."""
        if plan.method == "sparsegpt":
            self.dense.restore(self.loaded)
            apply_sparsegpt(self.loaded, plan, self.batches)
            return
        if plan.method not in self.cache:
            self.dense.restore(self.loaded)  # scores are always of the dense weights, whatever ran before
            self.cache[plan.method] = scores(plan.method, self.loaded, self.stats, vision=self.loaded.is_multimodal)
        apply_plan(self.loaded, plan, self.cache[plan.method], self.dense)

    def allocation(self, name: str, target: float) -> list[float]:
        if name == "uniform":
            return allocate.uniform(self.loaded.num_layers, target)
        if name == "owl":
            return allocate.owl(self.loaded, self.stats, target)
        raise ValueError(f"unknown allocation {name!r}; allowed: {', '.join(ALLOCATIONS)}")

    def restore(self) -> None:
        self.dense.restore(self.loaded)


def weight_bytes(loaded: Loaded) -> int:
    """Bytes of the model's weights if pruned linears stored only their non-zeros (values; indices not counted)."""
    prunable = {id(lin.weight) for lin in loaded.prunable(vision=True).values()}
    total = 0
    for p in loaded.model.parameters():
        count = int((p != 0).sum()) if id(p) in prunable else p.numel()
        total += count * p.element_size()
    return total


def row(plan: CompressionPlan, allocation: str, target: float, loaded: Loaded, metrics: Metrics, split: str,
        seed: int) -> dict:
    """One tidy results row."""
    return {
        "method": plan.method, "allocation": allocation, "pattern": plan.pattern,
        "target_sparsity": target, "achieved_sparsity": round(sparsity_of(loaded), 4),
        "mean_kv_bits": plan.mean_kv_bits, "weight_bytes": weight_bytes(loaded), "kv_bytes": metrics.kv_bytes,
        "accuracy": metrics.accuracy, **{f"accuracy_{k}": v for k, v in metrics.accuracy_by_kind.items()},
        "loss": metrics.loss, "split": split, "seed": seed,
    }


def ablate_prune(loaded: Loaded, methods: Sequence[str] = METHODS, sparsities: Sequence[float] = SPARSITIES,
                 allocations: Sequence[str] = ALLOCATIONS, patterns: Sequence[str] = PATTERNS, split: str = "test",
                 n: int | None = None, seed: int = 0) -> list[dict]:
    """Evaluate every method × sparsity × allocation, plus every method at each N:M pattern; the dense model first."""
    samples = data.split(split, n)
    pruner = Pruner.calibrated(loaded, data.split("calibration", seed=seed))
    dense_plan = CompressionPlan.uniform(loaded.num_layers, 0.0, method="magnitude")
    rows = [row(dense_plan, "dense", 0.0, loaded, evaluate(loaded, samples), split, seed)]
    runs = [(m, a, t, "unstructured") for m in methods for a in allocations for t in sparsities]
    runs += [(m, "uniform", 0.5, p) for m in methods for p in patterns]
    try:
        for method, alloc, target, pattern in runs:
            plan = CompressionPlan(pruner.allocation(alloc, target), method=method, pattern=pattern)
            pruner.apply(plan)
            rows.append(row(plan, alloc, target, loaded, evaluate(loaded, samples), split, seed))
            log.info("%s %s %s %.2f: accuracy %.3f", method, alloc, pattern, target, rows[-1]["accuracy"])
    finally:
        pruner.restore()
    return rows
