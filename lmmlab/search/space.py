"""The low-dimensional search space the first stage's TPE samples (the seed paper's sampler, made fit for the
dimension): a dozen parameters instead of one per layer and linear, each trial projected onto the exact budget.

Parameters of a trial and what they do to linear m of layer l (of L):
  base          categorical: the allocation the trial starts from (uniform, ATP, DLP, OWL, AlphaPruning at the target,
                their hyperparameters chosen on validation), a per-layer ratio a_l
  slope         float in ±`slope`: an ATP-style tilt added on top, slope · (l − (L − 1)/2)
  b0 … b{B−1}   floats in ±`offset`: one offset per bin of consecutive layers (the seed code's 8 bins, target ± 0.05)
  attn          float in ±`split`: attention linears get +attn, MLP linears −attn · A/M (A, M: a layer's attention and
                MLP weights), so a layer keeps its mean
  kv0 … kv{C−1} categoricals over K ≥ V pairs (`kvpairs`), one per cluster of layers of similar measured sensitivity
The raw ratios r_lm = a_l + tilt + b_bin(l) + split_m are projected onto the weight budget: the closest ratios, in
[0, max_sparsity], whose weight-weighted mean is exactly the target (`allocate.project`), then, with a level database,
onto its levels (`database.project_to_grid`, the residual recorded). The KV pairs are repaired onto the budget
(`kvpairs.fit_pairs`). Equal parameters give equal plans.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import optuna

from lmmlab.prune import allocate
from lmmlab.kv import pairs as kvpairs
from lmmlab.prune.database import project_to_grid
from lmmlab.models import ATTENTION
from lmmlab.kv.budget import KIVI_GROUP_SIZE, KIVI_RESIDUAL
from lmmlab.plan import CompressionPlan

BINS = 8  # the seed code's bins of layers
OFFSET = 0.05  # each bin's offset from the target, in ± (the seed code's target ± 0.05)
SPLIT = 0.15  # the attention/MLP split, in ±
MAX_SPARSITY = 0.95


@dataclass(frozen=True)
class LowDimSpace:
    """What a first-stage trial may choose; `plan` turns a trial's parameters into a CompressionPlan."""

    numel: tuple[tuple[tuple[str, int], ...], ...]  # per layer ((linear, weights), ...)
    target: float  # the weight-weighted mean sparsity every plan meets
    bases: tuple[tuple[str, tuple[float, ...]], ...]  # (allocation name, per-layer ratios at the target)
    kv_budget: float = 16.0  # mean nominal KV bits per layer, keys and values counted apart
    kv_pairs: tuple[kvpairs.Pair, ...] = ((16, 16),)  # the K ≥ V pairs a cluster may take
    kv_clusters: tuple[int, ...] = ()  # the cluster of each layer (empty: KV is not searched)
    kv_sensitivity: tuple[float, ...] = ()  # per layer: the repair steps the least sensitive down first
    bins: int = BINS
    offset: float = OFFSET
    slope: float = 0.0  # the tilt's range ±slope (0: no tilt parameter)
    split: float = SPLIT
    max_sparsity: float = MAX_SPARSITY
    levels: tuple = field(default=(), repr=False)  # per layer {linear: levels} of a database (empty: any ratio)
    method: str = "sparsegpt"
    kv_group_size: int = KIVI_GROUP_SIZE
    kv_residual: int = KIVI_RESIDUAL

    def __post_init__(self) -> None:
        allocate.check_target(self.target)
        if not self.bases:
            raise ValueError("the low-dimensional space needs at least one base allocation")
        if any(len(ratios) != self.num_layers for _, ratios in self.bases):
            raise ValueError(f"every base allocation needs one ratio per decoder layer ({self.num_layers})")
        if self.searches_kv:
            kvpairs.check_budget(self.kv_budget, self.kv_pairs)
            if len(self.kv_clusters) != self.num_layers:
                raise ValueError(f"KV clusters: give one per decoder layer ({self.num_layers}); got "
                                 f"{len(self.kv_clusters)}")
        if not 1 <= self.bins or self.offset < 0 or self.slope < 0 or self.split < 0:
            raise ValueError("bins must be >= 1 and offset, slope and split >= 0")
        if not self.target <= self.max_sparsity < 1:
            raise ValueError(f"max sparsity must be in [target, 1); got {self.max_sparsity}")

    @property
    def num_layers(self) -> int:
        return len(self.numel)

    @property
    def searches_kv(self) -> bool:
        return bool(self.kv_clusters) and len(self.kv_pairs) > 1

    @property
    def bin_of(self) -> list[int]:
        """The bin of each layer: contiguous, as equal in size as possible."""
        n = min(self.bins, self.num_layers)
        return [l * n // self.num_layers for l in range(self.num_layers)]

    @property
    def n_bins(self) -> int:
        return min(self.bins, self.num_layers)

    @property
    def uniform_pair(self) -> kvpairs.Pair:
        """The costliest pair within the budget: every layer at it is the uniform KV plan."""
        return next(p for p in sorted(self.kv_pairs, key=lambda p: (-kvpairs.cost(p), -p[0]))
                    if kvpairs.cost(p) <= self.kv_budget + 1e-9)

    # -- a trial's parameters -> a plan

    def suggest(self, trial: optuna.Trial) -> dict:
        """Draw a trial's parameters (see the module docstring)."""
        names = [name for name, _ in self.bases]
        p = {}
        if len(names) > 1:
            p["base"] = trial.suggest_categorical("base", names)
        if self.slope > 0:
            p["slope"] = trial.suggest_float("slope", -self.slope, self.slope)
        for b in range(self.n_bins):
            p[f"b{b}"] = trial.suggest_float(f"b{b}", -self.offset, self.offset)
        if self.split > 0:
            p["attn"] = trial.suggest_float("attn", -self.split, self.split)
        if self.searches_kv:
            choices = [kvpairs.pair_name(q) for q in self.kv_pairs]
            for c in range(max(self.kv_clusters) + 1):
                p[f"kv{c}"] = trial.suggest_categorical(f"kv{c}", choices)
        return p

    def warm_params(self, base: str, kv: Sequence[kvpairs.Pair] | None = None) -> dict:
        """The parameters that reproduce allocation `base` unchanged, with uniform KV at the budget, or with each
        cluster at the pair `kv` gives most of its layers."""
        p: dict = {}
        if len(self.bases) > 1:
            p["base"] = base
        if self.slope > 0:
            p["slope"] = 0.0
        p.update({f"b{b}": 0.0 for b in range(self.n_bins)})
        if self.split > 0:
            p["attn"] = 0.0
        if self.searches_kv:
            for c in range(max(self.kv_clusters) + 1):
                members = [kv[l] for l in range(self.num_layers) if self.kv_clusters[l] == c] if kv else []
                pair = max(set(members), key=members.count) if members else self.uniform_pair
                p[f"kv{c}"] = kvpairs.pair_name(pair)
        return p

    def ratios(self, params: dict) -> tuple[list[dict[str, float]], float]:
        """Per layer {linear: ratio} of `params`, on the budget (and the database's levels): (ratios, residual)."""
        bases = dict(self.bases)
        base = bases[params.get("base", self.bases[0][0])]
        slope = params.get("slope", 0.0)
        attn = params.get("attn", 0.0)
        half = (self.num_layers - 1) / 2
        raw, weights, grids = [], [], []
        for l, layer in enumerate(self.numel):
            a = sum(n for name, n in layer if name in ATTENTION)
            m = sum(n for name, n in layer if name not in ATTENTION)
            for name, n in layer:
                split = attn if name in ATTENTION else (-attn * a / m if m else 0.0)
                raw.append(base[l] + slope * (l - half) + params.get(f"b{self.bin_of[l]}", 0.0) + split)
                weights.append(float(n))
                if self.levels:
                    grids.append(self.levels[l][name])
        flat = allocate.project(raw, self.target, 0.0, self.max_sparsity, weights)
        residual = 0.0
        if self.levels:
            flat, residual = project_to_grid(flat, grids, self.target, weights)
        out, k = [], 0
        for layer in self.numel:
            out.append({name: flat[k + j] for j, (name, _) in enumerate(layer)})
            k += len(layer)
        return out, residual

    def pairs(self, params: dict) -> list[kvpairs.Pair]:
        """Per layer (key bits, value bits) of `params`, repaired onto the budget."""
        if not self.searches_kv:
            return [self.uniform_pair] * self.num_layers
        by_name = {kvpairs.pair_name(q): q for q in self.kv_pairs}
        chosen = [by_name[params[f"kv{c}"]] for c in self.kv_clusters]
        return kvpairs.fit_pairs(chosen, self.kv_budget, self.kv_pairs, self.kv_sensitivity or None)

    def plan(self, params: dict) -> tuple[CompressionPlan, float]:
        """(the plan of `params`, its residual from the weight budget on the database's levels)."""
        ratios, residual = self.ratios(params)
        pairs = self.pairs(params)
        numel = [dict(layer) for layer in self.numel]
        plan = CompressionPlan.per_module(ratios, numel, [k for k, _ in pairs], method=self.method,
                                          value_bits=[v for _, v in pairs], kv_group_size=self.kv_group_size,
                                          kv_residual=self.kv_residual)
        return plan, residual
