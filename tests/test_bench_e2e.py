"""`lmmlab bench e2e` at the tiny shape: the rows' keys and the invariants the layout fixes (bytes read per token and
resident bytes fall with sparsity and KV width), a layout measured in a fresh process, and bad input as one line on
stderr, exit 2, nothing written. No speed thresholds: speeds on a shared machine are not invariants."""
import json

import pytest

from lmmlab.cli import main
from lmmlab.lab import bench_e2e as e2e

KEYS = {"shape", "context", "sparsity", "pattern", "kv_bits", "tokens_per_s", "peak_rss_bytes", "bytes_per_token",
        "prefill_s", "resident_bytes", "weight_bytes", "cache_bytes", "limit_tokens_per_s", "bandwidth_gb_s",
        "speedup_vs_dense", "resident_vs_dense", "achieved_sparsity", "plan"}


@pytest.fixture(scope="module")
def e2e_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "bench_e2e.json"
    assert main(["-q", "bench", "e2e", "--shape", "tiny", "--layers", "8", "--contexts", "160", "--plans", "dense",
                 "50%", "70%", "2:4", "--kv-widths", "16", "2", "--quick", "--in-process", "--threads", "1",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def rows(e2e_json):
    return json.loads(e2e_json.read_text())["rows"]


def test_rows_hold_every_plan_and_width_with_their_keys(rows):
    assert {(r["plan"], r["kv_bits"]) for r in rows} == {(p, b) for p in e2e.PLANS for b in (16, 2)}
    for r in rows:
        assert KEYS <= r.keys(), KEYS - r.keys()
        assert (r["shape"], r["context"], r["depths_measured"], r["full_depth"]) == ("tiny", 160, [8], 8)
        assert r["peak_rss_bytes"] > r["resident_bytes"] > 0  # the Python runtime is resident too
        assert r["resident_bytes"] == r["weight_bytes"] + r["cache_bytes"]
        assert abs(r["achieved_sparsity"] - r["sparsity"]) < 0.01
        assert r["tokens_per_s"] is None or r["tokens_per_s"] > 0


def test_bytes_per_token_and_resident_bytes_fall_with_sparsity_and_kv_width(rows):
    by = {(r["plan"], r["kv_bits"]): r for r in rows}
    for bits in (16, 2):
        per_token = [by[(plan, bits)]["bytes_per_token"] for plan in ("70%", "50%", "dense")]
        assert per_token == sorted(per_token) and len(set(per_token)) == 3
        for plan in ("50%", "70%", "2:4"):
            assert by[(plan, bits)]["weight_bytes"] < by[("dense", bits)]["weight_bytes"]
            assert by[(plan, bits)]["resident_vs_dense"] < 1
    for plan in e2e.PLANS:
        assert by[(plan, 2)]["cache_bytes"] < by[(plan, 16)]["cache_bytes"]
        assert by[(plan, 2)]["bytes_per_token"] < by[(plan, 16)]["bytes_per_token"]


@pytest.mark.slow  # starts fresh Python processes: seconds of start-up each, kept out of `make test-fast`
def test_a_layout_measured_in_a_fresh_process():
    measured = e2e.run_layout("tiny", 2, "70%", (32,), (16,), "float32", 1, 3, 4, 1)
    assert measured["compressed_linears"] == 2 * 7 and measured["depth"] == 2
    (config,) = measured["configs"]
    assert config["peak_rss_bytes"] > measured["weights"] and len(config["times_s"]) == 3


@pytest.mark.parametrize("argv, message", [
    (["--shape", "llava-2-70b"], "unknown --shape 'llava-2-70b'; allowed: smollm2-135m, llava-1.5-7b, tiny"),
    (["--shape", "tiny", "--contexts", "1024", "5000"], "--contexts must be token counts in [1, 4096] for tiny"),
    (["--shape", "tiny", "--plans", "80%"], "unknown plan '80%'; allowed: dense, 50%, 70%, 2:4"),
    (["--shape", "tiny", "--kv-widths", "5"], "--kv-widths 5 not supported"),
    (["--shape", "tiny", "--repeats", "2"], "--repeats >= 3"),
    (["--shape", "tiny", "--layers", "9"], "--layers must be between 2 and 8 for tiny"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, argv, message):
    out = tmp_path / "e2e.json"
    assert main(["-q", "bench", "e2e", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("lmmlab bench: error:")
    assert not out.exists()


def test_fit_cost_from_the_rows_writes_the_model_and_its_errors(e2e_json, tmp_path):
    from lmmlab.search.cost import FEATURES, CostModel

    out = tmp_path / "cost_model.json"
    assert main(["-q", "bench", "e2e", "--rows", str(e2e_json), "--fit-cost", "--cost-out", str(out)]) == 0
    model = CostModel.load(out)
    assert set(model.coefficients) == set(FEATURES) and all(b >= 0 for b in model.coefficients.values())
    assert model.fitted_on == 8 and model.notes["heldout"] == 2 and model.notes["fit_error_pct"]["max"] >= 0
    assert model.rss_intercept > 0  # the Python runtime


def test_fit_cost_from_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["-q", "bench", "e2e", "--rows", str(tmp_path / "none.json"), "--fit-cost"]) == 2
    assert "--rows" in capsys.readouterr().err and not (tmp_path / "none.json").exists()


def test_two_depths_are_timed_interleaved_in_one_process():
    speeds = e2e.measure_speeds("tiny", (1, 2), ("dense", "70%"), (32,), (16, 2), "float32", 1, 3, 1)
    assert sorted(speeds) == [1, 2]
    for d, m in speeds.items():
        assert set(m["s_per_token"]) == {f"{p}/32/{b}" for p in ("dense", "70%") for b in (16, 2)}
        assert all(len(t) == 3 and min(t) > 0 for t in m["times_s"].values())
        assert abs(m["achieved"]["70%"] - 0.7) < 0.01 and m["achieved"]["dense"] == 0
