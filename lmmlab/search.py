"""Joint TPE search over per-layer sparsity and per-layer KV bit-widths (Optuna's TPESampler), no fine-tuning.

A trial suggests, for every decoder layer (or every bin of consecutive layers), a sparsity offset from the target
and a KV width; the suggestion is then *projected* onto the budget, and the projected plan is what is evaluated and
recorded, so every trial meets the budget and none is thrown away:
  - sparsity: s_l = clip(target + offset_l + ν, 0, max_sparsity), with the one shift ν that makes the
    parameter-weighted mean exactly the target (the weighted least-squares projection, `allocate.project`);
  - KV bits: while the mean width is over the budget, the widest layer steps down to the next allowed width
    (`allocate.fit_kv_bits`); a suggestion within budget is kept as is. The budget counts nominal widths, or
    (`kv_budget_unit="effective"`) the bits per element a layer really stores at `context_tokens`: packed codes,
    fp16 scales and zero points and the full-precision windows, a 16-bit layer as fp16 (`kvcache.effective_bits`).
TPE models the raw suggestions; projecting them is a deterministic repair, so equal suggestions give equal plans.

A trial is cheap: the calibration and the pruning scores are computed once (`ablate.Pruner`), so it re-masks, builds
a fresh KV cache per batch and evaluates the task on its validation split (the test split is for final reports only).
The objective is the task's primary metric in its direction (accuracy ↑, perplexity ↓), or its loss. The uniform and
OWL plans (with uniform KV at the budget) are enqueued first, so the best plan found is never worse than either on
validation. In multi-objective mode the target sparsity and the KV budget are suggested too, and the study optimises
the primary metric while minimising memory (non-zero weight bytes + KV bytes at `context_tokens`): its best trials
are the Pareto front.

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

import optuna

from lmmlab import allocate
from lmmlab.ablate import Pruner
from lmmlab.export import weight_format_bytes
from lmmlab.kvcache import KVCacheFactory, effective_bits, kv_cache_for, kv_nbytes, window_warning
from lmmlab.storage import HEARTBEAT_S, check_heartbeat, check_storage, safe_url, storage_for
from lmmlab.models import Loaded
from lmmlab.tasks import Task
from lmmlab.plan import (KIVI_GROUP_SIZE, KIVI_RESIDUAL, KV_BITS, METHODS, CompressionPlan, check_kv_bits,
                         check_kv_layout)

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///results/studies.db"
KV_UNITS = ("nominal", "effective")
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
    def widest_in_budget(self) -> int:
        return max(b for b in self.kv_widths if self.cost[b] <= self.kv_budget_bits + 1e-9)


def suggest_plan(trial: optuna.Trial, space: SearchSpace, weights: list[float], method: str = "wanda",
                 **plan_options) -> CompressionPlan:
    """Suggest raw per-bin choices, then project them onto the budget (see the module docstring)."""
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
    kv_bits = allocate.fit_kv_bits([widths[b] for b in space.bins], budget, space.kv_widths, space.cost)
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
    """Weight bytes as an export stores them (compressed-tensors' bitmask format; the model must already be pruned to
    `plan`), and KV bytes at `context_tokens`."""
    kv = kv_nbytes(plan.kv_bits, loaded.num_kv_heads, loaded.head_dim, context_tokens, plan.kv_group_size,
                   plan.kv_residual, loaded.model.dtype.itemsize)
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


def _settings(loaded: Loaded, task: Task, space: SearchSpace, objective: str, method: str, kv_group_size: int,
              kv_residual: int, n_eval: int | None, context_tokens: int) -> dict:
    return {"model": loaded.name, "task": task.describe(), "objective": objective, "method": method,
            "kv_group_size": kv_group_size, "kv_residual": kv_residual, "n_eval": n_eval, "context_tokens": context_tokens,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(space).items()}}


SETTINGS_WAIT_S = 60  # how long a worker waits for the study's creator to record its settings


def open_study(space: SearchSpace, storage: str, study_name: str, direction: str, seed: int, settings: dict, *,
               warm_starts: list[tuple[str, dict]] = (), heartbeat: int = HEARTBEAT_S) -> optuna.Study:
    """Create the study, enqueue `warm_starts` and record `settings` and `heartbeat`; or, if another worker created it,
    wait for its settings and load it if they are the same (resume), beating at the study's heartbeat (a worker that
    beats slower than another checks would have its running trial taken for a dead one's). `seed`: this worker's
    sampler seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10,
                                             constant_liar=True)
    directions = [direction, "minimize"] if space.multi_objective else [direction]
    store = storage_for(storage, heartbeat=heartbeat)
    try:  # the storage's unique study name makes exactly one worker the creator
        study = optuna.create_study(storage=store, study_name=study_name, sampler=sampler, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=store, sampler=sampler)
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
        study = optuna.load_study(study_name=study_name, storage=storage_for(storage, heartbeat=beat), sampler=sampler)
    return study


def run_until(study: optuna.Study, objective, n_trials: int, poll_s: float) -> None:
    """Run `objective` one trial at a time until the study holds `n_trials` COMPLETE trials. A worker starts a
    trial only while COMPLETE + RUNNING < n_trials; else it waits (`poll_s`) for the other workers' running trials,
    failing and re-queueing those that stopped beating."""
    waiting = False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a killed worker's trial -> FAIL, its parameters re-queued
        states = [t.state for t in study.get_trials(deepcopy=False)]
        complete = states.count(optuna.trial.TrialState.COMPLETE)
        running = states.count(optuna.trial.TrialState.RUNNING)
        if complete >= n_trials:
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
    live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    return sum(t.number < trial.number for t in study.get_trials(deepcopy=False, states=live))


def search(loaded: Loaded, task: Task, *, target_sparsity: float = 0.5, kv_budget_bits: float = 16.0,
           n_trials: int = 100, storage: str = DEFAULT_STORAGE, study_name: str | None = None,
           objective: str | None = None, multi_objective: bool = False, method: str = "wanda", kv_widths: tuple[int, ...] = KV_BITS,
           spread: float = 0.25, max_sparsity: float = 0.95, groups: int | None = None,
           target_range: tuple[float, float] = (0.3, 0.8), kv_group_size: int = KIVI_GROUP_SIZE,
           kv_residual: int = KIVI_RESIDUAL, n_eval: int | None = None, context_tokens: int = 1024, seed: int = 0, warm_start: bool = True,
           pruner: Pruner | None = None, worker: str = "main", heartbeat: int = HEARTBEAT_S,
           kv_budget_unit: str = "nominal") -> SearchResult:
    """Run (or resume) a TPE study until it holds `n_trials` finished trials; see the module docstring.
    `objective`: the task's primary metric (default) or "loss". `worker`: this worker's name (give each concurrent
    worker its own; the CLI uses hostname-pid); `seed` seeds the calibration, and with `worker` the sampler.
    `heartbeat`: seconds between a running trial's heartbeats (a killed worker's trial is retried after 3 missed).
    `kv_budget_unit`: "nominal" (mean width) or "effective" (mean bits per element stored at `context_tokens`)."""
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
    widths = tuple(sorted(set(kv_widths)))
    check_kv_bits(widths, name="kv width")
    effective = effective_costs(loaded, widths, context_tokens, kv_group_size, kv_residual)
    space = SearchSpace(loaded.num_layers, target_sparsity, kv_budget_bits, widths, spread, max_sparsity, groups,
                        multi_objective, tuple(target_range), kv_unit=kv_budget_unit,
                        kv_cost=tuple(effective[b] for b in widths) if kv_budget_unit == "effective" else ())
    kv_cache_for(CompressionPlan.uniform(loaded.num_layers, kv_group_size=kv_group_size, kv_residual=kv_residual),
                 loaded)  # a layout the model cannot hold fails here, before any study is written
    task.check_model(loaded)
    name = study_name or default_study_name(loaded, task, space, method)
    settings = _settings(loaded, task, space, objective, method, kv_group_size, kv_residual, n_eval, context_tokens)
    check_heartbeat(heartbeat)
    check_storage(storage)  # a database that is missing its driver or unreachable fails here, before calibration

    pruner = pruner or Pruner.for_task(loaded, task, seed=seed)
    weights = [float(sum(lin.weight.numel() for lin in loaded.linears(i).values())) for i in range(loaded.num_layers)]
    starts = warm_start_params(space, pruner.allocation("owl", space.target_sparsity))[:n_trials] if warm_start else []
    sampler_seed = worker_seed(seed, worker)
    study = open_study(space, storage, name, direction, sampler_seed, settings, warm_starts=starts, heartbeat=heartbeat)

    warned: list[int] = []

    def run_trial(trial: optuna.Trial):
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("sampler_seed", sampler_seed)
        if trials_ahead(study, trial) >= n_trials:  # another worker started the last trial at the same moment
            raise optuna.TrialPruned(f"surplus: {n_trials} trials were already finished, running or queued")
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
                           "mean_kv_bits_effective": sum(effective[b] for b in plan.kv_bits) / plan.num_layers,
                           "sample_s": suggested - start, "overhead_s": overhead,
                           "eval_s": evaluated - suggested - overhead,
                           **memory}.items():
            trial.set_user_attr(key, value)
        log.info("trial %d (%s): %s %.4f loss %.4f", trial.number, trial.user_attrs["source"],
                 metrics.primary_metric, metrics.primary, metrics.loss)
        if multi_objective:
            return metrics.primary, memory["memory_bytes"]
        return metrics.loss if objective == LOSS else metrics.primary

    try:
        run_until(study, run_trial, n_trials, poll_s=min(heartbeat, 5))
    finally:
        pruner.restore()
    return result_of(study)


def effective_costs(loaded: Loaded, widths, context: int, group_size: int, residual: int) -> dict[int, float]:
    """Each width's effective bits per element on `loaded`'s heads at `context` tokens (`kvcache.effective_bits`)."""
    return {b: effective_bits(b, head_dim=loaded.head_dim, context=context, group_size=group_size,
                              residual_length=residual) for b in widths}


def default_study_name(loaded: Loaded, task: Task, space: SearchSpace, method: str) -> str:
    model = f"{Path(loaded.name).name}-{task.name}"
    if space.multi_objective:
        return f"{model}-{method}-pareto"
    unit = "e" if space.kv_unit == "effective" else ""
    return f"{model}-{method}-s{space.target_sparsity:g}-kv{space.kv_budget_bits:g}{unit}"


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
            "mean_kv_bits": a["mean_kv_bits"], "mean_kv_bits_effective": a.get("mean_kv_bits_effective"),
            "weight_bytes": a["weight_bytes"],
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
