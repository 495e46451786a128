"""Pruning: importance scores, masks, and applying a CompressionPlan to a model.

Scores depend only on W and the calibration statistics, so they are computed once and kept apart from the masks;
`apply_plan` restores the dense weights and re-masks from the cached scores, which is what a search trial does.

  magnitude  S_ij = |W_ij|, compared across the whole matrix (the classic baseline; Han et al. 2015)
  wanda      S_ij = |W_ij| · ‖X_j‖₂, compared within each output row i (Sun et al. 2023, "Wanda")
  ria        S_ij = (|W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|) · ‖X_j‖₂^a, a = 0.5, compared within each output
             row (Zhang et al. 2024, "Plug-and-Play", Relative Importance and Activations: the L1 relative
             importance to the weight's input column and output row, times the activation norm to the power a)
N:M keeps, in every group of M consecutive weights of a row (along the input dimension), the N with the highest scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmmlab.calibrate import Key, Stats
from lmmlab.models import Loaded
from lmmlab.plan import CompressionPlan

SCORE_METHODS = ("magnitude", "wanda", "ria")
RIA_POWER = 0.5


def score(method: str, W: torch.Tensor, x_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of every weight of W [d_out, d_in]; x_norm [d_in] is ‖X_j‖₂ from calibration."""
    W = W.float().abs()
    if method == "magnitude":
        return W
    if x_norm is None:
        raise ValueError(f"method {method!r} needs calibration statistics (input norms)")
    x_norm = x_norm.to(W.device, torch.float32)
    if method == "wanda":
        return W * x_norm[None, :]
    if method == "ria":
        relative = W / W.sum(dim=0, keepdim=True).clamp_min(1e-12) + W / W.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return relative * x_norm[None, :].pow(RIA_POWER)
    raise ValueError(f"unknown scoring method {method!r}; allowed: {', '.join(SCORE_METHODS)}")


def compares_per_row(method: str) -> bool:
    """Wanda and RIA rank weights within each output row; magnitude across the whole matrix."""
    return method != "magnitude"


def mask_unstructured(S: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask that removes the lowest-scoring `sparsity` fraction (per output row, or of the whole matrix)."""
    mask = torch.ones_like(S, dtype=torch.bool)
    if per_row:
        k = int(S.shape[1] * sparsity)
        if k:
            mask.scatter_(1, torch.sort(S, dim=1, stable=True).indices[:, :k], False)
    else:
        k = int(S.numel() * sparsity)
        if k:
            mask.view(-1)[torch.sort(S.flatten(), stable=True).indices[:k]] = False
    return mask


def mask_nm(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly n of every m consecutive weights of each row (the n highest scores)."""
    d_out, d_in = S.shape
    if d_in % m:
        raise ValueError(f"N:M needs the input dimension ({d_in}) to be a multiple of M={m}")
    groups = S.reshape(d_out, d_in // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(d_out, d_in)


def make_mask(S: torch.Tensor, sparsity: float, method: str, nm: tuple[int, int] | None) -> torch.Tensor:
    if sparsity == 0:
        return torch.ones_like(S, dtype=torch.bool)
    if nm is not None:
        return mask_nm(S, *nm)
    return mask_unstructured(S, sparsity, compares_per_row(method))


@dataclass
class Scores:
    """Cached importance scores of every prunable linear for one method (W is not touched)."""

    method: str
    by_linear: dict[Key, torch.Tensor]  # [d_out, d_in] float32


def scores(method: str, loaded: Loaded, stats: Stats | None = None) -> Scores:
    """Scores of every prunable linear of the decoder layers for a score-based method."""
    if method not in SCORE_METHODS:
        raise ValueError(f"{method!r} has no cached scores; score-based methods: {', '.join(SCORE_METHODS)}")
    by_linear = {}
    for i in range(loaded.num_layers):
        for name, linear in loaded.linears(i).items():
            x_norm = stats.norm((i, name)) if stats is not None and (i, name) in stats.sq_norm else None
            by_linear[(i, name)] = score(method, linear.weight.detach(), x_norm)
    return Scores(method, by_linear)


class DenseWeights:
    """A copy of the prunable weights taken once, so any number of plans can be applied to the same model."""

    def __init__(self, loaded: Loaded):
        self.weights = {
            (i, name): linear.weight.detach().clone()
            for i in range(loaded.num_layers)
            for name, linear in loaded.linears(i).items()
        }

    @torch.no_grad()
    def restore(self, loaded: Loaded) -> None:
        for (i, name), W in self.weights.items():
            loaded.linears(i)[name].weight.copy_(W)


@torch.no_grad()
def apply_plan(loaded: Loaded, plan: CompressionPlan, scores: Scores, dense: DenseWeights) -> dict[Key, float]:
    """Restore the dense weights, then zero the lowest-scoring weights of every linear at its layer's ratio.

    Returns the achieved sparsity of every linear.
    """
    plan.check_layers(loaded.num_layers)
    if plan.method != scores.method:
        raise ValueError(f"plan asks for {plan.method!r} but the scores were computed for {scores.method!r}")
    dense.restore(loaded)
    achieved = {}
    for i, sparsity in enumerate(plan.sparsity):
        for name, linear in loaded.linears(i).items():
            mask = make_mask(scores.by_linear[(i, name)], sparsity, plan.method, plan.nm)
            linear.weight.mul_(mask.to(linear.weight.device))
            achieved[(i, name)] = 1 - mask.float().mean().item()
    return achieved


def sparsity_of(loaded: Loaded) -> float:
    """Fraction of exactly-zero weights over all prunable linears."""
    zeros = total = 0
    for i in range(loaded.num_layers):
        for linear in loaded.linears(i).values():
            zeros += int((linear.weight == 0).sum())
            total += linear.weight.numel()
    return zeros / total
