"""Which sampler finds the better plan at equal evaluations: TPE over the low-dimensional space (the first stage's),
TPE over one parameter per layer (the seed paper's space), the evolution per linear, random search and CMA-ES over the
low-dimensional space — every one scoring the same fitness (the KL divergence on the same search rows, through the
plan's KV cache) on the same level database, with the same warm starts, for several seeds.

One row per evaluation: sampler, seed, evaluation (1-based), value, best_so_far, seconds (since the run's start);
`samplers.summarise` turns it into the median and range over seeds against evaluations and against seconds.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import optuna
import pandas as pd

from lmmlab.progress import bar
from lmmlab.kv import pairs as kvpairs
from lmmlab.prune.database import DEFAULT_LEVELS, parse_levels, shared_levels
from lmmlab.prune.pruner import Pruner
from lmmlab.search.evolution import Evolution, Genome
from lmmlab.models import Loaded
from lmmlab.plan import CompressionPlan
from lmmlab.search.samplers import make_sampler
from lmmlab.search.space import LowDimSpace
from lmmlab.search.staged import SearchConfig, StagedSearch, plan_of_levels
from lmmlab.tasks import Task

ABLATION_SAMPLERS = ("tpe", "tpe-per-layer", "evolution", "random", "cmaes")
SPREAD = 0.25  # the per-layer space's offsets from the target, in ±


class PerLayerSpace:
    """The seed paper's space: one sparsity offset and one KV pair per layer (every linear of a layer at its ratio),
    projected onto the budget and the database's shared grid as the low-dimensional space's plans are."""

    def __init__(self, low: LowDimSpace):
        self.low = low

    def suggest(self, trial: optuna.Trial) -> dict:
        p = {f"s{l}": trial.suggest_float(f"s{l}", -SPREAD, SPREAD) for l in range(self.low.num_layers)}
        if self.low.searches_kv:
            names = [kvpairs.pair_name(q) for q in self.low.kv_pairs]
            p.update({f"kv{l}": trial.suggest_categorical(f"kv{l}", names) for l in range(self.low.num_layers)})
        return p

    def warm_params(self, base: str, kv=None) -> dict:
        ratios = dict(self.low.bases)[base]
        p = {f"s{l}": max(-SPREAD, min(SPREAD, ratios[l] - self.low.target)) for l in range(self.low.num_layers)}
        if self.low.searches_kv:
            p.update({f"kv{l}": kvpairs.pair_name(self.low.uniform_pair) for l in range(self.low.num_layers)})
        return p

    def plan(self, params: dict) -> tuple[CompressionPlan, float]:
        low = self.low
        per_layer = {**{f"b{b}": 0.0 for b in range(low.n_bins)}, "base": low.bases[0][0]}
        space = replace(low, bases=((low.bases[0][0], tuple(low.target + params[f"s{l}"]
                                                            for l in range(low.num_layers))),), slope=0.0, split=0.0)
        ratios, residual = space.ratios(per_layer)
        pairs = [low.uniform_pair] * low.num_layers
        if low.searches_kv:
            by_name = {kvpairs.pair_name(q): q for q in low.kv_pairs}
            pairs = kvpairs.fit_pairs([by_name[params[f"kv{l}"]] for l in range(low.num_layers)], low.kv_budget,
                                      low.kv_pairs, low.kv_sensitivity or None)
        numel = [dict(layer) for layer in low.numel]
        plan = CompressionPlan.per_module(ratios, numel, [k for k, _ in pairs], value_bits=[v for _, v in pairs],
                                          method=low.method, kv_group_size=low.kv_group_size,
                                          kv_residual=low.kv_residual)
        return plan, residual


def sampler_ablation(loaded: Loaded, task: Task, *, config: SearchConfig, samplers: Sequence[str] = ABLATION_SAMPLERS,
                     seeds: Sequence[int] = (0, 1, 2), evaluations: int = 40, offspring: int = 4,
                     pruner: Pruner | None = None, storage: str = "sqlite:///results/studies.db",
                     progress: bool = False):
    """Every sampler × seed at `evaluations` fitness evaluations (warm starts included) on the set-up of a staged
    search of `config` (its first-stage database, search rows, KV clusters and bases). The evolution draws
    `offspring` mutants per generation, each one evaluation (single-step selection on the same rows)."""
    import pandas as pd

    bad = [s for s in samplers if s not in ABLATION_SAMPLERS]
    if bad or not samplers or not seeds or evaluations < 1:
        raise ValueError(f"unknown sampler {bad[0] if bad else '(none)'!r} or no seed/evaluation; allowed samplers: "
                         f"{', '.join(ABLATION_SAMPLERS)}")
    search = StagedSearch(loaded, task, replace(config, stages=("tpe",)), pruner=pruner, storage=storage,
                          study_name=f"samplers-{task.name}-s{config.target_sparsity:g}-kv{config.kv_budget:g}",
                          progress=progress)
    low, ref, rows_used = search.setup()
    warm = [low.warm_params(name) for name, _ in low.bases]
    out = []
    evaluated = bar(total=len(samplers) * len(seeds) * evaluations, desc="sampler ablation (evaluations)",
                    enabled=progress or None)
    for name in samplers:
        for seed in seeds:
            start = time.perf_counter()
            record: list[tuple[float, float]] = []

            def evaluate(plan: CompressionPlan) -> float:
                value = search.fitness(plan, ref, rows_used)
                record.append((value, time.perf_counter() - start))
                evaluated.update(1)
                return value

            if name == "evolution":  # on the database's levels; a method without one takes the default shared grid
                grid = low.levels or tuple(shared_levels(loaded, parse_levels(DEFAULT_LEVELS)))
                run_evolution(search, replace(low, levels=grid), warm, evaluate, evaluations, offspring, seed)
            else:
                space = PerLayerSpace(low) if name == "tpe-per-layer" else low
                sampler = make_sampler("tpe" if name.startswith("tpe") else name, seed=seed)
                study = optuna.create_study(sampler=sampler, direction="minimize")
                for params in ([space.warm_params(b) for b, _ in low.bases] if name == "tpe-per-layer" else warm):
                    study.enqueue_trial(params)
                study.optimize(lambda t: evaluate(space.plan(space.suggest(t))[0]), n_trials=evaluations)
            best = np.minimum.accumulate([v for v, _ in record])
            out += [{"sampler": name, "seed": seed, "trial": k, "evaluation": k + 1, "value": v, "best_so_far": b,
                     "seconds": s} for k, ((v, s), b) in enumerate(zip(record, best))]
    evaluated.close()
    search.pruner.restore()
    return pd.DataFrame(out)


def run_evolution(search: StagedSearch, low: LowDimSpace, warm: list[dict], evaluate: Callable, evaluations: int,
                  offspring: int, seed: int) -> None:
    """The evolution per linear on the first-stage database's shared grid, from the best warm start: (1 + λ) with
    one selection step, each mutant one evaluation, until `evaluations` (warm starts included)."""
    scored = [(evaluate(low.plan(p)[0]), k) for k, p in enumerate(warm[:evaluations])]
    start_plan = low.plan(warm[min(scored)[1]])[0]
    levels = [dict(layer) for layer in low.levels]
    genes = [[(i, name)] for i in range(low.num_layers) for name, _ in low.numel[i]]
    numel = [dict(layer) for layer in low.numel]
    removed = [[int(numel[i][name] * s) if s is not None else None for s in levels[i][name]] for (i, name), in genes]
    order = sorted(low.kv_pairs, key=lambda p: (-kvpairs.cost(p), -p[0])) if low.searches_kv else []
    pairs = tuple(order.index((k, v)) for k, v in zip(start_plan.key_widths, start_plan.value_widths)) if order else ()
    parent = Genome(tuple(levels[i][name].index(start_plan.ratio(i, name)) for (i, name), in genes), pairs)
    parent_value = min(scored)[0]
    evo = Evolution(removed, order, offspring=offspring, selection=((1, 1),), seed=seed)
    config = replace(search.config, method=low.method)
    spent, g = len(scored), 0
    while spent < evaluations:
        rng = np.random.default_rng([seed, g])
        for child in evo.children(parent, rng)[:evaluations - spent]:
            value = evaluate(plan_of_levels(search.loaded, levels, genes, child, order, config))
            spent += 1
            if value < parent_value:
                parent, parent_value = child, value
        g += 1


def summarise(table: pd.DataFrame, *, points: int = 100) -> pd.DataFrame:
    """Best-so-far across seeds, per sampler: median, min and max against trials (x = trials finished) and against
    seconds (x on `points` common times from 0 to the slowest run's end; a run's value at time x is the best among
    its trials finished by x). A statistic is NaN where some seed has no finished trial yet.
    `table`: columns sampler, seed, trial, best_so_far, seconds (cumulative), as `sampler_ablation` returns."""
    grid = np.linspace(0.0, float(table.seconds.max()), points)
    out = []
    for name, part in table.groupby("sampler", sort=False):
        by_trial = part.pivot(index="trial", columns="seed", values="best_so_far").sort_index()
        curves = []
        for _, run in part.groupby("seed"):
            run = run.sort_values("seconds")
            index = np.searchsorted(run.seconds.to_numpy(), grid, side="right") - 1
            curves.append(np.where(index >= 0, run.best_so_far.to_numpy()[np.maximum(index, 0)], np.nan))
        for axis, x, values in (("trials", by_trial.index.to_numpy() + 1, by_trial.to_numpy()),
                                ("seconds", grid, np.stack(curves, axis=1))):
            out.append(pd.DataFrame({"sampler": name, "axis": axis, "x": x, "median": np.median(values, axis=1),
                                     "min": np.min(values, axis=1), "max": np.max(values, axis=1),
                                     "seeds": values.shape[1]}))
    return pd.concat(out, ignore_index=True)


def run(loaded: Loaded, task: Task, pruner: Pruner, out: str | Path, *, config: SearchConfig,
        storage: str | None = None, **options):
    """`lmmlab ablate-samplers`: the ablation (`sampler_ablation`), its table at `out` and its figure (best KL so far
    against evaluations and seconds) under the results' figures. Returns (table, paths)."""
    from lmmlab.files import write_table
    from lmmlab.lab import plots

    out = Path(out)
    table = sampler_ablation(loaded, task, config=config, pruner=pruner,
                             storage=storage or f"sqlite:///{out.with_suffix('.db')}", **options)
    write_table(out, table)
    figure = plots.save(plots.sampler_ablation_figure(summarise(table), "minimize", objective="KL fitness"),
                        out.stem, out.parent.parent / "figures")
    return table, [out, figure]
