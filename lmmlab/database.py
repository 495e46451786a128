"""A SparseGPT layer database (EvoPress-style): every decoder layer solved once at a grid of sparsity levels, so a
search trial stitches one level per layer at re-mask speed instead of re-solving SparseGPT.

Build (`build_database`): the calibration batches run through the DENSE model layer by layer
(`prune.layer_by_layer`, with a step that solves and stores but leaves the layer dense); each linear's Hessian
H = (2/n) Σ_t x_t x_tᵀ gives one damped factor of H⁻¹ (`SparseGPT.inverse_hessian`), from which `SparseGPT.solve`
prunes the dense W at every level. Inputs from the dense model, as EvoPress does: a layer's solution then does not
depend on the levels of the layers before it, so one database serves any per-layer plan (SparseGPT's own sequential
recipe, or the uniform plan's pruned inputs, would tie every stored solution to one plan of the earlier layers).

Format (a folder):
  manifest.json              {"format", "model", "num_layers", "dtype", "levels", "percdamp", "blocksize",
                              "shapes": per layer {linear: [d_out, d_in]}, "weights" (hash of the dense prunable
                              weights), "calibration" (hash of the batches), "build_seconds", "bytes", ...}
  layer{i:03d}_level{j:02d}.safetensors
                             per linear `name` of layer i at level j:
                               "{name}.mask"    uint8 [⌈numel/8⌉]  the kept positions of W, row-major, packed 8 to a
                                                                  byte, first weight in the most significant bit
                                                                  (numpy.packbits' order)
                               "{name}.values"  [kept] in the model's dtype: W_pruned at the kept positions, row-major
Bytes per linear and level: ⌈numel/8⌉ + (numel − ⌊numel · s⌋) · bytes per value (`database_bytes`), plus each
file's small safetensors header. A build writes into a temporary sibling folder and renames it into place once the
manifest is written: a folder at `path` is always a complete database.

Stitch (`LayerDatabase.apply`): W = 0; W[mask] = values, for each linear of each layer whose level changed since the
last apply; level 0.0 writes the dense weights back.

Budget (`project_to_grid`): a plan's per-layer sparsities rounded to grid levels with the parameter-weighted mean
as close to the target as the grid allows, the residual stated.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lmmlab.allocate import project
from lmmlab.files import write_json
from lmmlab.models import Loaded
from lmmlab.prune import DenseWeights, SparseGPT, layer_by_layer, removed_count

FORMAT = 1
MANIFEST = "manifest.json"
MATCH = 1e-9  # a requested level within this of a grid level is that level
GRID_EXAMPLE = "e.g. 0.3:0.9:0.05 or 0.5,0.6,0.7"


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


def grid_index(level: float, grid: Sequence[float]) -> int | None:
    """Index of the grid level within MATCH of `level`, or None."""
    j = bisect.bisect_left(grid, level - MATCH)
    return j if j < len(grid) and abs(grid[j] - level) <= MATCH else None


# --------------------------------------------------------------------------------------------------------------------
# The discrete projection


def project_to_grid(sparsity: list[float], levels: Sequence[float], target: float,
                    weights: list[float] | None = None) -> tuple[list[float], float]:
    """Per-layer grid levels for a plan's `sparsity`, their `weights`-weighted mean (default: equal) as close to
    `target` as the grid allows. Returns (levels, residual = achieved weighted mean − target).

    1. Each request is clamped to the grid's ends [g_0, g_K] (only grid levels are returned, never 0.0); if that
       moves the weighted mean off `target`, one common shift puts it back (`allocate.project` onto [g_0, g_K]), so
       a request already in range with mean `target` is not moved.
    2. Each layer l then takes the grid level just below (f_l) or just above (c_l) its value s_l — within one grid
       step — starting from all floors and raising layers in order of their remainder (s_l − f_l) / (c_l − f_l),
       largest first, whenever the raise brings the mean closer to `target` (it adds d_l = w_l (c_l − f_l) / Σw).
       With equal weights on an evenly spaced grid this is the largest-remainder rounding and optimal: the mean
       lands on the reachable value nearest the target, exactly on it when L · target is a sum of L grid levels
       (30 layers, step 0.05, target 0.6). With unequal weights or an uneven grid it is this simple greedy (not
       always the best subset), and |residual| ≤ max_l d_l / 2 all the same.
    A target outside [g_0, g_K] (the weighted means of all-lowest and all-highest levels) is a one-line ValueError.
    """
    grid = check_levels(levels)
    n = len(sparsity)
    if not n:
        raise ValueError("no layers to project onto the level grid; give one sparsity per layer")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} layers; give one positive weight per layer")
    if any(not x > 0 for x in w):
        raise ValueError(f"weights must be positive (parameter counts); got {min(w)}")
    total = sum(w)

    def mean(values: Sequence[float]) -> float:
        return sum(wi * si for wi, si in zip(w, values)) / total

    lo, hi = grid[0], grid[-1]
    if not lo - MATCH <= target <= hi + MATCH:
        raise ValueError(f"target sparsity {target} cannot be met on the level grid {grid[0]}..{grid[-1]}: a plan "
                         f"of grid levels has a weighted mean in [{lo}, {hi}]; choose a target there or widen the grid")
    target_in = min(max(target, lo), hi)
    s = [min(max(float(x), lo), hi) for x in sparsity]
    if abs(mean(s) - target_in) > MATCH:
        s = project(s, target_in, lo, hi, w)
    floor = [max(bisect.bisect_right(grid, x + MATCH) - 1, 0) for x in s]
    ceil = [f if abs(grid[f] - x) <= MATCH else min(f + 1, len(grid) - 1) for f, x in zip(floor, s)]
    chosen = list(floor)
    gap = target - mean([grid[f] for f in floor])
    remainder = {l: (s[l] - grid[floor[l]]) / (grid[ceil[l]] - grid[floor[l]]) for l in range(n) if ceil[l] != floor[l]}
    for l in sorted(remainder, key=lambda l: (-remainder[l], l)):
        step = w[l] * (grid[ceil[l]] - grid[floor[l]]) / total
        if step < 2 * gap:
            chosen[l] = ceil[l]
            gap -= step
    result = [grid[j] for j in chosen]
    return result, mean(result) - target


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


def layer_shapes(loaded: Loaded) -> list[dict[str, list[int]]]:
    """Per decoder layer {linear: [d_out, d_in]}."""
    return [{name: list(lin.weight.shape) for name, lin in loaded.linears(i).items()} for i in range(loaded.num_layers)]


def database_bytes(shapes: list[dict[str, Sequence[int]]], levels: Sequence[float], value_bytes: int) -> int:
    """Tensor bytes of a database (headers and manifest aside): Σ over layers, linears and levels s of
    ⌈numel/8⌉ (the mask) + (numel − ⌊numel · s⌋) · value_bytes (the kept values)."""
    total = 0
    for layer in shapes:
        for d_out, d_in in layer.values():
            numel = d_out * d_in
            total += sum((numel + 7) // 8 + (numel - removed_count(numel, s)) * value_bytes for s in levels)
    return total


def llama_shapes(num_layers: int, hidden: int, intermediate: int, heads: int | None = None,
                 kv_heads: int | None = None) -> list[dict[str, list[int]]]:
    """The prunable shapes of a Llama-family decoder (q, k, v, o, gate, up, down), for `database_bytes` at widths
    not at hand (LLaVA-1.5-7B: 32 layers, hidden 4096, intermediate 11008, no grouped-query attention)."""
    kv = hidden if heads is None or kv_heads is None else hidden // heads * kv_heads
    layer = {"q_proj": [hidden, hidden], "k_proj": [kv, hidden], "v_proj": [kv, hidden], "o_proj": [hidden, hidden],
             "gate_proj": [intermediate, hidden], "up_proj": [intermediate, hidden], "down_proj": [hidden, intermediate]}
    return [dict(layer) for _ in range(num_layers)]


def _file(i: int, j: int) -> str:
    return f"layer{i:03d}_level{j:02d}.safetensors"


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
    """A database on disk (`manifest` is its manifest.json) and a record of the level each decoder layer of the model
    holds (`current`: per layer a level, 0.0 = dense; None = unknown, so the next `apply` writes every layer). The
    record is of the one model it applies to; whatever else writes that model's decoder weights calls `forget`."""

    path: Path
    manifest: dict
    dense: DenseWeights | None = None  # where level 0.0 comes from when `apply` is given none
    current: list[float | None] | None = field(default=None, repr=False)

    @property
    def levels(self) -> tuple[float, ...]:
        return tuple(self.manifest["levels"])

    @property
    def num_layers(self) -> int:
        return self.manifest["num_layers"]

    @property
    def fingerprint(self) -> str:
        """What the stored solutions depend on (dense weights, calibration, grid, damping, block size), hashed."""
        keys = ("weights", "calibration", "levels", "percdamp", "blocksize", "dtype")
        described = {k: self.manifest[k] for k in keys}
        if self.manifest.get("inputs", "dense") != "dense":
            described["inputs"] = self.manifest["inputs"]
        text = json.dumps(described, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def forget(self) -> None:
        """The model's layers were changed by something else: the next `apply` writes every layer."""
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

    @torch.no_grad()
    def apply(self, loaded: Loaded, levels_per_layer: list[float], *, dense: DenseWeights | None = None) -> list[int]:
        """Write the stored solution of each layer's level into its linears (W = 0; W[mask] = values), or for level
        0.0 the dense weights (from `dense`, else the ones given at open). Layers whose level is the one the record
        says they hold are skipped. Every level must be 0.0 or on the grid (checked before anything is written).
        Returns the layers written."""
        self.check_model(loaded)
        if len(levels_per_layer) != self.num_layers:
            raise ValueError(f"{len(levels_per_layer)} levels for a database of {self.num_layers} decoder layers; "
                             "give one per layer")
        grid = self.levels
        wanted: list[float] = []
        for i, s in enumerate(levels_per_layer):
            j = grid_index(float(s), grid)
            if float(s) != 0.0 and j is None:
                raise ValueError(f"level {s} of layer {i} is not on the database's grid; allowed: 0.0 or "
                                 f"{', '.join(f'{g:g}' for g in grid)}")
            wanted.append(0.0 if float(s) == 0.0 else grid[j])
        dense = dense if dense is not None else self.dense
        todo = [i for i in range(self.num_layers) if self.current is None or self.current[i] != wanted[i]]
        if dense is None and any(wanted[i] == 0.0 for i in todo):
            raise ValueError("level 0.0 (dense) needs the dense weights: pass dense=DenseWeights(loaded) taken "
                             "while the model was dense")
        from safetensors import safe_open

        current = self.current or [None] * self.num_layers
        self.current = current
        for i in todo:
            current[i] = None  # until the layer is fully written
            linears = loaded.linears(i)
            if wanted[i] == 0.0:
                for name, linear in linears.items():
                    linear.weight.copy_(dense[(i, name)])
            else:
                with safe_open(self.path / _file(i, grid.index(wanted[i])), framework="pt") as f:
                    for name, linear in linears.items():
                        W = linear.weight
                        keep = unpack_mask(f.get_tensor(f"{name}.mask"), W.shape, W.device)
                        W.zero_().masked_scatter_(keep, f.get_tensor(f"{name}.values").to(W.device))
            current[i] = wanted[i]
        return todo


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
    refused). Checked against the model's own weights, the record says every layer is dense."""
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
        database.current = [0.0] * database.num_layers
    return database


def _check_build(levels: Sequence[float], path: Path, batches: list[dict], blocksize: int, percdamp: float
                 ) -> tuple[float, ...]:
    grid = check_levels(levels)
    if not batches:
        raise ValueError("no calibration batches; the database needs the layers' inputs")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer; got {blocksize!r}")
    if not 0.0 <= percdamp < 1.0:
        raise ValueError(f"percdamp must be in [0, 1); got {percdamp}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} exists and is not an empty folder; remove it or choose another path")
    return grid


@torch.no_grad()
def build_database(loaded: Loaded, batches: list[dict], *, levels: Sequence[float], path: str | Path,
                   blocksize: int = 128, percdamp: float = 0.01, progress: bool = True, inputs: float | None = None,
                   threads: int | None = None) -> LayerDatabase:
    """Solve every decoder layer's linears with SparseGPT at every level of `levels`, inputs from the dense model,
    and store them at `path` (see the module docstring for the format). The model's current weights are taken as the
    dense ones and left unchanged. `inputs`: None (the dense model's, EvoPress's choice) or a grid level: each layer
    is then solved on what the layers before it produce when pruned at that level, as sequential SparseGPT does, so
    the uniform plan at that level stitches to exactly `prune.apply_sparsegpt`'s weights. `threads`: torch's CPU threads during the build (None: as set), restored after;
    SparseGPT's column loop is thousands of small ops, each a parallel region on the CPU, so on a CPU shared with
    other jobs 1 thread can be many times faster than 2 (SmolLM2 here: ~20x). Returns the opened database (its
    record: every layer dense). A build killed outright leaves only a hidden `.{name}.partial-*` folder."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    path = Path(path)
    grid = _check_build(levels, path, batches, blocksize, percdamp)
    if inputs is not None and grid_index(inputs, grid) is None:
        raise ValueError(f"database inputs {inputs!r}: give 'dense' (None) or a level of the grid {list(grid)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None; got {threads!r}")
    previous_threads = torch.get_num_threads()
    started = time.perf_counter()
    dtype = next(iter(loaded.linears(0).values())).weight.dtype
    manifest = {"format": FORMAT, "model": loaded.name, "num_layers": loaded.num_layers,
                "dtype": str(dtype).removeprefix("torch."), "levels": list(grid), "percdamp": percdamp,
                "blocksize": blocksize, "inputs": "dense" if inputs is None else f"uniform-{inputs:g}",
                "shapes": layer_shapes(loaded),
                "weights": weights_fingerprint(loaded), "calibration": batches_fingerprint(batches),
                "n_batches": len(batches), "device": str(loaded.device),
                "threads": threads or torch.get_num_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    bar = tqdm(total=loaded.num_layers * len(grid), desc="sparsegpt database", disable=not progress)
    solvers: dict[str, SparseGPT] = {}
    held: dict[tuple[int, str], torch.Tensor] = {}  # inputs from a uniform plan: the dense weights, put back after

    def observe(i: int):
        solvers.clear()
        solvers.update({name: SparseGPT(linear) for name, linear in loaded.linears(i).items()})
        return {name: solver.add_batch for name, solver in solvers.items()}

    def solve_all(i: int) -> None:
        factors = {}
        for name, solver in solvers.items():
            factors[name] = solver.inverse_hessian(percdamp)
            solver.free()
        for j, level in enumerate(grid):
            tensors = {}
            for name, linear in loaded.linears(i).items():
                W, pruned = SparseGPT.solve(linear.weight.data, *factors[name], level, None, blocksize)
                keep = ~pruned
                tensors[f"{name}.mask"] = pack_mask(keep)
                tensors[f"{name}.values"] = W[keep].to("cpu")
                if inputs is not None and grid_index(inputs, grid) == j:
                    held[(i, name)] = (linear.weight.data.to("cpu", copy=True), W)
            save_file(tensors, str(tmp / _file(i, j)))
            bar.update(1)
        for name, linear in loaded.linears(i).items():  # the next layer sees this layer pruned to `inputs`
            if (i, name) in held:
                dense, W = held[(i, name)]
                linear.weight.data.copy_(W)
                held[(i, name)] = dense

    try:
        if threads is not None:
            torch.set_num_threads(threads)
        layer_by_layer(loaded, batches, observe, solve_all)
        bar.close()
        manifest["build_seconds"] = time.perf_counter() - started
        manifest["bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
        manifest["tensor_bytes"] = database_bytes(manifest["shapes"], grid, dtype.itemsize)
        write_json(tmp / MANIFEST, manifest)
        if path.exists():
            path.rmdir()  # empty (checked above)
        os.replace(tmp, path)
    finally:
        for (i, name), dense in held.items():
            loaded.linears(i)[name].weight.data.copy_(dense)
        torch.set_num_threads(previous_threads)
        bar.close()
        if tmp.exists():
            shutil.rmtree(tmp)
    database = LayerDatabase(path, manifest)
    database.current = [0.0] * loaded.num_layers
    return database
