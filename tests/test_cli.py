import json
import subprocess
import sys

import pytest

from lmmlab.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "lmmlab", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", ["demo", "train-default", "eval"])
def test_every_command_has_help(command):
    out = run(command, "--help")
    assert out.returncode == 0 and "usage: lmmlab" in out.stdout


def test_eval_prints_a_table_and_writes_json(default, tmp_path, capsys):
    path = tmp_path / "m.json"
    assert main(["eval", "--split", "validation", "--n", "64", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "position" in out
    metrics = json.loads(path.read_text())
    assert metrics["n"] == 64 and set(metrics["accuracy_by_kind"]) == {"colour", "count", "exists", "position"}
    assert {"accuracy", "loss", "latency_s", "peak_mem_bytes"} <= set(metrics)


@pytest.mark.parametrize("args, message", [
    (["eval", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["eval", "--dtype", "float13"], "unknown dtype 'float13'"),
])
def test_user_mistakes_give_one_line_and_exit_code_2_and_write_nothing(args, message, tmp_path):
    path = tmp_path / "m.json"
    out = run(*args, "--json", str(path))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr
    assert not path.exists()


def test_unknown_split_is_rejected_by_the_parser():
    out = run("eval", "--split", "tset")
    assert out.returncode == 2 and "invalid choice: 'tset'" in out.stderr


def test_prune_saves_a_loadable_pruned_model_with_its_plan(default, tmp_path, capsys):
    from lmmlab.models import load_model
    from lmmlab.plan import CompressionPlan

    out = tmp_path / "pruned"
    assert main(["prune", "--method", "wanda", "--pattern", "2:4", "--out", str(out)]) == 0
    plan = CompressionPlan.load(out / "compression_plan.json")
    assert plan.pattern == "2:4" and plan.sparsity == [0.5] * default.num_layers
    pruned = load_model(out, device="cpu")
    for i in range(pruned.num_layers):
        for W in (lin.weight for lin in pruned.linears(i).values()):
            assert ((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) == 2).all()
    assert "achieved 0.500" in capsys.readouterr().out


def test_prune_with_owl_and_a_plan_file(default, tmp_path):
    from lmmlab.plan import CompressionPlan

    assert main(["prune", "--allocation", "owl", "--sparsity", "0.6", "--out", str(tmp_path / "owl")]) == 0
    plan = CompressionPlan.load(tmp_path / "owl" / "compression_plan.json")
    assert plan.mean_sparsity == pytest.approx(0.6) and len(set(plan.sparsity)) > 1
    plan_file = tmp_path / "plan.json"
    CompressionPlan([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], method="magnitude").save(plan_file)
    assert main(["prune", "--plan", str(plan_file), "--out", str(tmp_path / "fromplan")]) == 0


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "--sparsity must be in [0, 1); got 1.5"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pattern", "2:4", "--allocation", "owl"], "needs an unstructured pattern"),
    (["--vision-sparsity", "-0.1"], "--vision-sparsity must be in [0, 1)"),
])
def test_prune_rejects_bad_input_and_writes_nothing(args, message, tmp_path, default):
    out = tmp_path / "x"
    result = run("prune", *args, "--out", str(out))
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_prune_rejects_a_plan_for_another_model(default, tmp_path):
    from lmmlab.plan import CompressionPlan

    CompressionPlan([0.5, 0.5]).save(tmp_path / "plan.json")
    result = run("prune", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "plan has 2 layers but the model has 6" in result.stderr
    assert not (tmp_path / "x").exists()


def test_ablate_prune_writes_a_tidy_csv(default, tmp_path):
    import pandas as pd

    out = tmp_path / "ablate.csv"
    assert main(["ablate-prune", "--methods", "magnitude", "wanda", "--sparsities", "0.5", "0.8", "--n", "64",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert len(table) == 1 + 2 * 2 * 2 + 2 * 2  # dense, method x allocation x sparsity, method x N:M pattern
    assert {"method", "allocation", "pattern", "target_sparsity", "achieved_sparsity", "mean_kv_bits",
            "weight_bytes", "kv_bytes", "accuracy", "accuracy_count", "loss", "split", "seed"} <= set(table.columns)
    pruned = table[table.allocation != "dense"]
    assert (abs(pruned.achieved_sparsity - pruned.target_sparsity) < 0.01).all()
    dense_bytes = table[table.allocation == "dense"].weight_bytes.item()
    assert (pruned.weight_bytes < dense_bytes).all()
    assert (table[table.target_sparsity == 0.8].accuracy < table[table.allocation == "dense"].accuracy.item()).all()


def test_bench_prune_prints_json(default, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "prune", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("calib_forward_s", "wanda_s", "sparsegpt_s", "remask_s", "eval_s", "achieved_sparsity"):
        assert result[key] > 0
    assert result["achieved_sparsity"] == pytest.approx(0.5)
    assert json.loads(capsys.readouterr().out) == result
