import numpy as np
import pytest

from lmmlab.stats import mean_interval, paired


def test_mean_interval_covers_the_mean_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 30), rng.normal(1.0, 1.0, 3000)
    m, lo, hi = mean_interval(small)
    assert lo < m < hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = mean_interval(large)
    assert hi2 - lo2 < (hi - lo) / 5  # width ~ 1/sqrt(n): 100x the items, ~10x narrower
    assert mean_interval(small, seed=3) == mean_interval(small, seed=3)


def test_paired_finds_a_shift_that_an_unpaired_view_would_miss():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 5, 200)  # large item-to-item spread
    a, b = base + 0.2 + rng.normal(0, 0.05, 200), base
    result = paired(a, b)
    assert result.verdict == "a higher" and result.low > 0 and result.p_value < 0.01
    assert result.mean_diff == pytest.approx(float(np.mean(a - b)))
    assert paired(b, a).verdict == "b higher"


def test_identical_plans_tie():
    x = np.random.default_rng(2).normal(0, 1, 100)
    result = paired(x, x.copy())
    assert result.verdict == "tie" and result.mean_diff == 0 and result.p_value == 1.0


def test_paired_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="same items: got 3 and 2"):
        paired([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])


def test_paired_table_names_the_better_plan_in_the_task_direction():
    from lmmlab.compare import paired_table

    rng = np.random.default_rng(3)
    nll = rng.normal(3.0, 0.5, 64)

    def rows(tpe_shift):
        common = {"target_sparsity": 0.7, "kv_budget_bits": 4, "per_item_metric": "nll"}
        return [{**common, "method": "wanda", "allocation": "tpe", "per_item": list(nll + tpe_shift)},
                {**common, "method": "wanda", "allocation": "uniform", "per_item": list(nll)}]
    better = paired_table(rows(-0.1), "minimize")  # lower NLL: the TPE plan has the lower perplexity
    assert [(t["baseline"], t["better"]) for t in better] == [("wanda-uniform", "tpe")]
    assert np.exp(better[0]["mean_diff"]) == pytest.approx(np.exp(-0.1))  # the perplexity ratio
    assert paired_table(rows(+0.1), "minimize")[0]["better"] == "baseline"
    assert paired_table(rows(0.0), "minimize")[0]["better"] == "tie"
    assert paired_table(rows(+0.1), "maximize")[0]["better"] == "tpe"  # e.g. accuracy per item
