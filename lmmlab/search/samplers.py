"""The search's samplers by name, an evolutionary sampler in EvoPress's style, and a sampler ablation runner.

`make_sampler(name, seed=...)` builds one of `SAMPLERS`; "tpe" is the search's default (multivariate, grouped TPE with
a constant liar). What each handles (the search suggests `s{b}` floats in [-spread, spread] and `kv{b}` categoricals):

  name       categoricals (kv widths)                  multi-objective  note
  tpe        modelled (multivariate TPE)               yes              `constant_liar` for parallel workers
  random     uniform                                   yes
  cmaes      NOT modelled: sampled independently       no               CMA-ES on the floats only (needs `cmaes`)
             (uniformly at random) every trial
  gp         modelled (GP with a Hamming kernel)       yes (logEHVI)    Optuna's GPSampler (torch + scipy)
  evolution  level switches, like the floats           no               `EvolutionSampler` below
  nsga2      crossover + mutation                      yes              population `population` (default 20)

`EvolutionSampler` (Sieberling et al. 2024, "EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary
Search", a (1 + λ) evolutionary algorithm): the genome is the per-layer level vector. Each generation draws
`offspring` mutants of one parent, every mutant one trial, and the next generation's parent is the best trial so far
(elitist: the old parent unless a mutant beat it). A mutation is `flips` budget-keeping level switches (EvoPress draws
min(U{1..3}, U{1..3}); the default here is exactly one): in one group of per-layer parameters (`s0, s1, ...` is one
group, `kv0, kv1, ...` another: the name without its trailing layer index), one layer goes up one level, then other
layers go down one level each until the group's sum is back at (or just below) the parent's. A level is one `step`
(0.05, or the distribution's own step) for floats, one choice for categoricals, one step for ints. With evenly spaced
levels that is a pairwise switch (one up, one down, the sum exactly kept: the mean sparsity offset, the KV count);
with uneven widths (2, 3, 4, 6, 8, 16) one 8 -> 16 is paid for by four 8 -> 6, so the mean nominal KV width never
rises above the parent's (a count-neutral switch would be over the budget and the search's repair would undo it).
"""
from __future__ import annotations

import re
import warnings
import zlib
from typing import Any, Callable

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

SAMPLERS = ("tpe", "random", "cmaes", "gp", "evolution", "nsga2")
SAMPLERS_SINGLE = SAMPLERS  # every sampler optimises one objective
SAMPLERS_MULTI = ("tpe", "random", "gp", "nsga2")  # CMA-ES and the (1 + λ) evolution need one objective
NSGA2_POPULATION = 20  # Optuna's default (50) leaves a 60-trial study in its random first generation
EVOLUTION_OFFSPRING = 8  # EvoPress uses 16-64 with cheap multi-stage selection; here every mutant is a full trial
EVOLUTION_STEP = 0.05  # one level of a float without its own step: the SparseGPT database's grid step


def make_sampler(name: str, *, seed: int, multi_objective: bool = False, constant_liar: bool = True,
                 n_startup_trials: int = 10, population: int | None = None) -> optuna.samplers.BaseSampler:
    """The sampler `name` (one of `SAMPLERS`) seeded with `seed`. `n_startup_trials`: random trials before the model
    (tpe, gp; CMA-ES keeps Optuna's 1, as it does not learn from them); `constant_liar`: tpe only; `population`:
    nsga2's population size / evolution's offspring per generation (ignored by the others)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    if multi_objective and name not in SAMPLERS_MULTI:
        raise ValueError(f"sampler {name!r} optimises one objective; for the multi-objective search choose "
                         f"{', '.join(SAMPLERS_MULTI)}")
    if population is not None and population < 2:
        raise ValueError(f"population must be at least 2; got {population}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              n_startup_trials=n_startup_trials, constant_liar=constant_liar)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False,
                                                independent_sampler=optuna.samplers.RandomSampler(seed=seed))
        if name == "gp":  # a trial's value is a deterministic function of its parameters
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials,
                                             deterministic_objective=True, warn_independent_sampling=False)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=population or NSGA2_POPULATION)
        return EvolutionSampler(seed=seed, offspring=population or EVOLUTION_OFFSPRING)


# --- the evolutionary sampler ---------------------------------------------------------------------------------------

def layer_group(name: str) -> str:
    """A parameter's group: its name without the trailing layer index ("s12" -> "s", "kv3" -> "kv", "x" -> "x")."""
    return re.sub(r"\d+$", "", name)


def neighbour(value: Any, dist: BaseDistribution, direction: int, step: float) -> Any | None:
    """The next level up (`direction` +1) or down (-1) from `value`, or None past the distribution's end. A level is
    one choice (categorical), the distribution's step (int, stepped float), else `step` (float)."""
    if isinstance(dist, CategoricalDistribution):
        index = dist.choices.index(value) + direction
        return dist.choices[index] if 0 <= index < len(dist.choices) else None
    if isinstance(dist, (IntDistribution, FloatDistribution)):
        new = value + direction * (dist.step or step)
        return new if dist.low <= new <= dist.high else None
    raise ValueError(f"cannot mutate a parameter with distribution {dist}")


def cost(value: Any, dist: BaseDistribution) -> float:
    """What a level adds to its group's sum: its value if numeric, else its index among the choices."""
    if isinstance(dist, CategoricalDistribution) and not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) for c in dist.choices):
        return float(dist.choices.index(value))
    return float(value)


def mutate(parent: dict[str, Any], space: dict[str, BaseDistribution], rng: np.random.Generator, *,
           step: float = EVOLUTION_STEP, flips: int = 1, group_of: Callable[[str], str] = layer_group,
           tol: float = 1e-9) -> dict[str, Any]:
    """`parent` after min(U{1..flips}, U{1..flips}) level switches (see the module docstring). A switch picks a group
    (weighted by its size), one member to go up one level, then other members down one level each, each at random,
    until the group's sum is within `tol` of (or below) the parent's. Groups of one member are never changed."""
    groups: dict[str, list[str]] = {}
    for name in sorted(space, key=lambda n: (group_of(n), len(n), n)):
        if name in parent:
            groups.setdefault(group_of(name), []).append(name)
    groups = {g: names for g, names in groups.items() if len(names) > 1}
    child = dict(parent)
    if not groups:
        return child
    keys = list(groups)
    sizes = np.array([len(groups[g]) for g in keys], dtype=float)
    n_flips = min(int(rng.integers(1, flips + 1)), int(rng.integers(1, flips + 1)))
    for _ in range(n_flips):
        for _attempt in range(4 * len(keys)):  # a group may have no feasible switch (all at their ends)
            members = groups[keys[rng.choice(len(keys), p=sizes / sizes.sum())]]
            if (switched := _switch(child, members, space, rng, step, tol)) is not None:
                child = switched
                break
    return child


def _switch(values: dict[str, Any], members: list[str], space: dict[str, BaseDistribution],
            rng: np.random.Generator, step: float, tol: float) -> dict[str, Any] | None:
    ups = [n for n in members if neighbour(values[n], space[n], +1, step) is not None]
    if not ups:
        return None
    up = ups[rng.integers(len(ups))]
    new = dict(values)
    new[up] = neighbour(values[up], space[up], +1, step)
    excess = cost(new[up], space[up]) - cost(values[up], space[up])
    moved = {up}
    while excess > tol:
        downs = [n for n in members if n not in moved and neighbour(new[n], space[n], -1, step) is not None]
        if not downs:
            return None
        down = downs[rng.integers(len(downs))]
        lower = neighbour(new[down], space[down], -1, step)
        excess -= cost(new[down], space[down]) - cost(lower, space[down])
        new[down] = lower
        moved.add(down)
    return new


GENERATION = "evolution:generation"  # trial system attributes: the study holds the sampler's whole state
PARENT = "evolution:parent"


class EvolutionSampler(optuna.samplers.BaseSampler):
    """EvoPress's (1 + λ) evolution through Optuna's API (single objective). Its state lives in the study, so a fresh
    sampler resumes it and parallel workers share it: each mutant records its generation and parent trial number; a
    generation with fewer than `offspring` trials goes on with its parent, else the next starts from the best COMPLETE
    trial so far. Without a complete trial it proposes the origin (every float at 0 or its nearest level, every
    categorical at its last choice: the search's widest KV width, which its repair steps down to the budget);
    enqueue warm starts (uniform, OWL) to start from them. Each trial's draws come from a generator seeded with
    (seed, trial number), so a run is reproducible by seed, and an interrupted run resumes to the same trials.
    Parameters outside the intersection search space are sampled at random (`RandomSampler`)."""

    def __init__(self, *, seed: int = 0, offspring: int = EVOLUTION_OFFSPRING, step: float = EVOLUTION_STEP,
                 flips: int = 1, group_of: Callable[[str], str] = layer_group, max_tries: int = 20) -> None:
        if offspring < 1 or flips < 1 or step <= 0:
            raise ValueError(f"offspring and flips must be >= 1 and step > 0; got {offspring}, {flips}, {step}")
        self.seed, self.offspring, self.step, self.flips = seed, offspring, step, flips
        self.group_of, self.max_tries = group_of, max_tries

    def _rng(self, trial: FrozenTrial, salt: str = "") -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, trial.number, zlib.crc32(salt.encode())])

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        space = optuna.search_space.IntersectionSearchSpace().calculate(study)
        return {name: dist for name, dist in space.items() if not dist.single()}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if len(study.directions) > 1:
            raise ValueError("the evolution sampler optimises one objective; for the multi-objective search choose "
                             f"{', '.join(SAMPLERS_MULTI)}")
        if not search_space or "fixed_params" in trial.system_attrs:  # nothing finished yet, or an enqueued trial
            return {}
        generation, parent = self.parent_of(study, trial)
        if parent is None:
            return {}
        start = {name: parent.params[name] for name in search_space if name in parent.params}
        taken = [t.params for t in study.get_trials(deepcopy=False)
                 if t.number != trial.number and t.system_attrs.get(GENERATION) == generation] + [start]
        rng = self._rng(trial)
        for _ in range(self.max_tries):  # EvoPress discards a mutant equal to the parent or to a sibling
            child = mutate(start, search_space, rng, step=self.step, flips=self.flips, group_of=self.group_of)
            if not any(all(k in t and _same(t[k], v) for k, v in child.items()) for t in taken):
                break
        study._storage.set_trial_system_attr(trial._trial_id, GENERATION, generation)
        study._storage.set_trial_system_attr(trial._trial_id, PARENT, parent.number)
        return child

    def parent_of(self, study: optuna.Study, trial: FrozenTrial) -> tuple[int, FrozenTrial | None]:
        """(generation, parent) for `trial`, from the study alone (see the class docstring)."""
        trials = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        tagged = [t for t in trials if GENERATION in t.system_attrs]
        if tagged:
            last = max(t.system_attrs[GENERATION] for t in tagged)
            members = [t for t in tagged if t.system_attrs[GENERATION] == last]
            if len(members) < self.offspring:
                number = members[0].system_attrs[PARENT]
                return last, next(t for t in trials if t.number == number)
            generation = last + 1
        else:
            generation = 0
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            return generation, None
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        return generation, max(complete, key=lambda t: (sign * t.value, -t.number))  # the earliest of equals

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return origin(param_distribution)
        seed = int(self._rng(trial, param_name).integers(2**32))
        return optuna.samplers.RandomSampler(seed=seed).sample_independent(study, trial, param_name,
                                                                           param_distribution)


def _same(a: Any, b: Any) -> bool:
    """Equal levels; floats reached by different paths of steps may differ in the last bits."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-9
    return a == b


def origin(dist: BaseDistribution) -> Any:
    """The evolution's start without a warm start: 0 (or the level nearest it) for numbers, the last choice else."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[-1]
    value = min(max(0, dist.low), dist.high)
    if dist.step:
        value = dist.low + round((value - dist.low) / dist.step) * dist.step
    return type(dist.low)(value) if isinstance(dist, IntDistribution) else float(value)
