"""Joint search over per-layer sparsity and per-layer KV bit-widths (Optuna; TPE by default), no fine-tuning.

A trial suggests, for every decoder layer (or every bin of consecutive layers), a sparsity offset from the target
and a KV width; the suggestion is then *projected* onto the budget, and the projected plan is what is evaluated and
recorded, so every trial meets the budget and none is thrown away:
  - sparsity: s_l = clip(target + offset_l + ν, 0, max_sparsity), with the one shift ν that makes the
    parameter-weighted mean exactly the target (the weighted least-squares projection, `allocate.project`);
  - KV bits: while the mean width is over the budget, the widest layer steps down to the next allowed width
    (`kv.budget.fit_kv_bits`); a suggestion within budget is kept as is. The budget counts nominal widths, or
    (`kv_budget_unit="effective"`) the bits per element a layer really stores at `context_tokens`: packed codes,
    fp16 scales and zero points and the full-precision windows, a 16-bit layer as fp16 (`kvcache.effective_bits`).
TPE models the raw suggestions; projecting them is a deterministic repair, so equal suggestions give equal plans.

Options:
  - `sampler`: any of `samplers.SAMPLERS` (TPE, random, CMA-ES, GP, NSGA-II, and an EvoPress-style evolution whose
    level-switch mutations keep the budget); recorded in the study's settings.
  - `method="sparsegpt"`: a trial stitches SparseGPT solutions from the pruner's layer database (`database.py`: each
    layer solved at a grid of levels on the dense model's inputs) at re-mask speed. The projected sparsities are then
    projected onto the grid (`database.project_to_grid`: each layer within one grid step of its value, the mean as
    close to the target as the grid allows; the residual is the trial's `budget_residual`, 0 when the target is a
    multiple of the grid step over the layer count).
  - `separate_kv`: keys (`kv{b}`) and values (`v{b}`) at their own widths, the budget on their combined mean
    (`kv.budget.fit_kv_pairs`; in effective bits each part costs what it stores).
  - `multi_fidelity`: a trial is scored on 1/16, then 1/4 of the validation items (`trial.report`: the loss there,
    signed in the study's direction), and Optuna's
    successive-halving pruner stops it (PRUNED, `pruned_at`) unless it is in the best quarter at that step; warm
    starts are always scored in full. Pruned trials count towards `n_trials` and are never the best.
  - `warm_allocations`: uniform plus any of OWL, ATP, AlphaPruning (`Pruner.allocation`).

A trial is cheap: the calibration and the pruning scores are computed once (`prune.pruner.Pruner`), so it re-masks, builds
a fresh KV cache per batch and evaluates the task on its validation split (the test split is for final reports only).
The objective is the task's primary metric in its direction (accuracy ↑, perplexity ↓), or its loss. The uniform and
OWL plans (with uniform KV at the budget) are enqueued first, so the best plan found is never worse than either on
validation. In multi-objective mode the target sparsity and the KV budget are suggested too, and the study optimises
the primary metric while minimising memory (non-zero weight bytes + KV bytes at `context_tokens`), or with a
`cost_model` the decode seconds per token it predicts at `context_tokens` (`search.cost`): its best trials are the
Pareto front.

Studies live in any Optuna storage (`lmmlab.storage`): `sqlite:///results/studies.db` (the default, one host),
`postgresql://USER:PASS@HOST:PORT/DB` (a server; `pip install 'lmmlab[postgres]'`) or `journal:///FILE` (Optuna's
JournalStorage on one file: one host, many processes, no server). Running the same study name again resumes it, and
several workers (processes, hosts) may run one study at the same time; together they finish exactly `n_trials`:
  - the first worker to create the study (the storage's unique study name decides) enqueues the warm starts, then
    records the settings; the others wait for the settings and refuse a study with other settings;
  - each worker's sampler has its own seed, `worker_seed(seed, worker)` (a hash), recorded on each trial with the
    worker's name, and TPE's constant liar treats the other workers' running trials as bad, so workers do not draw
    the same suggestions;
  - a worker starts a trial only while finished + running trials < `n_trials`, and a trial whose number has
    `n_trials` finished, running or queued trials before it is pruned unevaluated (two workers that started at
    once); otherwise a worker waits for the other workers' running trials;
  - a killed worker's running trial stops beating (every `heartbeat` s, as the study's creator set it); after 3
    beats missed the next worker marks it failed and runs its parameters again (once): a killed worker loses none.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import optuna

from lmmlab.progress import bar
from lmmlab.prune import allocate
from lmmlab.prune.pruner import Pruner
from lmmlab.prune.export import weight_format_bytes
from lmmlab.prune.database import project_to_grid
from lmmlab.kv.cache import KVCacheFactory, kv_cache_for, window_warning
from lmmlab.kv.budget import effective_bits, effective_key_bits, effective_value_bits, kv_nbytes
from lmmlab.search.samplers import make_sampler
from lmmlab.search.storage import HEARTBEAT_S, check_heartbeat, check_storage, safe_url, storage_for
from lmmlab.models import Loaded
from lmmlab.tasks import Task
from lmmlab.kv.budget import (KIVI_GROUP_SIZE, KIVI_RESIDUAL, KV_BITS, check_kv_bits, check_kv_layout, fit_kv_bits,
                              fit_kv_pairs)
from lmmlab.plan import METHODS, CompressionPlan

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///results/studies.db"
KV_UNITS = ("nominal", "effective")
WARM_ALLOCATIONS = ("uniform", "owl")  # enqueued as the first trials by default
WARM_CHOICES = ("uniform", "owl", "atp", "alphapruning")
LOSS = "loss"  # the objective that optimises the task's loss instead of its primary metric


@dataclass(frozen=True)
class SearchSpace:
    """What a trial may choose. `target_sparsity` / `kv_budget_bits` are the budgets (searched in multi-objective
    mode, within `target_range` and `kv_widths`)."""

    num_layers: int
    target_sparsity: float = 0.5
    kv_budget_bits: float = 16.0
    kv_widths: tuple[int, ...] = KV_BITS
    spread: float = 0.25  # per-layer sparsity offsets from the target, in [-spread, spread]
    max_sparsity: float = 0.95
    groups: int | None = None  # bins of consecutive layers sharing one choice; None = every layer its own
    multi_objective: bool = False
    target_range: tuple[float, float] = (0.3, 0.8)
    kv_unit: str = "nominal"  # what kv_budget_bits counts: "nominal" widths, or "effective" bits per element stored
    kv_cost: tuple[float, ...] = ()  # "effective": each width's bits per element at the stated context (kv_widths order)
    separate_kv: bool = False  # keys and values at their own widths (budget on their combined mean)
    key_cost: tuple[float, ...] = ()  # "effective" and separate_kv: a width's bits per stored key / value element
    value_cost: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"target sparsity must be in [0, 1); got {self.target_sparsity}")
        if not self.kv_widths:
            raise ValueError(f"the set of KV widths is empty; choose from {', '.join(map(str, KV_BITS))}")
        check_kv_bits(self.kv_widths, name="kv width")
        if self.kv_unit not in KV_UNITS:
            raise ValueError(f"unknown KV budget unit {self.kv_unit!r}; allowed: {', '.join(KV_UNITS)}")
        if self.kv_unit == "effective" and len(self.kv_cost) != len(self.kv_widths):
            raise ValueError("an effective-bits KV budget needs each width's effective bits (kv_cost)")
        if self.kv_unit == "effective" and self.separate_kv and not (
                len(self.key_cost) == len(self.value_cost) == len(self.kv_widths)):
            raise ValueError("separate key and value widths in effective bits need each part's cost "
                             "(key_cost, value_cost)")
        narrowest = min(self.kv_widths)
        if self.kv_budget_bits < self.cost[narrowest] - 1e-9:
            raise ValueError(f"KV budget {self.kv_budget_bits:g} {self.kv_unit} bits is below the narrowest allowed "
                             f"width {narrowest} ({self.cost[narrowest]:.4g} {self.kv_unit} bits)")
        if not 0 < self.max_sparsity < 1 or self.target_sparsity > self.max_sparsity:
            raise ValueError(f"max sparsity must be in (0, 1) and at least the target; got {self.max_sparsity}")
        if self.spread < 0:
            raise ValueError(f"spread must be >= 0; got {self.spread}")
        if self.groups is not None and not 1 <= self.groups <= self.num_layers:
            raise ValueError(f"groups must be between 1 and the number of layers ({self.num_layers}); "
                             f"got {self.groups}")
        low, high = self.target_range
        if not 0 <= low <= high <= self.max_sparsity:
            raise ValueError(f"target range must satisfy 0 <= low <= high <= max sparsity; got {self.target_range}")

    @property
    def bins(self) -> list[int]:
        """The bin of each layer: contiguous, as equal in size as possible."""
        n = self.groups or self.num_layers
        return [i * n // self.num_layers for i in range(self.num_layers)]

    @property
    def cost(self) -> dict[int, float]:
        """What each width costs in the budget's unit."""
        if self.kv_unit == "effective":
            return dict(zip(self.kv_widths, self.kv_cost))
        return {b: float(b) for b in self.kv_widths}

    @property
    def part_cost(self) -> tuple[dict[int, float], dict[int, float]]:
        """What a key width and a value width cost (a layer costs their mean): the nominal width, or each part's
        effective bits per element."""
        if self.kv_unit == "effective" and self.separate_kv:
            return dict(zip(self.kv_widths, self.key_cost)), dict(zip(self.kv_widths, self.value_cost))
        return self.cost, self.cost

    @property
    def widest_in_budget(self) -> int:
        return max(b for b in self.kv_widths if self.cost[b] <= self.kv_budget_bits + 1e-9)


def suggest_plan(trial: optuna.Trial, space: SearchSpace, weights: list[float], method: str = "wanda",
                 levels: Sequence[float] | None = None, **plan_options) -> CompressionPlan:
    """Suggest raw per-bin choices, then project them onto the budget (see the module docstring); with `levels` (a
    layer database's grid) the sparsities are then projected onto the grid (`database.project_to_grid`), the residual
    recorded as the trial's `budget_residual`."""
    n_bins = max(space.bins) + 1
    if space.multi_objective:
        target = trial.suggest_float("target_sparsity", *space.target_range)
        budget = space.cost[trial.suggest_categorical("kv_budget", sorted(space.kv_widths))]
    else:
        target, budget = space.target_sparsity, space.kv_budget_bits
    offsets = [trial.suggest_float(f"s{b}", -space.spread, space.spread) for b in range(n_bins)]
    widths = [trial.suggest_categorical(f"kv{b}", sorted(space.kv_widths)) for b in range(n_bins)]
    raw = [target + offsets[b] for b in space.bins]
    sparsity = allocate.project(raw, target, 0.0, space.max_sparsity, weights)
    if levels is not None:  # a layer database: one of its levels per layer, the mean as close as the grid allows
        sparsity, residual = project_to_grid(sparsity, levels, target, weights)
        trial.set_user_attr("budget_residual", residual)
    if not space.separate_kv:
        kv_bits = fit_kv_bits([widths[b] for b in space.bins], budget, space.kv_widths, space.cost)
        return CompressionPlan(sparsity, kv_bits, method=method, **plan_options)
    values = [trial.suggest_categorical(f"v{b}", sorted(space.kv_widths)) for b in range(n_bins)]
    keys, values = fit_kv_pairs([widths[b] for b in space.bins], [values[b] for b in space.bins], budget,
                                         space.kv_widths, *space.part_cost)
    return CompressionPlan(sparsity, keys, method=method, value_bits=values, **plan_options)


def warm_start_params(space: SearchSpace, allocations: dict[str, list[float]]) -> list[tuple[str, dict]]:
    """The uniform plan and each named allocation (OWL, ATP, AlphaPruning: per-layer sparsities at the target), all
    with uniform KV at the widest width within budget, as trial parameters. Multi-objective: at the low, middle and
    high target, each allocation shifted by its offsets from the target, at the widest and narrowest KV width."""
    n_bins = max(space.bins) + 1

    def params(sparsity: list[float], target: float, kv: int) -> dict:
        p = {}
        for b in range(n_bins):
            members = [s for s, bin_ in zip(sparsity, space.bins) if bin_ == b]
            offset = sum(members) / len(members) - target
            p[f"s{b}"] = max(-space.spread, min(space.spread, offset))
            p[f"kv{b}"] = kv
            if space.separate_kv:
                p[f"v{b}"] = kv
        return p
    named = {"uniform": [space.target_sparsity] * space.num_layers, **allocations}
    if not space.multi_objective:
        target, kv = space.target_sparsity, space.widest_in_budget
        return [(name, params(sparsity, target, kv)) for name, sparsity in named.items()]
    starts = []
    low, high = space.target_range
    for target in (low, (low + high) / 2, high):
        for kv in sorted({max(space.kv_widths), min(space.kv_widths)}, reverse=True):
            shared = {"target_sparsity": target, "kv_budget": kv}
            for name, sparsity in named.items():  # offsets from the target, the same at any target
                starts.append((name, {**shared, **params([target + s - space.target_sparsity for s in sparsity],
                                                         target, kv)}))
    return starts


def memory_bytes(loaded: Loaded, plan: CompressionPlan, context_tokens: int) -> dict:
    """Weight bytes as an export stores them (compressed-tensors' bitmask format; the model must already be pruned to
    `plan`), and KV bytes at `context_tokens`."""
    kv = kv_nbytes(plan.kv_bits, loaded.num_kv_heads, loaded.head_dim, context_tokens, plan.kv_group_size,
                   plan.kv_residual, loaded.model.dtype.itemsize, value_bits=plan.value_widths)
    weights = weight_format_bytes(loaded, "bitmask", pattern=plan.pattern)
    return {"weight_bytes": weights, "kv_bytes_at_context": kv, "memory_bytes": weights + kv}


@dataclass
class SearchResult:
    study: optuna.Study
    best_plan: CompressionPlan  # single objective: the best trial's; multi-objective: the most accurate on the front
    front: list[CompressionPlan] = field(default_factory=list)  # multi-objective: the Pareto front's plans


def worker_seed(seed: int, worker: str) -> int:
    """The sampler seed of `worker`: the first 4 bytes of sha256("{seed}/{worker}"), so workers differ and a named
    worker is reproducible."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{worker}".encode()).digest()[:4], "little")


def default_worker() -> str:
    """This process's worker name: hostname-pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _settings(loaded: Loaded, task: Task, space: SearchSpace, config: PerLayerConfig) -> dict:
    return {"model": loaded.name, "task": task.describe(), "objective": config.objective or task.primary_metric,
            "method": config.method, "kv_group_size": config.kv_group_size, "kv_residual": config.kv_residual,
            "n_eval": config.n_eval, "context_tokens": config.context_tokens,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(space).items()},
            "sampler": config.sampler, "multi_fidelity": config.multi_fidelity}


SETTINGS_WAIT_S = 60  # how long a worker waits for the study's creator to record its settings


def open_study(space: SearchSpace, storage: str, study_name: str, direction: str, seed: int, settings: dict, *,
               warm_starts: list[tuple[str, dict]] = (), heartbeat: int = HEARTBEAT_S, sampler: str = "tpe",
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the study, enqueue `warm_starts` and record `settings` and `heartbeat`; or, if another worker created it,
    wait for its settings and load it if they are the same (resume), beating at the study's heartbeat (a worker that
    beats slower than another checks would have its running trial taken for a dead one's). `seed`: this worker's
    sampler seed."""
    name = sampler
    sampler = make_sampler(name, seed=seed, multi_objective=space.multi_objective)
    pruner = pruner or optuna.pruners.NopPruner()
    directions = [direction, "minimize"] if space.multi_objective else [direction]
    store = storage_for(storage, heartbeat=heartbeat)
    try:  # the storage's unique study name makes exactly one worker the creator
        study = optuna.create_study(storage=store, study_name=study_name, sampler=sampler, pruner=pruner,
                                    directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=store, sampler=sampler, pruner=pruner)
    else:
        for source, params in warm_starts:
            study.enqueue_trial(params, user_attrs={"source": source})
        study.set_user_attr("heartbeat_s", heartbeat)
        study.set_user_attr("settings", settings)  # last: the other workers start once they see it
        return study
    deadline = time.monotonic() + SETTINGS_WAIT_S
    while (existing := study.user_attrs.get("settings")) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if existing is None:
        raise ValueError(f"study {study_name!r} in {safe_url(storage)} has no lmmlab settings (not made by lmmlab "
                         "search, or its creator stopped while setting it up); pass another --study-name")
    if existing != settings:
        changed = sorted(k for k in set(existing) | set(settings) if existing.get(k) != settings.get(k))
        raise ValueError(f"study {study_name!r} in {safe_url(storage)} was created with other settings "
                         f"({', '.join(changed)}); pass another --study-name or the same settings to resume it")
    if (beat := study.user_attrs.get("heartbeat_s", heartbeat)) != heartbeat:
        log.warning("study %r beats every %d s (as created); heartbeat %d s ignored", study_name, beat, heartbeat)
        study = optuna.load_study(study_name=study_name, storage=storage_for(storage, heartbeat=beat), sampler=sampler,
                                  pruner=pruner)
    return study


def finished(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that counts towards `n_trials`: COMPLETE, or PRUNED by the multi-fidelity pruner (not surplus)."""
    return (trial.state == optuna.trial.TrialState.COMPLETE
            or (trial.state == optuna.trial.TrialState.PRUNED and "pruned_at" in trial.user_attrs))


def own_trials(storage: str, study_name: str, worker: str) -> int:
    """Trials `worker` already ran in the study (0 if it does not exist yet): a worker that resumes its own run gets
    a new sampler seed, `worker_seed(seed, "worker@count")`; one that joins others keeps `worker_seed(seed, worker)`."""
    try:
        trials = optuna.load_study(study_name=study_name, storage=storage_for(storage)).get_trials(deepcopy=False)
    except KeyError:
        return 0
    return sum(t.user_attrs.get("worker") == worker for t in trials)


def run_until(study: optuna.Study, objective, n_trials: int, poll_s: float) -> None:
    """Run `objective` one trial at a time until the study holds `n_trials` finished trials (`finished`). A worker
    starts a trial only while finished + RUNNING < n_trials; else it waits (`poll_s`) for the other workers' running
    trials, failing and re-queueing those that stopped beating."""
    waiting = False
    shown = bar(total=n_trials, desc=f"search {study.study_name} (trials, all workers)", unit="trial")
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a killed worker's trial -> FAIL, its parameters re-queued
        trials = study.get_trials(deepcopy=False)
        complete = sum(map(finished, trials))
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        shown.update(min(complete, n_trials) - shown.n)
        if complete >= n_trials:
            shown.close()
            return
        if complete + running < n_trials:
            study.optimize(objective, n_trials=1)
            waiting = False
            continue
        if not waiting:
            log.info("%d of %d trials finished; waiting for %d running in other workers", complete, n_trials, running)
        waiting = True
        time.sleep(poll_s)


def trials_ahead(study: optuna.Study, trial: optuna.Trial) -> int:
    """Finished, running or queued trials numbered before `trial`: with n_trials of them, `trial` is surplus."""
    live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    return sum(t.number < trial.number and (t.state in live or finished(t)) for t in study.get_trials(deepcopy=False))


@dataclass(frozen=True)
class PerLayerConfig:
    """What a per-layer search does (`search`). The defaults are `lmmlab search --space per-layer`'s."""

    target_sparsity: float = 0.5  # parameter-weighted mean sparsity every plan meets (single objective)
    kv_budget_bits: float = 16.0  # mean KV bits per layer at most this, in `kv_budget_unit`
    n_trials: int = 100  # finished trials the study should hold (a rerun resumes it)
    objective: str | None = None  # the task's primary metric (None) or "loss"
    multi_objective: bool = False  # primary metric vs memory, the budgets searched within `target_range`/`kv_widths`
    method: str = "wanda"  # re-masked per trial, or sparsegpt stitched from the pruner's layer database
    kv_widths: tuple[int, ...] = KV_BITS  # widths a layer may take
    spread: float = 0.25  # per-layer sparsity offsets from the target, in ±
    max_sparsity: float = 0.95
    groups: int | None = None  # bins of consecutive layers sharing one choice (None: every layer its own)
    target_range: tuple[float, float] = (0.3, 0.8)  # multi-objective: the targets searched
    kv_group_size: int = KIVI_GROUP_SIZE
    kv_residual: int = KIVI_RESIDUAL
    n_eval: int | None = None  # validation items per trial (the task's default when None)
    context_tokens: int = 1024  # where KV bytes and effective bits are counted
    seed: int = 0  # the calibration's, and with the worker's name the sampler's
    warm_start: bool = True  # enqueue the warm starts first
    kv_budget_unit: str = "nominal"  # "nominal" widths or "effective" bits per element stored at `context_tokens`
    sampler: str = "tpe"  # one of `samplers.SAMPLERS`
    multi_fidelity: bool = False  # score on 1/16, 1/4 of the validation items first; successive halving prunes
    separate_kv: bool = False  # keys and values at their own widths (budget on their combined mean)
    warm_allocations: tuple[str, ...] = WARM_ALLOCATIONS  # allocations enqueued (with uniform) as the first trials
    cost_model: str | None = None  # multi-objective: a `search.cost` model JSON; minimise its predicted decode s/token

    def check(self, task: Task) -> str:
        """One-line ValueErrors for settings no search runs with; returns the study's direction."""
        objective = self.objective or task.primary_metric
        if objective not in (task.primary_metric, LOSS):
            raise ValueError(f"unknown objective {objective!r} for task {task.name!r}; allowed: "
                             f"{task.primary_metric}, {LOSS}")
        if self.multi_objective and objective == LOSS:
            raise ValueError("the multi-objective search optimises the task's primary metric; drop --objective loss")
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.n_trials < 1:
            raise ValueError(f"n_trials must be at least 1; got {self.n_trials}")
        check_sampler(self.sampler, multi_objective=self.multi_objective)
        if self.multi_fidelity and self.multi_objective:
            raise ValueError("multi-fidelity trials are for the single-objective search; drop --multi-fidelity or "
                             "--multi-objective")
        bad = [a for a in self.warm_allocations if a not in WARM_CHOICES]
        if bad:
            raise ValueError(f"unknown warm start {bad[0]!r}; allowed: {', '.join(WARM_CHOICES)}")
        check_kv_layout(self.kv_group_size, self.kv_residual)
        check_kv_bits(self.kv_widths, name="kv width")
        if self.cost_model is not None and not (self.multi_objective and Path(self.cost_model).is_file()):
            raise ValueError(f"--cost-model {self.cost_model}: needs --multi-objective and a file written by "
                             "`lmmlab bench e2e --fit-cost`")
        return "minimize" if objective == LOSS else task.direction

    def space(self, loaded: Loaded) -> SearchSpace:
        """The trials' space on `loaded` (costs in effective bits where the budget counts them)."""
        widths = tuple(sorted(set(self.kv_widths)))
        eff = self.kv_budget_unit == "effective"
        effective = effective_costs(loaded, widths, self.context_tokens, self.kv_group_size, self.kv_residual)
        keys, values = effective_part_costs(loaded, widths, self.context_tokens, self.kv_group_size, self.kv_residual)
        both = eff and self.separate_kv
        return SearchSpace(loaded.num_layers, self.target_sparsity, self.kv_budget_bits, widths, self.spread,
                           self.max_sparsity, self.groups, self.multi_objective, tuple(self.target_range),
                           kv_unit=self.kv_budget_unit, kv_cost=tuple(effective[b] for b in widths) if eff else (),
                           separate_kv=self.separate_kv, key_cost=tuple(keys[b] for b in widths) if both else (),
                           value_cost=tuple(values[b] for b in widths) if both else ())


def search(loaded: Loaded, task: Task, config: PerLayerConfig = PerLayerConfig(), *, pruner: Pruner | None = None,
           storage: str = DEFAULT_STORAGE, study_name: str | None = None, worker: str = "main",
           heartbeat: int = HEARTBEAT_S) -> SearchResult:
    """Run (or resume) a study until it holds `config.n_trials` finished trials; see the module docstring.
    `worker`: this worker's name (give each concurrent worker its own; the CLI uses hostname-pid); with
    `config.seed` it seeds the sampler. `heartbeat`: seconds between a running trial's heartbeats (a killed worker's
    trial is retried after 3 missed). `method="sparsegpt"` needs the pruner's layer database (`Pruner.database`): a
    trial stitches one of its levels per layer."""
    direction = config.check(task)
    space = config.space(loaded)
    kv_cache_for(CompressionPlan.uniform(loaded.num_layers, kv_group_size=config.kv_group_size,
                                         kv_residual=config.kv_residual), loaded)  # a layout the model cannot hold
    task.check_model(loaded)
    name = study_name or default_study_name(loaded, task, space, config.method, config.sampler)
    settings = _settings(loaded, task, space, config)
    check_heartbeat(heartbeat)
    check_storage(storage)  # a database that is missing its driver or unreachable fails here, before calibration
    pruner = pruner or Pruner.for_task(loaded, task, seed=config.seed)
    levels = database_levels(loaded, pruner, space, config, settings)
    starts = []
    if config.warm_start:
        allocations = {a: pruner.allocation(a, space.target_sparsity)
                       for a in config.warm_allocations if a != "uniform"}
        starts = warm_start_params(space, allocations)[:config.n_trials]
    sampler_seed = worker_seed(config.seed, worker)
    if existing := own_trials(storage, name, worker):  # resuming: do not redraw its first run's startup points
        sampler_seed = worker_seed(config.seed, f"{worker}@{existing}")
    study = open_study(space, storage, name, direction, sampler_seed, settings, warm_starts=starts,
                       heartbeat=heartbeat, sampler=config.sampler,
                       pruner=fidelity_pruner() if config.multi_fidelity else None)
    trial = _Trial(loaded, task, config, space, pruner, study, levels, direction, worker, sampler_seed)
    try:
        run_until(study, trial, config.n_trials, poll_s=min(heartbeat, 5))
    finally:
        pruner.restore()
    return result_of(study)


def database_levels(loaded: Loaded, pruner: Pruner, space: SearchSpace, config: PerLayerConfig,
                    settings: dict) -> tuple[float, ...] | None:
    """A SparseGPT search's database grid (checked: the targets must be reachable on it), or None."""
    if config.method != "sparsegpt":
        return None
    if pruner.database is None:
        raise ValueError("the search re-solves nothing: sparsegpt needs a layer database (build one with "
                         "`lmmlab database`, pass --database); or search wanda, ria or magnitude")
    levels = pruner.database.levels
    settings["database"] = pruner.database.fingerprint
    weights = layer_weights(loaded)
    low, high = space.target_range if config.multi_objective else (space.target_sparsity,) * 2
    for t in (low, high):
        project_to_grid([t] * loaded.num_layers, levels, t, weights)
    return levels


def layer_weights(loaded: Loaded) -> list[float]:
    return [float(sum(lin.weight.numel() for lin in loaded.linears(i).values())) for i in range(loaded.num_layers)]


class _Trial:
    """One worker's objective: suggest, project, re-mask (or stitch), evaluate on validation, record."""

    def __init__(self, loaded, task, config, space, pruner, study, levels, direction, worker, sampler_seed):
        self.loaded, self.task, self.config, self.space, self.pruner = loaded, task, config, space, pruner
        self.study, self.levels, self.direction, self.worker, self.sampler_seed = (study, levels, direction, worker,
                                                                                  sampler_seed)
        self.weights = layer_weights(loaded)
        self.full_n: list[int] = []  # items in one full validation evaluation, from this worker's first trial
        self.warned = False

    def __call__(self, trial: optuna.Trial):
        config = self.config
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("sampler_seed", self.sampler_seed)
        if trials_ahead(self.study, trial) >= config.n_trials:  # another worker started the last trial at once
            raise optuna.TrialPruned(f"surplus: {config.n_trials} trials were already finished, running or queued")
        start = time.perf_counter()
        plan = suggest_plan(trial, self.space, self.weights, config.method, self.levels,
                            kv_group_size=config.kv_group_size, kv_residual=config.kv_residual)
        suggested = time.perf_counter()
        self.pruner.apply(plan)
        make_cache = KVCacheFactory(plan, self.loaded)
        make_cache()  # cache set-up is part of a trial's overhead
        overhead = time.perf_counter() - suggested
        trial.set_user_attr("source", trial.user_attrs.get("source", config.sampler))  # warm starts: allocation
        self.cheap_steps(trial, plan, make_cache, suggested + overhead)
        metrics = self.task.evaluate(self.loaded, split="validation", n=config.n_eval, make_cache=make_cache,
                                     with_loss=True)
        self.full_n[:] = [metrics.n]
        evaluated = time.perf_counter()
        if not self.warned and (warning := window_warning(make_cache.last)):
            self.warned = True
            log.warning("trial %d: %s (KV widths cannot matter)", trial.number, warning)
        memory = memory_bytes(self.loaded, plan, config.context_tokens)
        if config.cost_model is not None:  # the second objective: predicted decode seconds per token
            from lmmlab.search.cost import CostModel, plan_features

            memory["decode_s_per_token"] = CostModel.load(config.cost_model).seconds(
                plan_features(self.loaded, plan, config.context_tokens))
        self.record(trial, plan, metrics, memory, suggested - start, overhead, evaluated - suggested - overhead)
        if config.multi_objective:
            return metrics.primary, memory["decode_s_per_token" if config.cost_model else "memory_bytes"]
        return metrics.loss if (config.objective or self.task.primary_metric) == LOSS else metrics.primary

    def cheap_steps(self, trial: optuna.Trial, plan: CompressionPlan, make_cache, since: float) -> None:
        """Multi-fidelity: the loss on 1/16 and 1/4 of the validation items, reported; a hopeless trial is stopped
        (warm starts report and are always scored in full)."""
        if not (self.config.multi_fidelity and self.full_n):
            return
        warm = "source" in trial.user_attrs and trial.user_attrs["source"] != self.config.sampler
        for step in FIDELITY_STEPS:
            items = fidelity_items(self.full_n[0], step)
            cheap = self.task.evaluate(self.loaded, split="validation", n=items, make_cache=make_cache,
                                       with_loss=True)
            trial.report(cheap.loss if self.direction == "minimize" else -cheap.loss, step=step)
            if not warm and trial.should_prune():
                trial.set_user_attr("pruned_at", items)
                trial.set_user_attr("plan", asdict(plan))
                trial.set_user_attr("eval_s", time.perf_counter() - since)
                raise optuna.TrialPruned(f"hopeless after {items} of {self.full_n[0]} validation items")

    def record(self, trial: optuna.Trial, plan: CompressionPlan, metrics, memory: dict, sample_s: float,
               overhead_s: float, eval_s: float) -> None:
        for key, value in {"plan": asdict(plan), "primary_metric": metrics.primary_metric, "primary": metrics.primary,
                           "values": metrics.values, "loss": metrics.loss, "kv_bytes_per_item": metrics.kv_bytes,
                           "mean_sparsity": plan.mean_sparsity, "mean_kv_bits": plan.mean_kv_bits,
                           "mean_kv_bits_effective": plan.mean_effective_kv_bits(self.loaded.head_dim,
                                                                                 self.config.context_tokens),
                           "sample_s": sample_s, "overhead_s": overhead_s, "eval_s": eval_s, **memory}.items():
            trial.set_user_attr(key, value)
        log.info("trial %d (%s): %s %.4f loss %.4f", trial.number, trial.user_attrs["source"],
                 metrics.primary_metric, metrics.primary, metrics.loss)


def effective_costs(loaded: Loaded, widths, context: int, group_size: int, residual: int) -> dict[int, float]:
    """Each width's effective bits per element on `loaded`'s heads at `context` tokens (`kvcache.effective_bits`)."""
    return {b: effective_bits(b, head_dim=loaded.head_dim, context=context, group_size=group_size,
                              residual_length=residual) for b in widths}


def effective_part_costs(loaded: Loaded, widths, context: int, group_size: int, residual: int
                         ) -> tuple[dict[int, float], dict[int, float]]:
    """Each width's effective bits per stored key element and per stored value element (their mean is
    `effective_costs`)."""
    keys = {b: effective_key_bits(b, head_dim=loaded.head_dim, context=context, group_size=group_size,
                                  residual_length=residual) for b in widths}
    values = {b: effective_value_bits(b, head_dim=loaded.head_dim, context=context, group_size=group_size,
                                      residual_length=residual) for b in widths}
    return keys, values


# Multi-fidelity: a trial is first scored on 1/16 and then 1/4 of the validation items (steps in sixteenths); Optuna's
# successive-halving pruner keeps going only the trials in the best quarter of those scored at the same step
# (Li et al. 2020, ASHA: rungs r·η^k with r = 1, η = 4). What a step reports is the task's loss on the subset, signed
# in the study's direction: continuous where accuracy on a few dozen questions ties (ties are all promoted), and for
# perplexity the same order as the metric itself.
FIDELITY_STEPS = (1, 4)
FIDELITY_REDUCTION = 4


def fidelity_items(n_full: int, step: int) -> int:
    """Items scored at `step` sixteenths of a full evaluation of `n_full` items (at least one)."""
    return max(1, -(-n_full * step // 16))


def fidelity_pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=FIDELITY_STEPS[0], reduction_factor=FIDELITY_REDUCTION,
                                                  min_early_stopping_rate=0)


def check_sampler(name: str, *, multi_objective: bool) -> None:
    """One clear error for a sampler lmmlab does not know or that cannot take the study's objectives."""
    make_sampler(name, seed=0, multi_objective=multi_objective)


def default_study_name(loaded: Loaded, task: Task, space: SearchSpace, method: str, sampler: str = "tpe") -> str:
    model = f"{Path(loaded.name).name}-{task.name}"
    tail = "" if sampler == "tpe" else f"-{sampler}"
    tail += "-kv" if space.separate_kv else ""
    if space.multi_objective:
        return f"{model}-{method}-pareto{tail}"
    unit = "e" if space.kv_unit == "effective" else ""
    return f"{model}-{method}-s{space.target_sparsity:g}-kv{space.kv_budget_bits:g}{unit}{tail}"


def result_of(study: optuna.Study) -> SearchResult:
    """Best plan (and, for two objectives, the Pareto front's plans, best primary metric first) of a finished
    study."""
    plans = lambda trials: [CompressionPlan(**t.user_attrs["plan"]) for t in trials]  # noqa: E731
    if len(study.directions) == 1:
        return SearchResult(study, plans([study.best_trial])[0])
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    front = sorted(study.best_trials, key=lambda t: (sign * t.values[0], t.values[1]))
    return SearchResult(study, plans(front[:1])[0], plans(front))


def trials_table(study: optuna.Study):
    """Every finished trial as one tidy row: its projected plan, metrics, memory and time."""
    import pandas as pd

    rows = []
    front = {t.number for t in study.best_trials}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        plan = a["plan"]
        rows.append({
            "trial": t.number, "source": a.get("source", t.user_attrs.get("sampler", "tpe")), "on_front": t.number in front,
            "primary_metric": a["primary_metric"], "primary": a["primary"], **a.get("values", {}),
            "loss": a["loss"], "mean_sparsity": a["mean_sparsity"],
            "mean_kv_bits": a["mean_kv_bits"], "mean_kv_bits_effective": a.get("mean_kv_bits_effective"),
            "weight_bytes": a["weight_bytes"],
            "kv_bytes_at_context": a["kv_bytes_at_context"], "memory_bytes": a["memory_bytes"],
            "sparsity": "-".join(f"{s:.3f}" for s in plan["sparsity"]), "kv_bits": "-".join(map(str, plan["kv_bits"])),
            "value_bits": "-".join(map(str, plan.get("value_bits") or plan["kv_bits"])),
            "method": plan["method"], "sample_s": a.get("sample_s", 0.0), "overhead_s": a["overhead_s"],
            "eval_s": a["eval_s"],
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
        })
    table = pd.DataFrame(rows)
    if len(study.directions) == 1 and len(table):
        objective = table.loss if study.user_attrs["settings"]["objective"] == LOSS else table.primary
        table["objective"] = objective
        table["best_so_far"] = objective.cummax() if study.directions[0].name == "MAXIMIZE" else objective.cummin()
    return table


def write_results(result: SearchResult, out_dir: str | Path) -> list[Path]:
    """The study's trials and best plan: `<study>_trials.csv` and `<study>_best_plan.json` in `out_dir`."""
    from lmmlab.files import write_table

    name = result.study.study_name
    paths = [Path(out_dir) / f"{name}_trials.csv", Path(out_dir) / f"{name}_best_plan.json"]
    write_table(paths[0], trials_table(result.study))
    result.best_plan.save(paths[1])
    return paths
