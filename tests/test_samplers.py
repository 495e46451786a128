"""The samplers on a cheap synthetic objective with the search's parameter layout (s0..s7 floats in [-0.25, 0.25],
kv0..kv7 categoricals over the KV widths): every sampler runs and resumes, the evolution keeps the budget, follows the
best trial and is reproducible; the ablation runner and its figure."""
import math

import matplotlib
import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from lmmlab.kv.budget import KV_BITS
from lmmlab.lab.sampler_ablation import summarise
from lmmlab.search.samplers import (GENERATION, PARENT, SAMPLERS, SAMPLERS_MULTI, EvolutionSampler, make_sampler,
                                   mutate)

matplotlib.use("Agg")
optuna.logging.set_verbosity(optuna.logging.WARNING)

N, SPREAD, WIDTHS = 8, 0.25, tuple(sorted(KV_BITS))
TARGET = np.linspace(-0.2, 0.2, N)  # the best offsets; later layers want wider KV


def suggest(trial):
    s = np.array([trial.suggest_float(f"s{b}", -SPREAD, SPREAD) for b in range(N)])
    kv = np.array([trial.suggest_categorical(f"kv{b}", WIDTHS) for b in range(N)])
    return s, kv


def objective(trial):
    s, kv = suggest(trial)
    return float(((s - s.mean() - TARGET) ** 2).sum() + 0.1 * (np.log2(16 / kv) * np.arange(1, N + 1) / N).sum())


def two_objectives(trial):
    s, kv = suggest(trial)
    return float(((s - TARGET) ** 2).sum()), float(kv.sum())


UNIFORM = {**{f"s{b}": 0.0 for b in range(N)}, **{f"kv{b}": 4 for b in range(N)}}
OWL = {**{f"s{b}": float(0.7 * TARGET[b] + 0.0131) for b in range(N)}, **{f"kv{b}": 4 for b in range(N)}}


def params_of(study):
    return [t.params for t in study.trials]


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_runs_a_short_study_and_resumes_from_storage(name, tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                                sampler=make_sampler(name, seed=0, population=4))
    study.enqueue_trial(UNIFORM)
    study.optimize(objective, n_trials=6)
    resumed = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(name, seed=0, population=4))
    resumed.optimize(objective, n_trials=6)
    trials = resumed.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 12
    assert all(t.params.keys() == UNIFORM.keys() and t.params["kv0"] in WIDTHS and abs(t.params["s0"]) <= SPREAD
               for t in trials)


@pytest.mark.parametrize("name", SAMPLERS_MULTI)
def test_multi_objective_samplers_run_two_objectives(name):
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=make_sampler(name, seed=0, multi_objective=True, n_startup_trials=4,
                                                     population=4))
    study.optimize(two_objectives, n_trials=8)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 8 and study.best_trials


def test_bad_sampler_names_and_single_objective_samplers_are_refused():
    with pytest.raises(ValueError, match=r"unknown sampler 'anneal'; allowed: tpe, random, cmaes, gp, evolution, "
                                         r"nsga2$"):
        make_sampler("anneal", seed=0)
    for name in set(SAMPLERS) - set(SAMPLERS_MULTI):
        with pytest.raises(ValueError, match=f"sampler '{name}' optimises one objective"):
            make_sampler(name, seed=0, multi_objective=True)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=EvolutionSampler(seed=0))
    with pytest.raises(ValueError, match="one objective"):
        study.optimize(two_objectives, n_trials=1)


def test_tpe_is_the_searchs_sampler():
    tpe = make_sampler("tpe", seed=7)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert (tpe._multivariate, tpe._group, tpe._constant_liar, tpe._n_startup_trials) == (True, True, True, 10)


SPACE = {**{f"s{b}": FloatDistribution(-SPREAD, SPREAD) for b in range(N)},
         **{f"kv{b}": CategoricalDistribution(WIDTHS) for b in range(N)}}


def check_switch(parent, child, step=0.05):
    """One level switch: in one group, one layer up one level, others down one level, the sum kept (offsets) or
    at most the parent's and within the last down-step of it (KV widths)."""
    changed = [k for k in parent if child[k] != parent[k]]
    assert changed and len({k.rstrip("0123456789") for k in changed}) == 1
    if changed[0].startswith("s"):
        deltas = sorted(round((child[k] - parent[k]) / step, 9) for k in changed)
        assert deltas == [-1, 1]
        assert sum(child[f"s{b}"] for b in range(N)) == pytest.approx(sum(parent[f"s{b}"] for b in range(N)),
                                                                       abs=1e-12)
    else:
        moves = sorted(WIDTHS.index(child[k]) - WIDTHS.index(parent[k]) for k in changed)
        assert moves == [-1] * (len(changed) - 1) + [1]
        before, after = sum(parent[f"kv{b}"] for b in range(N)), sum(child[f"kv{b}"] for b in range(N))
        largest_down = min(child[k] - parent[k] for k in changed if child[k] < parent[k])
        assert after <= before < after - largest_down  # no down-step more than it needs
    assert all(SPACE[k]._contains(SPACE[k].to_internal_repr(v)) for k, v in child.items())
    return changed


def test_a_mutation_switches_levels_and_keeps_the_budget():
    rng = np.random.default_rng(0)
    parent, groups = dict(OWL), set()
    for _ in range(300):
        child = mutate(parent, SPACE, rng)
        groups.add(check_switch(parent, child)[0][0])
        parent = child  # a random walk reaches the bounds and the uneven widths
    assert groups == {"s", "k"}
    even = {f"kv{b}": CategoricalDistribution((2, 4, 6, 8)) for b in range(4)}
    for _ in range(50):  # evenly spaced levels: exactly two layers move, the sum is kept
        child = mutate({f"kv{b}": 4 for b in range(4)}, even, rng)
        assert sorted(v - 4 for v in child.values() if v != 4) == [-2, 2]
    cornered = {"s0": 0.25, "s1": 0.25}  # no layer can go up: nothing changes
    assert mutate(cornered, {k: FloatDistribution(-SPREAD, SPREAD) for k in cornered}, rng) == cornered


def evolve(seed, n_trials, storage=None, split=None, offspring=4):
    study = optuna.create_study(storage=storage, study_name="evo", direction="minimize",
                                sampler=EvolutionSampler(seed=seed, offspring=offspring))
    study.enqueue_trial(UNIFORM)
    study.enqueue_trial(OWL)
    if split:
        study.optimize(objective, n_trials=split)
        study = optuna.load_study(study_name="evo", storage=storage,
                                  sampler=EvolutionSampler(seed=seed, offspring=offspring))
    study.optimize(objective, n_trials=n_trials - (split or 0))
    return study


def test_evolution_mutants_switch_levels_of_the_best_trial_so_far():
    study = evolve(seed=1, n_trials=30)
    trials = study.trials
    generations = {}
    for t in trials[2:]:
        parent = trials[t.system_attrs[PARENT]]
        check_switch(parent.params, t.params)
        generations.setdefault(t.system_attrs[GENERATION], []).append(t)
    assert sorted(generations) == list(range(7)) and all(len(g) == 4 for g in list(generations.values())[:-1])
    for members in generations.values():
        first = members[0].number
        best_before = min(t.value for t in trials[:first])
        assert {m.system_attrs[PARENT] for m in members} == {min((t.value, t.number) for t in trials[:first])[1]}
        assert trials[members[0].system_attrs[PARENT]].value == best_before
        assert len({tuple(m.params.items()) for m in members} | {tuple(trials[m.system_attrs[PARENT]].params.items())
                                                                 for m in members}) == len(members) + 1
    assert study.best_value < min(trials[0].value, trials[1].value)  # it improved on the warm starts


def test_evolution_is_reproducible_by_seed_and_resumes_to_the_same_trials(tmp_path):
    straight = params_of(evolve(seed=3, n_trials=14))
    assert params_of(evolve(seed=3, n_trials=14)) == straight
    assert params_of(evolve(seed=4, n_trials=14)) != straight
    resumed = evolve(seed=3, n_trials=14, storage=f"sqlite:///{tmp_path / 'evo.db'}", split=7)
    assert params_of(resumed) == straight


def test_evolution_without_a_warm_start_begins_at_the_origin():
    study = optuna.create_study(direction="minimize", sampler=EvolutionSampler(seed=0, offspring=3))
    study.optimize(objective, n_trials=4)
    assert study.trials[0].params == {**{f"s{b}": 0.0 for b in range(N)}, **{f"kv{b}": 16 for b in range(N)}}
    for t in study.trials[1:]:
        check_switch(study.trials[0].params, t.params)


def runs(names, seeds, n_trials):
    """Each sampler × seed minimising `objective` from the UNIFORM warm start: the table `summarise` reads."""
    import time

    import pandas as pd

    rows = []
    for name in names:
        for seed in seeds:
            study = optuna.create_study(sampler=make_sampler(name, seed=seed, population=3), direction="minimize")
            study.enqueue_trial(UNIFORM)
            start = time.perf_counter()
            study.optimize(objective, n_trials=n_trials)
            values = [t.value for t in study.trials]
            rows += [{"sampler": name, "seed": seed, "trial": k, "value": v, "best_so_far": b,
                      "seconds": time.perf_counter() - start + k * 1e-6}
                     for k, (v, b) in enumerate(zip(values, np.minimum.accumulate(values)))]
    return pd.DataFrame(rows)


def test_ablation_summary_and_figure():
    from lmmlab.lab.plots import sampler_ablation_figure

    names = ("tpe", "random", "evolution")
    table = runs(names, (0, 1), 8)
    summary = summarise(table, points=20)
    by_trials = summary[(summary.axis == "trials") & (summary.sampler == "random")]
    assert by_trials.x.tolist() == list(range(1, 9))
    last = table[(table.sampler == "random") & (table.trial == 7)].best_so_far
    assert by_trials["median"].iloc[-1] == pytest.approx(last.median())
    assert (by_trials["min"].iloc[-1], by_trials["max"].iloc[-1]) == (last.min(), last.max())
    seconds = summary[summary.axis == "seconds"]
    assert len(seconds) == 3 * 20 and math.isnan(seconds["median"].iloc[0])  # no trial has finished at t = 0
    assert seconds.groupby("sampler")["median"].last().tolist() == \
        summary[summary.axis == "trials"].groupby("sampler")["median"].last().tolist()
    fig = sampler_ablation_figure(summary, "minimize")
    assert len(fig.axes) == 2 and all(len(ax.lines) == 3 for ax in fig.axes)


def test_evolution_offspring_of_one_generation_differ_from_each_other_and_from_their_parent():
    def two_layers(trial):  # two switches from (0, 0) reach the best; then only two mutants exist
        return (trial.suggest_float("s0", -SPREAD, SPREAD) - 0.1) ** 2 + (trial.suggest_float("s1", -SPREAD, SPREAD)
                                                                          + 0.1) ** 2
    study = optuna.create_study(direction="minimize", sampler=EvolutionSampler(seed=0, offspring=2))
    study.optimize(two_layers, n_trials=25)
    generations = {}
    for t in study.trials[1:]:
        generations.setdefault(t.system_attrs[GENERATION], []).append(t)
    assert len(generations) == 12
    for members in generations.values():
        parent = study.trials[members[0].system_attrs[PARENT]]
        points = [tuple(round(v, 9) for v in t.params.values()) for t in [parent, *members]]
        assert len(set(points)) == 3
    assert study.best_params == pytest.approx({"s0": 0.1, "s1": -0.1})
