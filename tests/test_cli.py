import json
import subprocess
import sys

import pytest

from lmmlab.cli import main
from lmmlab.kv.budget import kv_nbytes
from lmmlab.lab.headline import SAME_WEIGHTS_16
from cli_runner import run_cli as run


def test_every_command_has_help(capsys):
    from lmmlab.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo", "eval", "prune", "export", "search", "compare", "bench", "dashboard"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: lmmlab {command}" in capsys.readouterr().out


def test_the_search_and_demo_commands_default_to_the_library_configs():
    from dataclasses import replace

    from lmmlab.cli import build_parser, demo_config, staged_config
    from lmmlab.lab.demo import STORAGE, DemoConfig
    from lmmlab.search.staged import SearchConfig

    parser = build_parser()
    assert staged_config(parser.parse_args(["search"])) == SearchConfig()
    args = parser.parse_args(["demo"])
    assert demo_config(args) == DemoConfig() and args.storage == STORAGE
    given = demo_config(parser.parse_args(["demo", "--offspring", "3", "--n", "5", "--sparsities", "0.6", "0.7"]))
    assert given == replace(DemoConfig(), n=5, sparsities=(0.6, 0.7), search=replace(DemoConfig().search, offspring=3))
    for command in ("demo", "headline"):  # they take lists of targets; a single target is not an option of theirs
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([command, "--target-sparsity", "0.5"])
        assert exit_.value.code == 2


def test_eval_prints_a_table_and_writes_json(default, tmp_path, capsys):
    path = tmp_path / "m.json"
    assert main(["eval", "--split", "validation", "--n", "64", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "position" in out
    metrics = json.loads(path.read_text())
    assert metrics["n"] == 64 and metrics["task"] == "shapes"
    assert (metrics["primary_metric"], metrics["direction"]) == ("accuracy", "maximize")
    assert metrics["primary"] == metrics["accuracy"]
    assert {f"accuracy_{k}" for k in ("colour", "count", "exists", "position")} <= set(metrics)
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


@pytest.mark.slow  # starts fresh Python processes: seconds of start-up each, kept out of `make test-fast`
def test_python_dash_m_lmmlab_gives_the_same_one_line_and_exit_code_2(tmp_path):
    """The real `python -m lmmlab` (the other tests run the CLI in-process): its exit code and whole stderr."""
    path = tmp_path / "m.json"
    out = subprocess.run([sys.executable, "-m", "lmmlab", "eval", "--model", "no-such-model", "--json", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "unknown model 'no-such-model'" in out.stderr
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
    assert {"method", "allocation", "pattern", "calibration", "target_sparsity", "achieved_sparsity", "mean_kv_bits",
            "mean_kv_bits_effective", "weight_bytes", "kv_bytes", "accuracy", "accuracy_count", "loss", "split", "seed",
            "ci_low", "ci_high", "versus", "p_value", "verdict"} <= set(table.columns)
    assert "per_item" not in table.columns
    pruned = table[table.allocation != "dense"]
    assert (abs(pruned.achieved_sparsity - pruned.target_sparsity) < 0.0005).all()  # the same zeros for all
    assert set(pruned[pruned.method == "wanda"].calibration) == {"sequential"}  # as published
    assert set(pruned[pruned.method == "magnitude"].calibration) == {"none"}
    assert ((table.ci_low <= table.accuracy) & (table.accuracy <= table.ci_high)).all()
    for _, group in pruned.groupby(["pattern", "target_sparsity"]):  # one reference per group: its best row
        assert (group.verdict == "reference").sum() == 1
        assert group[group.verdict == "reference"].accuracy.item() == group.accuracy.max()
        assert set(group.verdict) <= {"reference", "better", "worse", "tie"}
        assert (group[group.verdict.isin(["better", "worse"])].p_value < 0.05).all()
        assert (group[group.verdict == "tie"].p_value >= 0.05).all()
    dense_bytes = table[table.allocation == "dense"].weight_bytes.item()
    assert (pruned.weight_bytes < dense_bytes).all()
    # 80 % costs every plan loss (the toy's accuracy on 64 items may stay at the dense model's: it trains to other
    # weights on another CPU or thread count)
    assert (table[table.target_sparsity == 0.8].loss > table[table.allocation == "dense"].loss.item()).all()


def test_ablate_calibration_pairs_sequential_with_one_pass_on_the_same_items(default, tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "calibration.csv"
    assert main(["ablate-calibration", "--methods", "wanda", "--sparsities", "0.6", "--n", "48",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out).set_index("calibration")
    assert list(table.index) == ["one-pass", "sequential"]
    assert table.loc["one-pass", "verdict"] == "reference" and table.loc["sequential", "versus"] == "wanda-one-pass"
    assert 0 < table.loc["sequential", "p_value"] <= 1
    assert table.loc["sequential", "verdict"] == ("tie" if table.loc["sequential", "p_value"] >= 0.05 else
                                                  "better" if table.accuracy.diff().iloc[-1] > 0 else "worse")
    assert table.achieved_sparsity.nunique() == 1
    assert "wrote" in capsys.readouterr().out


def test_bench_prune_prints_json(default, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "prune", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("calib_forward_s", "wanda_s", "sparsegpt_s", "remask_s", "eval_s", "achieved_sparsity"):
        assert result[key] > 0
    assert result["achieved_sparsity"] == pytest.approx(0.5)
    assert json.loads(capsys.readouterr().out) == result


def test_ablate_kv_writes_accuracy_and_true_bytes_per_plan(default, tmp_path):
    import pandas as pd

    out = tmp_path / "kv.csv"
    assert main(["ablate-kv", "--widths", "16", "4", "2", "--kv-group-size", "8", "--kv-residual", "8", "--n", "64",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out).set_index("kv_plan")
    assert list(table.index) == ["uniform-16", "uniform-4", "uniform-2", "early-8-late-2", "early-2-late-8",
                                 "early-6-late-3", "early-3-late-6"]
    assert {"kv_bits", "mean_kv_bits", "kv_bytes", "kv_ratio", "accuracy", "loss", "kv_group_size"} <= set(table.columns)
    assert table.loc["early-8-late-2", "kv_bits"] == "8-8-8-2-2-2"
    kv = table.kv_bytes
    assert kv["uniform-2"] < kv["uniform-4"] < kv["early-8-late-2"] == kv["early-2-late-8"] < kv["uniform-16"]
    assert table.loc["uniform-16", "kv_ratio"] == 2.0  # fp32 states against the fp16 reference
    assert abs(table.loc["uniform-4", "accuracy"] - table.loc["uniform-16", "accuracy"]) < 0.05


def test_ablate_kv_warns_when_the_window_swallows_the_prompt(default, tmp_path, caplog):
    assert main(["ablate-kv", "--widths", "4", "--no-mixed", "--n", "16", "--out", str(tmp_path / "kv.csv")]) == 0
    assert "nothing was quantized" in caplog.text and "128-token residual window" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["ablate-kv", "--widths", "16", "5"], "kv bit-width 5 not supported; allowed: 2, 3, 4, 6, 8, 16"),
    (["ablate-kv", "--kv-group-size", "8", "--kv-residual", "12"], "positive multiple of the kv group size 8"),
    (["ablate-kv", "--kv-group-size", "64", "--kv-residual", "128"], "must divide the head dimension 32"),
])
def test_ablate_kv_rejects_bad_layouts_and_writes_nothing(args, message, tmp_path, default):
    path = tmp_path / "kv.csv"
    out = run(*args, "--out", str(path))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and message in out.stderr
    assert not path.exists()


def test_eval_with_a_quantized_kv_cache(default, capsys):
    assert main(["eval", "--split", "validation", "--n", "32", "--kv-bits", "2", "--kv-group-size", "8",
                 "--kv-residual", "8"]) == 0
    assert "KV bits 2-2-2-2-2-2" in capsys.readouterr().out
    assert main(["eval", "--n", "8", "--kv-bits", "4", "8"]) == 2
    assert "--kv-bits has 2 widths" in capsys.readouterr().err


def test_bench_kv_prints_ratios_and_speeds(default, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "kv", "--decode-contexts", "160", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["context"] == 1024 and result["group_size"] == 32 and result["residual_length"] == 128
    # 1024 tokens: all 1024 keys and 896 values quantized (b-bit codes + two fp16 per 32 elements), 128 values in fp16
    for bits in (2, 4, 8):
        assert result[f"ratio_{bits}bit"] == pytest.approx(((1024 + 896) * (bits + 1) + 128 * 16) / (2048 * 16))
        assert result["ratio_by_context"]["1024"][str(bits)] == result[f"ratio_{bits}bit"]
    assert set(result["ratio_by_context"]) == {"1000", "1024", "4096"}
    for key in ("decode_tokens_per_s_16bit", "decode_tokens_per_s_4bit", "decode_tokens_per_s_2bit",
                "decode_tokens_per_s_4bit_dequantize", "decode_tokens_per_s_2bit_dequantize"):
        assert result["lmmlab-default"][key] > 0
    # decode steps at LLaVA-7B's shapes: the plain cache, then each quantized width read both ways
    assert result["bandwidth_gb_s"] > 0 and result["read_bandwidth_gb_s"] > 0
    assert result["decode_shape"] == "llava-1.5-7b"
    rows = {(r["bits"], r["path"]): r for r in result["decode"]}
    assert set(rows) == {(16, "plain"), (16, "static")} | {(b, p) for b in (8, 4, 2) for p in ("dequantize", "packed")}
    for (bits, path), r in rows.items():
        assert r["context"] == 160 and r["tokens_per_s"] > 0
        assert r["limit_tokens_per_s"] == pytest.approx(result["bandwidth_gb_s"] * 1e9 / r["bytes_per_step"])
        assert r["over_plain"] == pytest.approx(r["tokens_per_s"] / rows[16, "plain"]["tokens_per_s"])
        assert r["over_static"] == pytest.approx(r["tokens_per_s"] / rows[16, "static"]["tokens_per_s"])
        assert ("kernel_tokens_per_s" in r) == (path == "packed")
    # bytes per step: the cache after the prefill and the warm-up step (161 tokens); 16-bit = fp16
    assert rows[16, "plain"]["bytes_per_step"] == rows[16, "static"]["bytes_per_step"] == 32 * 32 * 161 * 128 * 2 * 2
    for bits in (8, 4, 2):
        assert rows[bits, "packed"]["bytes_per_step"] == rows[bits, "dequantize"]["bytes_per_step"] == kv_nbytes(
            [bits] * 32, 32, 128, 161)
    assert result["llava-1.5-7b"]["shape"] == [32, 32, 128]
    assert result["llava-1.5-7b"]["fp16_bytes"] == 32 * 2 * 32 * 1024 * 128 * 2
    assert json.loads(capsys.readouterr().out) == result
    assert main(["bench", "kv", "--decode-contexts", "0"]) == 2
    assert "--decode-contexts must be positive" in capsys.readouterr().err


def test_demo_tells_the_whole_story_and_writes_its_tables(default, tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(tmp_path)  # the demo writes under ./results
    out = run("demo", "--model", "lmmlab-default", "--storage", f"sqlite:///{tmp_path / 'd.db'}", "--sparsities", "0.7",
              "--kv-budgets", "4", "--n-trials", "3", "--n", "64", "--n-eval", "32", "--kv-group-size", "8",
              "--kv-residual", "8")
    assert out.returncode == 0, out.stderr
    for line in ("dense model on the test split", "pruning (calibrated as published, on 16 calibration items)",
                 "KV cache at uniform widths", "the staged search's joint plan vs the baselines", "demo finished"):
        assert line in out.stdout
    tables = tmp_path / "results" / "tables"
    prune = pd.read_csv(tables / "demo-lmmlab-default-shapes_prune.csv")
    assert set(prune.method) == {"magnitude", "wanda"} and "2:4" in set(prune.pattern)
    kv = pd.read_csv(tables / "demo-lmmlab-default-shapes_kv.csv")
    assert list(kv.kv_plan) == [f"uniform-{b}" for b in (16, 4, 3, 2)]
    versus = pd.read_csv(tables / "demo-lmmlab-default-shapes_compare.csv")
    search = versus[versus.allocation == "search"].iloc[0]
    assert search.target_sparsity == pytest.approx(0.7) and search.mean_kv_bits <= 4
    assert {"uniform", "owl", "search"} <= set(versus.allocation)
    assert {"ci_low", "ci_high", "versus", "p_value", "verdict", "achieved_sparsity", "calibration",
            "mean_kv_bits_effective"} <= set(versus.columns)
    assert versus.achieved_sparsity.max() - versus.achieved_sparsity.min() <= 0.0005
    items = pd.read_csv(tables / "demo-lmmlab-default-shapes_compare_items.csv")
    assert len(items) == 64 and set(items.stack().unique()) <= {0.0, 1.0}  # each question's correctness, per plan
    assert items.mean().round(6).tolist() == versus.primary.round(6).tolist()
    tests = pd.read_csv(tables / "demo-lmmlab-default-shapes_compare_paired.csv")
    # the three baselines (Holm), then the search's own weights with a 16-bit cache (its own test, outside the family)
    assert len(tests) == 4 and set(tests.better) <= {"search", "baseline", "tie"}
    assert tests.baseline.str.contains(SAME_WEIGHTS_16).tolist() == [False, False, False, True]
    assert (tests.ci_low <= tests.mean_diff).all() and (tests.mean_diff <= tests.ci_high).all()
    for name in ("prune", "kv"):
        assert (tmp_path / "results" / "figures" / f"demo-lmmlab-default-shapes_{name}.png").stat().st_size > 5000


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_llama_dir, tiny_llava_dir):
    """Files for the task error cases: empty, too short for one window, a record without its image, a schema that
    matches no benchmark, and a valid POPE file."""
    import vqa_fixtures

    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.txt").write_text("")
    (folder / "short.txt").write_text("is there a circle ?")
    (folder / "noimage.jsonl").write_text(json.dumps({"question_id": "1", "question": "is there a cat ?",
                                                       "answer": "yes", "image": "missing.png",
                                                       "category": "random"}) + "\n")
    (folder / "odd.jsonl").write_text(json.dumps({"prompt": "hello", "label": 1}) + "\n")
    vqa_fixtures.write_jsonl(vqa_fixtures.records("pope", 4), folder / "pope" / "pope.jsonl")
    return {"dir": folder, "llama": str(tiny_llama_dir), "llava": str(tiny_llava_dir)}


@pytest.mark.parametrize("args, message", [
    (["--task", "shape"], "unknown task 'shape'; allowed: "),
    (["--task", "text", "--task-option", "bogus=1"], "unknown option(s) bogus for task 'text'; allowed: "),
    (["--task", "text", "--task-option", "seqlen"], "is not KEY=VALUE"),
    (["--task", "text", "--data", "{dir}/nothing-here.txt"], "does not exist"),
    (["--task", "text", "--data", "{dir}/empty.txt"], "is empty"),
    (["--model", "{llama}", "--task", "text", "--data", "{dir}/short.txt"], "shorter than one window"),
    (["--model", "{llava}", "--task", "pope", "--data", "{dir}/noimage.jsonl"], "missing.png does not exist"),
    (["--model", "{llava}", "--task", "pope", "--data", "{dir}/odd.jsonl"], "does not hold pope data: no field(s)"),
    (["--model", "{llama}", "--task", "pope", "--data", "{dir}/pope/pope.jsonl"], "needs images"),
])
def test_task_mistakes_give_one_line_exit_2_and_write_nothing(args, message, bad_inputs, tmp_path):
    path = tmp_path / "m.json"
    out = run("eval", *[a.format(**bad_inputs) for a in args], "--n", "2", "--json", str(path))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr, out.stderr
    assert not path.exists()


def test_train_default_if_stale_finds_the_cached_toy_and_refuses_an_out_folder(default, tmp_path):
    """What `make test` runs first: with today's toy in the cache it trains nothing; --out is not what it looks at."""
    out = run("train-default", "--if-stale")
    assert out.returncode == 0 and "up to date" in out.stdout
    out = run("train-default", "--if-stale", "--out", tmp_path / "toy")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--if-stale" in out.stderr
    assert not (tmp_path / "toy").exists()
