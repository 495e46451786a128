"""Per-layer sparsity allocations: uniform, and OWL (outlier-weighted layerwise sparsity).

OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): a layer's outlier ratio D_l is the fraction of its
Wanda scores |W_ij|·‖X_j‖₂ (all prunable linears of the layer together) above M times their mean. Ratios are
min-max scaled to [0, 2λ], centred, and layers with more outliers keep more weights:
  sparsity_l = target − (D̂_l − mean(D̂)),   D̂_l = 2λ (D_l − min D) / (max D − min D).
The mean over layers is exactly the target. Published defaults: M = 5, λ = 0.08.
"""
from __future__ import annotations

import torch

from lmmlab.calibrate import Stats
from lmmlab.models import Loaded
from lmmlab.prune import CHUNK, score

OWL_M = 5.0
OWL_LAMBDA = 0.08


def uniform(num_layers: int, target: float) -> list[float]:
    return [float(target)] * num_layers


def outlier_ratios(loaded: Loaded, stats: Stats, m: float = OWL_M, weights=None) -> list[float]:
    """D_l: fraction of layer l's Wanda scores above m × their mean; of `weights` (indexed by (layer, name)) when
    given, such as the `DenseWeights` while the model is pruned, else of the model's current weights. Two passes over
    the layer's linears (sum, then count), each a block of rows at a time, so no linear's scores exist whole."""
    def blocks(i: int):
        for name, lin in loaded.linears(i).items():
            W = lin.weight.detach() if weights is None else weights[(i, name)]
            x_norm = stats.norm((i, name))
            rows = max(1, CHUNK // W.shape[1])
            for r0 in range(0, W.shape[0], rows):
                yield score("wanda", W[r0:r0 + rows], x_norm)

    ratios = []
    for i in range(loaded.num_layers):
        total = sum(S.sum(dtype=torch.float64).item() for S in blocks(i))
        count = sum(lin.weight.numel() for lin in loaded.linears(i).values())
        threshold = m * total / count
        ratios.append(sum(int((S > threshold).sum()) for S in blocks(i)) / count)
    return ratios


def owl(loaded: Loaded, stats: Stats, target: float, m: float = OWL_M, lam: float = OWL_LAMBDA,
        weights: dict | None = None) -> list[float]:
    """OWL per-layer sparsities with mean exactly `target` (scores of `weights` if given; see `outlier_ratios`)."""
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must be in [0, 1); got {target}")
    if lam < 0:
        raise ValueError(f"OWL lambda must be >= 0; got {lam}")
    D = torch.tensor(outlier_ratios(loaded, stats, m, weights), dtype=torch.float64)
    spread = D.max() - D.min()
    scaled = (D - D.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(D)
    sparsity = target - (scaled - scaled.mean())
    return project(sparsity.tolist(), target)


def project(raw: list[float], target: float, low: float = 0.0, high: float = 0.99,
            weights: list[float] | None = None) -> list[float]:
    """The closest per-layer sparsities to `raw` whose `weights`-weighted mean is exactly `target`, each in
    [low, high].

    Minimising Σ w_l (s_l − raw_l)² under Σ w_l s_l = target · Σ w_l and the bounds gives (KKT) one common shift ν:
    s_l = clip(raw_l + ν, low, high), where ν solves the monotone equation, here by bisection to float precision."""
    if not low <= target <= high:
        raise ValueError(f"target {target} outside the allowed per-layer range [{low}, {high}]")
    x = torch.tensor(raw, dtype=torch.float64)
    w = torch.ones_like(x) if weights is None else torch.tensor(weights, dtype=torch.float64)
    if w.shape != x.shape or (w <= 0).any():
        raise ValueError("weights must be positive, one per layer")
    w = w / w.sum()

    def mean(shift: float) -> float:
        return ((x + shift).clamp(low, high) * w).sum().item()
    lo, hi = low - x.max().item(), high - x.min().item()
    for _ in range(200):
        shift = (lo + hi) / 2
        if mean(shift) < target:
            lo = shift
        else:
            hi = shift
    return (x + (lo + hi) / 2).clamp(low, high).tolist()


def fit_kv_bits(raw: list[int], budget: float, widths: tuple[int, ...], cost: dict[int, float] | None = None
                ) -> list[int]:
    """Per-layer KV widths whose mean cost is at most `budget`: while it is over, the widest layer (the deepest of
    equals) steps down to the next allowed width. `cost[b]` is what a width costs in the budget's unit: the nominal
    width (default), or the effective bits per element it really stores at a stated context
    (`kvcache.effective_bits`). A plan already within the budget is returned unchanged."""
    widths = tuple(sorted(set(widths)))
    cost = cost or {b: float(b) for b in widths}
    if budget < cost[widths[0]]:
        raise ValueError(f"KV budget {budget} bits is below the narrowest allowed width {widths[0]} "
                         f"({cost[widths[0]]:.4g} bits)")
    bad = [b for b in raw if b not in widths]
    if bad:
        raise ValueError(f"kv width {bad[0]} is not among the allowed {', '.join(map(str, widths))}")
    bits = list(raw)
    while sum(cost[b] for b in bits) > budget * len(bits) + 1e-9:
        widest = max(range(len(bits)), key=lambda i: (bits[i], i))
        bits[widest] = widths[widths.index(bits[widest]) - 1]
    return bits
