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
