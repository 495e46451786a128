import json

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


def test_values_at_their_own_widths_round_trip_and_average_with_the_keys(tmp_path):
    plan = CompressionPlan([0.1, 0.5, 0.7], [4, 8, 16], value_bits=[2, 2, 4], method="ria")
    assert plan.key_widths == [4, 8, 16] and plan.value_widths == [2, 2, 4] and plan.separate_kv
    assert plan.mean_key_bits == pytest.approx(28 / 3) and plan.mean_value_bits == pytest.approx(8 / 3)
    assert plan.mean_kv_bits == pytest.approx((6 / 2 + 10 / 2 + 20 / 2) / 3)  # the mean over layers of (k + v) / 2
    assert json.loads(plan.to_json())["value_bits"] == [2, 2, 4]
    assert CompressionPlan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "p.json")
    assert CompressionPlan.load(tmp_path / "p.json") == plan
    keys_only = CompressionPlan.uniform(3, 0.5, kv_bits=16, value_bits=2)
    assert keys_only.key_widths == [16] * 3 and keys_only.value_widths == [2] * 3 and keys_only.mean_kv_bits == 9
    values_only = CompressionPlan([0.5, 0.5], value_bits=[4, 3])  # kv_bits left out: keys as they come
    assert values_only.key_widths == [16, 16] and values_only.mean_kv_bits == pytest.approx((20 / 2 + 19 / 2) / 2)


def test_a_plan_without_value_widths_means_and_writes_what_it_did_before():
    text = ('{"sparsity": [0.5, 0.6], "kv_bits": [4, 2], "method": "wanda", "pattern": "unstructured", '
            '"vision_sparsity": 0.0, "kv_group_size": 32, "kv_residual": 128}')
    plan = CompressionPlan.from_json(text)
    assert plan.value_bits == [] and plan.value_widths == plan.key_widths == [4, 2] and not plan.separate_kv
    assert plan.mean_kv_bits == 3.0 and json.loads(plan.to_json()) == json.loads(text)
    # value widths equal to the key widths are kept as given: the same widths, but not the same plan
    same = CompressionPlan([0.5, 0.6], [4, 2], value_bits=[4, 2])
    assert not same.separate_kv and same.mean_kv_bits == plan.mean_kv_bits and same != plan
    assert same.effective_kv_bits(64, 1000) == plan.effective_kv_bits(64, 1000)


def test_effective_bits_per_part_and_together():
    from lmmlab.kv.budget import effective_bits, effective_key_bits, effective_value_bits

    plan = CompressionPlan([0.5] * 3, [2, 16, 4], value_bits=[16, 3, 4], kv_group_size=16, kv_residual=64)
    layout = dict(head_dim=64, context=1000, group_size=16, residual_length=64)
    keys, values = plan.effective_kv_bits(64, 1000, part="key"), plan.effective_kv_bits(64, 1000, part="value")
    assert keys == [effective_key_bits(b, **layout) for b in (2, 16, 4)] and keys[1] == 16.0
    assert values == [effective_value_bits(b, **layout) for b in (16, 3, 4)] and values[0] == 16.0
    both = plan.effective_kv_bits(64, 1000)
    assert both == [effective_bits(k, value_bits=v, **layout) for k, v in zip([2, 16, 4], [16, 3, 4])]
    assert both == pytest.approx([(k + v) / 2 for k, v in zip(keys, values)], rel=1e-12)
    assert both[2] == effective_bits(4, **layout)
    assert plan.mean_effective_kv_bits(64, 1000, part="value") == pytest.approx(sum(values) / 3)
    with pytest.raises(ValueError, match="unknown KV part 'keys'; allowed: both, key, value"):
        plan.effective_kv_bits(64, 1000, part="keys")


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=[0.5, 0.5], value_bits=[4]), "value_bits has 1 entries but sparsity has 2"),
    (dict(sparsity=[0.5], kv_bits=[4], value_bits=[5]), "value bit-width 5 not supported; allowed: 2, 3, 4, 6, 8, 16"),
    (dict(sparsity=[0.5], kv_bits=[4], value_bits=[1]), "value bit-width 1 not supported"),
])
def test_bad_value_widths_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionPlan(**kwargs)
