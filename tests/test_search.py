import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
import torch

from lmmlab.kv.budget import fit_kv_bits
from lmmlab.prune import allocate
from lmmlab.tasks import get_task
from lmmlab.tasks import shapes as data
from lmmlab.prune.pruner import Pruner
from lmmlab.cli import main
from lmmlab.plan import CompressionPlan
from lmmlab.search.per_layer import PerLayerConfig, SearchSpace, search, suggest_plan, trials_table, warm_start_params

SHAPES = get_task("shapes")

optuna.logging.set_verbosity(optuna.logging.WARNING)
FAST = dict(n_eval=32, kv_group_size=8, kv_residual=8)


def test_projection_meets_the_sparsity_budget_exactly_for_any_suggestion():
    g = torch.Generator().manual_seed(0)
    for case in range(300):
        n = int(torch.randint(1, 40, (1,), generator=g))
        target = float(torch.rand(1, generator=g)) * 0.9
        raw = (torch.rand(n, generator=g) * 1.6 - 0.3).tolist()  # outside the bounds too
        weights = (torch.rand(n, generator=g) * 10 + 0.1).tolist()
        s = allocate.project(raw, target, 0.0, 0.95, weights)
        assert sum(w * x for w, x in zip(weights, s)) / sum(weights) == pytest.approx(target, abs=1e-9), case
        assert all(0.0 <= x <= 0.95 for x in s)
        # one common shift: the order of the raw values is kept
        assert all((a <= b) == (x <= y) or x == y for a, b, x, y in zip(raw, raw[1:], s, s[1:]))


def test_kv_projection_meets_the_budget_and_only_lowers_widths():
    g = torch.Generator().manual_seed(1)
    widths = (2, 3, 4, 6, 8, 16)
    for _ in range(300):
        n = int(torch.randint(1, 33, (1,), generator=g))
        raw = [widths[int(i)] for i in torch.randint(0, 6, (n,), generator=g)]
        budget = float(torch.rand(1, generator=g)) * 14 + 2
        bits = fit_kv_bits(raw, budget, widths)
        assert sum(bits) / n <= budget + 1e-9 and all(b in widths for b in bits)
        assert all(b <= r for b, r in zip(bits, raw))
        if sum(raw) / n <= budget:
            assert bits == raw
    with pytest.raises(ValueError, match="below the narrowest allowed width 2"):
        fit_kv_bits([4, 4], 1.5, widths)


def test_a_trial_plan_is_the_projection_of_its_suggestion():
    space = SearchSpace(6, target_sparsity=0.7, kv_budget_bits=4, groups=3)
    params = {"s0": 0.2, "s1": -0.1, "s2": 0.25, "kv0": 16, "kv1": 2, "kv2": 8}
    plan = suggest_plan(optuna.trial.FixedTrial(params), space, [1.0] * 6, "wanda")
    assert plan.mean_sparsity == pytest.approx(0.7, abs=1e-9) and plan.mean_kv_bits <= 4
    assert plan.sparsity[0] == plan.sparsity[1] and plan.sparsity[2] == plan.sparsity[3]  # bins of two layers
    assert plan.sparsity[2] < plan.sparsity[0] < plan.sparsity[4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_sparsity=1.0), r"target sparsity must be in \[0, 1\); got 1.0"),
    (dict(target_sparsity=-0.1), r"target sparsity must be in \[0, 1\)"),
    (dict(kv_widths=(2, 5)), "kv width 5 not supported; allowed: 2, 3, 4, 6, 8, 16"),
    (dict(kv_widths=()), "the set of KV widths is empty"),
    (dict(kv_budget_bits=1), "below the narrowest allowed width 2"),
    (dict(objective="perplexity"), "unknown objective 'perplexity' for task 'shapes'; allowed: accuracy, loss"),
    (dict(groups=7), "groups must be between 1 and the number of layers"),
])
def test_bad_search_arguments_fail_clearly_and_write_nothing(default, tmp_path, kwargs, message):
    db = tmp_path / "s.db"
    with pytest.raises(ValueError, match=message):
        search(default, SHAPES, PerLayerConfig(n_trials=2, **kwargs), storage=f"sqlite:///{db}")
    assert not db.exists()


@pytest.fixture(scope="module")
def pruner(default):
    return Pruner.for_task(default, get_task("shapes"), n=64)


def test_warm_starts_come_first_and_a_rerun_resumes_the_study(default, pruner, tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    first = search(default, SHAPES, PerLayerConfig(target_sparsity=0.6, kv_budget_bits=4, n_trials=3, **FAST),
                   storage=storage, study_name="s", pruner=pruner)
    trials = first.study.trials
    assert [t.user_attrs["source"] for t in trials] == ["uniform", "owl", "tpe"]
    assert trials[0].user_attrs["plan"]["sparsity"] == pytest.approx([0.6] * default.num_layers)
    assert trials[1].user_attrs["plan"]["sparsity"] == pytest.approx(pruner.allocation("owl", 0.6))
    assert all(t.user_attrs["plan"]["kv_bits"] == [4] * default.num_layers for t in trials[:2])
    assert first.study.best_value >= max(t.value for t in trials[:2])
    for t in trials:
        assert t.user_attrs["mean_sparsity"] == pytest.approx(0.6) and t.user_attrs["mean_kv_bits"] <= 4

    again = search(default, SHAPES, PerLayerConfig(target_sparsity=0.6, kv_budget_bits=4, n_trials=5, **FAST),
                   storage=storage, study_name="s", pruner=pruner)
    resumed = again.study.trials
    assert len(resumed) == 5 and [t.params for t in resumed[:3]] == [t.params for t in trials]
    assert [t.value for t in resumed[:3]] == [t.value for t in trials]
    table = trials_table(again.study)
    assert list(table.trial) == [0, 1, 2, 3, 4] and (table.best_so_far.diff().dropna() >= 0).all()

    with pytest.raises(ValueError, match="was created with other settings"):
        search(default, SHAPES, PerLayerConfig(target_sparsity=0.7, kv_budget_bits=4, n_trials=5, **FAST),
               storage=storage, study_name="s", pruner=pruner)


def _finished(storage: str, name: str) -> int:
    study = optuna.load_study(study_name=name, storage=storage)
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def test_a_search_killed_mid_trial_loses_no_finished_trial(default, pruner, tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    args = ["search", "--space", "per-layer", "--target-sparsity", "0.5", "--kv-budget", "6", "--n-trials", "200", "--storage", storage,
            "--study-name", "k", "--n-eval", "32", "--kv-group-size", "8", "--kv-residual", "8",
            "--out-dir", str(tmp_path), "--heartbeat", "1"]  # the study's heartbeat: a killed trial is stale after 3 s
    proc = subprocess.Popen([sys.executable, "-m", "lmmlab", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                if _finished(storage, "k") >= 3:
                    break
            except (KeyError, Exception):  # the study may not exist yet
                continue
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = optuna.load_study(study_name="k", storage=storage).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    assert len(before) >= 3
    resumed = search(default, SHAPES, PerLayerConfig(target_sparsity=0.5, kv_budget_bits=6, n_trials=len(before) + 1, **FAST),
                     storage=storage, study_name="k", pruner=pruner)
    after = resumed.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(after) == len(before) + 1
    assert [(t.number, t.value, t.params) for t in after[: len(before)]] == [(t.number, t.value, t.params)
                                                                          for t in before]


def test_multi_objective_returns_a_non_dominated_front(default, pruner, tmp_path):
    result = search(default, SHAPES, PerLayerConfig(multi_objective=True, n_trials=14, target_range=(0.4, 0.8), **FAST),
                    storage=f"sqlite:///{tmp_path / 'm.db'}", study_name="m", pruner=pruner)
    complete = result.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    front = result.study.best_trials
    assert front and len(result.front) == len(front)

    def dominates(a, b):  # maximise accuracy, minimise memory
        return a.values[0] >= b.values[0] and a.values[1] <= b.values[1] and a.values != b.values
    assert not any(dominates(t, f) for t in complete for f in front)
    assert not any(dominates(a, b) for a in front for b in front)
    assert len({round(t.user_attrs["mean_sparsity"], 6) for t in complete}) > 2  # the budget itself is searched
    assert result.best_plan == result.front[0]
    for t in complete:
        assert t.values[1] == t.user_attrs["weight_bytes"] + t.user_attrs["kv_bytes_at_context"]


def test_search_command_writes_the_trials_and_the_best_plan(default, tmp_path, capsys):
    from lmmlab.plan import CompressionPlan

    storage = f"sqlite:///{tmp_path / 'c.db'}"
    assert main(["search", "--space", "per-layer", "--target-sparsity", "0.6", "--kv-budget", "4", "--n-trials", "3", "--storage", storage,
                 "--study-name", "cli", "--n-eval", "32", "--kv-group-size", "8", "--kv-residual", "8",
                 "--out-dir", str(tmp_path)]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "cli_trials.csv")
    assert len(table) == 3 and {"primary", "accuracy", "loss", "memory_bytes", "sparsity", "kv_bits", "source"} <= set(table)
    plan = CompressionPlan.load(tmp_path / "cli_best_plan.json")
    assert plan.mean_sparsity == pytest.approx(0.6) and plan.mean_kv_bits <= 4
    assert "3 finished trials" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # starts fresh Python processes: seconds of start-up each, kept out of `make test-fast`
def test_dashboard_serves_the_study_database_on_loopback(tmp_path):
    storage = f"sqlite:///{tmp_path / 'd.db'}"
    optuna.create_study(storage=storage, study_name="d").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmmlab", "dashboard", "--storage", storage, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    body = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the dashboard did not answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["d"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_warm_start_parameters_cover_uniform_and_owl_in_both_modes():
    owl = [0.62, 0.55, 0.7, 0.75, 0.68, 0.7]
    single = warm_start_params(SearchSpace(6, 0.6666666, 6), {"owl": owl})
    assert [name for name, _ in single] == ["uniform", "owl"]
    assert all(p[f"kv{i}"] == 6 for _, p in single for i in range(6))
    multi = warm_start_params(SearchSpace(6, multi_objective=True, target_range=(0.4, 0.8)), {"owl": owl})
    assert {(p["target_sparsity"], p["kv_budget"]) for _, p in multi} == {
        (t, kv) for t in (0.4, 0.6000000000000001, 0.8) for kv in (16, 2)}


def test_a_window_longer_than_the_prompts_is_reported(default, pruner, tmp_path, caplog):
    search(default, SHAPES, PerLayerConfig(target_sparsity=0.5, kv_budget_bits=4, n_trials=1, n_eval=16),
           storage=f"sqlite:///{tmp_path / 'w.db'}", pruner=pruner)  # KIVI's 32 / 128 on ~20-token prompts
    assert "quantized nothing" in caplog.text and "128-token residual window" in caplog.text


def test_loss_objective_minimises_the_validation_loss(default, pruner, tmp_path):
    result = search(default, SHAPES, PerLayerConfig(target_sparsity=0.7, kv_budget_bits=16, n_trials=3, objective="loss", groups=2, **FAST),
                    storage=f"sqlite:///{tmp_path / 'l.db'}", pruner=pruner)
    trials = result.study.trials
    assert result.study.direction == optuna.study.StudyDirection.MINIMIZE
    assert [t.value for t in trials] == [t.user_attrs["loss"] for t in trials]
    assert result.study.best_value == min(t.value for t in trials)
    for t in trials:  # two bins: layers 0-2 share one choice, layers 3-5 another
        s = t.user_attrs["plan"]["sparsity"]
        assert s[0] == s[1] == s[2] and s[3] == s[4] == s[5]


def test_bench_search_reports_overhead_and_throughput(default):
    from lmmlab.lab.bench import bench_search

    result = bench_search(default, SHAPES, n_trials=3, multi_fidelity_trials=6, n_eval=128)
    for key in ("trial_overhead_s", "trial_eval_s", "trial_sample_s", "trials_per_min", "minutes_per_100_trials",
                "trials_per_min_multifidelity", "multifidelity_wall_s"):
        assert result[key] > 0
    assert result["n_eval"] == 128
    assert result["multifidelity_trials"] == 6 and 0 <= result["multifidelity_pruned"] <= 6 - 2  # warm starts run
    low, high = result["best_objective_ci"]
    assert low <= result["best_objective"] <= high and 0 <= result["paired_p"] <= 1
    assert result["multifidelity_within_interval"] == (low <= result["best_objective_multifidelity"] <= high)
    assert result["overhead_over_eval"] == pytest.approx(result["trial_overhead_s"] / result["trial_eval_s"])
    assert result["minutes_per_100_trials"] == pytest.approx(100 / result["trials_per_min"])


def test_search_on_the_text_task_minimises_perplexity_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    """The objective is the task's primary metric in its direction: perplexity, minimised, on validation windows."""
    from lmmlab.models import load_model

    words = data.vocabulary()
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(rng.choice(words) for _ in range(6000)))
    loaded = load_model(tiny_llama_dir, device="cpu")
    task = get_task("text", data=str(corpus), seqlen=32, prefill=16, chunk=4)
    result = search(loaded, task, PerLayerConfig(target_sparsity=0.5, kv_budget_bits=4, n_trials=4, n_eval=4, kv_group_size=8, kv_residual=8),
                    storage=f"sqlite:///{tmp_path / 't.db'}")
    trials = result.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert result.study.direction == optuna.study.StudyDirection.MINIMIZE
    assert all(t.user_attrs["primary_metric"] == "perplexity" for t in trials)
    assert [t.value for t in trials] == [t.user_attrs["primary"] for t in trials]
    assert result.study.best_value == min(t.value for t in trials)
    assert result.best_plan.kv_bits == result.study.best_trial.user_attrs["plan"]["kv_bits"]
    assert all(t.user_attrs["mean_kv_bits"] <= 4 for t in trials)
    effective = search(loaded, task, PerLayerConfig(target_sparsity=0.5, kv_budget_bits=9, n_trials=3, n_eval=4, kv_group_size=8, kv_residual=8, kv_budget_unit="effective", context_tokens=100),
                       storage=f"sqlite:///{tmp_path / 't.db'}")  # a study of its own: the budget differs
    assert effective.study.study_name.endswith("kv9e")  # 9 effective bits: 4-bit costs 8.48 at 100 tokens
    for t in effective.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        plan = CompressionPlan(**t.user_attrs["plan"])
        assert t.user_attrs["mean_kv_bits_effective"] == pytest.approx(plan.mean_effective_kv_bits(loaded.head_dim, 100))
        assert t.user_attrs["mean_kv_bits_effective"] <= 9 + 1e-9
    table = trials_table(result.study)
    assert (table.best_so_far == table.objective.cummin()).all() and "perplexity" in table


def test_kv_projection_in_effective_bits_meets_the_budget_in_that_unit():
    """A budget in effective bits (what a width really stores at a context: codes, scales, zero points, windows)
    is met in that unit; a budget a nominal width meets may not be met effectively."""
    from lmmlab.kv.budget import effective_bits

    widths = (2, 3, 4, 6, 8, 16)
    cost = {b: effective_bits(b, head_dim=64, context=1000, group_size=32, residual_length=128) for b in widths}
    assert cost[16] == 16.0 and all(cost[b] > b for b in widths if b < 16)  # overheads on every quantized width
    g = torch.Generator().manual_seed(2)
    for _ in range(200):
        n = int(torch.randint(1, 33, (1,), generator=g))
        raw = [widths[int(i)] for i in torch.randint(0, 6, (n,), generator=g)]
        budget = float(torch.rand(1, generator=g)) * 12 + cost[2]
        bits = fit_kv_bits(raw, budget, widths, cost)
        assert sum(cost[b] for b in bits) / n <= budget + 1e-9 and all(b <= r for b, r in zip(bits, raw))
    assert fit_kv_bits([4, 4], 6.0, widths) == [4, 4]  # nominal: 4 bits meet a 6-bit budget
    assert fit_kv_bits([4, 4], 6.0, widths, cost) == [4, 3]  # effectively 4 bits cost 6.28 here
    space = SearchSpace(4, kv_budget_bits=6.0, kv_unit="effective", kv_cost=tuple(cost[b] for b in widths))
    assert space.widest_in_budget == 3 and SearchSpace(4, kv_budget_bits=6.0).widest_in_budget == 6
    with pytest.raises(ValueError, match="unknown KV budget unit 'bytes'; allowed: nominal, effective"):
        SearchSpace(4, kv_unit="bytes")
    with pytest.raises(ValueError, match="below the narrowest allowed width 2"):
        SearchSpace(4, kv_budget_bits=2.0, kv_unit="effective", kv_cost=tuple(cost[b] for b in widths))
