"""`lmmlab bench memory` at a tiny width: what it measures and how it extrapolates (its targets live in the JSON)."""
import json

import pytest

from cli_runner import run_cli
from lmmlab.lab.bench_memory import MODEL_SHAPES, bench_memory, extrapolate


def llama_parameters(hidden, intermediate, vocab, layers):
    """Parameters of a Llama with untied embeddings: per layer 4 attention matrices, 3 MLP ones and 2 norms."""
    return 2 * vocab * hidden + hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)


def test_extrapolation_is_the_line_through_the_two_depths():
    assert extrapolate(10.0, 14.0, 2, 4, 32) == 10.0 + 2.0 * 30
    assert extrapolate(5.0, 5.0, 1, 2, 40) == 5.0


@pytest.mark.slow  # starts fresh Python processes: seconds of start-up each, kept out of `make test-fast`
def test_memory_bench_measures_every_phase_and_extrapolates_the_model_exactly(tmp_path):
    shape = MODEL_SHAPES["tiny"]
    r = bench_memory("tiny", layers=4, n_calibration=4, n_eval=2, repeat=1, workdir=tmp_path)
    assert r["depths_measured"] == [2, 4] and r["full_depth"] == shape["num_hidden_layers"]
    full = llama_parameters(shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"],
                            shape["num_hidden_layers"])
    assert r["model_bytes"] == 2 * full  # fp16, extrapolated from two depths: exact, parameters grow linearly
    for d, m in r["measured"].items():
        assert m["model_bytes"] == 2 * llama_parameters(shape["hidden_size"], shape["intermediate_size"],
                                                        shape["vocab_size"], int(d))
        assert m["dense_source"] == "checkpoint"  # on the CPU the dense weights are read back, not copied
        for phase in ("calibration", "setup", "trial"):
            assert m[phase]["host"] >= m["runtime_host_bytes"]  # a real peak of this process, model and all
    assert r["peak_over_model"] == r["phases"]["trial"]["device_over_model"]
    assert r["host_over_model"] == max(r["phases"][p]["host_over_model"] for p in ("calibration", "setup", "trial"))
    assert r["remask_s_per_layer"] > 0
    assert not any(tmp_path.iterdir())  # the checkpoints it built are gone


@pytest.mark.parametrize("args, message", [
    (["--shape", "llava-2-70b"], "unknown shape 'llava-2-70b'; allowed: llava-1.5-7b, llava-1.5-13b, tiny"),
    (["--shape", "tiny", "--layers", "1"], "--layers must be between 2 and 8 for tiny"),
])
def test_bad_memory_bench_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "memory.json"
    proc = run_cli("bench", "memory", *args, "--json", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"lmmlab bench: error: {message}"] or message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow  # starts fresh Python processes: seconds of start-up each, kept out of `make test-fast`
def test_memory_bench_json_from_the_cli(tmp_path):
    out = tmp_path / "memory.json"
    proc = run_cli("bench", "memory", "--shape", "tiny", "--layers", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {"peak_over_model", "host_over_model", "remask_s_per_layer", "phases"} <= set(result)
    assert result["depths_measured"] == [1, 2]
