"""A SparseGPT level database (EvoPress): every prunable linear of every decoder layer solved once at a set of sparsity
levels, so a search trial stitches one level per linear at re-mask speed instead of re-solving SparseGPT.

Levels (`levels` of a build), per linear:
  a shared grid     every linear at the same sparsities, e.g. 0.3:0.9:0.05 (`level_grid`): what a search over
                    arbitrary allocations stitches from, after projecting them onto the grid (`project_to_grid`);
  count levels      EvoPress's levels around a reference plan (`count_levels`): linear m of layer i at level
                    j ∈ [−K, K] removes ⌊n_m · r_im⌋ + j·Δ weights (r the reference's ratio, Δ = ⌊0.5 · min(t, 1 − t)
                    / K · h²⌋ with t the plan's mean and h the hidden size, as EvoPress's prune.py), so one level up
                    in any linear and one down in any other keep the weight count exact.
Inputs (`reference` of a build): each layer's Hessians come from the calibration batches run through the layers before
it, either dense (None; EvoPress's choice: one database serves any plan, but no stitched layer has seen the error of
the pruned layers before it) or pruned to a reference plan (SparseGPT's sequential recipe along that plan; Týr-the-
Pruner's finding is that this decides the result: the reference plan, which must lie on the levels, then stitches to
exactly sequential SparseGPT's weights, and plans near it nearly so). A search re-bases: it builds on its best plan
so far and searches again (`lmmlab.search`).

Build (`build_database`): `prune.layer_by_layer` with one Hessian per distinct input (`prune.LayerHessians`),
factored once, from which `SparseGPT.solve_parts` solves every level of the linears that share it; then the layer is
set to the reference's levels (or left dense) and the next layer's inputs are computed.

Format (a folder, `FORMAT` 2):
  manifest.json              {"format", "model", "num_layers", "dtype", "levels": per layer {linear: [sparsity or
                              null per level index]}, "reference": per layer {linear: ratio} or null (dense inputs),
                              "percdamp", "blocksize", "shapes", "weights" (hash of the dense prunable weights),
                              "calibration" (hash of the batches), "build_seconds", "bytes", ...}
  layer{i:03d}.{name}.safetensors
                             per level index p the linear has:
                               "{p}.mask"    uint8 [⌈numel/8⌉]  the kept positions of W, row-major, packed 8 to a
                                                              byte, first weight in the most significant bit
                                                              (numpy.packbits' order)
                               "{p}.values"  [kept] in the model's dtype: W_pruned at the kept positions, row-major
A build writes into a temporary sibling folder and renames it into place once the manifest is written: a folder at
`path` is always a complete database.

Stitch (`LayerDatabase.apply`): W = 0; W[mask] = values, for each linear whose level changed since the last apply;
level 0.0 writes the dense weights back.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from lmmlab.prune.allocate import project
from lmmlab.files import atomic_folder, write_json
from lmmlab.models import Loaded
from lmmlab.plan import CompressionPlan
from lmmlab.prune.scores import DenseWeights, removed_count
from lmmlab.prune.sparsegpt import LayerHessians, SparseGPT
from lmmlab.prune.sequential import layer_by_layer

FORMAT = 2
MANIFEST = "manifest.json"
MATCH = 1e-9  # a requested level within this of a grid level is that level
GRID_EXAMPLE = "e.g. 0.3:0.9:0.05 or 0.5,0.6,0.7"
DEFAULT_LEVELS = "0.3:0.9:0.05"  # the shared grid a database is built on unless told otherwise
COUNT_LEVELS = 8  # EvoPress's num_levels: levels on each side of the reference
MAX_LEVEL_SPARSITY = 0.99  # count levels above this are left out

Grid = Sequence[float]
ModuleLevels = list[dict[str, list[Union[float, None]]]]  # per layer {linear: sparsity of each level index, or None}


# --------------------------------------------------------------------------------------------------------------------
# The level grid


def check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    """The grid as a tuple of floats: at least one level, each in (0, 1), strictly increasing; else a one-line
    ValueError."""
    grid = tuple(float(s) for s in levels)
    if not grid:
        raise ValueError(f"empty level grid; give at least one sparsity level in (0, 1), {GRID_EXAMPLE}")
    for s in grid:
        if not 0.0 < s < 1.0:  # also refuses nan
            raise ValueError(f"level {s} outside (0, 1); every level of the grid must be a sparsity strictly "
                             "between 0 and 1 (0.0, dense, needs no level)")
    for a, b in zip(grid, grid[1:]):
        if not a < b:
            raise ValueError(f"level grid not strictly increasing at {a}, {b}; give each level once, in increasing "
                             "order")
    return grid


def level_grid(start: float, stop: float, step: float) -> tuple[float, ...]:
    """start, start + step, ..., stop (inclusive when stop is on the grid), each rounded to 10 decimals so 0.35 is
    0.35 and not 0.35000000000000003."""
    if not step > 0:
        raise ValueError(f"level grid step must be > 0; got {step}")
    count = math.floor((stop - start) / step + 1e-9) + 1
    return check_levels([round(start + k * step, 10) for k in range(max(count, 0))])


def parse_levels(text: str) -> tuple[float, ...]:
    """'0.3:0.9:0.05' (start:stop:step, stop included) or '0.5,0.6,0.7' -> a checked grid."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            return level_grid(start, stop, step)
        return check_levels([float(x) for x in text.split(",") if x.strip()])
    except ValueError as err:
        if "level" in str(err):
            raise
        raise ValueError(f"bad level grid {text!r}; allowed: start:stop:step or a comma list, {GRID_EXAMPLE}") \
            from None


def grid_index(level: float, grid: Sequence[float | None]) -> int | None:
    """Index of the level within MATCH of `level` in `grid` (increasing; None entries are absent levels), or None."""
    present = [(g, j) for j, g in enumerate(grid) if g is not None]
    k = bisect.bisect_left([g for g, _ in present], level - MATCH)
    return present[k][1] if k < len(present) and abs(present[k][0] - level) <= MATCH else None


def shared_levels(loaded: Loaded, grid: Grid) -> ModuleLevels:
    """Every linear of every decoder layer at the levels of one `grid`."""
    grid = list(check_levels(grid))
    return [{name: list(grid) for name in loaded.linears(i)} for i in range(loaded.num_layers)]


def count_levels(reference: CompressionPlan, numel: list[dict[str, int]], *, hidden: int, k: int = COUNT_LEVELS,
                 max_sparsity: float = MAX_LEVEL_SPARSITY) -> ModuleLevels:
    """EvoPress's levels around `reference` (its prune.py `_prune_group`): linear m of layer i at level index
    p = j + k, j ∈ [−k, k], removes c_im + j·Δ of its n_m weights, c_im = ⌊n_m · r_im⌋ the reference's count and
    Δ = ⌊0.5 · min(t, 1 − t) / k · h²⌋ (t the reference's weighted mean, h = `hidden`). Level 0 (p = k) is the
    reference's own ratio (0.0 for a linear the reference leaves dense: stitched as the dense weights); the others
    are stored as (c + j·Δ + 0.5) / n, so that ⌊n · s⌋ is exactly the count. Levels removing no weight or more than
    `max_sparsity` of them are absent (None)."""
    if k < 1:
        raise ValueError(f"count levels need k >= 1 levels on each side; got {k}")
    reference.check_layers(len(numel))
    total = sum(n for layer in numel for n in layer.values())
    t = reference.removed_weights(numel) / total
    delta = int(0.5 * min(t, 1 - t) / k * hidden ** 2)
    if delta < 1:
        raise ValueError(f"count levels around a plan of mean sparsity {t:.3g} leave no weight between levels; "
                         "give a plan that prunes (0 < sparsity < 1)")
    out: ModuleLevels = []
    for i, layer in enumerate(numel):
        levels = {}
        for name, n in layer.items():
            r = reference.ratio(i, name)
            c = removed_count(n, r)
            row = []
            for j in range(-k, k + 1):
                count = c + j * delta
                if j == 0:
                    row.append(r)  # the reference's own ratio (0.0: the linear stays dense, stored as no level)
                elif 1 <= count <= int(n * max_sparsity):
                    row.append((count + 0.5) / n)
                else:
                    row.append(None)
            levels[name] = row
        out.append(levels)
    return out


# --------------------------------------------------------------------------------------------------------------------
# The discrete projection


def project_to_grid(sparsity: list[float], levels: Grid | Sequence[Grid], target: float,
                    weights: list[float] | None = None) -> tuple[list[float], float]:
    """Grid levels for a plan's `sparsity` (one per item: a layer, or a linear), their `weights`-weighted mean (default:
    equal) as close to `target` as the grids allow. `levels`: one grid for every item, or one per item (increasing;
    None entries are absent levels). Returns (levels, residual = achieved weighted mean − target).

    1. Each request is clamped to its grid's ends [g_0, g_K] (only grid levels are returned, never 0.0 unless the grid
       holds it); if that moves the weighted mean off `target`, one common shift puts it back (`allocate.project`
       onto the ends), so a request already in range with mean `target` is not moved.
    2. Each item l then takes the grid level just below (f_l) or just above (c_l) its value s_l — within one grid
       step — starting from all floors and raising items in order of their remainder (s_l − f_l) / (c_l − f_l),
       largest first, whenever the raise brings the mean closer to `target` (it adds d_l = w_l (c_l − f_l) / Σw).
       With equal weights on one evenly spaced grid this is the largest-remainder rounding and optimal: the mean
       lands on the reachable value nearest the target, exactly on it when L · target is a sum of L grid levels
       (30 layers, step 0.05, target 0.6). With unequal weights or uneven grids it is this simple greedy (not always
       the best subset), and |residual| ≤ max_l d_l / 2 all the same;
    3. then single flips between an item's floor and ceiling, or a raise paired with a lower, are taken while they
       bring the mean closer (`_refine`): with items of a few sizes (a model's linears) the mean then lands exactly
       on the target where the grid can reach it.
    A target outside [Σ w g_0, Σ w g_K] / Σ w (all lowest, all highest levels) is a one-line ValueError."""
    n = len(sparsity)
    grids, w = _grids_and_weights(n, levels, weights)
    total = sum(w)

    def mean(values: Sequence[float]) -> float:
        return sum(wi * si for wi, si in zip(w, values)) / total

    lo, hi = mean([g[0] for g in grids]), mean([g[-1] for g in grids])
    if not lo - MATCH <= target <= hi + MATCH:
        grid = grids[0]
        raise ValueError(f"target sparsity {target} cannot be met on the level grid {grid[0]}..{grid[-1]}: a plan "
                         f"of grid levels has a weighted mean in [{lo:.6g}, {hi:.6g}]; choose a target there or "
                         "widen the grid")
    s = [min(max(float(x), g[0]), g[-1]) for x, g in zip(sparsity, grids)]
    target_in = min(max(target, lo), hi)
    if abs(mean(s) - target_in) > MATCH:
        s = _project_clamped(s, target_in, grids, w)
    floor = [max(bisect.bisect_right(g, x + MATCH) - 1, 0) for x, g in zip(s, grids)]
    ceil = [f if abs(g[f] - x) <= MATCH else min(f + 1, len(g) - 1) for f, x, g in zip(floor, s, grids)]
    chosen = list(floor)
    gap = target - mean([g[f] for f, g in zip(floor, grids)])
    remainder = {l: (s[l] - grids[l][floor[l]]) / (grids[l][ceil[l]] - grids[l][floor[l]])
                 for l in range(n) if ceil[l] != floor[l]}
    for l in sorted(remainder, key=lambda l: (-remainder[l], l)):
        step = w[l] * (grids[l][ceil[l]] - grids[l][floor[l]]) / total
        if step < 2 * gap:
            chosen[l] = ceil[l]
            gap -= step
    chosen = _refine(chosen, floor, ceil, grids, w, target - mean([g[j] for g, j in zip(grids, chosen)]), total)
    result = [g[j] for g, j in zip(grids, chosen)]
    return result, mean(result) - target


def _grids_and_weights(n: int, levels: Grid | Sequence[Grid], weights: list[float] | None
                       ) -> tuple[list[list[float]], list[float]]:
    """Each item's grid (its levels present, checked) and weight (default 1), with one-line errors."""
    if not n:
        raise ValueError("no layers to project onto the level grid; give one sparsity per layer")
    per_item = bool(levels) and not isinstance(levels[0], (int, float))
    if per_item and len(levels) != n:
        raise ValueError(f"{len(levels)} level grids for {n} items; give one grid, or one per item")
    grids = [list(check_levels([g for g in grid if g is not None])) for grid in levels] if per_item \
        else [list(check_levels(levels))] * n
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} layers; give one positive weight per layer")
    if any(not x > 0 for x in w):
        raise ValueError(f"weights must be positive (parameter counts); got {min(w)}")
    return grids, w


def _refine(chosen: list[int], floor: list[int], ceil: list[int], grids: list[list[float]], w: list[float],
            gap: float, total: float, rounds: int = 64) -> list[int]:
    """After the greedy: while one item's flip between its floor and ceiling, or one raise paired with one lower,
    brings the weighted mean closer to the target, take the best such move (so with items of a few sizes the mean
    lands exactly on a reachable target)."""
    chosen = list(chosen)
    for _ in range(rounds):
        up = [l for l in range(len(chosen)) if chosen[l] == floor[l] != ceil[l]]
        down = [l for l in range(len(chosen)) if chosen[l] == ceil[l] != floor[l]]
        d_up = np.array([w[l] * (grids[l][ceil[l]] - grids[l][floor[l]]) / total for l in up])
        d_down = np.array([w[l] * (grids[l][ceil[l]] - grids[l][floor[l]]) / total for l in down])
        moves = [(abs(gap - d), ("u", k)) for k, d in enumerate(d_up)]
        moves += [(abs(gap + d), ("d", k)) for k, d in enumerate(d_down)]
        if len(d_up) and len(d_down):
            net = d_up[:, None] - d_down[None, :]
            k = int(np.abs(gap - net).argmin())
            moves.append((abs(gap - net.flat[k]), ("p", divmod(k, len(d_down)))))
        if not moves:
            break
        best, move = min(moves, key=lambda m: m[0])
        if best >= abs(gap) - 1e-15:
            break
        kind, k = move
        if kind == "u":
            chosen[up[k]] = ceil[up[k]]
            gap -= d_up[k]
        elif kind == "d":
            chosen[down[k]] = floor[down[k]]
            gap += d_down[k]
        else:
            i, j = k
            chosen[up[i]], chosen[down[j]] = ceil[up[i]], floor[down[j]]
            gap -= d_up[i] - d_down[j]
    return chosen


def _project_clamped(s: list[float], target: float, grids: list[list[float]], w: list[float]) -> list[float]:
    """`allocate.project` with each item's own bounds [g_0, g_K]: one common shift ν, each item clipped to its
    bounds, found by bisection."""
    if all(g[0] == grids[0][0] and g[-1] == grids[0][-1] for g in grids):
        return project(s, target, grids[0][0], grids[0][-1], w)
    x = torch.tensor(s, dtype=torch.float64)
    low = torch.tensor([g[0] for g in grids], dtype=torch.float64)
    high = torch.tensor([g[-1] for g in grids], dtype=torch.float64)
    wt = torch.tensor(w, dtype=torch.float64) / sum(w)
    lo, hi = (low - x).min().item(), (high - x).max().item()
    for _ in range(200):
        shift = (lo + hi) / 2
        if ((x + shift).clamp(low, high) * wt).sum().item() < target:
            lo = shift
        else:
            hi = shift
    return (x + (lo + hi) / 2).clamp(low, high).tolist()


# --------------------------------------------------------------------------------------------------------------------
# Fingerprints, shapes, bytes


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def weights_fingerprint(loaded: Loaded, dense: DenseWeights | None = None) -> str:
    """blake2b of every decoder layer's prunable weights (names, dtypes, shapes, bytes): of `dense` when given, else
    of the model's current weights."""
    h = hashlib.blake2b(digest_size=16)
    for i in range(loaded.num_layers):
        for name, linear in sorted(loaded.linears(i).items()):
            _hash_tensor(h, f"{i}.{name}", linear.weight if dense is None else dense[(i, name)])
    return h.hexdigest()


def batches_fingerprint(batches: list[dict]) -> str:
    """blake2b of the calibration batches (every tensor, by key, in order)."""
    h = hashlib.blake2b(digest_size=16)
    for b, batch in enumerate(batches):
        for key in sorted(batch):
            if isinstance(batch[key], torch.Tensor):
                _hash_tensor(h, f"{b}.{key}", batch[key])
    return h.hexdigest()


def plan_ratios(plan: CompressionPlan, loaded: Loaded) -> list[dict[str, float]]:
    """Per decoder layer {linear: the plan's ratio for it} (`CompressionPlan.ratio`)."""
    plan.check_layers(loaded.num_layers)
    return [{name: plan.ratio(i, name) for name in loaded.linears(i)} for i in range(loaded.num_layers)]


def plan_on_levels(loaded: Loaded, per_layer: Sequence[float], target: float, levels: Grid) -> CompressionPlan:
    """A per-layer allocation at mean `target` as a SparseGPT plan on a grid's levels: every linear of layer l at
    the allocation's ratio, projected onto the grid with the weight-weighted mean as close to `target` as it allows
    (`project_to_grid`; the reference a database is built on)."""
    numel = layer_numel(loaded)
    flat = [per_layer[i] for i, layer in enumerate(numel) for _ in layer]
    projected, _ = project_to_grid(flat, levels, target, [float(n) for layer in numel for n in layer.values()])
    it = iter(projected)
    return CompressionPlan.per_module([{name: next(it) for name in layer} for layer in numel], numel,
                                      method="sparsegpt")


def layer_shapes(loaded: Loaded) -> list[dict[str, list[int]]]:
    """Per decoder layer {linear: [d_out, d_in]}."""
    return [{name: list(lin.weight.shape) for name, lin in loaded.linears(i).items()} for i in range(loaded.num_layers)]


def layer_numel(loaded: Loaded) -> list[dict[str, int]]:
    """Per decoder layer {linear: its number of weights}."""
    return [{name: lin.weight.numel() for name, lin in loaded.linears(i).items()} for i in range(loaded.num_layers)]


def database_bytes(shapes: list[dict[str, Sequence[int]]], levels: Grid | ModuleLevels, value_bytes: int) -> int:
    """Tensor bytes of a database (headers and manifest aside): Σ over layers, linears and their levels s of
    ⌈numel/8⌉ (the mask) + (numel − ⌊numel · s⌋) · value_bytes (the kept values). `levels`: one grid for every
    linear, or per layer {linear: levels}."""
    total = 0
    for i, layer in enumerate(shapes):
        for name, (d_out, d_in) in layer.items():
            numel = d_out * d_in
            grid = levels if levels and isinstance(levels[0], (int, float)) else levels[i][name]
            total += sum((numel + 7) // 8 + (numel - removed_count(numel, s)) * value_bytes
                         for s in grid if s is not None)
    return total


def llama_shapes(num_layers: int, hidden: int, intermediate: int, heads: int | None = None,
                 kv_heads: int | None = None) -> list[dict[str, list[int]]]:
    """The prunable shapes of a Llama-family decoder (q, k, v, o, gate, up, down), for `database_bytes` at widths
    not at hand (LLaVA-1.5-7B: 32 layers, hidden 4096, intermediate 11008, no grouped-query attention)."""
    kv = hidden if heads is None or kv_heads is None else hidden // heads * kv_heads
    layer = {"q_proj": [hidden, hidden], "k_proj": [kv, hidden], "v_proj": [kv, hidden], "o_proj": [hidden, hidden],
             "gate_proj": [intermediate, hidden], "up_proj": [intermediate, hidden], "down_proj": [hidden, intermediate]}
    return [dict(layer) for _ in range(num_layers)]


def _file(i: int, name: str) -> str:
    return f"layer{i:03d}.{name}.safetensors"


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """bool [..] -> uint8 [⌈numel/8⌉], row-major, first element in the most significant bit."""
    return torch.from_numpy(np.packbits(keep.detach().to("cpu").numpy().ravel()))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse of `pack_mask`, as a bool tensor on `device`: numpy.unpackbits for the CPU, else `unpack_bits` on
    the device itself (only the packed bytes travel)."""
    numel = math.prod(shape)
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).view(bool)).view(*shape)
    return unpack_bits(packed.to(device), numel).view(*shape)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first `numel` bits of uint8 `packed`, most significant bit first, as bools, in torch (any device)."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return packed.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and_(1).flatten()[:numel].bool()


# --------------------------------------------------------------------------------------------------------------------
# Build and open


@dataclass
class LayerDatabase:
    """A database on disk (`manifest` is its manifest.json) and a record of the level each linear of the model holds
    (`current`: per layer {linear: ratio}, 0.0 = dense; None = unknown, so the next `apply` writes every linear). The
    record is of the one model it applies to; whatever else writes that model's decoder weights calls `forget`."""

    path: Path
    manifest: dict
    dense: DenseWeights | None = None  # where level 0.0 comes from when `apply` is given none
    current: list[dict[str, float]] | None = field(default=None, repr=False)

    @property
    def module_levels(self) -> ModuleLevels:
        """Per layer {linear: the sparsity of each level index, None where the linear has no such level}."""
        return self.manifest["levels"]

    @property
    def levels(self) -> tuple[float, ...]:
        """The shared grid of a database whose linears all have the same levels (else a ValueError)."""
        grids = {tuple(grid) for layer in self.module_levels for grid in layer.values()}
        if len(grids) != 1 or None in next(iter(grids)):
            raise ValueError(f"the layer database at {self.path} has levels of its own per linear (count levels "
                             "around a reference plan), not one grid")
        return next(iter(grids))

    @property
    def shared_grid(self) -> bool:
        return len({tuple(grid) for layer in self.module_levels for grid in layer.values()}) == 1

    @property
    def num_layers(self) -> int:
        return self.manifest["num_layers"]

    @property
    def reference(self) -> list[dict[str, float]] | None:
        """Per layer {linear: ratio} of the plan whose pruned layers the database was built on; None: dense inputs."""
        return self.manifest.get("reference")

    @property
    def inputs(self) -> str:
        """What the layers were solved on, in words: "dense" or "reference <hash>"."""
        ref = self.reference
        if ref is None:
            return "dense"
        return "reference " + hashlib.blake2b(json.dumps(ref, sort_keys=True).encode(), digest_size=6).hexdigest()

    @property
    def fingerprint(self) -> str:
        """What the stored solutions depend on (dense weights, calibration, levels, inputs, damping, block size)."""
        keys = ("weights", "calibration", "levels", "percdamp", "blocksize", "dtype", "reference")
        text = json.dumps({k: self.manifest.get(k) for k in keys}, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def grids(self, loaded: Loaded | None = None) -> list[list[float | None]]:
        """Every linear's levels, flattened in (layer, linear) order (`loaded.linears` order where given)."""
        return [layer[name] for layer in self.module_levels for name in layer]

    def forget(self) -> None:
        """The model's layers were changed by something else: the next `apply` writes every linear."""
        self.current = None

    def check_model(self, loaded: Loaded) -> None:
        """One-line ValueError when `loaded` is not shaped as the model the database was built for."""
        m = self.manifest
        if loaded.num_layers != m["num_layers"]:
            raise ValueError(f"the layer database at {self.path} was built for {m['model']!r} with {m['num_layers']} "
                             f"decoder layers; this model has {loaded.num_layers}")
        for i, expected in enumerate(m["shapes"]):
            got = {name: list(lin.weight.shape) for name, lin in loaded.linears(i).items()}
            if got != expected:
                raise ValueError(f"the layer database at {self.path} was built for {m['model']!r}, whose layer {i} "
                                 f"linears are {expected}; this model's are {got}")
        dtype = str(next(iter(loaded.linears(0).values())).weight.dtype).removeprefix("torch.")
        if dtype != m["dtype"]:
            raise ValueError(f"the layer database at {self.path} holds {m['dtype']} weights; this model is {dtype}: "
                             f"load it as {m['dtype']} or rebuild the database")

    def level_index(self, layer: int, name: str, ratio: float) -> int | None:
        """The level index of `ratio` for one linear (None for 0.0, dense); a ratio not among its levels is a
        one-line ValueError naming the allowed ones."""
        if float(ratio) == 0.0:
            return None
        grid = self.module_levels[layer][name]
        j = grid_index(float(ratio), grid)
        if j is None:
            allowed = ", ".join(f"{g:.6g}" for g in grid if g is not None)
            raise ValueError(f"level {ratio} of {name} in layer {layer} is not among the database's levels; "
                             f"allowed: 0.0 or {allowed}")
        return j

    @torch.no_grad()
    def apply(self, loaded: Loaded, plan: CompressionPlan | Sequence[float], *,
              dense: DenseWeights | None = None) -> list[int]:
        """Write the stored solution of each linear's level into it (W = 0; W[mask] = values), or for level 0.0 the
        dense weights (from `dense`, else the ones given at open). `plan`: a CompressionPlan (each linear at
        `plan.ratio`) or one level per layer. Linears whose level is the one the record says they hold are skipped.
        Every level must be 0.0 or one of the linear's levels (checked before anything is written). Returns the
        layers written."""
        self.check_model(loaded)
        if isinstance(plan, CompressionPlan):
            plan.check_layers(self.num_layers)
            if plan.nm is not None:
                raise ValueError(f"the layer database holds unstructured levels; pattern {plan.pattern} is solved "
                                 "by sequential SparseGPT")
            wanted = [{name: plan.ratio(i, name) for name in layer} for i, layer in enumerate(self.module_levels)]
        else:
            if len(plan) != self.num_layers:
                raise ValueError(f"{len(plan)} levels for a database of {self.num_layers} decoder layers; "
                                 "give one per layer")
            wanted = [{name: float(plan[i]) for name in layer} for i, layer in enumerate(self.module_levels)]
        index = [{name: self.level_index(i, name, s) for name, s in layer.items()} for i, layer in enumerate(wanted)]
        dense = dense if dense is not None else self.dense
        todo = [(i, name) for i, layer in enumerate(index) for name in layer
                if self.current is None or self.current[i].get(name) != self._level(i, name, layer[name])]
        if dense is None and any(index[i][name] is None for i, name in todo):
            raise ValueError("level 0.0 (dense) needs the dense weights: pass dense=DenseWeights(loaded) taken "
                             "while the model was dense")
        from safetensors import safe_open

        current = self.current or [{} for _ in range(self.num_layers)]
        self.current = current
        for i in sorted({i for i, _ in todo}):
            linears = loaded.linears(i)
            names = [name for j, name in todo if j == i]
            for name in names:
                current[i].pop(name, None)  # until the linear is fully written
            handle = None
            try:
                for name in names:
                    W, p = linears[name].weight, index[i][name]
                    if p is None:
                        W.copy_(dense[(i, name)])
                    else:
                        if handle is None or handle[0] != name:
                            handle = (name, safe_open(self.path / _file(i, name), framework="pt"))
                        keep = unpack_mask(handle[1].get_tensor(f"{p}.mask"), W.shape, W.device)
                        W.zero_().masked_scatter_(keep, handle[1].get_tensor(f"{p}.values").to(W.device))
                    current[i][name] = self._level(i, name, p)
            finally:
                handle = None
        return sorted({i for i, _ in todo})

    def _level(self, i: int, name: str, p: int | None) -> float:
        return 0.0 if p is None else self.module_levels[i][name][p]


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise ValueError(f"no layer database at {path} (no {MANIFEST}): build one with build_database")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"the layer database manifest {file} is not valid JSON ({err.msg}); rebuild it") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"the layer database at {path} has format {manifest.get('format')!r}; this lmmlab reads "
                         f"format {FORMAT}: rebuild it")
    return manifest


def open_database(path: str | Path, loaded: Loaded, *, dense: DenseWeights | None = None,
                  batches: list[dict] | None = None) -> LayerDatabase:
    """The database at `path`, checked against `loaded`: its layer count, shapes and dtype, and the hash of its dense
    weights (of `dense` if given, else of the model's current weights, which must then be dense), and, if `batches`
    are given, of the calibration batches. A mismatch is a one-line ValueError naming it (a stale database is
    refused). Checked against the model's own weights, the record says every linear is dense."""
    path = Path(path)
    database = LayerDatabase(path, _read_manifest(path), dense=dense)
    database.check_model(loaded)
    m = database.manifest
    if weights_fingerprint(loaded, dense) != m["weights"]:
        whose = "the given dense weights" if dense is not None else "this model's current weights (dense?)"
        raise ValueError(f"the layer database at {path} was built from other weights than {whose} (model "
                         f"{m['model']!r}, weights {m['weights']}): it is stale, rebuild it")
    if batches is not None and batches_fingerprint(batches) != m["calibration"]:
        raise ValueError(f"the layer database at {path} was calibrated on other batches ({m['n_batches']} batches, "
                         f"hash {m['calibration']}): rebuild it with these, or open it without batches")
    if dense is None:
        database.current = [{name: 0.0 for name in layer} for layer in database.module_levels]
    return database


def check_reference_on_levels(reference: list[dict[str, float]], levels: ModuleLevels) -> None:
    """Every ratio of the reference plan is 0.0 or one of its linear's levels: else a one-line ValueError (the
    layers after it would see weights the database does not hold)."""
    for i, layer in enumerate(reference):
        for name, r in layer.items():
            if r != 0.0 and grid_index(r, levels[i][name]) is None:
                raise ValueError(f"the reference plan's ratio {r:.6g} for {name} of layer {i} is not among the "
                                 "database's levels: project the plan onto the levels first (project_to_grid)")


def _check_build(levels: ModuleLevels, loaded: Loaded, path: Path, batches: list[dict], blocksize: int,
                 percdamp: float) -> None:
    if len(levels) != loaded.num_layers or any(set(levels[i]) != set(loaded.linears(i)) for i in range(len(levels))):
        raise ValueError("the levels must name every prunable linear of every decoder layer of the model")
    for layer in levels:
        for grid in layer.values():
            check_levels([g for g in grid if g is not None and g != 0.0])
    if not batches:
        raise ValueError("no calibration batches; the database needs the layers' inputs")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer; got {blocksize!r}")
    if not 0.0 <= percdamp < 1.0:
        raise ValueError(f"percdamp must be in [0, 1); got {percdamp}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} exists and is not an empty folder; remove it or choose another path")


@torch.no_grad()
def build_database(loaded: Loaded, batches: list[dict], *, levels: Grid | ModuleLevels, path: str | Path,
                   reference: CompressionPlan | None = None, blocksize: int = 128, percdamp: float = 0.01,
                   progress: bool | None = None, threads: int | None = None) -> LayerDatabase:
    """Solve every decoder layer's linears with SparseGPT at every one of their levels and store them at `path` (see
    the module docstring). `levels`: one grid for every linear, or per layer {linear: levels} (`count_levels`).
    `reference`: None (each layer solved on the dense model's inputs) or a plan on the levels (each layer solved on
    what the layers before it produce pruned to it, as sequential SparseGPT does, so the reference stitches to exactly
    `prune.apply_sparsegpt`'s weights). The model's current weights are taken as the dense ones and left unchanged.
    `threads`: torch's CPU threads during the build (None: as set), restored after. Returns the opened database (its
    record: every linear dense). A build killed outright leaves only a hidden `.{name}.partial-*` folder."""
    path = Path(path)
    module_levels = (shared_levels(loaded, levels) if not levels or isinstance(levels[0], (int, float))
                     else [{name: list(grid) for name, grid in layer.items()} for layer in levels])
    _check_build(module_levels, loaded, path, batches, blocksize, percdamp)
    ref = None
    if reference is not None:
        if reference.nm is not None or reference.vision_sparsity:
            raise ValueError("a database's reference plan is unstructured and prunes the decoder only")
        ref = plan_ratios(reference, loaded)
        check_reference_on_levels(ref, module_levels)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None; got {threads!r}")
    previous_threads = torch.get_num_threads()
    started = time.perf_counter()
    dtype = next(iter(loaded.linears(0).values())).weight.dtype
    manifest = {"format": FORMAT, "model": loaded.name, "num_layers": loaded.num_layers,
                "dtype": str(dtype).removeprefix("torch."), "levels": module_levels, "reference": ref,
                "percdamp": percdamp, "blocksize": blocksize, "shapes": layer_shapes(loaded),
                "weights": weights_fingerprint(loaded), "calibration": batches_fingerprint(batches),
                "n_batches": len(batches), "device": str(loaded.device),
                "threads": threads or torch.get_num_threads()}
    builder = _Builder(loaded, module_levels, ref, blocksize, percdamp)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with atomic_folder(path) as tmp:  # an existing `path` is empty (checked above)
            builder.folder = tmp
            builder.run(batches, progress)
            manifest["build_seconds"] = time.perf_counter() - started
            manifest["bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
            manifest["tensor_bytes"] = database_bytes(manifest["shapes"], module_levels, dtype.itemsize)
            write_json(tmp / MANIFEST, manifest)
    finally:
        builder.put_back()
        torch.set_num_threads(previous_threads)
    database = LayerDatabase(path, manifest)
    database.current = [{name: 0.0 for name in layer} for layer in module_levels]
    return database


class _Builder:
    """One build's layer-by-layer pass: each layer's Hessians (`LayerHessians`), every level of the linears that
    share one solved in one stacked column loop, each linear's levels written to its file, then the layer set to the
    reference's levels (the next layer's inputs) and its dense weights held to be put back."""

    def __init__(self, loaded: Loaded, levels: ModuleLevels, ref: list[dict[str, float]] | None, blocksize: int,
                 percdamp: float):
        self.loaded, self.levels, self.ref, self.blocksize, self.percdamp = loaded, levels, ref, blocksize, percdamp
        self.folder: Path | None = None
        self.hessians: LayerHessians | None = None
        self.held: dict[tuple[int, str], torch.Tensor] = {}  # dense weights of linears set to the reference

    def run(self, batches: list[dict], progress: bool | None) -> None:
        n = len({s for layer in self.levels for levels in layer.values() for s in levels if s})
        layer_by_layer(self.loaded, batches, self.observe, self.solve_layer,
                       desc=f"sparsegpt database ({n} levels per linear)", progress=progress)

    def observe(self, i: int):
        self.hessians = LayerHessians(self.loaded.linears(i))
        return self.hessians.observers()

    def solve_layer(self, i: int) -> None:
        from safetensors.torch import save_file

        linears = self.loaded.linears(i)
        for names, (Hinv, dead) in self.hessians.groups(self.percdamp):  # every level of the linears sharing H
            parts = [(name, j) for name in names for j, s in enumerate(self.levels[i][name]) if s]  # 0.0: dense
            solved = SparseGPT.solve_parts([(linears[name].weight.data, self.levels[i][name][j]) for name, j in parts],
                                           Hinv, dead, blocksize=self.blocksize)
            for name in names:
                tensors = {}
                for (owner, j), (W, pruned) in zip(parts, solved):
                    if owner == name:
                        tensors[f"{j}.mask"] = pack_mask(~pruned)
                        tensors[f"{j}.values"] = W[~pruned].to("cpu")
                        if self.is_reference(i, name, j):
                            self.held[(i, name)] = linears[name].weight.data.to("cpu", copy=True)
                            linears[name].weight.data.copy_(W)  # the next layer sees it pruned to the reference
                save_file(tensors, str(self.folder / _file(i, name)))

    def is_reference(self, i: int, name: str, j: int) -> bool:
        r = None if self.ref is None else self.ref[i][name]
        return bool(r) and grid_index(r, self.levels[i][name]) == j

    def put_back(self) -> None:
        for (i, name), dense in self.held.items():
            self.loaded.linears(i)[name].weight.data.copy_(dense)
