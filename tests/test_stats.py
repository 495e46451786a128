import math

import numpy as np
import pytest

from lmmlab.lab.stats import (annotate, bootstrap_interval, mcnemar_exact, mean_interval, paired, paired_bootstrap_p, paired_p, perplexity_interval, row_interval, wilson_interval)


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
    from lmmlab.lab.compare import paired_table

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


# --- intervals, exact McNemar, paired bootstrap, annotate ----------------------------------------------


def wilson_by_hand(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@pytest.mark.parametrize("k", [0, 5, 10])
def test_wilson_interval_matches_the_formula(k):
    low, high = wilson_interval(k, 10)
    assert (low, high) == pytest.approx(wilson_by_hand(k, 10), abs=1e-12)  # (0 and 1 exact at 0/n and n/n)
    assert 0 <= low <= k / 10 <= high <= 1


def test_wilson_interval_known_values_and_edges():
    # 0/10: low is exactly 0 and high = z²/(n + z²); 5/10 is symmetric about 1/2; 10/10 mirrors 0/10
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    low, high = wilson_interval(5, 10)
    assert low + high == pytest.approx(1.0) and low == pytest.approx(0.236593, abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((1 - z2 / (10 + z2), 1.0))
    assert wilson_interval(5, 10, confidence=0.99)[0] < low  # wider at a higher confidence
    for bad in [(1, 0), (11, 10), (-1, 10)]:
        with pytest.raises(ValueError, match="successes <= n"):
            wilson_interval(*bad)


def table(n01, n10, n00=3, n11=4):
    """Per-item correctness of plans a and b with the given discordant and concordant counts."""
    a = [0] * n01 + [1] * n10 + [0] * n00 + [1] * n11
    b = [1] * n01 + [0] * n10 + [0] * n00 + [1] * n11
    return a, b


@pytest.mark.parametrize("n01,n10", [(1, 6), (6, 1), (0, 5), (2, 3), (3, 12), (10, 10)])
def test_mcnemar_exact_matches_binomial_tails(n01, n10):
    n, k = n01 + n10, min(n01, n10)
    by_hand = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    assert mcnemar_exact(*table(n01, n10)) == pytest.approx(by_hand, rel=1e-12)


def test_mcnemar_exact_small_tables():
    assert mcnemar_exact(*table(1, 6)) == pytest.approx(2 * (1 + 7) / 2 ** 7) == pytest.approx(0.125)
    assert mcnemar_exact(*table(0, 5)) == pytest.approx(2 / 32)
    assert mcnemar_exact(*table(2, 2)) == 1.0  # 2·P(X ≤ 2), X ~ Bin(4, ½) = 2·11/16 > 1
    assert mcnemar_exact(*table(0, 0)) == 1.0  # no discordant pair
    assert mcnemar_exact([True, False, True], [True, False, True]) == 1.0


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match="same items: got 3 and 2"):
        mcnemar_exact([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0, 1, 2], [0, 1, 1])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0, 0.5], [0, 1])


def test_paired_bootstrap_p_small_for_a_clear_shift_and_one_for_identical_series():
    rng = np.random.default_rng(4)
    base = rng.normal(3.0, 1.0, 100)
    shifted = base + 0.3 + rng.normal(0, 0.1, 100)
    p = paired_bootstrap_p(shifted, base, n_boot=4000)
    assert p == pytest.approx(2 / 4001)  # no resampled mean reaches 0: the smallest p this B allows
    assert paired_bootstrap_p(base, shifted) == p  # two-sided
    assert paired_bootstrap_p(base, base.copy()) == 1.0
    e = rng.normal(0, 1.0, 50)
    noise = base + np.concatenate([e, -e])  # differences symmetric about 0: no shift
    assert paired_bootstrap_p(noise, base) > 0.5
    assert paired_bootstrap_p(noise, base) > 0.05
    assert paired_bootstrap_p(noise, base, seed=7) == paired_bootstrap_p(noise, base, seed=7)
    with pytest.raises(ValueError, match="same items: got 100 and 99"):
        paired_bootstrap_p(base, base[:99])


def test_paired_bootstrap_p_follows_its_formula():
    """The p-value is the formula applied to scipy's resampled means (same resamples: same rng seed)."""
    from scipy import stats as sps

    d = np.array([1.0, -1.0, 0.5, 2.0, -0.5, 0.25])
    n_boot, seed = 300, 5
    means = sps.bootstrap((d,), np.mean, n_resamples=n_boot, batch=500, method="percentile",
                          rng=seed).bootstrap_distribution
    assert np.all(means >= d.min()) and np.all(means <= d.max()) and len(np.unique(means)) > 20  # real resamples
    below, above = (means <= 0).sum(), (means >= 0).sum()
    by_hand = min(1.0, 2 * min((below + 1) / (n_boot + 1), (above + 1) / (n_boot + 1)))
    assert paired_bootstrap_p(d, np.zeros_like(d), n_boot=n_boot, seed=seed) == pytest.approx(by_hand)


def holm_by_hand(p):
    """Holm's step-down procedure as published: reject H_(1..k) while p_(i) <= α/(m − i + 1); the adjusted p-value of
    H_(i) is the smallest α at which it is rejected, i.e. max_{j <= i} min(1, (m − j + 1) p_(j))."""
    m = len(p)
    order = np.argsort(p, kind="stable")
    out = np.empty(m)
    for i, idx in enumerate(order):
        out[idx] = max(min(1.0, (m - j) * p[order[j]]) for j in range(i + 1))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_holm_matches_the_step_down_procedure_and_statsmodels(seed):
    from lmmlab.lab.stats import holm

    p = np.random.default_rng(seed).uniform(0, 0.2, 8) ** 2
    assert holm(list(p)) == pytest.approx(list(holm_by_hand(p)), rel=1e-12)
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    assert holm(list(p)) == pytest.approx(list(multipletests(p, method="holm")[1]), rel=1e-12)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3·0.01, then max(2·0.03, ·), 1·0.04 → 0.06


def test_paired_sign_flip_test_is_exact_for_few_items():
    """With 2^n <= n_perm, the sign-flip test enumerates every flip: for d all of one sign, only the identity and the
    all-flipped assignment are as extreme, so p = 2 / 2^n."""
    d = np.array([0.3, 0.1, 0.2, 0.5, 0.4, 0.25])
    assert paired(d, np.zeros(6)).p_value == pytest.approx(2 / 2 ** 6)
    assert paired(np.zeros(6), d).p_value == pytest.approx(2 / 2 ** 6)


def test_bootstrap_and_perplexity_intervals():
    rng = np.random.default_rng(5)
    nll = rng.normal(3.0, 0.4, 80)
    ppl, low, high = perplexity_interval(nll)
    assert ppl == pytest.approx(math.exp(nll.mean())) and low < ppl < high
    mlow, mhigh = bootstrap_interval(nll)
    assert (low, high) == pytest.approx((math.exp(mlow), math.exp(mhigh)))  # exp of the mean-NLL interval
    assert mlow < nll.mean() < mhigh
    med_low, med_high = bootstrap_interval(nll, statistic=np.median)
    assert med_low < np.median(nll) < med_high
    trimmed = bootstrap_interval(nll, statistic=lambda s: float(np.sort(s)[5:-5].mean()))  # no axis argument
    assert trimmed[0] < trimmed[1]
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])


def test_row_interval_and_paired_p_dispatch_on_the_metric():
    correct = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    assert row_interval(correct, "correct") == wilson_interval(7, 10)
    nll = [2.0, 2.5, 3.0, 2.2, 2.8]
    assert row_interval(nll, "nll") == perplexity_interval(nll)[1:]
    scores = [0.0, 0.3, 1.0, 0.6, 1.0]
    assert row_interval(scores, "vqa_score") == bootstrap_interval(scores)
    a, b = table(1, 6)
    assert paired_p(a, b, "correct") == mcnemar_exact(a, b)
    assert paired_p(nll, scores, "nll") == paired_bootstrap_p(nll, scores)
    with pytest.raises(ValueError, match="0/1"):
        row_interval(scores, "correct")


def rows_for(direction_shift, *, metric="correct", n=60):
    """One group per sparsity: at 0.5, uniform (baseline), owl (the stronger baseline), tpe; at 0.7 only tpe."""
    rng = np.random.default_rng(6)
    if metric == "correct":
        owl = (rng.random(n) < 0.6).astype(int)
        weak = owl.copy()
        weak[np.flatnonzero(owl == 1)[:10]] = 0  # uniform: 10 fewer right
        tpe = owl.copy()
        flip = np.flatnonzero(owl == (0 if direction_shift > 0 else 1))[:15]
        tpe[flip] = 1 - tpe[flip]  # 15 more right (or wrong)
    else:
        owl = rng.normal(3.0, 0.5, n)
        weak = owl + 0.5
        tpe = owl + direction_shift
    primary = (lambda v: float(np.mean(v))) if metric == "correct" else (lambda v: math.exp(float(np.mean(v))))

    def row(alloc, target, values):
        return {"method": "wanda", "allocation": alloc, "target_sparsity": target, "per_item_metric": metric,
                "per_item": list(values), "primary": primary(values)}
    return [row("uniform", 0.5, weak), row("owl", 0.5, owl), row("tpe", 0.5, tpe), row("tpe", 0.7, tpe)]


def test_annotate_accuracy_picks_the_strongest_baseline_and_judges_in_the_maximize_direction():
    rows = rows_for(+1)
    before = [dict(r) for r in rows]
    out = annotate(rows, direction="maximize", group_by=("target_sparsity",), is_baseline=lambda r: r["allocation"] != "tpe")
    assert rows == before and all(o is not r for o, r in zip(out, rows))  # inputs untouched, new dicts
    assert [o["allocation"] for o in out] == ["uniform", "owl", "tpe", "tpe"]  # same order
    assert [o["versus"] for o in out] == ["wanda-owl"] * 3 + [""]
    assert [o["verdict"] for o in out] == ["worse", "reference", "better", ""]
    assert out[2]["p_value"] == pytest.approx(2 / 2 ** 15)  # 15 discordant, all one way: 2·C(15,0)/2^15
    assert out[0]["p_value"] == pytest.approx(2 / 2 ** 10)
    assert math.isnan(out[1]["p_value"]) and math.isnan(out[3]["p_value"])  # reference; no baseline at 0.7
    for o in out:
        assert (o["ci_low"], o["ci_high"]) == wilson_interval(int(sum(o["per_item"])), len(o["per_item"]))
    worse = annotate(rows_for(-1), direction="maximize", group_by=("target_sparsity",),
                     is_baseline=lambda r: r["allocation"] != "tpe")
    assert worse[2]["verdict"] == "worse"


def test_annotate_perplexity_lower_nll_is_better_when_minimizing():
    base = lambda r: r["allocation"] != "tpe"
    out = annotate(rows_for(-0.2, metric="nll"), direction="minimize", group_by=("target_sparsity",),
                   is_baseline=base)
    assert out[1]["verdict"] == "reference" and out[1]["versus"] == "wanda-owl"  # lower perplexity wins
    assert out[2]["verdict"] == "better" and out[2]["p_value"] < 0.05
    assert out[0]["verdict"] == "worse"
    assert out[2]["ci_low"] < out[2]["primary"] < out[2]["ci_high"]
    assert annotate(rows_for(+0.2, metric="nll"), direction="minimize", group_by=("target_sparsity",),
                    is_baseline=base)[2]["verdict"] == "worse"
    tie = annotate(rows_for(0.0, metric="nll"), direction="minimize", group_by=("target_sparsity",),
                   is_baseline=base)[2]
    assert tie["verdict"] == "tie" and tie["p_value"] == 1.0  # the same windows
    # maximizing the same NLL values: the baseline with the higher perplexity is the strongest
    flipped = annotate(rows_for(-0.2, metric="nll"), direction="maximize", group_by=("target_sparsity",),
                       is_baseline=base)
    assert flipped[0]["verdict"] == "reference" and flipped[2]["verdict"] == "worse"


def test_annotate_one_group_custom_label_and_empty_rows():
    rows = rows_for(+1)[:3] + [{**rows_for(+1)[0], "allocation": "empty", "per_item": [], "primary": float("nan")}]
    out = annotate(rows, direction="maximize", group_by=(), label=lambda r: r["allocation"].upper())
    assert [o["versus"] for o in out] == ["TPE"] * 4  # every row is a baseline: the best of all is the reference
    assert [o["verdict"] for o in out] == ["worse", "worse", "reference", ""]
    assert math.isnan(out[3]["ci_low"]) and math.isnan(out[3]["p_value"])


def test_annotate_rejects_bad_tables():
    rows = rows_for(+1)
    rows[2]["per_item"] = rows[2]["per_item"][:-1]
    with pytest.raises(ValueError, match="wanda-tpe and its baseline wanda-owl"):
        annotate(rows, direction="maximize", group_by=("target_sparsity",), is_baseline=lambda r: r["allocation"] != "tpe")
    with pytest.raises(ValueError, match="direction must be one of maximize, minimize"):
        annotate(rows_for(+1), direction="up", group_by=())
    with pytest.raises(ValueError, match="lacks kv_budget_bits"):
        annotate(rows_for(+1), direction="maximize", group_by=("kv_budget_bits",))


def test_wilson_textbook_values_and_bad_confidence():
    # the published 95 % Wilson intervals, to four decimals
    for (k, n), expected in {(0, 10): (0.0, 0.2775), (5, 10): (0.2366, 0.7634), (10, 10): (0.7225, 1.0)}.items():
        assert tuple(round(v, 4) for v in wilson_interval(k, n)) == expected
        assert wilson_interval(k, n) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)
    assert wilson_interval(5, 10, confidence=0.90) == pytest.approx(wilson_by_hand(5, 10, z=1.6448536269514722))
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match="confidence must be in"):
            wilson_interval(5, 10, confidence=bad)
    with pytest.raises(ValueError, match="integers"):
        wilson_interval(2.5, 10)


def test_mcnemar_exact_large_tables_stay_exact():
    n, k = 1000, 480  # 1,000 discordant items: exact integers, no overflow; the normal approximation gives 0.21
    by_hand = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    p = mcnemar_exact(*table(k, n - k, n11=3000))
    assert p == pytest.approx(by_hand, rel=1e-12) and 0.2 < p < 0.3
    assert mcnemar_exact(*table(k, n - k)) == mcnemar_exact(*table(n - k, k))  # symmetric in the plans
    assert 0.0 <= mcnemar_exact(*table(0, 1500)) < 1e-300


def test_paired_bootstrap_p_statistic_and_bad_input():
    d = np.array([1.0, -1.0] * 50)  # differences exactly balanced about 0
    assert paired_bootstrap_p(d, np.zeros(100), statistic=np.median) > 0.5
    shifted = np.linspace(0.1, 1.0, 40)
    assert paired_bootstrap_p(shifted, np.zeros(40), statistic=np.median, n_boot=999) == pytest.approx(2 / 1000)
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap_p([1.0, float("inf")], [1.0, 2.0])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap_p([1.0, 2.0], [1.0, 2.0], n_boot=0)


def test_annotate_hand_made_accuracy_rows():
    owl = [1] * 24 + [0] * 16  # 0.60: the strongest baseline
    uniform = [1] * 20 + [0] * 20  # owl right, uniform wrong on 4 items: p = 2/16
    better = [1] * 34 + [0] * 6  # owl wrong, row right on 10 items: p = 2/2^10
    higher_but_tie = [1] * 28 + [0] * 12  # higher accuracy, but 4 discordant items: p = 2/16
    worse = [0] * 8 + [1] * 16 + [0] * 16  # owl right, row wrong on 8 items: p = 2/2^8

    def row(alloc, values):
        return {"method": "wanda", "allocation": alloc, "pattern": "2:4", "per_item_metric": "correct",
                "per_item": values, "primary": sum(values) / len(values)}
    rows = [row("uniform", uniform), row("owl", owl), row("tpe", better), row("tpe", higher_but_tie),
            row("tpe", worse)]
    out = annotate(rows, direction="maximize", group_by=("pattern",), is_baseline=lambda r: r["allocation"] != "tpe")
    assert {o["versus"] for o in out} == {"wanda-owl-2:4"}  # the default label: method-allocation-pattern
    assert [o["verdict"] for o in out] == ["tie", "reference", "better", "tie", "worse"]
    assert [o["p_value"] for o in out[2:]] == pytest.approx([2 / 2 ** 10, 2 / 2 ** 4, 2 / 2 ** 8])
    assert out[0]["p_value"] == pytest.approx(2 / 2 ** 4)
    # minimizing the same numbers (an error rate, say): uniform is the strongest baseline, the verdicts turn around
    flipped = annotate(rows, direction="minimize", group_by=(), is_baseline=lambda r: r["allocation"] != "tpe",
                       label=lambda r: r["allocation"])
    assert [o["versus"] for o in flipped] == ["uniform"] * 5
    assert [o["verdict"] for o in flipped] == ["reference", "tie", "worse", "worse", "tie"]
    assert flipped[1]["p_value"] == pytest.approx(2 / 2 ** 4)


def test_annotate_equal_baselines_and_more_bad_tables():
    def row(alloc, values, **extra):
        return {"method": "wanda", "allocation": alloc, "per_item_metric": "correct", "per_item": values,
                "primary": sum(values) / len(values), **extra}
    rows = [row("owl", [1, 1, 0, 1]), row("uniform", [1, 1, 1, 0])]  # equal primaries: the first is the reference
    assert [o["verdict"] for o in annotate(rows, direction="minimize", group_by=())] == ["reference", "tie"]
    mixed = [rows[0], {**rows[1], "per_item_metric": "nll"}]
    with pytest.raises(ValueError, match="same per-item metric"):
        annotate(mixed, direction="maximize", group_by=(), is_baseline=lambda r: r["allocation"] == "owl")
    with pytest.raises(ValueError, match="pass label="):
        annotate([{"primary": 0.5, "per_item": [1, 0], "per_item_metric": "correct"}], direction="maximize",
                 group_by=())
