"""Intervals and paired tests on per-item values (a question's correctness, a window's NLL), so that every claim that
one plan beats another carries its uncertainty — and "tie" is an answer.

  mean_interval  the mean and its percentile-bootstrap interval (Efron & Tibshirani 1993)
  paired         the mean per-item difference a − b on the same items, its bootstrap interval, and a two-sided
                 sign-flip permutation test (exact in distribution under "no difference", Monte Carlo with a seed)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def mean_interval(values: Sequence[float], *, confidence: float = 0.95, n_boot: int = 2000,
                  seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile-bootstrap interval."""
    x = _array(values, "values")
    rng = np.random.default_rng(seed)
    boot = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    return float(x.mean()), float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail))


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
    """Compare two plans' per-item values on the same items, in the same order."""
    x, y = _array(a, "a"), _array(b, "b")
    if len(x) != len(y):
        raise ValueError(f"paired values need the same items: got {len(x)} and {len(y)}")
    d = x - y
    mean, low, high = mean_interval(d, confidence=confidence, n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed + 1)
    flips = rng.choice((-1.0, 1.0), size=(n_perm, len(d)))
    extreme = (np.abs((flips * d).mean(axis=1)) >= abs(mean) - 1e-12).sum()
    p = float((extreme + 1) / (n_perm + 1))
    verdict = "tie" if low <= 0 <= high else ("a higher" if mean > 0 else "b higher")
    return Paired(mean, low, high, p, len(d), verdict)


def _array(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty list of per-item values; got shape {x.shape}")
    return x
