"""The default search: a low-dimensional TPE stage, then EvoPress's evolution per linear on level databases re-based on
the best plan so far, with the KL divergence from the dense model as the fitness and validation as the judge.

  bases        the allocations the first stage starts from (uniform, ATP, DLP, ...), their hyperparameters chosen on the
               validation split for the method as their baselines' are (`Pruner.tuned`)
  fitness      search windows from the calibration split (`lmmlab.fitness`): the dense model's top-k next-token
               distributions cached once; a plan's fitness is its mean KL on a fixed set of rows (first stage) or on
               rows drawn per selection step (evolution), through its KV cache when KV is searched
  KV           keys and values as K ≥ V pairs (`kvpairs`); each layer's sensitivity measured once (the KL with that
               layer alone at KV2), layers clustered by it
  stage "tpe"  TPE (or another sampler) over `space.LowDimSpace` — base, ATP-style slope, per-bin offsets, attention/MLP
               split, a pair per KV cluster — warm-started from every base; each trial's plan stitched from a database
               on a shared grid (SparseGPT), built on the inputs of the best base (`database_inputs`)
  stage "evolution", rounds 1..R
               a database of count levels (`database.count_levels`) around the best plan so far, built on that plan's
               own inputs (re-basing), then `evolution.Evolution` from it: per-linear levels (or per layer) and per-layer
               KV pairs, multi-step selection; the round's last parent is the next round's reference
  final        the first stage's and each round's best plan (stitched), the first stage's and the last one solved
               sequentially at their own ratios (each pair gives its database's stitching gap), and the best base as
               its baseline runs it (where the search started) are scored on the validation split; the best is the
               result (every candidate recorded)

Every trial is recorded in one Optuna study with its stage (`stage` user attribute): first-stage trials are Optuna
trials; each evolution candidate is added with `study.add_trial` (COMPLETE for a generation's winner, PRUNED for the
others, with the tokens it reached). Running the same study again resumes it: finished first-stage trials and
generations are kept (one worker per study; the first stage's TPE takes parallel workers through `lmmlab.search`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import optuna
from optuna.trial import TrialState

from lmmlab.progress import bar
from lmmlab.prune import allocate
from lmmlab.kv import pairs as kvpairs
from lmmlab.prune.pruner import Pruner
from lmmlab.prune.database import count_levels, layer_numel, level_grid, plan_on_levels, plan_ratios
from lmmlab.search.evolution import Evolution, Genome, check_selection
from lmmlab.search.fitness import DenseReference, kl_divergence, reference
from lmmlab.kv.cache import kv_cache_for
from lmmlab.models import Loaded
from lmmlab.kv.budget import KIVI_GROUP_SIZE, KIVI_RESIDUAL
from lmmlab.plan import CompressionPlan
from lmmlab.search.samplers import make_sampler
from lmmlab.search.space import LowDimSpace
from lmmlab.search.storage import safe_url, storage_for
from lmmlab.tasks import Task

log = logging.getLogger(__name__)

STAGES = ("tpe", "evolution")
GRANULARITIES = ("module", "layer")
INPUTS = ("dense", "reference")
BASES = ("uniform", "atp", "dlp", "owl", "alphapruning")
FITNESS_SEED = 1_000_003  # the search windows' draw from the calibration split (the calibration itself uses `seed`)


@dataclass(frozen=True)
class SearchConfig:
    """What the staged search does. The defaults are the headline's."""

    target_sparsity: float = 0.5  # weight-weighted mean sparsity every plan meets exactly
    kv_budget: float = 16.0  # mean nominal KV bits per layer, keys and values apart ((k + v) / 2 per layer)
    kv_pairs: tuple[kvpairs.Pair, ...] = ()  # K >= V pairs a layer may take (empty: KVTuner's, KV16 at budget 16)
    kv_clusters: int = kvpairs.CLUSTERS  # layer clusters by sensitivity, one pair choice each in the first stage
    method: str = "sparsegpt"  # sparsegpt (stitched from level databases) or wanda / ria / magnitude (re-masked)
    granularity: str = "module"  # "module": a level per linear; "layer": one level per decoder layer
    stages: tuple[str, ...] = STAGES  # "tpe" then "evolution"; either alone
    sampler: str = "tpe"  # the first stage's sampler (lmmlab.samplers)
    bases: tuple[str, ...] = ("uniform", "atp", "dlp")  # the first stage's base allocations and warm starts
    tpe_trials: int = 40  # first-stage trials, warm starts included
    fitness_tokens: int = 1024  # tokens each first-stage trial is scored on (the same rows for every trial)
    generations: tuple[int, ...] = (16, 8)  # evolution generations per round; one round per entry (re-based)
    offspring: int = 16  # mutants per generation (EvoPress: 64 on a GPU)
    selection: tuple[tuple[int, int], ...] = ((4, 256), (1, 1024))  # (survivors, tokens) per selection step
    count_levels: int = 5  # evolution databases: levels on each side of the reference (EvoPress: 8)
    grid_step: float = 0.05  # the first stage's shared grid: target - 0.3 ... target + 0.25 in this step
    database_inputs: str = "reference"  # first-stage database: "dense" inputs, or the best base's ("reference")
    fitness_rows: int = 16  # search windows drawn from the calibration split
    top_k: int = 1024  # dense next-token probabilities kept per position
    n_eval: int | None = None  # validation items for the final choice (the task's default when None)
    kv_group_size: int = KIVI_GROUP_SIZE
    kv_residual: int = KIVI_RESIDUAL
    seed: int = 0  # the samplers, the evolution and the search windows

    @property
    def pairs(self) -> tuple[kvpairs.Pair, ...]:
        pairs = self.kv_pairs or kvpairs.default_pairs(self.kv_budget)
        return tuple(p for p in pairs if self.kv_budget >= 16 or p != (16, 16)) if not self.kv_pairs else pairs

    @property
    def searches_kv(self) -> bool:
        return self.kv_budget < 16

    def check(self) -> None:
        """One-line ValueErrors for settings no search can run with (checked before any model loads)."""
        from lmmlab.plan import METHODS
        from lmmlab.search.samplers import SAMPLERS

        allocate.check_target(self.target_sparsity)
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; allowed: {', '.join(GRANULARITIES)}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"unknown or repeated stage {bad[0] if bad else list(self.stages)!r}; allowed: "
                             f"{', '.join(STAGES)} (in that order)")
        if list(self.stages) != [s for s in STAGES if s in self.stages]:
            raise ValueError(f"stages run in the order {', '.join(STAGES)}; got {', '.join(self.stages)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; allowed: {', '.join(SAMPLERS)}")
        bad = [b for b in self.bases if b not in BASES]
        if bad or not self.bases:
            raise ValueError(f"unknown base allocation {bad[0] if bad else '(none)'!r}; allowed: {', '.join(BASES)}")
        if self.database_inputs not in INPUTS:
            raise ValueError(f"unknown database inputs {self.database_inputs!r}; allowed: {', '.join(INPUTS)}")
        if self.searches_kv:
            kvpairs.check_budget(self.kv_budget, self.pairs)
        if self.tpe_trials < 1 or self.fitness_tokens < 1 or self.fitness_rows < 1 or self.top_k < 1:
            raise ValueError("tpe_trials, fitness_tokens, fitness_rows and top_k must be >= 1")
        if any(g < 1 for g in self.generations) or ("evolution" in self.stages and not self.generations):
            raise ValueError(f"every evolution round needs >= 1 generation; got {list(self.generations)}")
        check_selection(self.selection, self.offspring)
        if self.count_levels < 1 or not 0 < self.grid_step < 0.5:
            raise ValueError("count_levels must be >= 1 and grid_step in (0, 0.5)")
        if "tpe" not in self.stages and "evolution" in self.stages and self.method != "sparsegpt":
            pass

    def evaluations(self) -> float:
        """Fitness tokens the search spends (first stage + every generation's selection steps)."""
        tpe = self.tpe_trials * self.fitness_tokens if "tpe" in self.stages else 0
        per_generation = 0
        alive = self.offspring
        for s, (survivors, tokens) in enumerate(self.selection):
            per_generation += (alive + (1 if s == len(self.selection) - 1 else 0)) * tokens
            alive = survivors
        evo = sum(self.generations) * per_generation if "evolution" in self.stages else 0
        return tpe + evo


@dataclass
class StagedResult:
    study: optuna.Study
    best_plan: CompressionPlan  # the final choice
    realize: str  # how its weights are made: "stitched" (from `database`) or "sequential" (SparseGPT at its ratios)
    database: str | None  # the database a stitched plan comes from
    candidates: list[dict] = field(default_factory=list)  # every final candidate: name, plan, realize, validation
    timings: dict = field(default_factory=dict)  # seconds per phase

    def apply(self, pruner: Pruner) -> None:
        """Put the chosen plan's weights into the pruner's model as the search realized them."""
        realize_plan(pruner, self.best_plan, self.realize, self.database)


def realize_plan(pruner: Pruner, plan: CompressionPlan, realize: str, database: str | None) -> None:
    """Apply `plan` stitched from the database at `database`, or solved sequentially, or (re-masking methods)
    re-masked."""
    if realize == "stitched" and database is not None:
        if pruner.database is None or str(pruner.database.path) != str(database):
            from lmmlab.prune.database import open_database

            pruner.restore()
            pruner.database = open_database(database, pruner.loaded, dense=pruner.dense, batches=pruner.batches)
            pruner.applied = None
        pruner.apply(plan)
    else:
        pruner.apply(plan, sequential=realize == "sequential")


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def default_study_name(loaded: Loaded, task: Task, config: SearchConfig) -> str:
    stages = "+".join(config.stages)
    return (f"{Path(loaded.name).name}-{task.name}-{config.method}-s{config.target_sparsity:g}-kv{config.kv_budget:g}"
            f"-{stages}-{config.granularity}")


def first_grid(target: float, step: float) -> tuple[float, ...]:
    """The first stage's shared grid: from max(step, target − 0.3) to min(0.95, target + 0.25) in `step`."""
    low = max(step, round(target - 0.3, 10))
    high = min(0.95, round(target + 0.25, 10))
    grid = level_grid(low, high, step)
    return grid if target in grid or any(abs(g - target) < 1e-9 for g in grid) else tuple(sorted(grid + (target,)))


def plan_of_levels(loaded: Loaded, levels: list[dict[str, list]], genes: list[list[tuple[int, str]]],
                   genome: Genome, pairs: Sequence[kvpairs.Pair], config: SearchConfig) -> CompressionPlan:
    """The plan of an evolution genome: each gene's linears at its level index, each layer at its pair."""
    ratios = [dict() for _ in range(loaded.num_layers)]
    for gene, level in zip(genes, genome.levels):
        for i, name in gene:
            ratios[i][name] = levels[i][name][level]
    chosen = [pairs[p] for p in genome.pairs] if genome.pairs else [(16, 16)] * loaded.num_layers
    return CompressionPlan.per_module(ratios, layer_numel(loaded), [k for k, _ in chosen], method=config.method,
                                      value_bits=[v for _, v in chosen], kv_group_size=config.kv_group_size,
                                      kv_residual=config.kv_residual)


def cache_factory(plan: CompressionPlan, loaded: Loaded):
    """A KV cache factory for `plan`, or None when every width is 16 (a plain forward then)."""
    if set(plan.key_widths) | set(plan.value_widths) == {16}:
        return None
    return lambda: kv_cache_for(plan, loaded)


class Stopwatch(dict):
    """Seconds per named phase (added up when a phase runs twice)."""

    def time(self, name: str):
        watch = self

        class _Block:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                watch[name] = watch.get(name, 0.0) + time.perf_counter() - self.start
        return _Block()


# --------------------------------------------------------------------------------------------------------------------
# The search


class StagedSearch:
    """One staged search's state: the model and its pruner, the fitness reference, KV clusters, the study."""

    def __init__(self, loaded: Loaded, task: Task, config: SearchConfig, *, pruner: Pruner | None = None,
                 storage: str = "sqlite:///results/studies.db", study_name: str | None = None,
                 weights: tuple[CompressionPlan, str, str | None] | None = None, progress: bool = False):
        config.check()
        task.check_model(loaded)
        self.loaded, self.task, self.config = loaded, task, config
        self.weights = weights  # fixed weights (a two-stage search's KV stage): (plan, realize, database)
        self.progress = progress
        self.watch = Stopwatch()
        self.pruner = pruner or Pruner.for_task(loaded, task, seed=config.seed)
        self.numel = layer_numel(loaded)
        self.name = study_name or default_study_name(loaded, task, config) + ("-kv-only" if weights else "")
        self.storage = storage
        self.study = self._open_study()

    # -- set-up

    def _open_study(self) -> optuna.Study:
        settings = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
                    "model": self.loaded.name, "task": self.task.describe(),
                    "weights": None if self.weights is None else json.loads(self.weights[0].to_json())}
        settings = json.loads(json.dumps(settings))
        store = storage_for(self.storage)
        sampler = make_sampler(self.config.sampler, seed=self.config.seed)
        try:
            study = optuna.create_study(storage=store, study_name=self.name, sampler=sampler, direction="minimize")
            study.set_user_attr("settings", settings)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.name, storage=store, sampler=sampler)
            if study.user_attrs.get("settings") != settings:
                existing = study.user_attrs.get("settings") or {}
                changed = sorted(k for k in set(existing) | set(settings) if existing.get(k) != settings.get(k))
                raise ValueError(f"study {self.name!r} in {safe_url(self.storage)} was created with other settings "
                                 f"({', '.join(changed) or 'none recorded'}); pass another study name or the same "
                                 "settings to resume it")
        return study

    def fitness_reference(self) -> DenseReference:
        with self.watch.time("reference"):
            self.pruner.restore()
            batches = self.task.calibration_batches(self.loaded, n=self.config.fitness_rows,
                                                    seed=self.config.seed + FITNESS_SEED)
            return reference(self.loaded, batches, top_k=self.config.top_k)

    def kv_sensitivity(self, ref: DenseReference) -> list[float]:
        """Per layer, the KL with that layer alone at KV2 on the dense weights (one row), measured once per study."""
        if "kv_sensitivity" in self.study.user_attrs:
            return self.study.user_attrs["kv_sensitivity"]
        with self.watch.time("kv_sensitivity"):
            self.pruner.restore()
            rows = ref.order(256)

            def score(pairs):
                plan = CompressionPlan([0.0] * self.loaded.num_layers, [k for k, _ in pairs],
                                       value_bits=[v for _, v in pairs], kv_group_size=self.config.kv_group_size,
                                       kv_residual=self.config.kv_residual)
                return kl_divergence(self.loaded, ref, make_cache=lambda: kv_cache_for(plan, self.loaded), rows=rows)
            sens = kvpairs.sensitivity(self.loaded.num_layers, score)
        self.study.set_user_attr("kv_sensitivity", sens)
        return sens

    def bases(self) -> dict[str, list[float]]:
        with self.watch.time("bases"):
            return {name: self.pruner.allocation(name, self.config.target_sparsity, self.config.method)
                    for name in self.config.bases}

    def best_base(self, bases: dict[str, list[float]]) -> str:
        """The base with the best validation score its tuning measured (`Pruner.validation_score`); the first base
        when none was scored."""
        scores = {name: self.pruner.validation_score(name, self.config.target_sparsity, self.config.method)
                  for name in bases}
        scores = {name: v for name, v in scores.items() if v is not None}
        if not scores:
            return next(iter(bases))
        sign = 1 if self.task.direction == "minimize" else -1
        return min(scores, key=lambda n: (sign * scores[n], list(bases).index(n)))

    # -- stages

    def fitness(self, plan: CompressionPlan, ref: DenseReference, rows: Sequence[int]) -> float:
        if self.weights is None:  # (fixed weights are in place already)
            self.pruner.apply(plan)
        return kl_divergence(self.loaded, ref, make_cache=cache_factory(plan, self.loaded), rows=rows)

    def first_stage(self, ref: DenseReference, space: LowDimSpace, bases: dict[str, list[float]],
                    kv_plan: list[kvpairs.Pair] | None) -> tuple[CompressionPlan, float]:
        """The low-dimensional stage: returns its best plan (lowest KL) and that KL."""
        config = self.config
        rows = ref.order(config.fitness_tokens)
        tpe = [t for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("stage") == "tpe"]
        if not tpe:
            for name in bases:
                self.study.enqueue_trial(space.warm_params(name), user_attrs={"stage": "tpe", "source": name})
            if kv_plan is not None:
                self.study.enqueue_trial(space.warm_params(next(iter(bases)), kv_plan),
                                         user_attrs={"stage": "tpe", "source": "kvtuner"})

        def objective(trial: optuna.Trial) -> float:
            start = time.perf_counter()
            params = space.suggest(trial)
            plan, residual = space.plan(params)
            value = self.fitness(plan, ref, rows)
            trial.set_user_attr("stage", "tpe")
            trial.set_user_attr("source", trial.user_attrs.get("source", config.sampler))
            trial.set_user_attr("plan", json.loads(plan.to_json()))
            trial.set_user_attr("budget_residual", residual)
            trial.set_user_attr("mean_kv_bits", plan.mean_kv_bits)
            trial.set_user_attr("seconds", time.perf_counter() - start)
            return value

        done = sum(t.state == TrialState.COMPLETE for t in tpe)
        with self.watch.time("tpe"):
            trials = bar(total=config.tpe_trials, initial=done, desc="search: first stage (TPE trials)",
                         enabled=self.progress or None)
            while done < config.tpe_trials:
                self.study.optimize(objective, n_trials=1)
                done += 1
                trials.update(1)
            trials.close()
        best = min((t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.user_attrs.get("stage") == "tpe"), key=lambda t: (t.value, t.number))
        return CompressionPlan(**best.user_attrs["plan"]), best.value

    def genes(self) -> list[list[tuple[int, str]]]:
        """The evolution's genes: one per linear, or one per layer (all its linears)."""
        if self.config.granularity == "layer":
            return [[(i, name) for name in self.numel[i]] for i in range(self.loaded.num_layers)]
        return [[(i, name)] for i in range(self.loaded.num_layers) for name in self.numel[i]]

    def evolution_round(self, r: int, start: CompressionPlan, ref: DenseReference,
                        pairs: Sequence[kvpairs.Pair]) -> tuple[CompressionPlan, str | None]:
        """Round `r`: a count-level database around `start` on its own inputs (SparseGPT), then the evolution from it.
        Returns the round's last parent and the database it is stitched from."""
        config = self.config
        database = None
        if self.weights is not None:  # KV only: one level per linear, the fixed weights
            levels = [{name: [start.ratio(i, name)] for name in self.numel[i]} for i in range(self.loaded.num_layers)]
        else:  # count levels around the start; SparseGPT stitches them from a database on the start's inputs
            levels = count_levels(start, self.numel, hidden=self.loaded.hidden_size, k=config.count_levels)
            if config.method == "sparsegpt":
                with self.watch.time(f"database {r}"):
                    db = self.pruner.attach_database(levels=levels, reference=start, progress=self.progress)
                database = str(db.path)
        genes = self.genes()
        removed = [[sum(int(self.numel[i][name] * levels[i][name][j]) if levels[i][name][j] is not None else 0
                        for i, name in gene) if all(levels[i][name][j] is not None for i, name in gene) else None
                    for j in range(len(levels[gene[0][0]][gene[0][1]]))] for gene in genes]
        start_levels = tuple(levels[gene[0][0]][gene[0][1]].index(start.ratio(*gene[0])) for gene in genes)
        order = sorted(pairs, key=lambda p: (-kvpairs.cost(p), -p[0]))
        searched_pairs = order if config.searches_kv else []
        start_pairs = tuple(order.index((k, v)) for k, v in zip(start.key_widths, start.value_widths)) \
            if searched_pairs else ()
        evo = Evolution(removed, order if searched_pairs else [], offspring=config.offspring,
                        selection=config.selection, seed=config.seed * 1009 + r)
        parent = Genome(start_levels, start_pairs)
        stage = f"evolution{r}"
        done = self._resume_generations(stage)
        if done:
            parent = Genome(tuple(done[-1]["levels"]), tuple(done[-1]["pairs"]))

        def plan_of(genome: Genome) -> CompressionPlan:
            return plan_of_levels(self.loaded, levels, genes, genome, order, config)

        def score(genome: Genome, tokens: int, start_row: int) -> float:
            return self.fitness(plan_of(genome), ref, ref.order(tokens, start=start_row % len(ref.rows)))

        generations = config.generations[r - 1]
        with self.watch.time(f"evolution {r}"):
            for g in bar(range(len(done), generations), desc=f"search: evolution round {r} (generations)",
                         enabled=self.progress or None):
                t0 = time.perf_counter()
                candidates = evo.generation(parent, g, score)
                self._record(stage, g, candidates, plan_of, time.perf_counter() - t0)
                parent = candidates[0].genome
        return plan_of(parent), database

    def _resume_generations(self, stage: str) -> list[dict]:
        """The winners of the finished generations of `stage`, in order (resuming a study)."""
        chosen = {}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("stage") == stage and t.user_attrs.get("chosen"):
                chosen[t.user_attrs["generation"]] = t.user_attrs["genome"]
        out = []
        for g in range(len(chosen)):
            if g not in chosen:
                break
            out.append(chosen[g])
        return out

    def _record(self, stage: str, g: int, candidates, plan_of, seconds: float) -> None:
        steps = self.config.selection
        for c in candidates:
            chosen = c is candidates[0]
            reached = len(c.scores)
            user_attrs = {"stage": stage, "generation": g, "chosen": chosen, "parent": c.parent,
                          "scores": c.scores, "tokens": [t for _, t in steps][-reached:] if c.parent else
                          [t for _, t in steps][:reached],
                          "genome": {"levels": list(c.genome.levels), "pairs": list(c.genome.pairs)},
                          "plan": json.loads(plan_of(c.genome).to_json()), "generation_seconds": seconds}
            state = TrialState.COMPLETE if reached == len(steps) or c.parent else TrialState.PRUNED
            trial = optuna.trial.create_trial(state=state, value=c.scores[-1] if state == TrialState.COMPLETE else None,
                                              user_attrs={**user_attrs, "pruned_at": None if state ==
                                                          TrialState.COMPLETE else user_attrs["tokens"][-1]})
            self.study.add_trial(trial)

    # -- final choice

    def final(self, candidates: list[tuple[str, CompressionPlan, str, str | None]]) -> StagedResult:
        """Score every candidate on the validation split; the best is the result (recorded in the study)."""
        if "final" in self.study.user_attrs:
            return self._result(self.study.user_attrs["final"])
        rows = []
        with self.watch.time("final"):
            for name, plan, realize, database in candidates:
                if self.weights is not None:
                    realize, database = self.weights[1], self.weights[2]
                    realize_plan(self.pruner, replace(plan), realize, database)
                else:
                    realize_plan(self.pruner, plan, realize, database)
                metrics = self.task.evaluate(self.loaded, split="validation", n=self.config.n_eval,
                                             make_cache=cache_factory(plan, self.loaded), with_loss=False)
                rows.append({"name": name, "plan": json.loads(plan.to_json()), "realize": realize,
                             "database": database, "validation": metrics.primary})
                log.info("final candidate %s (%s): validation %s %.4f", name, realize, self.task.primary_metric,
                         metrics.primary)
        sign = 1 if self.task.direction == "minimize" else -1
        best = min(range(len(rows)), key=lambda k: (sign * rows[k]["validation"], k))
        final = {"candidates": rows, "chosen": best, "timings": dict(self.watch)}
        self.study.set_user_attr("final", final)
        return self._result(final)

    def _result(self, final: dict) -> StagedResult:
        chosen = final["candidates"][final["chosen"]]
        return StagedResult(self.study, CompressionPlan(**chosen["plan"]), chosen["realize"], chosen["database"],
                            final["candidates"], final.get("timings", {}))

    # -- the whole run

    def setup(self) -> tuple[LowDimSpace, DenseReference, list[int]]:
        """The fitness reference, the KV clusters, the bases and the first stage's database and space; returns (the
        space, the reference, the first stage's rows). With fixed weights: a space over the KV clusters only, the
        weights realized once."""
        config = self.config
        ref = self.fitness_reference()
        pairs = config.pairs
        clusters, sens = (), ()
        self.kv_plan = None
        if config.searches_kv:
            sens = self.kv_sensitivity(ref)
            clusters = tuple(kvpairs.clusters(sens, config.kv_clusters))
            self.kv_plan = kvpairs.kvtuner_plan(sens, config.kv_budget, pairs)
        self.first_database = None
        if self.weights is not None:
            fixed = self.weights[0]
            realize_plan(self.pruner, fixed, self.weights[1], self.weights[2])
            self.base_ratios = {"fixed": [fixed.sparsity[i] for i in range(self.loaded.num_layers)]}
            space = _FixedWeights(fixed, plan_ratios(fixed, self.loaded), self.numel, config, pairs, clusters, sens)
            return space, ref, ref.order(config.fitness_tokens)
        bases = self.base_ratios = self.bases()
        levels = ()
        if config.method == "sparsegpt":
            grid = first_grid(config.target_sparsity, config.grid_step)
            reference_plan = None
            if config.database_inputs == "reference":
                reference_plan = plan_on_levels(self.loaded, bases[self.best_base(bases)], config.target_sparsity,
                                                grid)
            with self.watch.time("database 0"):
                db = self.pruner.attach_database(levels=grid, reference=reference_plan, progress=self.progress)
            self.first_database = str(db.path)
            levels = tuple(db.module_levels)
        space = LowDimSpace(
            numel=tuple(tuple(layer.items()) for layer in self.numel), target=config.target_sparsity,
            bases=tuple((name, tuple(r)) for name, r in bases.items()), kv_budget=config.kv_budget,
            kv_pairs=pairs if config.searches_kv else ((16, 16),), kv_clusters=clusters, kv_sensitivity=tuple(sens),
            slope=allocate.atp_max_slope(self.loaded.num_layers, config.target_sparsity) / 2, levels=levels,
            method=config.method, kv_group_size=config.kv_group_size, kv_residual=config.kv_residual)
        return space, ref, ref.order(config.fitness_tokens)

    def run(self) -> StagedResult:
        config = self.config
        if "final" in self.study.user_attrs:
            return self._result(self.study.user_attrs["final"])
        space, ref, _ = self.setup()
        candidates = []
        if self.weights is not None:
            realize, database = self.weights[1], self.weights[2]
            best = self.weights[0]
            if "tpe" in config.stages:
                best, _ = self.first_stage(ref, space, self.base_ratios, self.kv_plan)
        else:
            database = self.first_database
            realize = "stitched" if database else "remask"
            if "tpe" in config.stages:
                best, _ = self.first_stage(ref, space, self.base_ratios, self.kv_plan)
            else:  # the evolution starts from the best base, its KV uniform at the budget
                best, _ = space.plan(space.warm_params(self.best_base(self.base_ratios)))
        if "tpe" in config.stages:
            candidates.append(("tpe", best, realize, database))
            if "evolution" in config.stages and config.method == "sparsegpt" and self.weights is None:
                candidates.append(("tpe-sequential", best, "sequential", None))  # the first database's stitching gap
        if "evolution" in config.stages:
            current = best
            for r in range(1, len(config.generations) + 1):
                current, database = self.evolution_round(r, current, ref, config.pairs)
                if self.weights is not None:
                    database = self.weights[2]
                candidates.append((f"evolution{r}", current, realize if self.weights else
                                   "stitched" if database else "remask", database))
            best = current
        if config.method == "sparsegpt" and self.weights is None:
            candidates.append(("sequential", best, "sequential", None))
        if self.weights is None:  # where the search started: the best base as its baseline runs it
            base = self.best_base(self.base_ratios)
            plan, _ = space.plan(space.warm_params(base))
            start = replace(plan, module_sparsity=[], sparsity=list(self.base_ratios[base]))
            candidates.append((f"base:{base}", start, "sequential" if config.method == "sparsegpt" else "remask",
                               None))
        return self.final(candidates)


class _FixedWeights(LowDimSpace):
    """A first-stage space over the KV clusters only, the weights fixed to a plan's."""

    def __init__(self, fixed: CompressionPlan, ratios, numel, config: SearchConfig, pairs, clusters, sens):
        super().__init__(numel=tuple(tuple(layer.items()) for layer in numel), target=config.target_sparsity,
                         bases=(("fixed", tuple(fixed.sparsity)),), kv_budget=config.kv_budget,
                         kv_pairs=pairs if config.searches_kv else ((16, 16),), kv_clusters=clusters,
                         kv_sensitivity=tuple(sens), bins=1, offset=0.0, slope=0.0, split=0.0,
                         max_sparsity=max(config.target_sparsity, max(max(r.values()) for r in ratios)),
                         method=fixed.method, kv_group_size=config.kv_group_size, kv_residual=config.kv_residual)
        object.__setattr__(self, "_ratios", ratios)

    def suggest(self, trial):
        p = {}
        if self.searches_kv:
            choices = [kvpairs.pair_name(q) for q in self.kv_pairs]
            for c in range(max(self.kv_clusters) + 1):
                p[f"kv{c}"] = trial.suggest_categorical(f"kv{c}", choices)
        return p

    def warm_params(self, base, kv=None):
        return {k: v for k, v in super().warm_params(base, kv).items() if k.startswith("kv")}

    def ratios(self, params):
        return [dict(layer) for layer in self._ratios], 0.0


def staged_trials_table(study: optuna.Study):
    """Every trial of a staged study as one row: its stage, state, fitness (KL), where it came from and its plan's
    means (the per-linear ratios and per-layer pairs joined by '-')."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if "plan" not in a:
            continue
        plan = CompressionPlan(**a["plan"])
        rows.append({"study": study.study_name, "trial": t.number, "stage": a.get("stage", ""), "state": t.state.name,
                     "kl": t.value, "source": a.get("source", ""), "generation": a.get("generation"),
                     "chosen": a.get("chosen", False), "tokens": (a.get("tokens") or [None])[-1],
                     "mean_sparsity": plan.mean_sparsity, "mean_kv_bits": plan.mean_kv_bits,
                     "mean_key_bits": plan.mean_key_bits, "mean_value_bits": plan.mean_value_bits,
                     "sparsity": "-".join(f"{s:.3f}" for s in plan.sparsity),
                     "kv_bits": "-".join(map(str, plan.key_widths)), "value_bits": "-".join(map(str, plan.value_widths)),
                     "seconds": a.get("seconds", a.get("generation_seconds"))})
    return pd.DataFrame(rows)


def write_results(result: StagedResult, out_dir: str | Path, studies: Sequence[optuna.Study] = ()) -> list[Path]:
    """The search's trials (of `studies`, default its own), final candidates and chosen plan:
    `<study>_trials.csv`, `<study>_final.csv`, `<study>_best_plan.json` in `out_dir`."""
    import pandas as pd

    from lmmlab.files import write_table

    out_dir = Path(out_dir)
    name = result.study.study_name
    table = pd.concat([staged_trials_table(study) for study in (studies or [result.study])], ignore_index=True)
    paths = [out_dir / f"{name}_trials.csv", out_dir / f"{name}_final.csv", out_dir / f"{name}_best_plan.json"]
    write_table(paths[0], table)
    write_table(paths[1], [{k: v for k, v in c.items() if k != "plan"} for c in result.candidates])
    result.best_plan.save(paths[2])
    return paths


def chosen_name(result: StagedResult) -> str:
    """The name of the final candidate the search chose (tpe, evolution1, sequential, base:atp, ...)."""
    plan = json.loads(result.best_plan.to_json())
    return next(c["name"] for c in result.candidates if c["plan"] == plan and c["realize"] == result.realize)


def staged_search(loaded: Loaded, task: Task, config: SearchConfig = SearchConfig(), *,
                  pruner: Pruner | None = None, storage: str = "sqlite:///results/studies.db",
                  study_name: str | None = None, progress: bool = False) -> StagedResult:
    """Run (or resume) the staged search of `config` (see the module docstring)."""
    return StagedSearch(loaded, task, config, pruner=pruner, storage=storage, study_name=study_name,
                        progress=progress).run()


def two_stage_search(loaded: Loaded, task: Task, config: SearchConfig, *, pruner: Pruner | None = None,
                     storage: str = "sqlite:///results/studies.db", study_name: str | None = None,
                     progress: bool = False) -> tuple[StagedResult, StagedResult]:
    """The ablation the joint search answers to, at equal evaluations: the weights searched first with every layer
    at 16 bits (half of the first-stage trials and of every round's generations), then the KV pairs on those fixed
    weights (the other half). Returns (weights stage, KV stage); the KV stage's result is the plan."""
    half = lambda n: max(1, n // 2)  # noqa: E731
    weights_config = replace(config, kv_budget=16.0, kv_pairs=(), tpe_trials=half(config.tpe_trials),
                             generations=tuple(half(g) for g in config.generations))
    name = study_name or default_study_name(loaded, task, config) + "-two-stage"
    pruner = pruner or Pruner.for_task(loaded, task, seed=config.seed)
    first = StagedSearch(loaded, task, weights_config, pruner=pruner, storage=storage, study_name=name + "-weights",
                         progress=progress).run()
    kv_config = replace(config, tpe_trials=config.tpe_trials - half(config.tpe_trials),
                        generations=tuple(max(1, g - half(g)) for g in config.generations[:1]))
    second = StagedSearch(loaded, task, kv_config, pruner=pruner, storage=storage, study_name=name + "-kv",
                          weights=(first.best_plan, first.realize, first.database), progress=progress).run()
    return first, second
