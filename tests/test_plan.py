import pytest

from lmmlab.plan import CompressionPlan


def test_json_round_trip(tmp_path):
    plan = CompressionPlan([0.1, 0.5, 0.7], [4, 8, 16], method="wanda", vision_sparsity=0.4)
    assert CompressionPlan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "p.json")
    assert CompressionPlan.load(tmp_path / "p.json") == plan
    assert plan.mean_sparsity == pytest.approx(1.3 / 3) and plan.mean_kv_bits == pytest.approx(28 / 3)


def test_defaults_and_uniform():
    assert CompressionPlan([0.5, 0.5]).kv_bits == [16, 16]
    plan = CompressionPlan.uniform(4, 0.5, kv_bits=4, pattern="2:4")
    assert plan.sparsity == [0.5] * 4 and plan.kv_bits == [4] * 4 and plan.nm == (2, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=[]), "at least one layer"),
    (dict(sparsity=[0.5, 1.0]), "in \\[0, 1\\).*1.0 at layer 1"),
    (dict(sparsity=[-0.1]), "in \\[0, 1\\)"),
    (dict(sparsity=[0.5, 0.5], kv_bits=[4]), "kv_bits has 1 entries but sparsity has 2"),
    (dict(sparsity=[0.5], kv_bits=[5]), "bit-width 5 not supported; allowed: 2, 3, 4, 6, 8, 16"),
    (dict(sparsity=[0.5], method="random"), "unknown pruning method 'random'"),
    (dict(sparsity=[0.5], pattern="4:2"), "0 < N < M"),
    (dict(sparsity=[0.5], pattern="two:four"), "allowed: 'unstructured' or 'N:M'"),
    (dict(sparsity=[0.3], pattern="2:4"), "fixes each layer's sparsity at 0.5"),
    (dict(sparsity=[0.5], pattern="2:4", vision_sparsity=0.3), "got 0.3 at layer vision"),
    (dict(sparsity=[0.5], vision_sparsity=1.0), "vision_sparsity must be in \\[0, 1\\)"),
])
def test_bad_plans_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionPlan(**kwargs)


def test_bad_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no plan file"):
        CompressionPlan.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown plan field"):
        CompressionPlan.from_json('{"sparsity": [0.5], "bits": [4]}')
    with pytest.raises(ValueError, match="not valid JSON"):
        CompressionPlan.from_json("{")
    plan = CompressionPlan([0.5, 0.5])
    with pytest.raises(ValueError, match="plan has 2 layers but the model has 6"):
        plan.check_layers(6)


def test_weight_summary_counts_non_zero_weights_and_bytes():
    summary = CompressionPlan([0.0, 0.5, 0.75]).weight_summary([100, 200, 400], bytes_per_weight=2)
    assert summary["dense_weights"] == 700 and summary["kept_weights"] == 100 + 100 + 100
    assert summary["kept_bytes"] == 600 and summary["dense_bytes"] == 1400
    assert summary["achieved_sparsity"] == pytest.approx(4 / 7)
