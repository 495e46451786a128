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
from lmmlab.models import VISION, Loaded
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


def scores(method: str, loaded: Loaded, stats: Stats | None = None, vision: bool = False) -> Scores:
    """Scores of every prunable linear of the decoder layers (and of the vision side, when asked)."""
    if method not in SCORE_METHODS:
        raise ValueError(f"{method!r} has no cached scores; score-based methods: {', '.join(SCORE_METHODS)}")
    by_linear = {}
    for key, linear in loaded.prunable(vision).items():
        x_norm = stats.norm(key) if stats is not None and key in stats.sq_norm else None
        by_linear[key] = score(method, linear.weight.detach(), x_norm)
    return Scores(method, by_linear)


class DenseWeights:
    """A copy of the prunable weights taken once, so any number of plans can be applied to the same model."""

    def __init__(self, loaded: Loaded):
        self.weights = {key: linear.weight.detach().clone() for key, linear in loaded.prunable(vision=True).items()}

    @torch.no_grad()
    def restore(self, loaded: Loaded) -> None:
        for key, linear in loaded.prunable(vision=True).items():
            linear.weight.copy_(self.weights[key])


@torch.no_grad()
def apply_plan(loaded: Loaded, plan: CompressionPlan, scores: Scores, dense: DenseWeights) -> dict[Key, float]:
    """Restore the dense weights, then zero the lowest-scoring weights of every linear at its layer's ratio.

    Returns the achieved sparsity of every linear.
    """
    plan.check_layers(loaded.num_layers)
    if plan.method != scores.method:
        raise ValueError(f"plan asks for {plan.method!r} but the scores were computed for {scores.method!r}")
    ratios = {key: plan.sparsity[key[0]] for key in loaded.prunable()}
    if plan.vision_sparsity:
        ratios.update({key: plan.vision_sparsity for key in loaded.prunable(vision=True) if key[0] == VISION})
        if not all(key in scores.by_linear for key in ratios):
            raise ValueError("the plan prunes the vision side but the scores lack it: use scores(..., vision=True)")
    dense.restore(loaded)
    achieved = {}
    linears = loaded.prunable(vision=True)
    for key, sparsity in ratios.items():
        mask = make_mask(scores.by_linear[key], sparsity, plan.method, plan.nm)
        linears[key].weight.mul_(mask.to(linears[key].weight.device))
        achieved[key] = 1 - mask.float().mean().item()
    return achieved


def sparsity_of(loaded: Loaded) -> float:
    """Fraction of exactly-zero weights over the decoder layers' prunable linears."""
    weights = [linear.weight for linear in loaded.prunable().values()]
    return sum(int((W == 0).sum()) for W in weights) / sum(W.numel() for W in weights)


# --------------------------------------------------------------------------------------------------------------------
# SparseGPT (Frantar & Alistarh 2023): prune with the optimal-brain-surgeon weight update, column by column.


class SparseGPT:
    """One linear's SparseGPT solver: `add_batch` (accumulate H) -> `prune` (mask + update W in place) -> `free`."""

    def __init__(self, linear: torch.nn.Linear):
        self.linear = linear
        self.columns = linear.weight.shape[1]
        self.H = torch.zeros(self.columns, self.columns, device=linear.weight.device)  # [d_in, d_in]
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x: [tokens, d_in] inputs of the linear. Keeps H = (2 / n) Σ_t x_t x_tᵀ as a running mean."""
        x = x.float()
        n = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = (2 / self.nsamples) ** 0.5 * x
        self.H += x.T @ x

    @torch.no_grad()
    def prune(self, sparsity: float, nm: tuple[int, int] | None = None, blocksize: int = 128,
              percdamp: float = 0.01) -> None:
        """Remove `sparsity` of the weights (or keep n of every m), compensating each removal on later columns."""
        W = self.linear.weight.data.clone().float()  # [d_out, d_in]
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        H += damp * torch.eye(self.columns, device=H.device)
        # Upper Cholesky factor of H⁻¹: row i holds the OBS update of columns ≥ i after removing column i.
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            prune_mask = torch.zeros_like(W1, dtype=torch.bool)
            if nm is None:
                # OBS saliency w² / [H⁻¹]_jj², thresholded over the whole block (adaptive mask selection)
                saliency = W1**2 / torch.diag(Hinv1)[None, :] ** 2
                k = int(saliency.numel() * sparsity)
                if k:
                    prune_mask.view(-1)[torch.sort(saliency.flatten(), stable=True).indices[:k]] = True
            else:
                n, m = nm
            for i in range(i2 - i1):
                w = W1[:, i]
                d = Hinv1[i, i]
                if nm is not None and i % m == 0:
                    saliency = W1[:, i : i + m] ** 2 / torch.diag(Hinv1)[i : i + m][None, :] ** 2
                    prune_mask.scatter_(1, i + torch.topk(saliency, m - n, dim=1, largest=False).indices, True)
                q = w.clone()
                q[prune_mask[:, i]] = 0
                Q1[:, i] = q
                err = (w - q) / d
                W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        self.linear.weight.data.copy_(W.to(self.linear.weight.dtype))

    def free(self) -> None:
        self.H = None


class _StopForward(Exception):
    pass


def decoder_inputs(loaded: Loaded, batches: list[dict]) -> list[tuple[tuple, dict, torch.Tensor]]:
    """(args, kwargs, token mask) that each batch brings to the first decoder layer (vision tower and merge done)."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = loaded.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                loaded.model(**batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return [(args, kwargs, batch["attention_mask"].bool()) for (args, kwargs), batch in zip(captured, batches)]


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def apply_sparsegpt(loaded: Loaded, plan: CompressionPlan, batches: list[dict], blocksize: int = 128,
                    percdamp: float = 0.01) -> None:
    """Prune the model in place with SparseGPT, layer by layer: each layer is calibrated on the outputs of the
    already-pruned layers before it, so only one layer's Hessians are ever in memory."""
    plan.check_layers(loaded.num_layers)
    if plan.vision_sparsity:
        raise ValueError("sparsegpt prunes the decoder layers only; use vision_sparsity with magnitude, wanda or ria")
    inputs = decoder_inputs(loaded, batches)
    for i, layer in enumerate(loaded.layers):
        solvers = {name: SparseGPT(linear) for name, linear in loaded.linears(i).items()}

        def hook_for(solver: SparseGPT, mask: list[torch.Tensor]):
            return lambda module, args: solver.add_batch(args[0][mask[0]])

        mask: list[torch.Tensor] = []
        handles = [s.linear.register_forward_pre_hook(hook_for(s, mask)) for s in solvers.values()]
        for args, kwargs, token_mask in inputs:
            mask[:] = [token_mask]
            layer(*args, **kwargs)
        for h in handles:
            h.remove()
        if plan.sparsity[i] > 0:
            for solver in solvers.values():
                solver.prune(plan.sparsity[i], plan.nm, blocksize, percdamp)
        for solver in solvers.values():
            solver.free()
        # the next layer sees what this pruned layer produces
        inputs = [((_layer_output(layer(*args, **kwargs)),) + tuple(args[1:]), kwargs, token_mask)
                  for args, kwargs, token_mask in inputs]
