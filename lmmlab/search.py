"""Joint TPE search over per-layer sparsity and per-layer KV bit-widths (Optuna's TPESampler), no fine-tuning.

A trial suggests, for every decoder layer (or every bin of consecutive layers), a sparsity offset from the target
and a KV width; the suggestion is then *projected* onto the budget, and the projected plan is what is evaluated and
recorded, so every trial meets the budget and none is thrown away:
  - sparsity: s_l = clip(target + offset_l + ν, 0, max_sparsity), with the one shift ν that makes the
    parameter-weighted mean exactly the target (the weighted least-squares projection, `allocate.project`);
  - KV bits: while the mean width is over the budget, the widest layer steps down to the next allowed width
    (`allocate.fit_kv_bits`); a suggestion within budget is kept as is.
TPE models the raw suggestions; projecting them is a deterministic repair, so equal suggestions give equal plans.

A trial is cheap: the calibration and the pruning scores are computed once (`ablate.Pruner`), so it re-masks, builds
a fresh KV cache per batch and evaluates the task on its validation split (the test split is for final reports only).
The objective is the task's primary metric in its direction (accuracy ↑, perplexity ↓), or its loss. The uniform and
OWL plans (with uniform KV at the budget) are enqueued first, so the best plan found is never worse than either on
validation. In multi-objective mode the target sparsity and the KV budget are suggested too, and the study optimises
the primary metric while minimising memory (non-zero weight bytes + KV bytes at `context_tokens`): its best trials
are the Pareto front.

Studies live in any Optuna storage (default `sqlite:///results/studies.db`); running the same study name again
resumes it up to `n_trials` finished trials, and a worker killed mid-trial loses only that trial.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna

from lmmlab import allocate
from lmmlab.ablate import Pruner, weight_bytes
from lmmlab.kvcache import KVCacheFactory, kv_cache_for, kv_nbytes, window_warning
from lmmlab.models import Loaded
from lmmlab.tasks import Task
from lmmlab.plan import (KIVI_GROUP_SIZE, KIVI_RESIDUAL, KV_BITS, METHODS, CompressionPlan, check_kv_bits,
                         check_kv_layout)

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///results/studies.db"
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

    def __post_init__(self) -> None:
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"target sparsity must be in [0, 1); got {self.target_sparsity}")
        if not self.kv_widths:
            raise ValueError(f"the set of KV widths is empty; choose from {', '.join(map(str, KV_BITS))}")
        check_kv_bits(self.kv_widths, name="kv width")
        if self.kv_budget_bits < min(self.kv_widths):
            raise ValueError(f"KV budget {self.kv_budget_bits} bits is below the narrowest allowed width "
                             f"{min(self.kv_widths)}")
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
    def widest_in_budget(self) -> int:
        return max(b for b in self.kv_widths if b <= self.kv_budget_bits)


def suggest_plan(trial: optuna.Trial, space: SearchSpace, weights: list[float], method: str = "wanda",
                 **plan_options) -> CompressionPlan:
    """Suggest raw per-bin choices, then project them onto the budget (see the module docstring)."""
    n_bins = max(space.bins) + 1
    if space.multi_objective:
        target = trial.suggest_float("target_sparsity", *space.target_range)
        budget = float(trial.suggest_categorical("kv_budget", sorted(space.kv_widths)))
    else:
        target, budget = space.target_sparsity, space.kv_budget_bits
    offsets = [trial.suggest_float(f"s{b}", -space.spread, space.spread) for b in range(n_bins)]
    widths = [trial.suggest_categorical(f"kv{b}", sorted(space.kv_widths)) for b in range(n_bins)]
    raw = [target + offsets[b] for b in space.bins]
    sparsity = allocate.project(raw, target, 0.0, space.max_sparsity, weights)
    kv_bits = allocate.fit_kv_bits([widths[b] for b in space.bins], budget, space.kv_widths)
    return CompressionPlan(sparsity, kv_bits, method=method, **plan_options)


def warm_start_params(space: SearchSpace, owl_sparsity: list[float]) -> list[tuple[str, dict]]:
    """Uniform and OWL plans (uniform KV at the widest width within budget) as trial parameters."""
    n_bins = max(space.bins) + 1

    def params(sparsity: list[float], target: float, kv: int) -> dict:
        p = {}
        for b in range(n_bins):
            members = [s for s, bin_ in zip(sparsity, space.bins) if bin_ == b]
            offset = sum(members) / len(members) - target
            p[f"s{b}"] = max(-space.spread, min(space.spread, offset))
            p[f"kv{b}"] = kv
        return p
    owl_offsets = [s - space.target_sparsity for s in owl_sparsity]
    if not space.multi_objective:
        target, kv = space.target_sparsity, space.widest_in_budget
        return [("uniform", params([target] * space.num_layers, target, kv)),
                ("owl", params(owl_sparsity, target, kv))]
    starts = []
    low, high = space.target_range
    for target in (low, (low + high) / 2, high):
        for kv in sorted({max(space.kv_widths), min(space.kv_widths)}, reverse=True):
            shared = {"target_sparsity": target, "kv_budget": kv}
            starts.append(("uniform", {**shared, **params([target] * space.num_layers, target, kv)}))
            owl = [target + o for o in owl_offsets]  # OWL's offsets do not depend on the target
            starts.append(("owl", {**shared, **params(owl, target, kv)}))
    return starts


def memory_bytes(loaded: Loaded, plan: CompressionPlan, context_tokens: int) -> dict:
    """Weight bytes (non-zeros; the model must already be pruned to `plan`) and KV bytes at `context_tokens`."""
    kv = kv_nbytes(plan.kv_bits, loaded.num_kv_heads, loaded.head_dim, context_tokens, plan.kv_group_size,
                   plan.kv_residual, loaded.model.dtype.itemsize)
    weights = weight_bytes(loaded)
    return {"weight_bytes": weights, "kv_bytes_at_context": kv, "memory_bytes": weights + kv}


@dataclass
class SearchResult:
    study: optuna.Study
    best_plan: CompressionPlan  # single objective: the best trial's; multi-objective: the most accurate on the front
    front: list[CompressionPlan] = field(default_factory=list)  # multi-objective: the Pareto front's plans


def storage_for(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url` (its sqlite folder created), with heartbeats."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # Heartbeats let a later run mark the trials of a killed worker as failed (and retry them once).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=30, grace_period=90,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))


def _settings(loaded: Loaded, task: Task, space: SearchSpace, objective: str, method: str, kv_group_size: int,
              kv_residual: int, n_eval: int | None, context_tokens: int) -> dict:
    return {"model": loaded.name, "task": task.describe(), "objective": objective, "method": method,
            "kv_group_size": kv_group_size, "kv_residual": kv_residual, "n_eval": n_eval, "context_tokens": context_tokens,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(space).items()}}


def open_study(space: SearchSpace, storage: str, study_name: str, direction: str, seed: int,
               settings: dict) -> optuna.Study:
    """Create the study, or load it if it exists with the same settings (resume)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10)
    directions = [direction, "minimize"] if space.multi_objective else [direction]
    study = optuna.create_study(storage=storage_for(storage), study_name=study_name, sampler=sampler,
                                directions=directions, load_if_exists=True)
    existing = study.user_attrs.get("settings")
    if existing is None:
        study.set_user_attr("settings", settings)
    elif existing != settings:
        changed = sorted(k for k in set(existing) | set(settings) if existing.get(k) != settings.get(k))
        raise ValueError(f"study {study_name!r} in {storage} was created with other settings ({', '.join(changed)}); "
                         "pass another --study-name or the same settings to resume it")
    return study


def search(loaded: Loaded, task: Task, *, target_sparsity: float = 0.5, kv_budget_bits: float = 16.0,
           n_trials: int = 100, storage: str = DEFAULT_STORAGE, study_name: str | None = None,
           objective: str | None = None, multi_objective: bool = False, method: str = "wanda", kv_widths: tuple[int, ...] = KV_BITS,
           spread: float = 0.25, max_sparsity: float = 0.95, groups: int | None = None,
           target_range: tuple[float, float] = (0.3, 0.8), kv_group_size: int = KIVI_GROUP_SIZE,
           kv_residual: int = KIVI_RESIDUAL, n_eval: int | None = None, context_tokens: int = 1024, seed: int = 0, warm_start: bool = True,
           pruner: Pruner | None = None) -> SearchResult:
    """Run (or resume) a TPE study until it holds `n_trials` finished trials; see the module docstring.
    `objective`: the task's primary metric (default) or "loss"."""
    objective = objective or task.primary_metric
    if objective not in (task.primary_metric, LOSS):
        raise ValueError(f"unknown objective {objective!r} for task {task.name!r}; allowed: "
                         f"{task.primary_metric}, {LOSS}")
    if multi_objective and objective == LOSS:
        raise ValueError("the multi-objective search optimises the task's primary metric; drop --objective loss")
    direction = "minimize" if objective == LOSS else task.direction
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; allowed: {', '.join(METHODS)}")
    if n_trials < 1:
        raise ValueError(f"n_trials must be at least 1; got {n_trials}")
    check_kv_layout(kv_group_size, kv_residual)
    space = SearchSpace(loaded.num_layers, target_sparsity, kv_budget_bits, tuple(sorted(set(kv_widths))), spread,
                        max_sparsity, groups, multi_objective, tuple(target_range))
    kv_cache_for(CompressionPlan.uniform(loaded.num_layers, kv_group_size=kv_group_size, kv_residual=kv_residual),
                 loaded)  # a layout the model cannot hold fails here, before any study is written
    task.check_model(loaded)
    name = study_name or default_study_name(loaded, task, space, method)
    settings = _settings(loaded, task, space, objective, method, kv_group_size, kv_residual, n_eval, context_tokens)
    study = open_study(space, storage, name, direction, seed, settings)

    pruner = pruner or Pruner.for_task(loaded, task, seed=seed)
    weights = [float(sum(lin.weight.numel() for lin in loaded.linears(i).values())) for i in range(loaded.num_layers)]
    if warm_start and not study.trials:
        owl = pruner.allocation("owl", space.target_sparsity)
        for source, params in warm_start_params(space, owl)[:n_trials]:
            study.enqueue_trial(params, user_attrs={"source": source})

    warned: list[int] = []

    def run_trial(trial: optuna.Trial):
        start = time.perf_counter()
        plan = suggest_plan(trial, space, weights, method, kv_group_size=kv_group_size, kv_residual=kv_residual)
        suggested = time.perf_counter()
        pruner.apply(plan)
        make_cache = KVCacheFactory(plan, loaded)
        make_cache()  # cache set-up is part of a trial's overhead
        overhead = time.perf_counter() - suggested
        metrics = task.evaluate(loaded, split="validation", n=n_eval, make_cache=make_cache, with_loss=True)
        evaluated = time.perf_counter()
        if not warned and (warning := window_warning(make_cache.last)):
            warned.append(trial.number)
            log.warning("trial %d: %s (KV widths cannot matter)", trial.number, warning)
        memory = memory_bytes(loaded, plan, context_tokens)
        trial.set_user_attr("source", trial.user_attrs.get("source", "tpe"))
        for key, value in {"plan": asdict(plan), "primary_metric": metrics.primary_metric, "primary": metrics.primary,
                           "values": metrics.values, "loss": metrics.loss, "kv_bytes_per_item": metrics.kv_bytes,
                           "mean_sparsity": plan.mean_sparsity, "mean_kv_bits": plan.mean_kv_bits,
                           "sample_s": suggested - start, "overhead_s": overhead,
                           "eval_s": evaluated - suggested - overhead,
                           **memory}.items():
            trial.set_user_attr(key, value)
        log.info("trial %d (%s): %s %.4f loss %.4f", trial.number, trial.user_attrs["source"],
                 metrics.primary_metric, metrics.primary, metrics.loss)
        if multi_objective:
            return metrics.primary, memory["memory_bytes"]
        return metrics.loss if objective == LOSS else metrics.primary

    finished = (optuna.trial.TrialState.COMPLETE,)
    remaining = n_trials - len(study.get_trials(deepcopy=False, states=finished))
    try:
        if remaining > 0:
            study.optimize(run_trial, n_trials=remaining,
                           callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=finished)])
    finally:
        pruner.restore()
    return result_of(study)


def default_study_name(loaded: Loaded, task: Task, space: SearchSpace, method: str) -> str:
    model = f"{Path(loaded.name).name}-{task.name}"
    if space.multi_objective:
        return f"{model}-{method}-pareto"
    return f"{model}-{method}-s{space.target_sparsity:g}-kv{space.kv_budget_bits:g}"


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
            "trial": t.number, "source": a.get("source", "tpe"), "on_front": t.number in front,
            "primary_metric": a["primary_metric"], "primary": a["primary"], **a.get("values", {}),
            "loss": a["loss"], "mean_sparsity": a["mean_sparsity"],
            "mean_kv_bits": a["mean_kv_bits"], "weight_bytes": a["weight_bytes"],
            "kv_bytes_at_context": a["kv_bytes_at_context"], "memory_bytes": a["memory_bytes"],
            "sparsity": "-".join(f"{s:.3f}" for s in plan["sparsity"]), "kv_bits": "-".join(map(str, plan["kv_bits"])),
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
