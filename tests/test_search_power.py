"""Search power through the real `search`: samplers, multi-fidelity trials, SparseGPT levels stitched from
a layer database, keys and values at their own widths, ATP / AlphaPruning warm starts, and the CLI's one-line errors."""
import random

import optuna
import pytest
import torch

from lmmlab.kv.budget import fit_kv_pairs
from lmmlab.prune import allocate
from lmmlab import models
from lmmlab.prune.pruner import Pruner
from lmmlab.cli import main
from lmmlab.prune.database import grid_index
from lmmlab.plan import CompressionPlan
from lmmlab.prune.scores import sparsity_of
from lmmlab.search.samplers import SAMPLERS
from lmmlab.search.per_layer import PerLayerConfig, finished, search, trials_table
from lmmlab.tasks import get_task
from lmmlab.tasks import shapes as data

optuna.logging.set_verbosity(optuna.logging.WARNING)
GRID = (0.3, 0.4, 0.5, 0.6, 0.7)
FAST = dict(kv_group_size=8, kv_residual=8, target_sparsity=0.5, kv_budget_bits=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = data.vocabulary()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(12000)))
    return path


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return models.load_model(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="module")
def task(corpus):
    return get_task("text", data=str(corpus), seqlen=32, prefill=16, chunk=4)


@pytest.fixture(scope="module")
def pruner(llama, task):
    return Pruner.for_task(llama, task, n=8)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_a_study_through_search_and_resumes(llama, task, pruner, tmp_path, sampler):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    first = search(llama, task, PerLayerConfig(n_trials=4, n_eval=4, sampler=sampler, **FAST),
                   storage=storage, study_name="s", pruner=pruner)
    before = [t.params for t in first.study.trials]
    again = search(llama, task, PerLayerConfig(n_trials=7, n_eval=4, sampler=sampler, **FAST),
                   storage=storage, study_name="s", pruner=pruner)
    trials = again.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 7 and [t.params for t in trials[:4]] == before
    assert [t.user_attrs["source"] for t in trials[:2]] == ["uniform", "owl"]
    assert {t.user_attrs["source"] for t in trials[2:]} == {sampler}
    for t in trials:
        assert t.user_attrs["mean_sparsity"] == pytest.approx(0.5) and t.user_attrs["mean_kv_bits"] <= 4
    assert again.study.study_name == "s" and again.study.user_attrs["settings"]["sampler"] == sampler


def test_a_study_refuses_another_sampler_and_unknown_ones_fail_first(llama, task, pruner, tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    search(llama, task, PerLayerConfig(n_trials=2, n_eval=4, **FAST), storage=storage, study_name="s", pruner=pruner)
    with pytest.raises(ValueError, match="created with other settings.*sampler"):
        search(llama, task, PerLayerConfig(n_trials=3, n_eval=4, sampler="random", **FAST),
               storage=storage, study_name="s", pruner=pruner)
    with pytest.raises(ValueError, match="unknown sampler 'annealing'; allowed: tpe, random, cmaes, gp, evolution"):
        search(llama, task, PerLayerConfig(n_trials=2, sampler="annealing"),
               storage=f"sqlite:///{tmp_path / 'x.db'}", pruner=pruner)
    assert not (tmp_path / "x.db").exists()


def test_multi_fidelity_prunes_hopeless_trials_and_never_picks_one(llama, task, pruner, tmp_path):
    result = search(llama, task, PerLayerConfig(n_trials=14, n_eval=16, multi_fidelity=True, sampler="random", **FAST),
                    storage=f"sqlite:///{tmp_path / 'm.db'}", pruner=pruner)
    trials = result.study.get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sum(map(finished, trials)) == 14 and len(pruned) + len(complete) == 14
    assert pruned, "a random sampler against uniform/OWL warm starts: some trial falls out of the best quarter"
    for t in pruned:  # stopped on a cheap subset (1/16 or 1/4 of 16 windows), reported, and never scored in full
        assert t.user_attrs["pruned_at"] in (1, 4) and t.value == list(t.intermediate_values.values())[-1]
        assert "primary" not in t.user_attrs
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials[:2])  # warm starts: always in full
    assert result.study.best_trial.state == optuna.trial.TrialState.COMPLETE
    assert result.study.best_value == min(t.value for t in complete)
    assert len(trials_table(result.study)) == len(complete)


def test_a_sparsegpt_search_stitches_database_levels_at_the_budget(llama, task, pruner, tmp_path):
    with pytest.raises(ValueError, match="sparsegpt needs a layer database"):
        search(llama, task, PerLayerConfig(n_trials=2, method="sparsegpt", **FAST),
               storage=f"sqlite:///{tmp_path / 'n.db'}", pruner=pruner)
    database = pruner.attach_database(levels=GRID, path=tmp_path / "db", progress=False)
    try:
        with pytest.raises(ValueError, match="grid"):  # 0.8 is above every level: no plan can meet it
            search(llama, task, PerLayerConfig(n_trials=2, method="sparsegpt", **{**FAST, "target_sparsity": 0.8}),
                   storage=f"sqlite:///{tmp_path / 'g.db'}", pruner=pruner)
        assert not (tmp_path / "g.db").exists()
        result = search(llama, task, PerLayerConfig(n_trials=5, n_eval=4, method="sparsegpt", **FAST),
                        storage=f"sqlite:///{tmp_path / 'd.db'}", pruner=pruner)
        for t in result.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            plan = CompressionPlan(**t.user_attrs["plan"])
            assert all(grid_index(s, GRID) is not None for s in plan.sparsity)
            assert plan.mean_sparsity == pytest.approx(0.5, abs=1e-12) and abs(t.user_attrs["budget_residual"]) < 1e-12
        # the model holds what the database stores for the best plan, whatever was applied before
        best = result.best_plan
        for before in (lambda: pruner.apply(CompressionPlan([0.3] * llama.num_layers, method="wanda")),
                       pruner.restore, lambda: pruner.apply(best, sequential=True)):
            before()
            pruner.apply(best)
            assert sparsity_of(llama) == pytest.approx(best.mean_sparsity, abs=1e-3)
        pruner.apply(CompressionPlan([0.3] * llama.num_layers, method="wanda"))
        pruner.apply(best)
        stitched = {k: lin.weight.detach().clone() for k, lin in llama.prunable().items()}
        database.forget()
        database.apply(llama, best.sparsity, dense=pruner.dense)
        assert all((stitched[k] == lin.weight).all() for k, lin in llama.prunable().items())
        assert pruner.calibration("sparsegpt", False) == "one-pass"
        assert pruner.calibration("sparsegpt", True) == "sequential"
    finally:
        pruner.database = None
        pruner.restore()


def test_keys_and_values_get_their_own_widths_under_one_combined_budget(llama, task, pruner, tmp_path):
    for unit, budget in (("nominal", 5.0), ("effective", 9.0)):
        result = search(llama, task, PerLayerConfig(n_trials=6, n_eval=4, separate_kv=True, kv_budget_unit=unit, context_tokens=100, **{**FAST, "kv_budget_bits": budget}),
                        storage=f"sqlite:///{tmp_path / 'kv.db'}", pruner=pruner)
        assert result.study.study_name.endswith("-kv")
        plans = [CompressionPlan(**t.user_attrs["plan"])
                 for t in result.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
        assert all(len(p.value_bits) == llama.num_layers for p in plans)
        assert any(p.key_widths != p.value_widths for p in plans[2:])  # the sampler draws keys and values apart
        for p in plans:
            spent = p.mean_kv_bits if unit == "nominal" else p.mean_effective_kv_bits(llama.head_dim, 100)
            assert spent <= budget + 1e-9


def test_fit_kv_pairs_meets_a_combined_budget_stepping_the_widest_part_down():
    widths = (2, 3, 4, 6, 8, 16)
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 12)
        keys = [rng.choice(widths) for _ in range(n)]
        values = [rng.choice(widths) for _ in range(n)]
        budget = rng.uniform(2, 16)
        k, v = fit_kv_pairs(keys, values, budget, widths)
        assert (sum(k) + sum(v)) / (2 * n) <= budget + 1e-9
        assert all(a <= b for a, b in zip(k + v, keys + values))
        if (sum(keys) + sum(values)) / (2 * n) <= budget:
            assert (k, v) == (keys, values)
    assert fit_kv_pairs([16, 2], [16, 2], 8, widths) == ([16, 2], [8, 2])  # values step down first


def test_atp_and_alphapruning_are_warm_starts(llama, task, pruner, tmp_path):
    result = search(llama, task, PerLayerConfig(n_trials=4, n_eval=4, warm_allocations=("uniform", "owl", "atp", "alphapruning"), **FAST),
                    storage=f"sqlite:///{tmp_path / 'w.db'}", pruner=pruner)
    trials = result.study.trials
    assert [t.user_attrs["source"] for t in trials] == ["uniform", "owl", "atp", "alphapruning"]
    for t, name in zip(trials[2:], ("atp", "alphapruning")):
        assert t.user_attrs["plan"]["sparsity"] == pytest.approx(pruner.allocation(name, 0.5), abs=1e-9)
    atp = trials[2].user_attrs["plan"]["sparsity"]
    steps = [b - a for a, b in zip(atp, atp[1:])]
    assert all(s == pytest.approx(steps[0]) for s in steps)  # linear in depth
    assert pruner.atp_slope(0.5) in allocate.atp_slopes(llama.num_layers, 0.5)


@pytest.mark.parametrize("argv, message", [
    (["search", "--space", "per-layer", "--sampler", "annealing"], "unknown sampler 'annealing'"),
    (["search", "--sampler", "cmaes", "--multi-objective"], "sampler 'cmaes' optimises one objective"),
    (["search", "--space", "per-layer", "--database-levels", "0.9:0.3:0.1"], "level"),
    (["search", "--space", "per-layer", "--database-levels", ""], "level"),
    (["search", "--space", "per-layer", "--database-levels", "0.3,1.2"], "level"),
    (["search", "--space", "per-layer", "--warm-starts", "owl", "lottery"], "unknown warm start 'lottery'"),
    (["database", "--levels", "0.5,0.5"], "level"),
    (["search", "--space", "per-layer", "--database-levels", "0.3,0.5", "--database-inputs", "0.4"],
     "--database-inputs '0.4'"),
])
def test_bad_search_power_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_a_database_on_the_uniform_plans_inputs_stitches_sequential_sparsegpt(llama, task, pruner, tmp_path):
    """Solved on what the layers before produce when pruned at 0.5, the uniform 0.5 plan stitches to the weights of
    sequential SparseGPT itself; from the dense model's inputs it does not."""
    plan = CompressionPlan([0.5] * llama.num_layers, method="sparsegpt")
    try:
        pruner.apply(plan, sequential=True)  # no database: SparseGPT layer by layer
        reference = {k: lin.weight.detach().clone() for k, lin in llama.prunable().items()}
        for inputs, equal in ((plan, True), (None, False)):
            pruner.attach_database(levels=GRID, path=tmp_path / f"db-{inputs is None}", reference=inputs,
                                   progress=False)
            pruner.apply(plan)
            assert (pruner.database.inputs == "dense") == (inputs is None)
            same = all(torch.allclose(reference[k], lin.weight, atol=1e-6) for k, lin in llama.prunable().items())
            assert same == equal
            pruner.database = None
    finally:
        pruner.database = None
        pruner.restore()
