"""The `Pruner`: a model, its dense weights (kept off the device) and its calibration statistics, which applies any
`CompressionPlan` without recalibrating — re-masking from cached scores, solving SparseGPT layer by layer, or stitching
SparseGPT levels from a layer database — and resolves allocations by name (their hyperparameters chosen on a task's
validation split, as their baselines run)."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lmmlab.files import cache_dir
from lmmlab.progress import bar
from lmmlab.models import VISION, Loaded
from lmmlab.models.sparse_linear import compress_linears, decompress_linears, refuse_compressed
from lmmlab.plan import CompressionPlan, pattern_sparsity
from lmmlab.prune import allocate
from lmmlab.prune.allocate import ALLOCATIONS
from lmmlab.prune.calibrate import Stats, calibrate
from lmmlab.prune.database import (MANIFEST, LayerDatabase, batches_fingerprint, build_database, check_levels,
                                   open_database, plan_ratios, shared_levels, weights_fingerprint)
from lmmlab.prune.scores import DenseWeights, apply_plan, apply_sequential, linear_ratios
from lmmlab.prune.solves import SolveCache
from lmmlab.prune.sparsegpt import apply_sparsegpt
from lmmlab.tasks import Task

log = logging.getLogger(__name__)

TUNED = ("atp", "dlp")  # allocations with a hyperparameter chosen on the validation split, per method


TUNING_POINTS = 5  # ATP slopes / DLP alphas tried on the validation split


@dataclass
class Pruner:
    """A model with its dense weights (off the device) and its calibration statistics: applies any plan without
    recalibrating, re-masking one linear at a time."""

    loaded: Loaded
    batches: list[dict]
    stats: Stats
    dense: DenseWeights
    applied: tuple | None = None  # the weight part of the plan the model holds now (None: dense or unknown)
    task: Task | None = None  # the task calibrated on: ATP's slope is searched on its validation split
    database: LayerDatabase | None = None  # SparseGPT solved at a grid of levels: sparsegpt plans stitch from it
    found: dict = field(default_factory=dict)  # allocations that cost a search or SVDs, by (name, target)
    masked: tuple | None = None  # (method, pattern, per-linear ratios) of the re-masked plan the model holds now
    solves: SolveCache = field(default_factory=SolveCache)  # sequential solves kept for re-use (tuning, then test)

    @classmethod
    def calibrated(cls, loaded: Loaded, batches: list[dict]) -> "Pruner":
        """Calibrate once on `batches` (a task's `calibration_batches`); the vision side too when they hold images.
        A model whose linears are held compressed is refused (one-line ValueError): its masks are baked in."""
        refuse_compressed(loaded)
        vision = loaded.is_multimodal and any("pixel_values" in b for b in batches)
        return cls(loaded, batches, calibrate(loaded, batches, vision=vision), DenseWeights(loaded))

    @classmethod
    def for_task(cls, loaded: Loaded, task: Task, *, n: int | None = None, seed: int = 0) -> "Pruner":
        """Calibrate on `n` calibration items of `task` (its default count when None)."""
        pruner = cls.calibrated(loaded, task.calibration_batches(loaded, n=n, seed=seed))
        pruner.task = task
        return pruner

    def apply(self, plan: CompressionPlan, *, sequential: bool = False) -> None:
        """Prune the model to `plan` from the dense weights: SparseGPT re-solves layer by layer, or, with a layer
        `database` and not `sequential`, stitches its stored solutions (inputs from the dense model, levels on the
        database's grid); magnitude, Wanda and RIA re-mask
        from the cached one-pass statistics, or, with `sequential` (Wanda and RIA only), recalibrate layer by layer
        as their reference code does (`prune.apply_sequential`). A plan whose weights are the ones the model already
        holds (it differs in KV widths only) costs nothing; any other plan on a model held compressed (`compress`)
        is a one-line ValueError."""
        weights = weight_part(plan, sequential) + (self.calibration(plan.method, sequential),)
        if weights == self.applied:
            return
        refuse_compressed(self.loaded)
        same = self.applied is not None and self.masked is not None and self.masked[:2] == (plan.method, plan.pattern)
        held = self.masked[2] if same else None  # the linears of the plan held now: those left unchanged are kept
        self.applied, self.masked = None, None  # until this plan is fully in place
        stitch = plan.method == "sparsegpt" and self.database is not None and not sequential
        if self.database is not None and not stitch:
            self.database.forget()  # the model's layers will no longer be what the database last wrote
        if stitch:
            self.database.apply(self.loaded, plan, dense=self.dense)
        elif plan.method == "sparsegpt" or (sequential and plan.method in SEQUENTIAL_METHODS):
            if not self.solves.get(weights, self.loaded):  # solved before (a tuned baseline scored again): put back
                self.solve(plan)
                self.solves.put(weights, self.loaded)
        else:
            apply_plan(self.loaded, plan, self.dense, self.stats, held=held)  # scores of the dense weights
            self.masked = (plan.method, plan.pattern, linear_ratios(self.loaded, plan))
        self.applied = weights

    def solve(self, plan: CompressionPlan) -> None:
        """Solve `plan` layer by layer from the dense weights: SparseGPT, or Wanda / RIA recalibrated."""
        if plan.method == "sparsegpt":
            self.dense.restore(self.loaded)
            apply_sparsegpt(self.loaded, plan, self.batches)
        else:
            apply_sequential(self.loaded, plan, self.dense, self.batches, self.stats)

    def attach_database(self, *, levels, reference: CompressionPlan | None = None, path: str | Path | None = None,
                        progress: bool | None = None) -> LayerDatabase:
        """Open the SparseGPT layer database of these calibration batches, `levels` (one grid, or per layer
        {linear: levels}: `database.count_levels`) and inputs (`reference`: None, the dense model's; or a plan on the
        levels, whose pruned layers each layer is solved on) at `path` (default: under the model cache, named by the
        model and a hash of all of these), building it first if there is none (from the dense weights: the model is
        restored). A folder holding a database of other levels or inputs is a one-line ValueError."""
        if levels and isinstance(levels[0], (int, float)):
            levels = check_levels(levels)
        ref = None if reference is None else plan_ratios(reference, self.loaded)
        if path is None:
            key = hashlib.blake2b(json.dumps([batches_fingerprint(self.batches), weights_fingerprint(
                self.loaded, self.dense), levels, ref]).encode(), digest_size=6).hexdigest()
            path = cache_dir() / "databases" / f"{Path(self.loaded.name).name}-{key}"
        path = Path(path)
        if (path / MANIFEST).is_file():
            database = open_database(path, self.loaded, dense=self.dense, batches=self.batches)
            wanted = shared_levels(self.loaded, levels) if isinstance(levels[0], (int, float)) else levels
            if database.module_levels != [{n: list(g) for n, g in layer.items()} for layer in wanted]:
                raise ValueError(f"the layer database at {path} holds other levels than the ones asked for; "
                                 "choose another path or omit it")
            if database.reference != ref:
                raise ValueError(f"the layer database at {path} was built on {database.inputs} inputs, not on "
                                 f"{'the dense model' if ref is None else 'the reference plan asked for'}; choose "
                                 "another path or omit it")
            self.database = database
        else:
            self.restore()
            self.database = build_database(self.loaded, self.batches, levels=levels, path=path, progress=progress,
                                           reference=reference)
            self.database.dense = self.dense
        self.applied = None
        return self.database

    def calibration(self, method: str, sequential: bool) -> str:
        """How `method`'s weights are calibrated here (`calibration_of`; SparseGPT stitched from the database:
        "one-pass" on dense inputs, "reference" on a reference plan's)."""
        if method == "sparsegpt" and self.database is not None and not sequential:
            return "one-pass" if self.database.reference is None else "reference"
        return calibration_of(method, sequential)

    def allocation(self, name: str, target: float, method: str = "wanda") -> list[float]:
        """Per-layer sparsities of allocation `name` with mean `target`, all from the dense weights whatever plan the
        model holds now. ATP's slope and DLP's α are chosen on the task's validation split for `method`
        (`tuned`) and AlphaPruning's per-layer α computed once; all are remembered."""
        L = self.loaded.num_layers
        if name == "uniform":
            return allocate.uniform(L, target)
        if name == "owl":
            return allocate.owl(self.loaded, self.stats, target, weights=self.dense)
        if name == "atp":
            return allocate.atp(L, target, self.tuned("atp", target, method))
        if name == "dlp":
            return self.dlp(target, self.tuned("dlp", target, method))
        if name == "alphapruning":
            if "alpha" not in self.found:
                self.found["alpha"] = allocate.layer_alphas(self.loaded, weights=self.dense)
            return allocate.alphapruning_from(self.found["alpha"], target)
        raise ValueError(f"unknown allocation {name!r}; allowed: {', '.join(ALLOCATIONS)}")

    def dlp(self, target: float, alpha: float) -> list[float]:
        """DLP's sparsities at `alpha` (its layer scores computed once, from the dense weights)."""
        if "dlp" not in self.found:
            self.found["dlp"] = allocate.dlp_scores(self.loaded, self.stats, weights=self.dense)
        return allocate.dlp_from(self.found["dlp"], target, alpha)

    def candidates(self, name: str, target: float) -> dict[float, list[float]]:
        """The hyperparameter grid of a tuned allocation and the sparsities each value gives: ATP's slopes
        (`allocate.atp_slopes`, 5 from uniform to the steepest in range) or DLP's α (`allocate.dlp_alphas`)."""
        L = self.loaded.num_layers
        if name == "atp":
            return {slope: allocate.atp(L, target, slope) for slope in allocate.atp_slopes(L, target, n=TUNING_POINTS)}
        if name == "dlp":
            return {alpha: self.dlp(target, alpha) for alpha in allocate.dlp_alphas(n=TUNING_POINTS)}
        raise ValueError(f"allocation {name!r} has no hyperparameter; tuned ones: {', '.join(TUNED)}")

    def tuned(self, name: str, target: float, method: str = "wanda", *, n: int | None = None) -> float:
        """ATP's slope or DLP's α: the best of `candidates` on the validation split (`n` items) with `method` run as
        its baseline runs (Wanda and RIA calibrated layer by layer, SparseGPT solved sequentially, magnitude
        re-masked). Remembered per (name, target, method); leaves the model pruned to the last candidate."""
        key = (name, target, method)
        if key in self.found:
            return self.found[key]
        if self.task is None:
            raise ValueError(f"{name.upper()} chooses its hyperparameter on a task's validation split: make the "
                             "pruner with Pruner.for_task")
        best, scores = None, {}
        candidates = self.candidates(name, target).items()
        for value, sparsity in bar(candidates, desc=f"{name} at {target:g} ({method}): tuning on validation",
                                   unit="point"):
            plan = CompressionPlan(sparsity, method=method)
            seen = ("validation", weight_part(plan, True), n)  # uniform is every tuned allocation's first candidate
            if seen not in self.found:
                self.apply(plan, sequential=True)
                self.found[seen] = self.task.evaluate(self.loaded, split="validation", n=n, with_loss=False).primary
            score = self.found[seen]
            log.info("%s at %.2f (%s), %.4f: validation %s %.4f", name, target, method, value,
                     self.task.primary_metric, score)
            scores[value] = score
            if best is None or self.task.better(score, best[0]):
                best = (score, value)
        self.found[key] = best[1]
        self.found[key + ("scores",)] = scores
        return best[1]

    def validation_score(self, name: str, target: float, method: str) -> float | None:
        """The validation score a tuned allocation reached (uniform: a tuned allocation's first candidate, slope or
        α 0), or None where none was measured."""
        for tuned in TUNED:
            scores = self.found.get((tuned, target, method, "scores"))
            if scores is not None and name == tuned:
                return scores[self.found[(tuned, target, method)]]
            if scores is not None and name == "uniform" and 0.0 in scores:
                return scores[0.0]
        return None

    def atp_slope(self, target: float, method: str = "wanda") -> float:
        """ATP's slope at `target` for `method` (`tuned`)."""
        return self.tuned("atp", target, method)

    def plan(self, method: str, allocation: str, target: float, kv_bits: int | Sequence[int] = 16,
             **options) -> CompressionPlan:
        """`allocation`'s per-layer ratios at `target` (tuned for `method`), with `kv_bits` (one width for every
        layer, or one per layer); `options` are the plan's other fields (pattern, KV group size and window, value
        bits, vision sparsity). An N:M pattern fixes the ratio (`plan.pattern_sparsity`) and takes the uniform
        allocation only. A vision ratio needs vision statistics (a task with images)."""
        pattern = options.get("pattern", "unstructured")
        target = pattern_sparsity(pattern, target)
        if pattern != "unstructured" and allocation != "uniform":
            raise ValueError(f"--allocation {allocation} needs an unstructured pattern: N:M fixes every layer's ratio")
        if options.get("vision_sparsity") and not self.has_vision_stats:
            raise ValueError("vision sparsity (--vision-sparsity, or the plan's vision_sparsity) needs a task with "
                             "images; this pruner calibrated the language model only")
        bits = [kv_bits] * self.loaded.num_layers if isinstance(kv_bits, int) else list(kv_bits)
        return CompressionPlan(self.allocation(allocation, target, method), bits, method=method, **options)

    def compress(self, dtype: torch.dtype | None = None) -> dict[str, int]:
        """Hold the pruned linears of the plan applied last compressed in memory (`models.sparse_linear`: bitmask +
        kept values in `dtype`, default the weights'; decode multiplies straight from them). Until `restore`, `apply`
        refuses any plan with other weights. Returns `compress_linears`' byte counts."""
        return compress_linears(self.loaded, dtype=dtype)

    def restore(self) -> None:
        """Put the dense weights back (decompressing linears held compressed first), and tell the database its
        record of the layers no longer holds."""
        decompress_linears(self.loaded, dtype=next(iter(self.dense.dtype.values()), None))
        self.dense.restore(self.loaded)
        self.applied, self.masked = None, None
        if self.database is not None:
            self.database.forget()

    @property
    def has_vision_stats(self) -> bool:
        return any(key[0] == VISION for key in self.stats.sq_norm)

    def layer_statistics(self, target: float = 0.7):
        """Per decoder layer: OWL's outlier ratio and allocation at `target`, and the largest and median input
        activation norm ‖X_j‖₂ over the layer's linears (calibration items), as a table."""
        import pandas as pd

        ratios = allocate.outlier_ratios(self.loaded, self.stats, weights=self.dense)
        owl = self.allocation("owl", target)
        rows = []
        for i in range(self.loaded.num_layers):
            norms = torch.cat([self.stats.norm((i, name)) for name in self.loaded.linears(i)])
            rows.append({"layer": i, "outlier_ratio": ratios[i], f"owl_sparsity_at_{target:g}": owl[i],
                         "max_input_norm": norms.max().item(), "median_input_norm": norms.median().item()})
        return pd.DataFrame(rows)


def weight_part(plan: CompressionPlan, sequential: bool = False) -> tuple:
    """What of a plan decides the weights: method, pattern, per-layer and vision sparsity (not the KV cache), and how
    it was calibrated."""
    modules = tuple(tuple(sorted(layer.items())) for layer in plan.module_sparsity)
    return (plan.method, plan.pattern, tuple(plan.sparsity), modules, plan.vision_sparsity,
            calibration_of(plan.method, sequential))


SEQUENTIAL_METHODS = ("wanda", "ria")


def calibration_of(method: str, sequential: bool) -> str:
    """How a method's weights were calibrated: "none" (magnitude), "sequential" (layer by layer on the pruned
    layers' outputs: SparseGPT always, Wanda and RIA when asked), or "one-pass" (statistics of the dense model)."""
    if method == "magnitude":
        return "none"
    return "sequential" if method == "sparsegpt" or (sequential and method in SEQUENTIAL_METHODS) else "one-pass"
