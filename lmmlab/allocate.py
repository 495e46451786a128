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
from lmmlab.prune import score

OWL_M = 5.0
OWL_LAMBDA = 0.08


def uniform(num_layers: int, target: float) -> list[float]:
    return [float(target)] * num_layers


def outlier_ratios(loaded: Loaded, stats: Stats, m: float = OWL_M) -> list[float]:
    """D_l: fraction of layer l's Wanda scores above m × their mean."""
    ratios = []
    for i in range(loaded.num_layers):
        S = torch.cat([score("wanda", lin.weight.detach(), stats.norm((i, name))).flatten()
                       for name, lin in loaded.linears(i).items()])
        ratios.append((S > m * S.mean()).float().mean().item())
    return ratios


def owl(loaded: Loaded, stats: Stats, target: float, m: float = OWL_M, lam: float = OWL_LAMBDA) -> list[float]:
    """OWL per-layer sparsities with mean exactly `target`."""
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must be in [0, 1); got {target}")
    if lam < 0:
        raise ValueError(f"OWL lambda must be >= 0; got {lam}")
    D = torch.tensor(outlier_ratios(loaded, stats, m), dtype=torch.float64)
    spread = D.max() - D.min()
    scaled = (D - D.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(D)
    sparsity = target - (scaled - scaled.mean())
    return project(sparsity.tolist(), target)


def project(raw: list[float], target: float, low: float = 0.0, high: float = 0.99) -> list[float]:
    """The closest per-layer sparsities to `raw` (shifted by one constant, then clipped to [low, high]) whose mean
    is exactly `target` — found by bisection on the shift."""
    if not low <= target <= high:
        raise ValueError(f"target {target} outside the allowed per-layer range [{low}, {high}]")
    x = torch.tensor(raw, dtype=torch.float64)
    lo, hi = low - x.max().item(), high - x.min().item()
    for _ in range(200):
        shift = (lo + hi) / 2
        if (x + shift).clamp(low, high).mean().item() < target:
            lo = shift
        else:
            hi = shift
    return (x + (lo + hi) / 2).clamp(low, high).tolist()
