"""Intervals and paired tests on per-item values (a question's correctness, a window's NLL), so that every claim that
one plan beats another carries its uncertainty — and "tie" is an answer. The statistics are scipy's; this module
keeps the project's names, its checks of the inputs and the choices made for every table:

  wilson_interval      Wilson score interval of a proportion (`scipy.stats.binomtest(...).proportion_ci`)
  bootstrap_interval   percentile-bootstrap interval of a statistic of per-item values (`scipy.stats.bootstrap`)
  perplexity_interval  exp(mean window NLL) and its interval, resampling windows
  mcnemar_exact        exact McNemar test: a two-sided binomial test on the discordant pairs (`scipy.stats.binomtest`)
  paired_bootstrap_p   paired bootstrap p-value of the mean per-item difference (`scipy.stats.bootstrap`'s
                       resampled distribution)
  holm                 Holm–Bonferroni adjusted p-values of one family of tests
  row_interval         the interval of a results-table row by its per-item metric ("correct", "nll", other)
  paired_p             the paired p-value of two rows by their per-item metric
  annotate             every row of a results table: ci_low, ci_high, the strongest baseline of its group (versus),
                       p_value against it and the verdict ("reference", "better", "worse", "tie"); the one
                       function that compare, the ablations, Pareto re-scoring and the notebooks call
  mean_interval        the mean and its percentile-bootstrap interval
  paired               the mean per-item difference a − b, its bootstrap interval, and a two-sided sign-flip
                       permutation test (`scipy.stats.permutation_test`, Monte Carlo with a seed; exact for n ≤ 13)

Percentile intervals, not scipy's default BCa: BCa is undefined when every resample is equal (a plan identical to its
baseline on most items) and the tables compare intervals across rows made the same way.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

DIRECTIONS = ("maximize", "minimize")
ALPHA = 0.05  # a row is "better"/"worse" than its baseline only at p < ALPHA


# --- intervals --------------------------------------------------------------------------------------------------------

def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion p̂ = successes / n (z the two-sided normal quantile):

        centre = (p̂ + z²/2n) / (1 + z²/n),   half = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²)

    Unlike p̂ ± z·se it is never empty at 0/n or n/n (exactly 0 and 1 there)."""
    if n <= 0 or not 0 <= successes <= n or int(successes) != successes or int(n) != n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n >= 1 (integers); got {successes} of {n}")
    _check_confidence(confidence)
    ci = sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    low = 0.0 if successes == 0 else max(0.0, float(ci.low))
    high = 1.0 if successes == n else min(1.0, float(ci.high))
    return low, high


def bootstrap_interval(values: Sequence[float], *, statistic: Callable = np.mean, confidence: float = 0.95,
                       n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of `statistic(values)`: resample the items with replacement `n_boot` times and
    take the (1 − confidence)/2 and (1 + confidence)/2 percentiles of the resampled statistic. A `statistic` with an
    `axis` argument (np.mean, np.median) is evaluated on all resamples at once, any other per resample."""
    x = _array(values, "values")
    _check_confidence(confidence)
    boot = _resample(x, n_boot, seed, statistic)
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail))


def perplexity_interval(window_nll: Sequence[float], *, confidence: float = 0.95, n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, float, float]:
    """(perplexity, low, high): perplexity = exp(mean window NLL) and the bootstrap interval resampling windows,
    i.e. exp of the percentile interval of the mean NLL (exp is monotone). Every window must score the same number
    of tokens (the text task's windows all score seqlen − 1), so the mean of window means is the token mean."""
    x = _array(window_nll, "window_nll")
    low, high = bootstrap_interval(x, confidence=confidence, n_boot=n_boot, seed=seed)
    return math.exp(float(x.mean())), math.exp(low), math.exp(high)


def mean_interval(values: Sequence[float], *, confidence: float = 0.95, n_boot: int = 2000,
                  seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile-bootstrap interval."""
    x = _array(values, "values")
    low, high = bootstrap_interval(x, confidence=confidence, n_boot=n_boot, seed=seed)
    return float(x.mean()), low, high


# --- paired tests ---------------------------------------------------------------------------------------------------

def mcnemar_exact(a: Sequence[int], b: Sequence[int]) -> float:
    """Exact two-sided McNemar test of two plans' 0/1 correctness on the same items. With n01 = #(a wrong, b right)
    and n10 = #(a right, b wrong), X ~ Binomial(n01 + n10, 1/2) and p = min(1, 2 · P(X <= min(n01, n10))): the
    two-sided binomial test of n01 successes in n01 + n10 trials. 1.0 when no item is discordant."""
    x, y = _binary(a, "a"), _binary(b, "b")
    _same_length(x, y)
    n01 = int(np.sum((x == 0) & (y == 1)))
    n10 = int(np.sum((x == 1) & (y == 0)))
    if n01 + n10 == 0:
        return 1.0
    return min(1.0, float(sps.binomtest(n01, n01 + n10, 0.5).pvalue))


def paired_bootstrap_p(a: Sequence[float], b: Sequence[float], *, statistic: Callable = np.mean,
                       n_boot: int = 4000, seed: int = 0) -> float:
    """Two-sided paired-bootstrap p-value of the per-item differences d = a − b on the same items, in the same order:
    resample the items with replacement B = n_boot times, t*_j = statistic(d on resample j) (default the mean), and

        p = min(1, 2 · min((#{t* <= 0} + 1) / (B + 1), (#{t* >= 0} + 1) / (B + 1)))

    i.e. how often the resampled statistic lands on the other side of 0, with +1 so that p > 0 (the smallest possible
    p is 2 / (B + 1)). Identical series give 1.0. For perplexity pass window NLLs: the perplexity ratio of a to b is
    exp(mean d), so testing mean d against 0 is testing the ratio against 1 (windows of equal token counts)."""
    x, y = _array(a, "a"), _array(b, "b")
    _same_length(x, y)
    boot = _resample(x - y, n_boot, seed, statistic)
    below, above = int(np.sum(boot <= 0)), int(np.sum(boot >= 0))
    return min(1.0, 2 * min((below + 1) / (n_boot + 1), (above + 1) / (n_boot + 1)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values of one family of tests (one plan against every baseline at a budget):
    p_(i) × (m − i + 1) for the i-th smallest, made monotone, at most 1. "Better than every baseline at 5 %" holds
    when every adjusted p is below 0.05. (scipy has no Holm; the tests check it against statsmodels.)"""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, p_values[i] * (m - rank)))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Paired:
    """a − b on the same items: mean difference, its interval, the permutation p-value and the verdict."""

    mean_diff: float
    low: float
    high: float
    p_value: float
    n: int
    verdict: str  # "a higher", "b higher" or "tie" (the interval covers 0)


def paired(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, n_boot: int = 2000,
           n_perm: int = 10000, seed: int = 0) -> Paired:
    """Compare two plans' per-item values on the same items, in the same order: the mean difference with its
    bootstrap interval, and the sign-flip permutation test of mean d = 0 (each item's difference keeps or flips its
    sign under the null; exact when 2^n <= n_perm)."""
    x, y = _array(a, "a"), _array(b, "b")
    _same_length(x, y)
    d = x - y
    mean, low, high = mean_interval(d, confidence=confidence, n_boot=n_boot, seed=seed)
    if not np.any(d):
        p = 1.0
    else:
        test = sps.permutation_test((d,), lambda s, axis: np.mean(s, axis=axis), permutation_type="samples",
                                    n_resamples=n_perm, vectorized=True, alternative="two-sided", rng=seed + 1)
        p = float(test.pvalue)
    verdict = "tie" if low <= 0 <= high else ("a higher" if mean > 0 else "b higher")
    return Paired(mean, low, high, p, len(d), verdict)


# --- results-table rows -----------------------------------------------------------------------------------------------

def row_interval(per_item: Sequence[float], per_item_metric: str, *,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Interval of a row's primary value from its per-item values, in the primary's units: "correct" (0/1, primary =
    accuracy) → Wilson; "nll" (a text window's mean NLL, primary = perplexity = exp(mean NLL), windows of equal token
    counts) → the perplexity's bootstrap interval over windows; anything else ("vqa_score", ..., primary = the mean)
    → bootstrap interval of the mean. Bootstraps use their default n_boot and seed 0, so a row's interval is fixed."""
    if per_item_metric == "correct":
        x = _binary(per_item, "per_item")
        return wilson_interval(int(x.sum()), len(x), confidence=confidence)
    if per_item_metric == "nll":
        return perplexity_interval(per_item, confidence=confidence)[1:]
    return bootstrap_interval(per_item, confidence=confidence)


def paired_p(a: Sequence[float], b: Sequence[float], per_item_metric: str) -> float:
    """Paired p-value of two rows on the same items: "correct" → exact McNemar, else the paired bootstrap."""
    if per_item_metric == "correct":
        return mcnemar_exact(a, b)
    return paired_bootstrap_p(a, b)


LABEL_KEYS = ("method", "allocation", "pattern")


def default_label(r: dict) -> str:
    """method-allocation-pattern from whichever of those keys the row has (e.g. "wanda-owl-2:4")."""
    parts = [str(r[k]) for k in LABEL_KEYS if r.get(k) not in (None, "")]
    if not parts:
        raise ValueError(f"annotate's default label needs one of {', '.join(LABEL_KEYS)} in the row; pass label=")
    return "-".join(parts)


def annotate(rows: list[dict], *, direction: str, group_by: Sequence[str],
             is_baseline: Callable[[dict], bool] = lambda r: True,
             label: Callable[[dict], str] | None = None) -> list[dict]:
    """The statistics columns of a results table. `rows`: dicts with "primary" (the task's primary metric),
    "per_item" (its per-item values, in the same item order in every row), "per_item_metric" ("correct", "nll", ...)
    and the `group_by` keys; `direction` is the task's ("maximize" or "minimize"). Rows sharing the `group_by` values
    form a group (group_by=() : one group). Returns new dicts (same order, inputs untouched) with, per row:

      ci_low, ci_high  `row_interval` of its per_item, in the primary's units (NaN when per_item is empty)
      versus           label of the group's strongest baseline: the is_baseline row with the best "primary" in
                       `direction` (the first one on a tie, NaN primaries never win); "" when the group has none
      p_value          `paired_p` of the row against that baseline on the same items: exact McNemar for "correct",
                       paired bootstrap otherwise. NaN for the strongest baseline itself, when the group has no
                       baseline, or when either per_item is empty
      verdict          "reference" for the strongest baseline itself; else "better"/"worse" when p_value < 0.05, by the
                       sign of mean(row per_item) − mean(baseline per_item) in `direction` (for "nll" with "minimize"
                       a lower mean NLL is a lower perplexity: better); "tie" otherwise; "" when there is no test

    `label(row)` names the baseline (default: method-allocation-pattern from the keys the row has). Every row of a
    group is tested on the baseline's items: a per_item count or per_item_metric that differs from the baseline's
    is a ValueError, raised before any test runs (no partial table)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
    name = label or default_label
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        missing = [k for k in ("primary", "per_item", "per_item_metric", *group_by) if k not in r]
        if missing:
            raise ValueError(f"row {i} lacks {', '.join(missing)}; annotate needs primary, per_item, "
                             f"per_item_metric and the group_by keys")
        groups.setdefault(tuple(r[k] for k in group_by), []).append(i)
    sign = 1.0 if direction == "maximize" else -1.0
    bases = {key: _strongest([i for i in members if is_baseline(rows[i])], rows, sign)
             for key, members in groups.items()}
    for key, members in groups.items():  # check every group before the first (slow) test
        if bases[key] is not None:
            _check_same_items([rows[i] for i in members], rows[bases[key]], name)
    out = [dict(r) for r in rows]
    for key, members in groups.items():
        base = bases[key]
        ref = rows[base] if base is not None else None
        for i in members:
            r, o = rows[i], out[i]
            o["ci_low"], o["ci_high"] = (row_interval(r["per_item"], r["per_item_metric"]) if len(r["per_item"])
                                         else (math.nan, math.nan))
            o["versus"], o["p_value"], o["verdict"] = ("" if ref is None else name(ref)), math.nan, ""
            if i == base:
                o["verdict"] = "reference"
            elif ref is not None and len(r["per_item"]) and len(ref["per_item"]):
                p = paired_p(r["per_item"], ref["per_item"], r["per_item_metric"])
                diff = float(np.mean(r["per_item"]) - np.mean(ref["per_item"]))
                o["p_value"] = p
                o["verdict"] = "tie" if p >= ALPHA or diff == 0 else ("better" if sign * diff > 0 else "worse")
    return out


def _check_same_items(members: list[dict], ref: dict, name: Callable[[dict], str]) -> None:
    for r in members:
        if not len(r["per_item"]) or not len(ref["per_item"]):
            continue
        if len(r["per_item"]) != len(ref["per_item"]) or r["per_item_metric"] != ref["per_item_metric"]:
            raise ValueError(f"{name(r)} and its baseline {name(ref)} must be scored on the same items with the "
                             f"same per-item metric; got {len(r['per_item'])} {r['per_item_metric']!r} and "
                             f"{len(ref['per_item'])} {ref['per_item_metric']!r}")


def _strongest(candidates: list[int], rows: list[dict], sign: float) -> int | None:
    """The candidate with the best primary (sign +1: highest), the first on a tie; NaN primaries never win."""
    best = None
    for i in candidates:
        v = float(rows[i]["primary"])
        if not math.isnan(v) and (best is None or sign * v > sign * float(rows[best]["primary"])):
            best = i
    return best


# --- helpers ----------------------------------------------------------------------------------------------------------

def _resample(x: np.ndarray, n_boot: int, seed: int, statistic: Callable) -> np.ndarray:
    """`statistic` of `n_boot` resamples of x with replacement: scipy.stats.bootstrap's resampled distribution."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    if len(x) < 2 or np.all(x == x[0]):  # every resample is x itself (scipy warns and refuses one item)
        return np.full(n_boot, float(statistic(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)  # only BCa needs a spread
        res = sps.bootstrap((x,), statistic, n_resamples=n_boot, batch=500, method="percentile", rng=seed)
    return np.asarray(res.bootstrap_distribution, dtype=np.float64)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")


def _array(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty list of per-item values; got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must hold finite per-item values; got NaN or inf")
    return x


def _binary(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0 or not np.all((x == 0) | (x == 1)):
        raise ValueError(f"{name} must be a non-empty list of per-item 0/1 correctness values; "
                         f"got {np.unique(x)[:5].tolist() if x.ndim == 1 else x.shape}")
    return x


def _same_length(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ValueError(f"paired values need the same items: got {len(x)} and {len(y)}")
