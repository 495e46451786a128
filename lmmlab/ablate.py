"""Ablations evaluated on one split of a task, as tidy tables: pruning (every method × sparsity × allocation, and N:M
patterns) and KV-cache widths (uniform and mixed per-layer bits).

One row per run with the columns every lmmlab results table shares (task, method, allocation, pattern, target and
achieved sparsity, KV bits per layer and their mean, weight bytes, KV bytes, the primary metric and the task's other
metrics by name, loss, split, seed).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lmmlab import allocate
from lmmlab.calibrate import Stats, calibrate
from lmmlab.database import (MANIFEST, LayerDatabase, batches_fingerprint, build_database, check_levels,
                             open_database, plan_ratios, shared_levels, weights_fingerprint)
from lmmlab.export import weight_format_bytes
from lmmlab.kvcache import KVCacheFactory, kv_cache_for, window_warning
from lmmlab.models import VISION, Loaded, cache_dir
from lmmlab.plan import KIVI_GROUP_SIZE, KIVI_RESIDUAL, KV_CONTEXT, CompressionPlan
from lmmlab.stats import annotate
from lmmlab.prune import DenseWeights, apply_plan, apply_sequential, apply_sparsegpt, sparsity_of
from lmmlab.tasks import Metrics, Task

log = logging.getLogger(__name__)

SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
METHODS = ("magnitude", "wanda", "ria", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "atp", "alphapruning", "dlp")
TUNED = ("atp", "dlp")
TUNING_POINTS = 5  # ATP slopes / DLP alphas tried on the validation split  # allocations with a hyperparameter chosen on the validation split, per method
PATTERNS = ("2:4", "4:8")


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

    @classmethod
    def calibrated(cls, loaded: Loaded, batches: list[dict]) -> "Pruner":
        """Calibrate once on `batches` (a task's `calibration_batches`); the vision side too when they hold images."""
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
        holds (it differs in KV widths only) costs nothing."""
        weights = weight_part(plan, sequential) + (self.calibration(plan.method, sequential),)
        if weights == self.applied:
            return
        self.applied = None  # until this plan is fully in place
        stitch = plan.method == "sparsegpt" and self.database is not None and not sequential
        if self.database is not None and not stitch:
            self.database.forget()  # the model's layers will no longer be what the database last wrote
        if stitch:
            self.database.apply(self.loaded, plan, dense=self.dense)
        elif plan.method == "sparsegpt":
            self.dense.restore(self.loaded)
            apply_sparsegpt(self.loaded, plan, self.batches)
        elif sequential and plan.method in SEQUENTIAL_METHODS:
            apply_sequential(self.loaded, plan, self.dense, self.batches, self.stats)
        else:
            apply_plan(self.loaded, plan, self.dense, self.stats)  # scores of the dense weights, whatever ran before
        self.applied = weights

    def attach_database(self, *, levels, reference: CompressionPlan | None = None, path: str | Path | None = None,
                        progress: bool = True) -> LayerDatabase:
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
        for value, sparsity in self.candidates(name, target).items():
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
        bits)."""
        bits = [kv_bits] * self.loaded.num_layers if isinstance(kv_bits, int) else list(kv_bits)
        return CompressionPlan(self.allocation(allocation, target, method), bits, method=method, **options)

    def restore(self) -> None:
        """Put the dense weights back (and tell the database its record of the layers no longer holds)."""
        self.dense.restore(self.loaded)
        self.applied = None
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
        for method, alloc, target, pattern in runs:
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
        for method in methods:
            for target in sparsities:
                plan = pruner.plan(method, "uniform", target)
                for sequential in (False, True):
                    pruner.apply(plan, sequential=sequential)
                    rows.append(row(plan, "uniform", target, loaded, task.evaluate(loaded, split=split, n=n), task,
                                    split, seed, sequential=sequential,
                                    calibration=pruner.calibration(method, sequential)))
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
    for name, plan in plans.items():
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


def ablate_samplers(loaded: Loaded, task: Task, pruner: Pruner, *, samplers: Sequence[str], seeds: Sequence[int] = (0, 1, 2),
                    n_trials: int = 30, storage: str, study_prefix: str = "samplers", **search_options):
    """Every sampler × seed runs the same search (`search.search`: same budget, warm starts, validation objective)
    for `n_trials` trials. Returns one row per finished trial: sampler, seed, trial, objective, best_so_far and the
    seconds since the study's first trial started (`samplers.summarise` turns it into median and range)."""
    import pandas as pd

    from lmmlab.search import search, trials_table

    frames = []
    for name in samplers:
        for seed in seeds:
            result = search(loaded, task, n_trials=n_trials, storage=storage, sampler=name, seed=seed,
                            study_name=f"{study_prefix}-{name}-seed{seed}", pruner=pruner, **search_options)
            table = trials_table(result.study)
            t0 = min(t.datetime_start for t in result.study.get_trials(deepcopy=False))
            ends = {t.number: (t.datetime_complete - t0).total_seconds()
                    for t in result.study.get_trials(deepcopy=False) if t.datetime_complete}
            frames.append(pd.DataFrame({"sampler": name, "seed": seed, "trial": range(len(table)),
                                        "value": table.objective.values, "best_so_far": table.best_so_far.values,
                                        "seconds": [ends[n] for n in table.trial]}))
            log.info("sampler %s seed %d: best %.4f", name, seed, table.best_so_far.iloc[-1])
    return pd.concat(frames, ignore_index=True)
