"""Scale-out search: several `lmmlab search` workers on one study in a real PostgreSQL server (tests/postgres_server.py)
or one journal file. Workers are real subprocesses on the cached toy model (`lmmlab-default`, shapes, 16 validation
items a trial, about a second)."""
import importlib.util
import os
import signal
import subprocess
import sys
import time
from itertools import combinations

import optuna
import pytest

from lmmlab.cli import main
from lmmlab.search.per_layer import SearchSpace, open_study, run_until, trials_ahead, worker_seed
from lmmlab.search.storage import (HeartbeatJournalStorage, HeartbeatRDBStorage, check_storage, resolve_url,
                                   storage_for)

optuna.logging.set_verbosity(optuna.logging.WARNING)
COMPLETE, RUNNING = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING
LAYERS = 6  # the toy model's decoder layers: a trial suggests s0..s5 and kv0..kv5


def worker(storage: str, study: str, name: str, n_trials: int, out_dir) -> subprocess.Popen:
    args = ["search", "--space", "per-layer", "--model", "lmmlab-default", "--task", "shapes", "--target-sparsity", "0.5", "--kv-budget", "6",
            "--n-trials", str(n_trials), "--storage", storage, "--study-name", study, "--worker", name,
            "--heartbeat", "1", "--n-eval", "16", "--kv-group-size", "8", "--kv-residual", "8",
            "--out-dir", str(out_dir / name)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two workers share the cores
    return subprocess.Popen([sys.executable, "-m", "lmmlab", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def check_two_workers(storage: str, study_name: str, n_trials: int, tmp_path) -> dict:
    """Two workers started at the same moment on one new study; returns the run's figures."""
    start = time.perf_counter()
    procs = {name: worker(storage, study_name, name, n_trials, tmp_path) for name in ("a", "b")}
    results = {name: finish(proc) for name, proc in procs.items()}
    wall = time.perf_counter() - start
    for name, (code, out, err) in results.items():
        assert code == 0, f"worker {name}: {err[-2000:]}"
    trials = optuna.load_study(study_name=study_name, storage=storage_for(storage)).trials
    complete = [t for t in trials if t.state == COMPLETE]
    assert len(complete) == n_trials
    sources = [t.user_attrs.get("source") for t in trials]
    assert sources.count("uniform") == 1 and sources.count("owl") == 1  # enqueued once, by the creator only
    assert [t.user_attrs["source"] for t in complete[:2]] == ["uniform", "owl"]  # and run first
    tpe = [t for t in complete if t.user_attrs["source"] == "tpe"]
    duplicates = sum(a.params == b.params for a, b in combinations(tpe, 2))
    assert duplicates == 0
    seeds = {t.user_attrs["worker"]: t.user_attrs["sampler_seed"] for t in complete}
    assert seeds == {"a": worker_seed(0, "a"), "b": worker_seed(0, "b")} and seeds["a"] != seeds["b"]
    figures = {"trials": len(complete), "all_trials": len(trials), "wall_s": round(wall, 1), "duplicates": duplicates,
               "by_worker": {w: sum(t.user_attrs["worker"] == w for t in complete) for w in seeds}, "seeds": seeds}
    print(f"\ntwo workers on {storage.split(':')[0]}: {figures}")
    return figures


def test_two_workers_share_one_postgres_study(default, postgres_server, tmp_path):
    check_two_workers(postgres_server.database("two"), "two", 10, tmp_path)


def test_two_workers_share_one_journal_file(default, tmp_path):
    check_two_workers(f"journal:///{tmp_path / 'studies.log'}", "journal", 8, tmp_path)


def test_a_killed_worker_loses_no_trial(default, postgres_server, tmp_path):
    """Worker a is killed (SIGKILL) mid-trial; worker b fails a's trial once its heartbeats stop, runs it again and
    finishes the study with exactly n_trials."""
    storage, n_trials = postgres_server.database("kill"), 10
    procs = {name: worker(storage, "kill", name, n_trials, tmp_path) for name in ("a", "b")}
    rdb = optuna.storages.RDBStorage(storage)
    killed = None
    try:
        deadline = time.time() + 180
        while killed is None and time.time() < deadline and procs["a"].poll() is None:
            time.sleep(0.1)
            try:
                study = optuna.load_study(study_name="kill", storage=rdb)
            except KeyError:  # not created yet
                continue
            if len(study.get_trials(deepcopy=False, states=(COMPLETE,))) < 3:  # kill a in the middle of the run
                continue
            for t in study.get_trials(deepcopy=False, states=(RUNNING,)):
                if t.user_attrs.get("worker") == "a" and len(t.params) == 2 * LAYERS:  # suggested, evaluating
                    os.kill(procs["a"].pid, signal.SIGKILL)
                    killed = t
                    break
    finally:
        procs["a"].kill()
        procs["a"].wait()
    assert killed is not None, "worker a never ran a trial"
    assert rdb.get_trial(killed._trial_id).state == RUNNING  # killed mid-trial
    code, _, err = finish(procs["b"])
    assert code == 0, err[-2000:]

    trials = optuna.load_study(study_name="kill", storage=rdb).trials
    complete = [t for t in trials if t.state == COMPLETE]
    assert len(complete) == n_trials
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL  # failed by b once its heartbeat stopped
    retries = [t for t in complete if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params and retries[0].number > killed.number
    assert retries[0].user_attrs["worker"] == "b"
    print(f"\nkilled worker a in trial {killed.number}; retried as trial {retries[0].number}; "
          f"{len(complete)} finished of {len(trials)} trials")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_samplers_use_constant_liar_and_each_worker_its_own_seed(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    space, settings = SearchSpace(4), {"test": 1}

    def first_suggestion(name: str) -> float:
        study = open_study(space, storage, "seeds", "maximize", worker_seed(0, name), settings,
                           heartbeat=2 if name == "a" else 30)
        assert study.sampler._constant_liar  # the other workers' running trials count as bad ones
        assert study._storage.get_heartbeat_interval() == 2  # the creator's: all workers of a study beat alike
        return study.ask().suggest_float("x", 0, 1)

    a, b, a_again = first_suggestion("a"), first_suggestion("b"), first_suggestion("a")
    assert a != b  # two workers on one study do not draw the same startup trials
    assert a == a_again  # a named worker is reproducible
    seeds = {worker_seed(seed, f"host-{pid}") for seed in (0, 1) for pid in range(500)}
    assert len(seeds) == 1000 and all(0 <= s < 2 ** 32 for s in seeds)
    assert worker_seed(0, "a") == worker_seed(0, "a") != worker_seed(1, "a")


def test_a_trial_counts_the_finished_running_and_queued_trials_before_it(tmp_path):
    """A trial with n_trials of those before it is surplus (pruned unevaluated): workers finish exactly n_trials."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'a.db'}")
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=x, value=1.0))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    study.ask()  # running
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    study.enqueue_trial({"x": 0.1})  # queued
    study.enqueue_trial({"x": 0.2})
    numbers = {t.number: t for t in study.trials}
    assert [trials_ahead(study, numbers[n]) for n in (0, 2, 4, 5)] == [0, 1, 2, 3]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_run_again(tmp_path, kind):
    """Optuna 5's JournalStorage has no heartbeats: lmmlab's records them. Optuna's RDBStorage never takes a trial
    without a heartbeat row for stale: lmmlab's does once its start is older than the grace period. Either way a
    killed worker's trial is retried instead of waited on for ever."""
    url = f"journal:///{tmp_path / 'j.log'}" if kind == "journal" else f"sqlite:///{tmp_path / 'j.db'}"
    storage = storage_for(url, heartbeat=1)
    assert isinstance(storage, HeartbeatJournalStorage if kind == "journal" else HeartbeatRDBStorage)
    study = optuna.create_study(study_name="j", storage=storage)
    dead = study.ask()  # a worker that asked, suggested, then died: no heartbeats follow
    x = dead.suggest_float("x", 0, 1)
    time.sleep(3.5)  # more than 3 heartbeats
    resumed = optuna.load_study(study_name="j", storage=storage_for(url, heartbeat=1))
    run_until(resumed, lambda t: t.suggest_float("x", 0, 1), n_trials=1, poll_s=1)
    trials = resumed.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, COMPLETE]
    assert trials[1].params == {"x": x} and trials[1].system_attrs["failed_trial"] == 0


def test_an_unreachable_database_is_one_line_and_exit_2(tmp_path, capsys):
    from postgres_server import free_port

    port = free_port()  # nothing listens there
    out = tmp_path / "out"
    assert main(["search", "--storage", f"postgresql://postgres@127.0.0.1:{port}/db", "--n-trials", "2",
                 "--out-dir", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"cannot connect to the postgresql database at 127.0.0.1:{port}" in lines[0]
    assert "refused" in lines[0].lower()  # the reason, as the client library gives it
    assert not out.exists()


def test_a_database_that_refuses_gives_the_servers_reason(postgres_server, tmp_path, capsys):
    url = postgres_server.url.rsplit("/", 1)[0] + "/no_such_db"
    assert main(["search", "--storage", url, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'database "no_such_db" does not exist' in err
    assert f"127.0.0.1:{postgres_server.port}" in err and not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("MySQLdb") is not None, reason="a MySQL driver is installed")
def test_a_missing_database_driver_names_what_to_install(tmp_path, capsys):
    assert main(["search", "--storage", "mysql://u@127.0.0.1/db", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "the database driver for mysql (MySQLdb) is not installed: install a SQLAlchemy driver for mysql" in err
    with pytest.raises(ValueError, match="unknown database 'nosuchdb'"):
        check_storage("nosuchdb://x/y")
    with pytest.raises(ValueError, match="three slashes"):
        check_storage("journal://x.log")


def test_a_plain_postgresql_url_gets_the_installed_driver():
    assert resolve_url("postgresql://u:pw@h:5/db") == "postgresql+psycopg://u:pw@h:5/db"
    assert resolve_url("sqlite:///a/b.db") == "sqlite:///a/b.db"
    assert resolve_url("journal:///a/b.log") == "journal:///a/b.log"
