"""The staged search and its parts: KV pairs, the KL fitness, the low-dimensional space, the evolution with multi-step
selection, DLP, the pipeline on a tiny Llama (budgets met exactly in every stage, resumable, two-stage ablation), and
one-line errors."""
import random

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F

from lmmlab.prune import allocate
from lmmlab.kv import pairs as kvpairs
from lmmlab import models
from lmmlab.prune.pruner import Pruner
from lmmlab.cli import main
from lmmlab.prune.database import layer_numel
from lmmlab.prune.scores import removed_count
from lmmlab.search.evolution import Evolution, Genome, check_selection, parse_selection
from lmmlab.search.fitness import coarsen, kl_divergence, kl_terms, reference, row_logits, split_rows
from lmmlab.kv.cache import kv_cache_for
from lmmlab.plan import CompressionPlan
from lmmlab.search.space import LowDimSpace
from lmmlab.search.staged import SearchConfig, staged_search, staged_trials_table, two_stage_search
from lmmlab.tasks import get_task


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return models.load_model(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="module")
def task():
    return get_task("text", seqlen=64, batch_size=4)


@pytest.fixture(scope="module")
def pruner(llama, task):
    return Pruner.for_task(llama, task, n=8)


def one_line(err) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


TINY = dict(tpe_trials=5, generations=(2, 1), offspring=4, selection=((2, 64), (1, 128)), count_levels=2,
            fitness_rows=4, n_eval=4, top_k=16, kv_group_size=8, kv_residual=16)


# --------------------------------------------------------------------------------------------------------------------
# KV pairs


def test_pairs_parse_in_kvtuners_names_and_meet_a_budget_by_stepping_the_costliest_down():
    pairs = kvpairs.parse_pairs("KV2, K4V2,KV8 ,K8V4,KV4")
    assert pairs == ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))
    rng = random.Random(0)
    for _ in range(50):
        chosen = [rng.choice(pairs) for _ in range(12)]
        sens = [rng.random() for _ in range(12)]
        budget = rng.choice((2.0, 3.0, 3.5, 5.0))
        fitted = kvpairs.fit_pairs(chosen, budget, pairs, sens)
        assert sum(map(kvpairs.cost, fitted)) <= budget * 12 + 1e-9
        assert all(kvpairs.cost(f) <= kvpairs.cost(c) for f, c in zip(fitted, chosen))  # only ever down
        if sum(map(kvpairs.cost, chosen)) <= budget * 12:
            assert fitted == chosen
    # equal costs: the least sensitive layer steps down first
    assert kvpairs.fit_pairs([(4, 4)] * 3, 11 / 3, pairs, [0.5, 0.1, 0.9]) == [(4, 4), (4, 2), (4, 4)]


def test_clusters_group_layers_of_similar_sensitivity_and_kvtuner_gives_sensitive_layers_more_bits():
    sens = [0.1, 0.9, 0.5, 0.05, 0.7, 0.3]
    assert kvpairs.clusters(sens, 3) == [2, 0, 1, 2, 0, 1]
    plan = kvpairs.kvtuner_plan(sens, 3.0, kvpairs.KVTUNER_PAIRS)
    assert sum(map(kvpairs.cost, plan)) <= 3.0 * 6 + 1e-9
    assert kvpairs.cost(plan[1]) >= kvpairs.cost(plan[3])  # most sensitive vs least


@pytest.mark.parametrize("text, message", [
    ("KV5", "width 5 not supported"), ("K2V4", "values wider than keys"), ("KV8,KV8", "names a pair twice"),
    ("KVfour", "bad KV pair"), ("", "empty KV pair list")])
def test_bad_pair_lists_are_one_line_errors(text, message):
    with pytest.raises(ValueError) as err:
        kvpairs.parse_pairs(text)
    assert message in one_line(err)


def test_a_budget_no_pair_can_meet_is_a_one_line_error():
    with pytest.raises(ValueError) as err:
        kvpairs.check_budget(1.5, kvpairs.KVTUNER_PAIRS)
    assert "KV budget 1.5 mean bits cannot be met by the pairs" in one_line(err)


# --------------------------------------------------------------------------------------------------------------------
# KL fitness


def test_the_kl_fitness_equals_a_direct_computation(llama, task, pruner):
    batches = task.calibration_batches(llama, n=3, seed=7)
    pruner.restore()
    full = reference(llama, batches, top_k=10 ** 6)  # k = the vocabulary: the exact KL
    top = reference(llama, batches, top_k=5)
    dense_logits = [llama.model(**b, use_cache=False).logits for b in batches]
    plan = CompressionPlan.uniform(llama.num_layers, 0.6, kv_bits=4, method="wanda", kv_group_size=8, kv_residual=16)
    pruner.apply(plan)
    got_full = kl_divergence(llama, full, make_cache=lambda: kv_cache_for(plan, llama))
    got_top = kl_divergence(llama, top, make_cache=lambda: kv_cache_for(plan, llama))
    # direct: the pruned model's logits through the same prefill + chunks, KL of every next-token distribution
    rows = split_rows(batches)
    exact, coarse, count = 0.0, 0.0, 0
    for r, row in enumerate(rows):
        p = F.log_softmax(torch.cat([l for l in dense_logits])[r, :-1].double(), -1)
        q = F.log_softmax(row_logits(llama, row, lambda: kv_cache_for(plan, llama), full.chunk)[0, :-1].double(), -1)
        exact += (p.exp() * (p - q)).sum().item()
        idx = p.topk(5, -1).indices
        p_top, q_top = p.gather(-1, idx), q.gather(-1, idx)
        p_tail, q_tail = torch.log1p(-p_top.exp().sum(-1)), torch.log1p(-q_top.exp().sum(-1))
        coarse += ((p_top.exp() * (p_top - q_top)).sum(-1) + p_tail.exp() * (p_tail - q_tail)).sum().item()
        count += p.shape[0]
    pruner.restore()
    assert got_full == pytest.approx(exact / count, rel=1e-4)
    assert got_top == pytest.approx(coarse / count, rel=1e-3)
    assert 0 < got_top <= got_full  # the coarsened KL is a lower bound
    assert abs(kl_divergence(llama, full)) < 1e-6  # the dense model against itself


def test_the_protocol_through_a_16_bit_cache_gives_the_plain_logits(llama, task):
    row = split_rows(task.calibration_batches(llama, n=1, seed=3))[0]
    plan = CompressionPlan.uniform(llama.num_layers, 0.0, kv_bits=16)
    plain = row_logits(llama, row, None)
    chunked = row_logits(llama, row, lambda: kv_cache_for(plan, llama), 7)
    assert torch.allclose(plain, chunked, atol=1e-4)


def test_coarsening_keeps_the_mass():
    logits = torch.randn(6, 50)
    index, top, tail = coarsen(logits, 8)
    assert torch.allclose(top.exp().sum(-1) + tail.exp(), torch.ones(6), atol=1e-5)
    assert kl_terms(logits, index, top, tail).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------------------------------
# DLP


def test_dlp_scores_and_ratios_equal_a_direct_computation(llama, pruner):
    scores = allocate.dlp_scores(llama, pruner.stats, weights=pruner.dense)
    for i in range(llama.num_layers):
        metric = torch.cat([(pruner.dense[(i, n)].abs() * pruner.stats.norm((i, n))[None, :]).flatten()
                            for n in llama.linears(i)])
        assert scores[i] == pytest.approx(metric.double().mean().item(), rel=1e-6)
    s = allocate.dlp_from(scores, 0.6, 0.15)
    I = np.array(scores)
    u = 1 - I / I.sum()
    scaled = (u - u.min()) / (u.max() - u.min()) * 0.3
    assert s == pytest.approx(list(0.6 - (scaled - scaled.mean())), abs=1e-9)
    assert np.mean(s) == pytest.approx(0.6) and s[int(np.argmax(I))] == max(s)  # the largest metric: pruned most
    assert allocate.dlp_from([1.0] * 4, 0.5) == pytest.approx([0.5] * 4)


# --------------------------------------------------------------------------------------------------------------------
# the low-dimensional space and the evolution


def space_for(llama, **kw) -> LowDimSpace:
    numel = layer_numel(llama)
    L = llama.num_layers
    options = dict(numel=tuple(tuple(layer.items()) for layer in numel), target=0.6,
                   bases=(("uniform", (0.6,) * L), ("atp", tuple(allocate.atp(L, 0.6, 0.1)))),
                   kv_budget=3.0, kv_pairs=kvpairs.KVTUNER_PAIRS, kv_clusters=tuple(i % 2 for i in range(L)),
                   slope=0.1)
    return LowDimSpace(**{**options, **kw})


def test_every_trial_of_the_low_dimensional_space_meets_the_budgets_exactly(llama):
    from lmmlab.prune.database import level_grid, shared_levels

    numel = layer_numel(llama)
    total = sum(n for layer in numel for n in layer.values())
    for levels in ((), tuple(shared_levels(llama, level_grid(0.3, 0.9, 0.05)))):
        space = space_for(llama, levels=levels)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(20):
            trial = study.ask()
            plan, residual = space.plan(space.suggest(trial))
            mean = sum(plan.ratio(i, n) * c for i, layer in enumerate(numel) for n, c in layer.items()) / total
            assert mean == pytest.approx(0.6, abs=1e-9) and abs(residual) < 1e-9  # the smallest linear: 1/54 of all
            assert plan.mean_kv_bits <= 3.0 + 1e-9 and all(k >= v for k, v in zip(plan.kv_bits, plan.value_bits))
            study.tell(trial, 0.0)
    warm, _ = space.plan(space.warm_params("atp"))
    assert [warm.ratio(i, "q_proj") for i in range(llama.num_layers)] == pytest.approx(allocate.atp(3, 0.6, 0.1))


def test_mutations_keep_the_weight_count_and_the_kv_budget():
    rng = np.random.default_rng(0)
    removed = [[None, 10, 20, 30, 40], [5, 15, 25, 35, None], [0, 10, 20, None, None], [7, 17, 27, 37, 47]]
    evo = Evolution(removed, kvpairs.KVTUNER_PAIRS, offspring=6, selection=((2, 10), (1, 20)), seed=1)
    parent = Genome((2, 2, 1, 2), (2, 2, 2, 2))
    spent = lambda g: sum(removed[k][j] for k, j in enumerate(g.levels))  # noqa: E731
    cost = lambda g: sum(kvpairs.cost(evo.pairs[p]) for p in g.pairs)  # noqa: E731
    children = evo.children(parent, rng)
    assert len(children) == 6 and parent not in children and len(set(children)) == 6
    for child in children:
        assert spent(child) == spent(parent) and cost(child) <= cost(parent) + 1e-9
        assert all(removed[k][j] is not None for k, j in enumerate(child.levels))


def test_multi_step_selection_keeps_the_best_and_the_parent_when_nothing_beats_it():
    removed = [[0, 1, 2, 3]] * 4
    evo = Evolution(removed, offspring=6, selection=((3, 1), (1, 2)), seed=0)
    parent = Genome((1, 1, 2, 2))
    target = (0, 2, 1, 3)

    def distance(g, tokens, start):
        return sum(abs(a - b) for a, b in zip(g.levels, target)) + 0.0

    for g in range(5):
        candidates = evo.generation(parent, g, distance)
        best = candidates[0]
        assert best.scores[-1] <= distance(parent, 0, 0)  # elitist
        assert len([c for c in candidates if c.parent]) == 1 and len(candidates) == 7
        parent = best.genome
    assert distance(parent, 0, 0) < distance(Genome((1, 1, 2, 2)), 0, 0)


@pytest.mark.parametrize("selection, message", [
    (((2, 10), (2, 20)), "must fall to 1"), (((1, 20), (1, 10)), "tokens must be positive and grow"),
    (((9, 10), (1, 20)), "at most at the offspring"), ((), "at least one")])
def test_bad_selections_are_one_line_errors(selection, message):
    with pytest.raises(ValueError) as err:
        check_selection(selection, 8)
    assert message in one_line(err)
    assert parse_selection("4:256,1:1024") == ((4, 256), (1, 1024))


# --------------------------------------------------------------------------------------------------------------------
# the pipeline


@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_the_staged_search_meets_the_budgets_in_every_stage_and_resumes(llama, task, pruner, tmp_path, monkeypatch,
                                                                       granularity):
    monkeypatch.setenv("LMMLAB_CACHE", str(tmp_path / "cache"))
    config = SearchConfig(target_sparsity=0.6, kv_budget=3.0, granularity=granularity, **TINY)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    result = staged_search(llama, task, config, pruner=pruner, storage=storage, study_name="s")
    numel = layer_numel(llama)
    total = sum(n for layer in numel for n in layer.values())
    table = staged_trials_table(result.study)
    assert set(table.stage) == {"tpe", "evolution1", "evolution2"}
    assert (table.stage == "tpe").sum() == 5
    chosen = table[table.chosen]
    assert sorted(chosen.generation.tolist()) == [0, 0, 1]  # one winner per generation, rounds of 2 and 1
    for t in result.study.get_trials(deepcopy=False):
        plan = CompressionPlan(**t.user_attrs["plan"])
        removed = plan.removed_weights(numel)
        assert abs(removed - removed_count(total, 0.6)) <= max(max(layer.values()) for layer in numel) * 0.05
        assert plan.mean_kv_bits <= 3.0 + 1e-9
    # the evolution keeps the count of its start exactly
    by_round = {}
    for t in result.study.get_trials(deepcopy=False):
        if t.user_attrs["stage"].startswith("evolution"):
            by_round.setdefault(t.user_attrs["stage"], set()).add(
                CompressionPlan(**t.user_attrs["plan"]).removed_weights(numel))
    assert all(len(counts) == 1 for counts in by_round.values())
    names = [c["name"] for c in result.candidates]
    assert names[:5] == ["tpe", "tpe-sequential", "evolution1", "evolution2", "sequential"]
    assert names[5].startswith("base:") and len(names) == 6
    assert result.candidates[5]["plan"].get("module_sparsity") is None  # the base as its baseline runs it
    assert result.candidates[0]["plan"] == result.candidates[1]["plan"]  # one plan stitched and solved: the gap
    assert result.realize in ("stitched", "sequential")
    best = min(result.candidates, key=lambda c: c["validation"])
    assert result.best_plan == CompressionPlan(**best["plan"])
    # resumed: the same result, no trial added
    again = staged_search(llama, task, config, pruner=pruner, storage=storage, study_name="s")
    assert again.best_plan == result.best_plan and len(again.study.trials) == len(result.study.trials)


def test_an_interrupted_evolution_resumes_from_its_last_finished_generation(llama, task, pruner, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("LMMLAB_CACHE", str(tmp_path / "cache"))
    config = SearchConfig(target_sparsity=0.6, kv_budget=16.0, **{**TINY, "generations": (3,)})
    storage = f"sqlite:///{tmp_path / 's.db'}"
    calls = []
    from lmmlab.search import evolution as evo_module

    original = evo_module.Evolution.generation

    def dying(self, parent, g, score):
        if g == 2 and not calls:
            calls.append(g)
            raise KeyboardInterrupt
        return original(self, parent, g, score)

    monkeypatch.setattr(evo_module.Evolution, "generation", dying)
    with pytest.raises(KeyboardInterrupt):
        staged_search(llama, task, config, pruner=pruner, storage=storage, study_name="r")
    first = optuna.load_study(study_name="r", storage=storage)
    assert sum(bool(t.user_attrs.get("chosen")) for t in first.trials) == 2
    result = staged_search(llama, task, config, pruner=pruner, storage=storage, study_name="r")
    table = staged_trials_table(result.study)
    assert sorted(table[table.chosen].generation.tolist()) == [0, 1, 2]
    monkeypatch.undo()
    uninterrupted = staged_search(llama, task, config, pruner=pruner, storage=storage, study_name="u")
    assert uninterrupted.best_plan == result.best_plan  # the same draws: generation RNGs are seeded per generation


def test_the_two_stage_ablation_searches_weights_then_kv_at_equal_evaluations(llama, task, pruner, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("LMMLAB_CACHE", str(tmp_path / "cache"))
    config = SearchConfig(target_sparsity=0.6, kv_budget=3.0, **{**TINY, "tpe_trials": 6, "generations": (2,)})
    storage = f"sqlite:///{tmp_path / 's.db'}"
    first, second = two_stage_search(llama, task, config, pruner=pruner, storage=storage)
    assert set(first.best_plan.kv_bits) == {16} and first.best_plan.mean_kv_bits == 16
    ratios = lambda plan: [plan.ratio(i, n) for i in range(llama.num_layers) for n in llama.linears(i)]  # noqa: E731
    assert second.best_plan.mean_kv_bits <= 3.0 and ratios(second.best_plan) == ratios(first.best_plan)
    weights_trials = len([t for t in first.study.trials if t.user_attrs.get("stage") == "tpe"])
    kv_trials = len([t for t in second.study.trials if t.user_attrs.get("stage") == "tpe"])
    assert weights_trials + kv_trials == 6
    gens = lambda study: len({t.user_attrs["generation"] for t in study.trials  # noqa: E731
                              if str(t.user_attrs.get("stage")).startswith("evolution")})
    assert gens(first.study) + gens(second.study) == 2
    again = two_stage_search(llama, task, config, pruner=pruner, storage=storage)  # resumed from its storage
    assert again[1].best_plan == second.best_plan and len(again[0].study.trials) == len(first.study.trials)
    assert len(again[1].study.trials) == len(second.study.trials)


@pytest.mark.parametrize("argv, message", [
    (["--granularity", "block"], "unknown granularity 'block'"),
    (["--stages", "tpe,annealing"], "unknown or repeated stage 'annealing'"),
    (["--stages", "evolution,tpe"], "stages run in the order tpe, evolution"),
    (["--kv-budget", "3", "--kv-pairs", "KV8,K5V2"], "width 5 not supported"),
    (["--kv-budget", "1.5"], "cannot be met by the pairs"),
    (["--bases", "uniform", "lottery"], "unknown base allocation 'lottery'"),
    (["--selection", "4:256,2:1024"], "must fall to 1"),
])
def test_bad_staged_search_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    args = ["search", "--model", "smollm2-135m", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--out-dir",
            str(tmp_path / "out")] + argv
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["headline", "--baselines", "wanda-lottery"], "bad baseline 'wanda-lottery'"),
    (["headline", "--kv-budgets", "16", "1.5"], "cannot be met by the pairs"),
    (["headline", "--granularity", "row"], "unknown granularity 'row'"),
    (["ablate-samplers", "--samplers", "tpe", "hillclimb"], "unknown sampler 'hillclimb'"),
    (["database", "--inputs", "lottery"], "unknown database inputs 'lottery'"),
])
def test_bad_headline_and_ablation_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, argv,
                                                                              message):
    monkeypatch.chdir(tmp_path)
    args = argv + ["--model", "smollm2-135m"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_database_on_other_inputs_than_asked_is_refused(llama, pruner, tmp_path):
    from lmmlab.prune.database import level_grid

    grid = level_grid(0.3, 0.75, 0.15)
    pruner.attach_database(levels=grid, path=tmp_path / "db", progress=False)
    reference_plan = CompressionPlan.uniform(llama.num_layers, 0.45, method="sparsegpt")
    with pytest.raises(ValueError) as err:
        pruner.attach_database(levels=grid, reference=reference_plan, path=tmp_path / "db", progress=False)
    assert "was built on dense inputs, not on the reference plan asked for" in one_line(err)
    with pytest.raises(ValueError) as err:
        pruner.attach_database(levels=level_grid(0.3, 0.6, 0.15), path=tmp_path / "db", progress=False)
    assert "holds other levels than the ones asked for" in one_line(err)
    pruner.restore()
    pruner.database = None


def test_the_sampler_ablation_runs_every_sampler_at_equal_evaluations(llama, task, pruner, tmp_path, monkeypatch):
    from lmmlab.lab.sampler_ablation import ABLATION_SAMPLERS, sampler_ablation
    from lmmlab.lab.sampler_ablation import summarise

    monkeypatch.setenv("LMMLAB_CACHE", str(tmp_path / "cache"))
    config = SearchConfig(target_sparsity=0.6, kv_budget=3.0, **TINY)
    table = sampler_ablation(llama, task, config=config, seeds=(0, 1), evaluations=6, offspring=2, pruner=pruner,
                             storage=f"sqlite:///{tmp_path / 's.db'}")
    counts = table.groupby(["sampler", "seed"]).size()
    assert set(counts.index.get_level_values(0)) == set(ABLATION_SAMPLERS) and (counts == 6).all()
    for _, run in table.groupby(["sampler", "seed"]):
        assert (np.diff(run.best_so_far) <= 0).all() and (np.diff(run.seconds) >= 0).all()
        assert run.best_so_far.iloc[-1] == run.value.min()
    # the warm starts come first and are the same for every sampler on the low-dimensional space
    firsts = table[table.evaluation <= 3].pivot_table(index=["evaluation"], columns="sampler", values="value")
    assert np.allclose(firsts["tpe"], firsts["random"]) and np.allclose(firsts["tpe"], firsts["cmaes"])
    assert set(summarise(table).axis) == {"trials", "seconds"}


def test_the_headline_ranks_the_search_against_every_baseline_with_paired_tests(llama, task, pruner, tmp_path,
                                                                                 monkeypatch):
    from lmmlab.lab.headline import headline, headline_tests, write_headline

    monkeypatch.setenv("LMMLAB_CACHE", str(tmp_path / "cache"))
    config = SearchConfig(**{**TINY, "tpe_trials": 3, "generations": (1,)})
    rows = headline(llama, task, sparsities=(0.6,), kv_budgets=(16, 3), config=config,
                    baselines=(("wanda", "uniform"), ("sparsegpt", "atp")), two_stage_at=(0.6,),
                    storage=f"sqlite:///{tmp_path / 's.db'}", n=4, pruner=pruner)
    names = [(r["kv_budget_bits"], r["method"], r["allocation"], r["kv_plan"]) for r in rows]
    assert names == [(16.0, "sparsegpt", "search", ""), (16.0, "wanda", "uniform", "uniform"),
                     (16.0, "sparsegpt", "atp", "uniform"), (3.0, "sparsegpt", "search", ""),
                     (3.0, "sparsegpt", "search-kv16", ""), (3.0, "sparsegpt", "two-stage", ""), (3.0, "wanda", "uniform", "uniform"),
                     (3.0, "wanda", "uniform", "kvtuner"), (3.0, "sparsegpt", "atp", "uniform"),
                     (3.0, "sparsegpt", "atp", "kvtuner")]
    same = rows[4]  # the KV-limited search's own weights with a 16-bit cache
    for r in rows:
        assert abs(r["achieved_sparsity"] - 0.6) < 0.0005
        assert r["mean_kv_bits"] <= r["kv_budget_bits"] + 1e-9 or (r is same and r["mean_kv_bits"] == 16)
        assert len(r["per_item"]) == 4 and r["ci_low"] <= r["primary"] <= r["ci_high"]
    assert all(same[k] == rows[3][k] for k in ("achieved_sparsity", "weight_bytes", "weight_bytes_nonzeros"))
    tests = headline_tests(rows, task.direction)
    outside = ("sparsegpt-two-stage", "sparsegpt-search-kv16")
    family = [t for t in tests if t["kv_budget_bits"] == 3.0 and t["baseline"] not in outside]
    assert len(family) == 4 and all(t["p_holm"] >= t["p_value"] for t in family)
    assert sorted(t["baseline"] for t in tests if t["baseline"] in outside) == sorted(outside)
    paths = write_headline(rows, task.direction, tmp_path / "tables" / "tiny_headline.csv")
    assert all(p.is_file() for p in paths)
    whole = [p.read_text() for p in paths]
    kv3 = [r for r in rows if r["kv_budget_bits"] == 3.0]
    write_headline(kv3, task.direction, paths[0])  # a run of one cell replaces that cell and keeps the other
    assert [p.read_text() for p in paths] == whole
    write_headline(kv3, task.direction, paths[0], keep_other_cells=False)
    import pandas as pd

    assert set(pd.read_csv(paths[0]).kv_budget_bits) == set(pd.read_csv(paths[2]).kv_budget_bits) == {3.0}
    assert len(pd.read_csv(paths[0])) == len(kv3) and all(c.endswith("-kv3") for c in pd.read_csv(paths[1]).columns)
    assert not list((tmp_path / "cache").glob("databases/*"))  # the level databases were removed after the target


def test_the_headline_command_writes_its_tables_and_the_stitching_gaps(tiny_llama_dir, tmp_path, monkeypatch,
                                                                       capsys):
    import pandas as pd

    monkeypatch.setenv("LMMLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tables" / "tiny_headline.csv"
    argv = ["headline", "--model", str(tiny_llama_dir), "--task", "text", "--task-option", "seqlen=64",
            "--task-option", "batch_size=4", "--sparsities", "0.6", "--kv-budgets", "16", "3", "--n-trials", "3",
            "--generations", "1", "--offspring", "2", "--selection", "1:64", "--count-levels", "2",
            "--fitness-rows", "2", "--top-k", "8", "--n", "4", "--n-eval", "4", "--kv-group-size", "8",
            "--kv-residual", "16", "--baselines", "sparsegpt-uniform", "wanda-atp", "--two-stage-at",
            "--dense-gap-at", "0.6", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--out", str(out)]
    assert main(argv) == 0
    table = pd.read_csv(out)
    assert len(table) == 3 + 2 + 4  # KV 16: search + 2 baselines; KV 3: search, its weights at 16 bits, 2 × 2 KV plans
    gaps = pd.read_csv(tmp_path / "tables" / "tiny_stitching_gap.csv")
    assert set(gaps.database.str.split(" ").str[0]) == {"first", "re-based", "dense"}
    assert {"tiny_headline_items.csv", "tiny_headline_paired.csv"} <= {p.name for p in out.parent.iterdir()}
    assert not out.with_name("tiny_headline.partial.json").exists()
    assert "Holm" in capsys.readouterr().out
    from lmmlab.lab.report import headline_table

    header, _, kv3, kv16 = headline_table(out).splitlines()  # a row per cell; KV 3 with its 16-bit-cache comparison
    assert kv16.count("|") == kv3.count("|") == header.count("|")
    assert kv16.split("|")[-2].strip() == "" and "%" in kv3.split("|")[-2] and "better than" in kv3
