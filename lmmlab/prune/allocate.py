"""Per-layer sparsity allocations: uniform, OWL (outlier-weighted), ATP (linear in depth), AlphaPruning (spectra),
DLP (layer importance from the Wanda metric).

OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): a layer's outlier ratio D_l is the fraction of its
Wanda scores |W_ij|·‖X_j‖₂ (all prunable linears of the layer together) above M times their mean. Ratios are
min-max scaled to [0, 2λ], centred, and layers with more outliers keep more weights:
  sparsity_l = target − (D̂_l − mean(D̂)),   D̂_l = 2λ (D_l − min D) / (max D − min D).
The mean over layers is exactly the target. Published defaults: M = 5, λ = 0.08.

ATP (Huang et al. 2025, "Determining Layer-wise Sparsity for LLMs Through a Theoretical Perspective"): sparsity is an
arithmetic progression in depth, deeper layers sparser, one common difference (slope) found by a grid search:
  sparsity_l = target + slope · (l − (L − 1)/2),   l = 0 … L − 1.

AlphaPruning (Lu et al., NeurIPS 2024): per matrix, PL_Alpha_Hill, the Hill estimate of the power-law exponent of the
eigenvalues λ_1 ≥ … ≥ λ_N of WᵀW over its k largest, α = 1 + k / Σ_{i ≤ k} ln(λ_i / λ_k); per layer, the mean α of
its linears, mapped linearly onto [s1, s2] and scaled to the target:
  r_l = s1 + (α_l − min α) / (max α − min α) · (s2 − s1),   sparsity_l = target · r_l / mean(r).
Defaults from the reference code (github haiquanlu/AlphaPruning): x_min at the spectral peak ("alpha_peak", its
default metric and the one all its scripts use); s1, s2 = 1 ∓ ε with ε = 0.2, `ww_sparsity`'s own defaults. The
scripts tune ε per model and method at 70 %: LLaMA-7B 0.2 (Wanda, SparseGPT), 0.3 (magnitude); LLaMA-2-7B 0.3
(Wanda), 0.2 (SparseGPT), 0.5 (magnitude); main.py's default is 0.3.

DLP (Chen et al. 2025, "DLP: Dynamic Layerwise Pruning in Large Language Models"; github ironartisan/DLP,
lib/prune.py `get_dlp_ratios`): a layer's score I_l is the mean of the Wanda metric |W_ij|·‖X_j‖₂ over every weight of
its linears (dense inputs), its importance 1 − I_l / Σ I, min-max scaled to [0, 2α], centred, and kept as density:
  density_l = 1 − target + Ŝ_l − mean(Ŝ),   Ŝ_l = 2α (u_l − min u) / (max u − min u),   u_l = 1 − I_l / Σ_k I_k,
so layers with a larger mean metric are pruned more, as the reference computes (its scripts: α = 0.15 at 70 %).
"""
from __future__ import annotations

import math

import torch

from lmmlab.prune.calibrate import Stats
from lmmlab.models import Loaded
from lmmlab.prune.scores import CHUNK, score

ALLOCATIONS = ("uniform", "owl", "atp", "alphapruning", "dlp")  # the allocations lmmlab resolves by name
OWL_M = 5.0
OWL_LAMBDA = 0.08
ALPHA_XMIN = "peak"  # AlphaPruning's default metric, alpha_peak
ALPHA_S1, ALPHA_S2 = 0.8, 1.2  # 1 ∓ ε, ε = 0.2


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


def check_target(target: float) -> None:
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must be in [0, 1); got {target}")


# ATP: sparsity linear in depth --------------------------------------------------------------------------------------

def atp_max_slope(num_layers: int, target: float, *, low: float = 0.0, high: float = 0.99) -> float:
    """The largest |slope| that keeps every ATP layer in [low, high]: min(target − low, high − target) / ((L − 1)/2)
    (infinite for one layer, where the slope does nothing)."""
    check_target(target)
    if num_layers < 1:
        raise ValueError(f"ATP needs at least one layer; got {num_layers}")
    if not low <= target <= high:
        raise ValueError(f"target {target} outside the allowed per-layer range [{low}, {high}]")
    half = (num_layers - 1) / 2
    return math.inf if half == 0 else min(target - low, high - target) / half


def atp(num_layers: int, target: float, slope: float, *, low: float = 0.0, high: float = 0.99) -> list[float]:
    """ATP's arithmetic progression (Huang et al. 2025): s_l = target + slope · (l − (L − 1)/2), l = 0 … L − 1, so
    consecutive layers differ by `slope` and the mean is exactly `target`. A slope that would put a layer outside
    [low, high] is refused (ValueError naming the allowed range |slope| ≤ `atp_max_slope`), not projected: that
    keeps the plan linear. ATP's own slopes are ≥ 0 (deeper layers sparser); negative ones are allowed here."""
    largest = atp_max_slope(num_layers, target, low=low, high=high)
    if not abs(slope) <= largest + 1e-12:
        raise ValueError(f"ATP slope {slope} puts a layer outside [{low}, {high}] at target {target} with "
                         f"{num_layers} layers; allowed: -{largest:.6g} <= slope <= {largest:.6g}")
    half = (num_layers - 1) / 2
    return [min(max(target + slope * (l - half), low), high) for l in range(num_layers)]


def atp_slopes(num_layers: int, target: float, *, n: int = 9, low: float = 0.0, high: float = 0.99) -> list[float]:
    """The grid ATP searches its one hyperparameter on: `n` evenly spaced slopes from 0 (uniform) to the largest
    that keeps every layer in [low, high] (`atp_max_slope`); just [0.0] where no slope is possible or needed."""
    if n < 1:
        raise ValueError(f"ATP slope grid needs n >= 1 points; got {n}")
    largest = atp_max_slope(num_layers, target, low=low, high=high)
    if n == 1 or largest == 0 or math.isinf(largest):
        return [0.0]
    return [largest * i / (n - 1) for i in range(n)]


# AlphaPruning: heavy-tailed spectra ---------------------------------------------------------------------------------

def eigenvalues(W: torch.Tensor) -> torch.Tensor:
    """The eigenvalues λ of WᵀW, ascending, in float64: the squared singular values of W (torch.linalg.svdvals in
    float32, as the reference does); non-positive ones (a rank-deficient W) are dropped."""
    lam = torch.linalg.svdvals(W.detach().to(torch.float32)).to(torch.float64).square().sort().values
    return lam[lam > 0]


def hill(lam: torch.Tensor, k: int) -> float:
    """The Hill estimator of the power-law exponent on the k largest of the ascending eigenvalues `lam`:
    α = 1 + k / Σ_{i ≤ k} ln(λ_i / λ_k), λ_1 ≥ … ≥ λ_k the k largest (λ_k, the smallest of them, is x_min)."""
    if not 2 <= k <= len(lam):
        raise ValueError(f"Hill estimator needs 2 <= k <= {len(lam)} (the number of eigenvalues); got {k}")
    top = lam[len(lam) - k:]
    return 1 + k / torch.log(top / top[0]).sum().item()


def hill_peak(lam: torch.Tensor, *, bins: int = 100) -> float:
    """AlphaPruning's default α ("alpha_peak", fix-fingers "xmin_peak" of the reference's `net_esd_estimator`):
    among the candidate x_min = λ_i the Hill α of the tail λ ≥ λ_i with the smallest Kolmogorov–Smirnov distance
    D_i = max_j |1 − (λ_j / λ_i)^(1 − α_i) − j / n_i| (j = 0 … n_i − 1 over the tail, n_i = N − i, α_i ≤ 1: D = 1).
    Candidates: λ_i ≤ 1.5 · p and λ_i ≥ log10(0.95 · p), not the largest, where p = 10^(left edge of the fullest
    of `bins` histogram bins of log10 λ). The lower bound is the reference's as coded (a log10 compared with
    eigenvalues), kept so α matches it; for λ < 1 it excludes nothing. Ties and no candidate follow its argmin."""
    N = len(lam)
    logs = lam.log10()
    lo, hi = logs.min().item(), logs.max().item()
    counts = torch.histc(logs, bins=bins, min=lo, max=hi)
    peak = 10 ** torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[counts.argmax()].item()
    first, last = math.log10(0.95 * peak), 1.5 * peak
    i = torch.arange(N - 1)
    n = (N - i).to(torch.float64)
    tail_log_sum = lam.log().flip(0).cumsum(0).flip(0)[:-1]  # Σ_{j ≥ i} ln λ_j
    alpha = 1 + n / (tail_log_sum - n * lam[:-1].log())
    candidate = (lam[:-1] >= first) & (lam[:-1] <= last)
    alpha = torch.where(candidate, alpha, torch.zeros_like(alpha))
    D = torch.ones_like(alpha)
    j = torch.arange(N)
    for rows in i[candidate & (alpha > 1)].split(256):
        rel = j[None, :] - rows[:, None]  # position within the tail
        cdf = 1 - (lam[None, :] / lam[rows, None]) ** (1 - alpha[rows, None])
        gap = (cdf - rel / n[rows, None]).abs().masked_fill(rel < 0, 0)
        D[rows] = gap.max(dim=1).values
    return alpha[D.argmin()].item()


def pl_alpha_hill(W: torch.Tensor, *, k: int | None = None, xmin: str = "peak") -> float:
    """PL_Alpha_Hill of a weight matrix: the power-law exponent of the tail of the eigenvalues of WᵀW (its
    empirical spectral density), α = 1 + k / Σ_{i ≤ k} ln(λ_i / λ_k) over the k largest (`hill`). A smaller α is a
    heavier tail, a better-trained matrix (HT-SR theory). k given: exactly that. Else, as the reference
    (github haiquanlu/AlphaPruning, lib/esd_utils.py `net_esd_estimator`) chooses x_min: "peak" (its default
    `--ww_metric alpha_peak`, used by every script and the paper's results; `hill_peak`) or "mid" (its
    "alpha_mid": x_min the median eigenvalue, k = N − ⌊N/2⌋ of the N = min(rows, cols) eigenvalues)."""
    lam = eigenvalues(W)
    if k is not None:
        return hill(lam, k)
    if xmin == "mid":
        return hill(lam, len(lam) - len(lam) // 2)
    if xmin == "peak":
        return hill_peak(lam)
    raise ValueError(f"unknown x_min rule {xmin!r}; allowed: peak, mid")


def layer_alphas(loaded: Loaded, *, weights=None, xmin: str = ALPHA_XMIN) -> list[float]:
    """Per decoder layer: the mean PL_Alpha_Hill over its prunable linears (the reference's `mapping_type
    block_wise`), of `weights` (indexed by (layer, name), such as the `DenseWeights` while the model is pruned) when
    given, else of the model's current weights. One SVD per linear."""
    alphas = []
    for i in range(loaded.num_layers):
        values = [pl_alpha_hill(lin.weight if weights is None else weights[(i, name)], xmin=xmin)
                  for name, lin in loaded.linears(i).items()]
        alphas.append(sum(values) / len(values))
    return alphas


def check_alphapruning(target: float, s1: float, s2: float) -> None:
    check_target(target)
    if not 0 <= s1 <= s2 or s2 <= 0:
        raise ValueError(f"AlphaPruning needs 0 <= s1 <= s2 and s2 > 0 (the reference's 1 - epsilon, 1 + epsilon); "
                         f"got s1={s1}, s2={s2}")


def alphapruning_from(alphas: list[float], target: float, *, s1: float = ALPHA_S1, s2: float = ALPHA_S2,
                      low: float = 0.0, high: float = 0.99) -> list[float]:
    """AlphaPruning's sparsities from per-layer α (the reference's `ww_sparsity`): α mapped linearly onto [s1, s2],
    r_l = s1 + (α_l − min α) / (max α − min α) · (s2 − s1), then scaled to the target, s_l = target · r_l / mean(r)
    (the reference weights the mean by parameters: the same for equal-size decoder layers), then `project`ed into
    [low, high] (a no-op unless a layer leaves it). Layers with a larger α (lighter tail, less well trained) are
    pruned more. Equal α: uniform."""
    check_alphapruning(target, s1, s2)
    a = torch.tensor(alphas, dtype=torch.float64)
    spread = (a.max() - a.min()).item()
    ratio = s1 + (a - a.min()) / spread * (s2 - s1) if spread > 0 else torch.ones_like(a)
    return project((target * ratio / ratio.mean()).tolist(), target, low, high)


def alphapruning(loaded: Loaded, target: float, *, weights=None, s1: float = ALPHA_S1, s2: float = ALPHA_S2,
                 xmin: str = ALPHA_XMIN) -> list[float]:
    """AlphaPruning (Lu et al., NeurIPS 2024) per-layer sparsities with mean exactly `target`: `layer_alphas` (of
    `weights` when given) mapped by `alphapruning_from`."""
    check_alphapruning(target, s1, s2)  # before the SVDs
    return alphapruning_from(layer_alphas(loaded, weights=weights, xmin=xmin), target, s1=s1, s2=s2)


# DLP: layer importance from the mean Wanda metric -----------------------------------------------------------------

DLP_ALPHA = 0.15  # the reference's scripts at 70 % (LLaMA-1/2 7B-30B)


def dlp_scores(loaded: Loaded, stats: Stats, weights=None) -> list[float]:
    """I_l: the mean of the Wanda metric |W_ij|·‖X_j‖₂ over every weight of layer l's prunable linears (the
    reference's mean over their concatenated metrics), of `weights` (indexed by (layer, name)) when given, else of
    the model's current weights; a block of rows at a time."""
    scores = []
    for i in range(loaded.num_layers):
        total, count = 0.0, 0
        for name, lin in loaded.linears(i).items():
            W = lin.weight.detach() if weights is None else weights[(i, name)]
            x_norm = stats.norm((i, name))
            rows = max(1, CHUNK // W.shape[1])
            for r0 in range(0, W.shape[0], rows):
                total += score("wanda", W[r0:r0 + rows], x_norm).sum(dtype=torch.float64).item()
            count += W.numel()
        scores.append(total / count)
    return scores


def dlp_from(scores: list[float], target: float, alpha: float = DLP_ALPHA, *, low: float = 0.0,
             high: float = 0.99) -> list[float]:
    """DLP's sparsities from per-layer scores I_l (see the module docstring), mean exactly `target`, then `project`ed
    into [low, high] (a no-op unless a layer leaves it). Equal scores: uniform."""
    check_target(target)
    if alpha < 0:
        raise ValueError(f"DLP alpha must be >= 0; got {alpha}")
    I = torch.tensor(scores, dtype=torch.float64)
    u = 1 - I / I.sum()
    spread = (u.max() - u.min()).item()
    scaled = (u - u.min()) / spread * 2 * alpha if spread > 0 else torch.zeros_like(u)
    density = scaled - scaled.mean() + (1 - target)
    return project((1 - density).tolist(), target, low, high)


def dlp(loaded: Loaded, stats: Stats, target: float, alpha: float = DLP_ALPHA, weights=None) -> list[float]:
    """DLP (Chen et al. 2025) per-layer sparsities with mean exactly `target` (`dlp_scores` of `weights` if given)."""
    check_target(target)
    return dlp_from(dlp_scores(loaded, stats, weights), target, alpha)


def dlp_alphas(*, n: int = 7, largest: float = 0.3) -> list[float]:
    """The grid DLP's α is chosen on: `n` evenly spaced values from 0 (uniform) to `largest` (the reference's 0.15 in
    the middle); a layer an α pushes out of [0, 0.99] is brought back by `dlp_from`'s projection."""
    if n < 1 or largest < 0:
        raise ValueError(f"DLP alpha grid needs n >= 1 points and largest >= 0; got {n}, {largest}")
    return [0.0] if n == 1 else [round(largest * i / (n - 1), 10) for i in range(n)]


