"""SparseGPT (Frantar & Alistarh 2023): prune with the optimal-brain-surgeon weight update, column by column.

`SparseGPT` is one Hessian's solver (accumulate H, factor it once, solve any number of levels from the dense W);
`LayerHessians` gives the linears of one decoder layer one Hessian per distinct input (q, k and v share one, gate and
up another); `apply_sparsegpt` runs them layer by layer (`prune.sequential.layer_by_layer`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from lmmlab.models import Loaded
from lmmlab.plan import CompressionPlan
from lmmlab.prune.scores import removed_count
from lmmlab.prune.sequential import layer_by_layer


@contextmanager
def one_thread():
    """torch's CPU thread count set to 1 inside the block, restored after. LAPACK's Cholesky factorisations reduce in
    an order that depends on the thread count (SmolLM2: layer 0's q_proj differed in 95,632 values between 1 and 2
    threads), so SparseGPT factors its Hessians on one thread: a solve is then the same whatever the thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class SparseGPT:
    """One Hessian's SparseGPT solver: `add_batch` (accumulate H) -> `prune` (mask + update W in place) -> `free`.

    `prune` is `inverse_hessian` (the damped factor of H⁻¹, once per Hessian) then `solve` (a pure function of the
    dense W), so one Hessian can serve any number of sparsity levels (`lmmlab.database`) and every linear that reads
    the same input (`LayerHessians`: q, k and v; gate and up).

    Thread-independent: H is accumulated in float64 (each batch's XᵀX a float32 product, added in float64) and
    factored in float64 on one thread (`one_thread`), then rounded to float32 for the column loop, whose element-wise
    updates and fixed-shape products do not depend on the thread count; so a solve gives the same masks and weights
    with 1 or 2 threads (tested)."""

    def __init__(self, linear: torch.nn.Linear):
        self.linear = linear
        self.columns = linear.weight.shape[1]
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float64,
                             device=linear.weight.device)  # [d_in, d_in]
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x: [tokens, d_in] inputs of the linear. Keeps H = (2 / n) Σ_t x_t x_tᵀ as a running mean in float64; each
        batch's product is taken in float32 (a fixed-shape GEMM, the same whatever the thread count) and added in
        float64. (Summing XᵀX and scaling once would save two passes over H per batch, but moves a few float64 entries
        by an ulp, and sequential SparseGPT amplifies that over the layers: 70 % uniform on SmolLM2 went from 60.67 to
        59.93 validation PPL. The running mean keeps every solve bit-identical to the reference recipe.)"""
        x = x.float()
        n = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        G = (x.T @ x).to(torch.float64)  # [d_in, d_in]
        self.H += G.mul_(2 / self.nsamples)

    def hessian(self) -> torch.Tensor:
        """H [d_in, d_in], float64 (a copy)."""
        return self.H.clone()

    @torch.no_grad()
    def inverse_hessian(self, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """(Hinv, dead) from a copy of H (H itself is left as it is): `dead` [d_in] marks the columns no input
        reached (H_jj = 0; their H_jj is set to 1 and their weights are zeroed by `solve`); Hinv [d_in, d_in] float32
        is the upper Cholesky factor of (H + λI)⁻¹, λ = percdamp · mean(diag H): row i holds the OBS update of columns
        ≥ i after removing column i. Factored in float64 on one thread (see the class docstring)."""
        H = self.hessian()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        damp = percdamp * torch.mean(torch.diag(H))
        H += damp * torch.eye(self.columns, device=H.device, dtype=H.dtype)
        with one_thread():
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        return Hinv.to(torch.float32), dead

    @staticmethod
    @torch.no_grad()
    def solve(W_dense: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor, sparsity: float,
              nm: tuple[int, int] | None = None, blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """SparseGPT on the dense W [d_out, d_in] (not modified) with `inverse_hessian`'s (Hinv, dead): remove
        `sparsity` of the weights (⌊numel · sparsity⌋ of them), or keep n of every m, compensating each removal on
        later columns. Returns (W_pruned in W_dense's dtype and device, pruned [d_out, d_in] bool: the removed
        positions, exactly zero in W_pruned)."""
        return SparseGPT.solve_levels(W_dense, Hinv, dead, [sparsity], nm, blocksize)[0]

    @staticmethod
    @torch.no_grad()
    def solve_levels(W_dense: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor, sparsities: Sequence[float],
                     nm: tuple[int, int] | None = None, blocksize: int = 128, max_elements: int = 1 << 24
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`solve` at every level of `sparsities` (`solve_parts` of copies of one W)."""
        return SparseGPT.solve_parts([(W_dense, s) for s in sparsities], Hinv, dead, nm, blocksize, max_elements)

    @staticmethod
    @torch.no_grad()
    def solve_parts(parts: Sequence[tuple[torch.Tensor, float]], Hinv: torch.Tensor, dead: torch.Tensor,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, max_elements: int = 1 << 24
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`solve` of each (W_dense, sparsity) of `parts` — matrices that share one Hessian (levels of one linear,
        or q, k and v) — with one column loop: the parts are stacked row-wise (as many as fit in `max_elements`
        floats at a time). A row's updates are element-wise or products over its own values, so each part's result
        is bit-identical to solving it alone (tested); stacking saves the loop's per-op overhead, which dominates on
        small matrices."""
        out, chunk, size = [], [], 0
        for W, s in parts:
            if chunk and size + W.numel() > max_elements:
                out += SparseGPT._solve_stacked(chunk, Hinv, dead, nm, blocksize)
                chunk, size = [], 0
            chunk.append((W, s))
            size += W.numel()
        return out + (SparseGPT._solve_stacked(chunk, Hinv, dead, nm, blocksize) if chunk else [])

    @staticmethod
    def _solve_stacked(parts: list[tuple[torch.Tensor, float]], Hinv: torch.Tensor, dead: torch.Tensor,
                       nm: tuple[int, int] | None, blocksize: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = [W.shape[0] for W, _ in parts]
        edges = [0]
        for r in rows:
            edges.append(edges[-1] + r)
        W = torch.cat([W_dense.float() for W_dense, _ in parts])  # [Σ d_out, d_in]: part c at rows edges[c]...
        W[:, dead] = 0
        columns = W.shape[1]
        pruned = torch.zeros_like(W, dtype=torch.bool)

        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            prune_mask = torch.zeros_like(W1, dtype=torch.bool)
            if nm is None:
                # OBS saliency w² / [H⁻¹]_jj², thresholded over the whole block of each part (adaptive mask
                # selection); the block's share of the part's ⌊numel · s⌋ (the reference floors every block: up to
                # one weight short per block of columns)
                saliency = W1**2 / torch.diag(Hinv1)[None, :] ** 2
                for c, (_, sparsity) in enumerate(parts):
                    d_out = rows[c]
                    k = removed_count(d_out * i2, sparsity) - removed_count(d_out * i1, sparsity)
                    if k:
                        part = slice(edges[c], edges[c + 1])
                        prune_mask[part].view(-1)[torch.sort(saliency[part].flatten(), stable=True).indices[:k]] = True
            else:
                n, m = nm
            for i in range(i2 - i1):
                if nm is not None and i % m == 0:
                    saliency = W1[:, i : i + m] ** 2 / torch.diag(Hinv1)[i : i + m][None, :] ** 2
                    prune_mask.scatter_(1, i + torch.topk(saliency, m - n, dim=1, largest=False).indices, True)
                # err = (w - q) / [H⁻¹]_ii with q = w but 0 where pruned; W1[:, i] keeps w (q is formed per block)
                err = torch.where(prune_mask[:, i], W1[:, i], 0.0) / Hinv1[i, i]  # [Σ d_out]
                W1[:, i + 1:] -= err[:, None] * Hinv1[i, i + 1:][None, :]
                Err1[:, i] = err
            Q1 = W1.masked_fill(prune_mask, 0.0)
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
            pruned[:, i1:i2] = prune_mask
        return [(W[edges[c]:edges[c + 1]].to(W_dense.dtype), pruned[edges[c]:edges[c + 1]])
                for c, (W_dense, _) in enumerate(parts)]

    @torch.no_grad()
    def prune(self, sparsity: float, nm: tuple[int, int] | None = None, blocksize: int = 128,
              percdamp: float = 0.01) -> None:
        """Remove `sparsity` of the weights (or keep n of every m), compensating each removal on later columns:
        `solve` with this Hessian's `inverse_hessian`, written into the linear."""
        Hinv, dead = self.inverse_hessian(percdamp)
        W, _ = self.solve(self.linear.weight.data, Hinv, dead, sparsity, nm, blocksize)
        self.linear.weight.data.copy_(W)

    def free(self) -> None:
        self.H = None


class LayerHessians:
    """The SparseGPT Hessians of one decoder layer's linears, one per distinct input: linears fed the same token
    tensor in a forward (`layer_by_layer`: q, k and v read the same hidden states, gate and up too) share one H,
    accumulated once and factored once. `observers()` go to `layer_by_layer`'s `observe`; then `groups()`."""

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.linears = linears
        self.solver: dict[str, SparseGPT] = {}  # by linear name; shared objects for shared inputs
        self._seen: list[tuple[torch.Tensor, SparseGPT]] = []  # the running forward's inputs
        self._fed: set[str] = set()

    def observers(self) -> dict:
        return {name: (lambda x, name=name: self._add(name, x)) for name in self.linears}

    def _add(self, name: str, x: torch.Tensor) -> None:
        if name in self._fed:  # every linear is fed once per forward: a repeat starts the next one
            self._seen.clear()
            self._fed.clear()
        self._fed.add(name)
        solver = self.solver.get(name)
        if solver is None:  # the first forward decides: share with a linear that read this very tensor
            solver = next((s for seen, s in self._seen if seen is x), None) or SparseGPT(self.linears[name])
            self.solver[name] = solver
        for seen, fed in self._seen:
            if fed is solver:  # a linear sharing this Hessian already added this forward's input
                if seen is not x:
                    raise RuntimeError(f"{name} shares its Hessian but read another input than its peers")
                return
        solver.add_batch(x)
        self._seen.append((x, solver))

    def groups(self, percdamp: float = 0.01) -> Iterator[tuple[list[str], tuple[torch.Tensor, torch.Tensor]]]:
        """Yields (the linears sharing one Hessian, its (Hinv, dead)), each Hessian factored once, when its turn
        comes; the Hessians are freed at the end."""
        shared: dict[int, tuple[SparseGPT, list[str]]] = {}
        for name, solver in self.solver.items():
            shared.setdefault(id(solver), (solver, []))[1].append(name)
        for solver, names in shared.values():
            yield names, solver.inverse_hessian(percdamp)
        for solver, _ in shared.values():
            solver.free()


@torch.no_grad()
def apply_sparsegpt(loaded: Loaded, plan: CompressionPlan, batches: list[dict], blocksize: int = 128,
                    percdamp: float = 0.01) -> None:
    """Prune the model in place with SparseGPT, layer by layer: each layer is calibrated on the outputs of the
    already-pruned layers before it (`layer_by_layer`), so only one layer's Hessians are ever in memory; linears that
    read one input share its Hessian (`LayerHessians`). Each linear removes its own ratio (`plan.ratio`)."""
    plan.check_layers(loaded.num_layers)
    if plan.vision_sparsity:
        raise ValueError("sparsegpt prunes the decoder layers only; use vision_sparsity with magnitude, wanda or ria")
    hessians: list[LayerHessians] = []

    def observe(i: int):
        hessians[:] = [LayerHessians({n: lin for n, lin in loaded.linears(i).items() if plan.ratio(i, n) > 0})]
        return hessians[0].observers()

    def prune(i: int) -> None:
        linears = loaded.linears(i)
        for names, (Hinv, dead) in hessians[0].groups(percdamp):
            solved = SparseGPT.solve_parts([(linears[n].weight.data, plan.ratio(i, n)) for n in names], Hinv, dead,
                                           plan.nm, blocksize)
            for name, (W, _) in zip(names, solved):
                linears[name].weight.data.copy_(W)

    layer_by_layer(loaded, batches, observe, prune, desc="sparsegpt, layer by layer")
