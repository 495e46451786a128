"""Pruning: importance scores, masks, and applying a CompressionPlan to a model.

Scores depend only on the dense W and the calibration statistics (‖X_j‖₂, cached once per calibration), so a search
trial never recalibrates: `apply_plan` reads each linear's dense W back (`DenseWeights`: a host copy or the
checkpoint), scores it, masks it and writes it into the model, one linear at a time.

  magnitude  S_ij = |W_ij|, compared across the whole matrix (the classic baseline; Han et al. 2015)
  wanda      S_ij = |W_ij| · ‖X_j‖₂, compared within each output row i (Sun et al. 2023, "Wanda")
  ria        S_ij = (|W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|) · ‖X_j‖₂^a, a = 0.5, compared within each output
             row (Zhang et al. 2024, "Plug-and-Play", Relative Importance and Activations: the L1 relative
             importance to the weight's input column and output row, times the activation norm to the power a)
N:M keeps, in every group of M consecutive weights of a row (along the input dimension), the N with the highest scores.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lmmlab.prune.calibrate import Key, Stats
from lmmlab.models import VISION, Loaded, saved_names
from lmmlab.plan import CompressionPlan
from lmmlab.prune.sequential import layer_by_layer

SCORE_METHODS = ("magnitude", "wanda", "ria")
RIA_POWER = 0.5


def score(method: str, W: torch.Tensor, x_norm: torch.Tensor | None = None,
          col_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of every weight of W [d_out, d_in] in float32; x_norm [d_in] is ‖X_j‖₂ from calibration.
    `col_sum` [d_in] = Σ_k |W_kj| over all rows, for RIA on a block of rows (computed from W when not given)."""
    S = W.abs().float()  # exact: |w| in W's dtype, then widened
    if method == "magnitude":
        return S
    if x_norm is None:
        raise ValueError(f"method {method!r} needs calibration statistics (input norms)")
    x_norm = x_norm.to(S.device, torch.float32)
    if method == "wanda":
        return S.mul_(x_norm[None, :])
    if method == "ria":
        col_sum = S.sum(dim=0) if col_sum is None else col_sum.to(S.device)
        relative = S / col_sum[None, :].clamp_min(1e-12) + S.div_(S.sum(dim=1, keepdim=True).clamp_min(1e-12))
        return relative.mul_(x_norm[None, :].pow(RIA_POWER))
    raise ValueError(f"unknown scoring method {method!r}; allowed: {', '.join(SCORE_METHODS)}")


def compares_per_row(method: str) -> bool:
    """Wanda and RIA rank weights within each output row; magnitude across the whole matrix."""
    return method != "magnitude"


def lowest(S: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k lowest scores along the last dim, ties going to the lower index — exactly the first k of a stable
    sort, found with a selection (kthvalue) and one cumulative count instead of a sort (~4x faster on a CPU)."""
    kth = torch.kthvalue(S, k, dim=-1, keepdim=True).values  # the k-th lowest score (per row)
    at_most = S <= kth
    if bool((at_most.sum(-1) == k).all()):  # the usual case: no score beyond the k-th ties with it
        return at_most
    below = S < kth
    tied = S == kth
    room = k - below.sum(-1, keepdim=True)  # how many of the tied scores still go, lowest index first
    return below | (tied & (tied.cumsum(-1) <= room))


def row_quotas(next_score: torch.Tensor, removed: int) -> torch.Tensor:
    """How many weights each output row loses, so that a per-row method removes exactly `removed` weights of the
    matrix — the same count as a whole-matrix threshold, whatever d_out: every row loses ⌊removed / d_out⌋, and the
    remaining removed mod d_out go, one each, to the rows whose next candidate (their (⌊removed/d_out⌋+1)-th lowest
    score, `next_score` [d_out]) is lowest, ties to the lower row. (Wanda's and RIA's reference code floors every row,
    which keeps up to d_out − 1 weights too many per matrix: 0.43 % of the budget at 70 % on the toy model.)"""
    d_out = next_score.shape[0]
    base, extra = divmod(removed, d_out)
    quota = torch.full((d_out,), base, dtype=torch.long)
    if extra:
        quota[torch.sort(next_score.float().cpu(), stable=True).indices[:extra]] += 1
    return quota


def lowest_per_row(S: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """True at the quota[i] lowest scores of each row i (ties to the lower index); quota holds at most two values."""
    drop = torch.zeros_like(S, dtype=torch.bool)
    for k in quota.unique().tolist():
        if k:
            rows = (quota == k).nonzero().flatten().to(S.device)
            drop[rows] = lowest(S[rows], k)
    return drop


def removed_count(numel: int, sparsity: float) -> int:
    """Weights removed from a matrix at `sparsity`: ⌊numel · sparsity⌋, for every method and pattern alike."""
    return int(numel * sparsity)


def mask_unstructured(S: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask that removes the lowest-scoring ⌊numel · sparsity⌋ weights: compared within each output row (the
    count spread over the rows by `row_quotas`), or across the whole matrix."""
    k = removed_count(S.numel(), sparsity)
    if not k:
        return torch.ones_like(S, dtype=torch.bool)
    if per_row:
        base = k // S.shape[0]
        next_score = torch.kthvalue(S, base + 1, dim=1).values if k % S.shape[0] else torch.zeros(S.shape[0])
        return ~lowest_per_row(S, row_quotas(next_score, k))
    return ~lowest(S.flatten(), k).view_as(S)


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


def checkpoint_names(loaded: Loaded, keys: list[Key]) -> dict[Key, tuple[str, str]] | None:
    """Where each prunable weight lies in the model's local safetensors checkpoint: {key: (file, tensor name)}, or
    None when the model has no local checkpoint or one of the weights is not in it under its saved name
    (`models.saved_names`: transformers' own renaming between modules and checkpoint)."""
    from safetensors import safe_open

    folder = Path(str(getattr(loaded.model.config, "_name_or_path", "")))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    stored: dict[str, str] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            stored.update({name: str(file) for name in handle.keys()})
    names = {id(p): n for n, p in loaded.model.named_parameters()}
    linears = loaded.prunable(vision=True)
    params = {key: names[id(linears[key].weight)] for key in keys}
    saved = saved_names(loaded.model, list(params.values()))
    found = {key: (stored[saved[name]], saved[name]) for key, name in params.items() if saved[name] in stored}
    return found if len(found) == len(keys) else None


class DenseWeights:
    """The dense prunable weights, kept off the device and put back layer by layer, so any number of plans can be
    applied to the same model. Where they come from (`source`):

      "host"        a copy in CPU memory. For a model on an accelerator the device holds only the model.
      "checkpoint"  read back from the model's own safetensors file, one weight at a time (memory-mapped, freed
                    after use). For a model on the CPU, where a copy would double host memory.
      "auto"        "checkpoint" for a model on the CPU whose checkpoint holds exactly its current weights (checked
                    value by value once, here), else "host".
    """

    def __init__(self, loaded: Loaded, *, source: str = "auto"):
        if source not in ("auto", "host", "checkpoint"):
            raise ValueError(f"unknown dense-weight source {source!r}; allowed: auto, host, checkpoint")
        linears = loaded.prunable(vision=True)
        self.keys: list[Key] = list(linears)
        self.dtype = {key: linear.weight.dtype for key, linear in linears.items()}
        self.files: dict[Key, tuple[str, str]] | None = None
        self.weights: dict[Key, torch.Tensor] = {}
        if source == "checkpoint" or (source == "auto" and loaded.device.type == "cpu"):
            self.files = checkpoint_names(loaded, self.keys)
            if self.files is not None and not all(torch.equal(self[key], linears[key].weight.detach().cpu())
                                                  for key in self.keys):
                self.files = None  # the model no longer holds what its checkpoint does
            if self.files is None and source == "checkpoint":
                raise ValueError("the model's weights are not in a local safetensors checkpoint as they are now; "
                                 "use source='host'")
        if self.files is None:
            self.weights = {key: linear.weight.detach().to("cpu", copy=True) for key, linear in linears.items()}

    @property
    def source(self) -> str:
        return "host" if self.files is None else "checkpoint"

    @property
    def host_bytes(self) -> int:
        """Bytes this object holds in memory (0 when it reads the checkpoint)."""
        return sum(W.numel() * W.element_size() for W in self.weights.values())

    def __getitem__(self, key: Key) -> torch.Tensor:
        """The dense weight [d_out, d_in] of one linear, on the CPU, in the model's dtype."""
        if self.files is None:
            return self.weights[key]
        from safetensors import safe_open

        file, name = self.files[key]
        with safe_open(file, framework="pt") as handle:  # a view of the mapped file; unmapped once dropped
            return handle.get_tensor(name).to(self.dtype[key])

    @torch.no_grad()
    def restore(self, loaded: Loaded, keys=None) -> None:
        """Put the dense weights back (all of them, or those of `keys`), one linear at a time."""
        linears = loaded.prunable(vision=True)
        for key in self.keys if keys is None else keys:
            linears[key].weight.copy_(self[key])


CHUNK = 1 << 24  # weights scored and masked at a time (64 MB of float32 scores), so a linear costs no full copy


@torch.no_grad()
def prune_into(weight: torch.Tensor, W: torch.Tensor, method: str, sparsity: float, nm: tuple[int, int] | None,
               x_norm: torch.Tensor | None) -> int:
    """Write W ⊙ mask into `weight` (both [d_out, d_in]): score, select, mask, a block of rows at a time. Magnitude's
    unstructured mask first finds its one threshold over the whole matrix (on |W| in W's own dtype: exact, the same
    order as float32); a per-row method first finds each row's quota (`row_quotas`, one selection per row, only when
    ⌊numel · sparsity⌋ is not a multiple of d_out). Returns the number of weights removed: ⌊numel · sparsity⌋ for an
    unstructured mask. The masks are exactly `make_mask(score(...))` of the whole matrix."""
    d_out, d_in = W.shape
    rows = max(1, CHUNK // d_in)
    if sparsity == 0:
        weight.copy_(W)
        return 0
    if method == "magnitude" and nm is None:  # one selection over the whole matrix, then written in blocks
        k = removed_count(W.numel(), sparsity)
        drop = lowest(W.abs().flatten(), k).view_as(W) if k else torch.zeros_like(W, dtype=torch.bool)
        for r0 in range(0, d_out, rows):
            weight[r0:r0 + rows].copy_(W[r0:r0 + rows].masked_fill(drop[r0:r0 + rows], 0))
        return k
    col_sum = W.abs().sum(dim=0, dtype=torch.float32) if method == "ria" else None
    blocks = range(0, d_out, rows)
    quota = None
    if nm is None:  # per-row unstructured: each row's share of the matrix's count (a first pass when it is uneven)
        k = removed_count(W.numel(), sparsity)
        base = k // d_out
        next_score = (torch.cat([torch.kthvalue(score(method, W[r0:r0 + rows], x_norm, col_sum), base + 1, dim=1)
                                 .values for r0 in blocks]) if k % d_out else torch.zeros(d_out))
        quota = row_quotas(next_score, k)
    removed = 0
    for r0 in blocks:
        block = W[r0:r0 + rows]
        S = score(method, block, x_norm, col_sum)
        keep = mask_nm(S, *nm) if quota is None else ~lowest_per_row(S, quota[r0:r0 + rows])
        weight[r0:r0 + rows].copy_(block.masked_fill(~keep, 0))
        removed += keep.numel() - int(keep.sum())
    return removed


def linear_ratios(loaded: Loaded, plan: CompressionPlan) -> dict[Key, float]:
    """The sparsity `plan` gives each prunable linear (decoder layers; the vision side when it asks for a ratio)."""
    ratios = {key: plan.ratio(*key) for key in loaded.prunable()}
    if plan.vision_sparsity:
        ratios.update({key: plan.vision_sparsity for key in loaded.prunable(vision=True) if key[0] == VISION})
    return ratios


@torch.no_grad()
def apply_plan(loaded: Loaded, plan: CompressionPlan, dense: DenseWeights, stats: Stats | None = None, *,
               held: dict[Key, float] | None = None) -> dict[Key, float]:
    """Prune the model to `plan` from its dense weights, one linear at a time: read the dense W, score it, mask the
    lowest-scoring weights at its layer's ratio, write W ⊙ mask into the model (`prune_into`). Nothing is cached
    between plans but the calibration statistics; beyond the model, memory holds one block of one linear's scores.
    The scores are recomputed each time: an element-wise product, cheap beside the selection any ratio needs.

    `held`: the per-linear ratios (`linear_ratios`) of a plan of the same method, pattern and statistics that the
    model holds now. A linear's mask depends only on its dense W, its statistics and its ratio, so the linears whose
    ratio is unchanged are left as they are (an evolution's mutant re-masks the few linears it moved).

    Returns the achieved sparsity of every pruned linear it re-masked.
    """
    plan.check_layers(loaded.num_layers)
    if plan.method not in SCORE_METHODS:
        raise ValueError(f"{plan.method!r} does not re-mask from scores; score-based methods: {', '.join(SCORE_METHODS)}")
    ratios = linear_ratios(loaded, plan)
    if plan.method != "magnitude":
        missing = [key for key, s in ratios.items() if s and (stats is None or key not in stats.sq_norm)]
        if missing:
            side = ("the vision side: calibrate on a task with images to prune it" if missing[0][0] == VISION
                    else f"layer {missing[0][0]}")
            raise ValueError(f"method {plan.method!r} needs calibration statistics (input norms) of {side}")
    achieved = {}
    linears = loaded.prunable(vision=True)
    for key in dense.keys:
        weight = linears[key].weight
        sparsity = ratios.get(key, 0.0)
        if held is not None and held.get(key, 0.0) == sparsity:
            continue
        x_norm = stats.norm(key) if sparsity and plan.method != "magnitude" else None
        removed = prune_into(weight, dense[key].to(weight.device), plan.method, sparsity, plan.nm, x_norm)
        if sparsity:
            achieved[key] = removed / weight.numel()
    return achieved


def sparsity_of(loaded: Loaded) -> float:
    """Fraction of exactly-zero weights over the decoder layers' prunable linears."""
    weights = [linear.weight for linear in loaded.prunable().values()]
    return sum(int((W == 0).sum()) for W in weights) / sum(W.numel() for W in weights)


@torch.no_grad()
def apply_sequential(loaded: Loaded, plan: CompressionPlan, dense: DenseWeights, batches: list[dict],
                     stats: Stats | None = None) -> dict[Key, float]:
    """Wanda or RIA as their reference implementations calibrate: layer i's ‖X_j‖₂ come from the outputs of the
    already-pruned layers 0..i−1 (`layer_by_layer`), not from one pass of the dense model. Starts from the dense
    weights. The vision side (if the plan prunes it) is pruned first, from the one-pass `stats`, so the decoder is
    calibrated on what the pruned vision tower produces. Returns the achieved sparsity of every pruned linear."""
    plan.check_layers(loaded.num_layers)
    if plan.method not in ("wanda", "ria"):
        raise ValueError(f"sequential calibration is for wanda and ria; got {plan.method!r} (sparsegpt is always "
                         "sequential, magnitude uses no calibration)")
    dense.restore(loaded)
    achieved = {}
    if plan.vision_sparsity:
        vision = {key: lin for key, lin in loaded.prunable(vision=True).items() if key[0] == VISION}
        if stats is None or any(key not in stats.sq_norm for key in vision):
            raise ValueError(f"method {plan.method!r} needs calibration statistics (input norms) of the vision side: "
                             "calibrate on a task with images to prune it")
        for key, linear in vision.items():
            removed = prune_into(linear.weight, dense[key].to(linear.weight.device), plan.method,
                                 plan.vision_sparsity, plan.nm, stats.norm(key))
            achieved[key] = removed / linear.weight.numel()
    sq_norm: dict[str, torch.Tensor] = {}

    def observe(i: int):
        sq_norm.clear()

        def accumulate(name: str):
            def add(x: torch.Tensor) -> None:
                x2 = x.float().pow(2).sum(0)
                sq_norm[name] = sq_norm[name] + x2 if name in sq_norm else x2
            return add
        return {name: accumulate(name) for name in loaded.linears(i) if plan.ratio(i, name)}

    def prune(i: int) -> None:
        for name, linear in loaded.linears(i).items():
            if plan.ratio(i, name):
                removed = prune_into(linear.weight, dense[(i, name)].to(linear.weight.device), plan.method,
                                     plan.ratio(i, name), plan.nm, sq_norm[name].sqrt())
                achieved[(i, name)] = removed / linear.weight.numel()

    layer_by_layer(loaded, batches, observe, prune, desc=f"{plan.method}, layer by layer")
    return achieved


