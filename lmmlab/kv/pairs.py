"""Keys and values as pairs (KVTuner, Li et al. 2025): a layer stores its keys at K bits and its values at V ≤ K bits,
one choice from a short list of pairs — KV8, K8V4, KV4, K4V2, KV2 (KVTuner's), KV16 where the budget allows — and
layers are grouped into clusters by measured sensitivity, each cluster one choice.

  pair cost       (K + V) / 2 nominal bits: a plan's `mean_kv_bits` is the mean of it over layers
  fit_pairs       the repair onto a budget: while the mean cost is over, the costliest layer (the least sensitive of
                  equals, then the deepest) steps down to the next cheaper pair of the list
  sensitivity     per layer, the KL fitness (`lmmlab.fitness`) with that layer alone at a probe pair (KV2) and every
                  other layer at 16 bits
  clusters        layers split into `n` groups of consecutive sensitivity rank, as equal in size as possible
  kvtuner_plan    the static KVTuner-style baseline: every layer at the costliest pair, then `fit_pairs` down to the
                  budget, least sensitive layers first
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from lmmlab.kv.budget import KV_BITS

Pair = tuple[int, int]  # (key bits, value bits)
KVTUNER_PAIRS = ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))
PAIRS_EXAMPLE = "e.g. KV8,K8V4,KV4,K4V2,KV2"
PROBE = (2, 2)  # the pair a layer is probed at to measure its sensitivity
CLUSTERS = 5  # KVTuner groups layers into 5-8 clusters


def pair_name(pair: Pair) -> str:
    k, v = pair
    return f"KV{k}" if k == v else f"K{k}V{v}"


def cost(pair: Pair) -> float:
    """Nominal bits per stored element of a layer at `pair`: the mean of its key and value widths."""
    return (pair[0] + pair[1]) / 2


def parse_pairs(text: str | Sequence[str]) -> tuple[Pair, ...]:
    """'KV8,K8V4,KV4,K4V2,KV2' (KVTuner's names; KV{b} = keys and values at b bits, K{k}V{v} = keys at k, values at
    v) -> the pairs, costliest first. Every width must be one of lmmlab's KV widths and K ≥ V (keys carry the
    per-channel outliers); else a one-line ValueError."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise ValueError(f"empty KV pair list; give pairs such as {PAIRS_EXAMPLE}")
    pairs = []
    for name in names:
        match = re.fullmatch(r"KV(\d+)|K(\d+)V(\d+)", name.upper())
        if not match:
            raise ValueError(f"bad KV pair {name!r}; allowed: KV<b> or K<k>V<v>, {PAIRS_EXAMPLE}")
        k, v = (int(match[1]), int(match[1])) if match[1] else (int(match[2]), int(match[3]))
        for b in (k, v):
            if b not in KV_BITS:
                raise ValueError(f"KV pair {name}: width {b} not supported; allowed: {', '.join(map(str, KV_BITS))}")
        if v > k:
            raise ValueError(f"KV pair {name}: values wider than keys; give K >= V ({PAIRS_EXAMPLE})")
        pairs.append((k, v))
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"KV pair list {', '.join(names)} names a pair twice")
    return tuple(sorted(pairs, key=lambda p: (-cost(p), -p[0])))


def default_pairs(budget: float) -> tuple[Pair, ...]:
    """KVTuner's pairs, with KV16 first when the budget reaches 16 bits."""
    return (((16, 16),) if budget >= 16 else ()) + KVTUNER_PAIRS


def check_budget(budget: float, pairs: Sequence[Pair]) -> None:
    """One clear error when not even the cheapest pair meets the budget."""
    cheapest = min(pairs, key=cost)
    if cost(cheapest) > budget + 1e-9:
        raise ValueError(f"KV budget {budget:g} mean bits cannot be met by the pairs "
                         f"{', '.join(map(pair_name, pairs))}: the cheapest, {pair_name(cheapest)}, costs "
                         f"{cost(cheapest):g}; raise the budget or add a cheaper pair")


def fit_pairs(chosen: Sequence[Pair], budget: float, pairs: Sequence[Pair],
              sensitivity: Sequence[float] | None = None) -> list[Pair]:
    """Per-layer pairs whose mean cost is at most `budget`: while it is over, the costliest layer (the least
    sensitive of equals, then the deepest) steps down to the next cheaper pair of `pairs`. A choice within budget is
    returned unchanged."""
    order = sorted(pairs, key=lambda p: (-cost(p), -p[0]))
    check_budget(budget, order)
    bad = [p for p in chosen if p not in order]
    if bad:
        raise ValueError(f"KV pair {pair_name(bad[0])} is not among {', '.join(map(pair_name, order))}")
    s = list(sensitivity) if sensitivity is not None else [0.0] * len(chosen)
    out = list(chosen)
    while sum(cost(p) for p in out) > budget * len(out) + 1e-9:
        i = max((i for i in range(len(out)) if order.index(out[i]) < len(order) - 1),
                key=lambda i: (cost(out[i]), -s[i], i))
        out[i] = order[order.index(out[i]) + 1]
    return out


def clusters(sensitivity: Sequence[float], n: int = CLUSTERS) -> list[int]:
    """The cluster of each layer: layers ranked by sensitivity (most sensitive first, ties to the shallower) and cut
    into `n` groups of consecutive rank, as equal in size as possible. Cluster 0 holds the most sensitive."""
    L = len(sensitivity)
    if not 1 <= n:
        raise ValueError(f"KV clusters must be >= 1; got {n}")
    n = min(n, L)
    rank = sorted(range(L), key=lambda i: (-sensitivity[i], i))
    out = [0] * L
    for r, i in enumerate(rank):
        out[i] = r * n // L
    return out


def sensitivity(num_layers: int, score: Callable[[list[Pair]], float], probe: Pair = PROBE) -> list[float]:
    """Per layer, `score` (a fitness, lower is better, such as the KL from the dense model) of the plan with that
    layer alone at `probe` and every other layer at 16 bits."""
    out = []
    for i in range(num_layers):
        pairs = [(16, 16)] * num_layers
        pairs[i] = probe
        out.append(score(pairs))
    return out


def kvtuner_plan(sens: Sequence[float], budget: float, pairs: Sequence[Pair]) -> list[Pair]:
    """The KVTuner-style baseline: every layer at the costliest pair, then `fit_pairs` down to `budget`, the least
    sensitive layers first."""
    order = sorted(pairs, key=lambda p: (-cost(p), -p[0]))
    return fit_pairs([order[0]] * len(sens), budget, order, sens)
