"""The SparseGPT layer database: stitched plans equal SparseGPT run layer-wise on the dense model's inputs, exact
counts, the discrete projection onto the level grid, the skip-unchanged record, and one-line errors."""
import itertools
import json
import math
import random
import shutil

import pytest
import torch

from lmmlab import models
from lmmlab.prune.allocate import project
from lmmlab.prune.database import (LayerDatabase, build_database, check_levels, database_bytes, layer_shapes, level_grid, llama_shapes, open_database, pack_mask, parse_levels, project_to_grid, unpack_bits, unpack_mask)
from lmmlab.prune.scores import DenseWeights, removed_count
from lmmlab.prune.sparsegpt import SparseGPT
from lmmlab.prune.sequential import layer_by_layer
from lmmlab.tasks import get_task

GRID = (0.3, 0.45, 0.6, 0.75)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return models.load_model(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="module")
def batches(llama):
    """Text windows plus one padded batch (padding must stay out of the Hessians)."""
    padded = dict(llama.tokenizer(["USER: what colour is the circle ?", "is there a square ?"], return_tensors="pt",
                                  padding=True))
    return get_task("text").calibration_batches(llama, n=8, seed=0) + [padded]


@pytest.fixture(scope="module")
def dense(llama):
    return DenseWeights(llama, source="host")


@pytest.fixture(scope="module")
def built(llama, batches, tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "tiny"
    return build_database(llama, batches, levels=GRID, path=path, progress=False)


@pytest.fixture
def db(built, llama, dense):
    """The module's database; the model is put back to dense after each test."""
    yield built
    built.forget()
    built.apply(llama, [0.0] * llama.num_layers, dense=dense)


def weights(loaded) -> dict:
    return {key: lin.weight.detach().clone() for key, lin in loaded.prunable().items()}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


# --------------------------------------------------------------------------------------------------------------------
# (a) the refactored SparseGPT, and stitching == SparseGPT layer-wise on dense inputs


@torch.no_grad()
def old_prune(linear, H, sparsity, nm=None, blocksize=128, percdamp=0.01):
    """SparseGPT.prune as it was before the refactor (verbatim, H mutated in place), but for the precision of H⁻¹:
    H is now accumulated and factored in float64 and the factor rounded to float32 (thread-independent solves)."""
    columns = linear.weight.shape[1]
    W = linear.weight.data.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(columns, device=H.device, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        prune_mask = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            saliency = W1**2 / torch.diag(Hinv1)[None, :] ** 2
            d_out = W.shape[0]
            k = removed_count(d_out * i2, sparsity) - removed_count(d_out * i1, sparsity)
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
    linear.weight.data.copy_(W.to(linear.weight.dtype))


@pytest.mark.parametrize("sparsity, nm", [(0.37, None), (0.8, None), (0.5, (2, 4))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refactored_prune_is_bit_identical_to_the_old_algorithm(sparsity, nm, dtype):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 40, generator=g) * torch.rand(40, generator=g) * 3
    X[:, [3, 17]] = 0  # dead columns: no input reaches them
    lin = torch.nn.Linear(40, 24, bias=False).to(dtype)
    lin.weight.data.copy_(torch.randn(24, 40, generator=g))
    ref = torch.nn.Linear(40, 24, bias=False).to(dtype)
    ref.weight.data.copy_(lin.weight.data)
    W0 = lin.weight.detach().clone()
    solver = SparseGPT(lin)
    for x in X.split(70):
        solver.add_batch(x)
    H = solver.hessian()
    old_prune(ref, H.clone(), sparsity, nm, blocksize=16)
    solver.prune(sparsity, nm, blocksize=16)
    assert torch.equal(solver.hessian(), H)  # the Hessian is no longer altered: it can serve another level
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(lin.weight.view(bits), ref.weight.view(bits))
    # solve: a pure function of the dense W, the pruned positions returned (and exactly zero)
    W, pruned = SparseGPT.solve(W0, *solver.inverse_hessian(), sparsity, nm, 16)
    assert torch.equal(W.view(bits), lin.weight.view(bits)) and W.dtype == dtype
    assert int(pruned.sum()) == (removed_count(W.numel(), sparsity) if nm is None else W.numel() // 2)
    assert not W[pruned].any() and W[:, [3, 17]].abs().sum() == 0 and bool(W0[:, [3, 17]].any())


@torch.no_grad()
def sparsegpt_on_dense_inputs(loaded, batches, ratios: list[dict[str, float]]) -> dict:
    """The reference: each layer's Hessians from the dense model's inputs (one per linear, no sharing),
    `SparseGPT.prune` of each linear at its own ratio, the layer put back to dense after it is pruned (so the next
    layer sees dense outputs)."""
    solvers, result = {}, {}

    def observe(i):
        solvers.clear()
        solvers.update({name: SparseGPT(lin) for name, lin in loaded.linears(i).items()})
        return {name: s.add_batch for name, s in solvers.items()}

    def prune(i):
        for name, solver in solvers.items():
            W0 = solver.linear.weight.detach().clone()
            if ratios[i][name] > 0:
                solver.prune(ratios[i][name])
            result[(i, name)] = solver.linear.weight.detach().clone()
            solver.linear.weight.copy_(W0)

    layer_by_layer(loaded, batches, observe, prune)
    return result


def per_linear(loaded, plan: list[float]) -> list[dict[str, float]]:
    """A per-layer plan as per-linear ratios (every linear of a layer at the layer's ratio)."""
    return [dict.fromkeys(loaded.linears(i), ratio) for i, ratio in enumerate(plan)]


def test_a_stitched_plan_equals_sparsegpt_layer_wise_on_dense_inputs(llama, batches, db, dense):
    plans = ([0.6, 0.0, 0.75], [0.3, 0.45, 0.3])
    references = [sparsegpt_on_dense_inputs(llama, batches, per_linear(llama, plan)) for plan in plans]
    assert same_bits(weights(llama), {k: dense[k] for k in references[0]})  # the reference left the model dense
    for plan, reference in zip(plans, references):  # the second stitched over the first
        db.apply(llama, plan, dense=dense)
        assert same_bits(weights(llama), reference)


# --------------------------------------------------------------------------------------------------------------------
# (b) exact counts, bytes


def test_every_stitched_linear_removes_exactly_its_count(llama, db, dense):
    for level in GRID:
        db.apply(llama, [level] * llama.num_layers, dense=dense)
        for key, lin in llama.prunable().items():
            W = lin.weight
            assert int((W == 0).sum()) == removed_count(W.numel(), level), (key, level)
            assert not torch.equal(W[W != 0], dense[key][W != 0])  # SparseGPT updated the kept weights


def test_mask_packing_round_trips_on_both_unpack_paths():
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 1), (3, 5), (7, 9), (16, 8), (33, 64)]:
        keep = torch.rand(shape, generator=g) > 0.4
        packed = pack_mask(keep)
        assert packed.dtype == torch.uint8 and packed.numel() == (keep.numel() + 7) // 8
        assert torch.equal(unpack_mask(packed, shape), keep)  # numpy, for the CPU
        assert torch.equal(unpack_bits(packed, keep.numel()).view(shape), keep)  # torch, for an accelerator


def test_stored_masks_and_bytes_match_the_closed_form(llama, db):
    from safetensors import safe_open

    manifest = json.loads((db.path / "manifest.json").read_text())
    tensor_bytes = 0
    for i, j in itertools.product(range(llama.num_layers), range(len(GRID))):
        for name, lin in llama.linears(i).items():
            with safe_open(db.path / f"layer{i:03d}.{name}.safetensors", framework="pt") as f:
                mask, values = f.get_tensor(f"{j}.mask"), f.get_tensor(f"{j}.values")
                keep = unpack_mask(mask, lin.weight.shape)
                assert lin.weight.numel() - int(keep.sum()) == removed_count(lin.weight.numel(), GRID[j])
                assert values.numel() == int(keep.sum()) and values.dtype == lin.weight.dtype
                tensor_bytes += mask.numel() + values.numel() * values.element_size()
    assert manifest["tensor_bytes"] == tensor_bytes == database_bytes(layer_shapes(llama), GRID, 4)
    assert manifest["bytes"] == sum(p.stat().st_size for p in db.path.glob("*.safetensors")) > tensor_bytes
    assert manifest["build_seconds"] > 0 and db.levels == GRID and manifest["reference"] is None
    # the closed form at LLaVA-1.5-7B widths is the same formula: one level's mask + values of one 4096² matrix
    one = database_bytes(llama_shapes(1, 4096, 11008), [0.5], 2)
    assert one == sum((d_out * d_in + 7) // 8 + (d_out * d_in - d_out * d_in // 2) * 2
                      for d_out, d_in in llama_shapes(1, 4096, 11008)[0].values())


# --------------------------------------------------------------------------------------------------------------------
# (c) the projection


def check_projection(request, grid, target, weights=None):
    levels, residual = project_to_grid(request, grid, target, weights)
    w = weights or [1.0] * len(request)
    mean = sum(a * b for a, b in zip(w, levels)) / sum(w)
    assert mean - target == pytest.approx(residual, abs=1e-12)
    assert all(s in grid for s in levels)
    clamped = [min(max(r, grid[0]), grid[-1]) for r in request]
    steps = [b - a for a, b in zip(grid, grid[1:])]
    if abs(sum(a * b for a, b in zip(w, clamped)) / sum(w) - target) < 1e-12:  # no shift needed: one step at most
        for r, s in zip(clamped, levels):
            below = max([g for g in grid if g <= r + 1e-9])
            above = min([g for g in grid if g >= r - 1e-9])
            assert s in (below, above), (r, s)
    bound = max(wi * max(steps, default=0) for wi in w) / sum(w) / 2
    assert abs(residual) <= bound + 1e-12
    return levels, residual


def test_projection_hits_a_reachable_target_exactly():
    grid = level_grid(0.3, 0.9, 0.05)
    assert len(grid) == 13 and grid[1] == 0.35 and grid[-1] == 0.9
    rng = random.Random(0)
    for _ in range(20):
        request = project([rng.uniform(0.3, 0.9) for _ in range(30)], 0.6, 0.3, 0.9)
        levels, residual = check_projection(request, grid, 0.6)
        assert abs(residual) < 1e-12
        assert all(abs(s - r) < 0.05 + 1e-9 for s, r in zip(levels, request))


def test_projection_with_equal_weights_is_the_best_floor_or_ceiling_choice():
    """Brute force over every floor/ceiling choice: the greedy's |residual| is the smallest there is."""
    grid = (0.3, 0.4, 0.5, 0.6, 0.7)
    rng = random.Random(1)
    for _ in range(30):
        target = rng.uniform(0.35, 0.65)
        request = project([rng.uniform(0.3, 0.7) for _ in range(8)], target, 0.3, 0.7)
        levels, residual = check_projection(request, grid, target)
        options = [sorted({max(g for g in grid if g <= r + 1e-9), min(g for g in grid if g >= r - 1e-9)})
                   for r in request]
        best = min(abs(sum(choice) / 8 - target) for choice in itertools.product(*options))
        assert abs(residual) <= best + 1e-12


def test_projection_with_unequal_weights_and_an_uneven_grid():
    grid = (0.3, 0.5, 0.55, 0.7, 0.9)
    rng = random.Random(2)
    for _ in range(30):
        w = [float(rng.choice([3.5e6, 1.2e6, 8e5])) for _ in range(12)]
        target = rng.uniform(0.4, 0.8)
        request = project([rng.uniform(0.3, 0.9) for _ in range(12)], target, 0.3, 0.9, w)
        check_projection(request, grid, target, w)


def test_projection_clamps_requests_outside_the_grid_and_keeps_the_budget():
    grid = level_grid(0.3, 0.9, 0.05)
    request = [0.0, 0.05, 0.95, 0.99] + [0.6] * 26  # mean 0.5997: clamping moves it, a shift restores it
    levels, residual = check_projection(request, grid, 0.6)
    assert abs(residual) < 1e-12 and levels[0] == levels[1] == 0.3 and levels[2] == levels[3] == 0.9


# --------------------------------------------------------------------------------------------------------------------
# (d) the skip-unchanged record


def test_reapplying_a_plan_after_another_gives_identical_weights(llama, db, dense):
    a, b = [0.45, 0.75, 0.3], [0.6, 0.75, 0.0]
    assert db.apply(llama, a, dense=dense) == [0, 1, 2]  # opened dense: every layer changes
    first = weights(llama)
    assert db.apply(llama, a, dense=dense) == []  # nothing changed, nothing written
    assert db.apply(llama, b, dense=dense) == [0, 2]  # layer 1 keeps its level
    assert db.apply(llama, a, dense=dense) == [0, 2]
    assert same_bits(weights(llama), first)
    # something else writes the model: forget, and every layer is written again
    with torch.no_grad():
        llama.linears(1)["q_proj"].weight.mul_(2)
    db.forget()
    assert db.apply(llama, a, dense=dense) == [0, 1, 2]
    assert same_bits(weights(llama), first)
    assert db.apply(llama, [0.45 + 1e-12, 0.75, 0.3], dense=dense) == []  # a float a hair off is the grid level


def test_a_reopened_database_stitches_the_same_weights(llama, db, dense, batches):
    db.apply(llama, [0.3, 0.6, 0.75], dense=dense)
    first = weights(llama)
    db.apply(llama, [0.0] * 3, dense=dense)
    again = open_database(db.path, llama, batches=batches)  # the model is dense: record says so, no dense needed
    assert again.fingerprint == db.fingerprint and again.levels == GRID
    assert again.apply(llama, [0.3, 0.6, 0.75]) == [0, 1, 2]
    assert same_bits(weights(llama), first)
    with pytest.raises(ValueError, match=r"^level 0.0 \(dense\) needs the dense weights"):
        again.apply(llama, [0.0, 0.6, 0.75])
    db.forget()


# --------------------------------------------------------------------------------------------------------------------
# (e) errors: one line each, nothing written


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("levels, message", [
    ([], "empty level grid"),
    ([0.0, 0.5], "level 0.0 outside (0, 1)"),
    ([0.5, 1.0], "level 1.0 outside (0, 1)"),
    ([0.5, float("nan")], "level nan outside (0, 1)"),
    ([0.6, 0.5], "not strictly increasing at 0.6, 0.5"),
    ([0.5, 0.5], "not strictly increasing at 0.5, 0.5"),
])
def test_bad_grids_are_one_line_errors_and_build_nothing(llama, batches, tmp_path, levels, message):
    with pytest.raises(ValueError) as err:
        check_levels(levels)
    assert message in one_line(err)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_database(llama, batches, levels=levels, path=tmp_path / "db", progress=False)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        project_to_grid([0.5, 0.5], levels, 0.5)
    assert list(tmp_path.iterdir()) == []


def test_parse_levels():
    assert parse_levels("0.3:0.9:0.05") == level_grid(0.3, 0.9, 0.05)
    assert parse_levels("0.5, 0.6,0.7") == (0.5, 0.6, 0.7)
    for text, message in (("0.3:0.9", "bad level grid"), ("a,b", "bad level grid"), ("0.3:0.9:0", "step must be"),
                          ("", "empty level grid"), ("0.7,0.5", "not strictly increasing")):
        with pytest.raises(ValueError) as err:
            parse_levels(text)
        assert message in one_line(err)


@pytest.mark.parametrize("target", [0.2, 0.95])
def test_an_unreachable_target_is_a_one_line_error(target):
    with pytest.raises(ValueError) as err:
        project_to_grid([0.5] * 4, GRID, target)
    assert f"target sparsity {target} cannot be met on the level grid 0.3..0.75" in one_line(err)


def test_an_off_grid_level_is_refused_before_anything_is_written(llama, db, dense):
    db.apply(llama, [0.3, 0.3, 0.3], dense=dense)
    before = weights(llama)
    for plan, message in (([0.45, 0.5, 0.3], "level 0.5 of q_proj in layer 1 is not among the database's levels; "
                                             "allowed: 0.0 or 0.3, 0.45, 0.6, 0.75"),
                          ([0.3, 0.3], "2 levels for a database of 3 decoder layers")):
        with pytest.raises(ValueError) as err:
            db.apply(llama, plan, dense=dense)
        assert message in one_line(err)
    assert same_bits(weights(llama), before) and db.apply(llama, [0.3] * 3, dense=dense) == []


def test_bad_build_options_are_one_line_errors(llama, batches, tmp_path):
    for options, message in (({"threads": 0}, "threads must be a positive integer"),
                             ({"blocksize": 0}, "blocksize must be a positive integer"),
                             ({"percdamp": -0.1}, "percdamp must be in [0, 1)")):
        with pytest.raises(ValueError) as err:
            build_database(llama, batches, levels=GRID, path=tmp_path / "db", progress=False, **options)
        assert message in one_line(err)
    with pytest.raises(ValueError) as err:
        build_database(llama, [], levels=GRID, path=tmp_path / "db", progress=False)
    assert "no calibration batches" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_build_leaves_nothing(llama, batches, tmp_path):
    broken = batches[:2] + [{"input_ids": batches[0]["input_ids"]}]  # no attention mask: fails inside the build
    with pytest.raises(KeyError):
        build_database(llama, broken, levels=GRID, path=tmp_path / "db", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_not_overwritten(llama, batches, built, tmp_path):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "keep.txt").write_text("x")
    with pytest.raises(ValueError) as err:
        build_database(llama, batches, levels=GRID, path=tmp_path / "db", progress=False)
    assert "exists and is not an empty folder" in one_line(err)
    with pytest.raises(ValueError) as err:
        open_database(tmp_path / "db", llama)
    assert "no layer database at" in one_line(err)


def test_a_stale_or_foreign_database_is_refused(llama, batches, built, dense, tiny_llama_dir, tiny_llava_dir,
                                                tmp_path):
    with pytest.raises(ValueError) as err:  # calibrated on other batches
        open_database(built.path, llama, batches=batches[:-1])
    assert "was calibrated on other batches" in one_line(err)
    changed = models.load_model(tiny_llama_dir, device="cpu")  # same model, one weight changed: stale
    with torch.no_grad():
        changed.linears(2)["down_proj"].weight[0, 0] += 1e-3
    with pytest.raises(ValueError) as err:
        open_database(built.path, changed)
    assert "it is stale, rebuild it" in one_line(err)
    with pytest.raises(ValueError) as err:  # checked against the given dense weights instead of the model's
        open_database(built.path, changed, dense=DenseWeights(changed, source="host"))
    assert "other weights than the given dense weights" in one_line(err)
    assert open_database(built.path, llama, dense=dense).current is None  # dense given: the model's state unknown
    llava = models.load_model(tiny_llava_dir, device="cpu")  # another model: 2 decoder layers
    with pytest.raises(ValueError) as err:
        open_database(built.path, llava)
    assert "with 3 decoder layers; this model has 2" in one_line(err)
    from transformers import LlamaConfig, LlamaForCausalLM  # same depth, other widths

    config = LlamaConfig(vocab_size=len(llama.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "narrow")
    llama.tokenizer.save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError) as err:
        open_database(built.path, models.load_model(tmp_path / "narrow", device="cpu"))
    assert "whose layer 0 linears are" in one_line(err)
    with pytest.raises(ValueError) as err:
        built.apply(models.load_model(tmp_path / "narrow", device="cpu"), [0.3] * 3)
    assert "whose layer 0 linears are" in one_line(err)
    half = models.load_model(tiny_llama_dir, device="cpu", dtype="bfloat16")
    with pytest.raises(ValueError) as err:
        open_database(built.path, half)
    assert "holds float32 weights; this model is bfloat16" in one_line(err)
    shutil.copytree(built.path, tmp_path / "copy")
    manifest = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    (tmp_path / "copy" / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(ValueError) as err:
        open_database(tmp_path / "copy", llama)
    assert "has format 99; this lmmlab reads format 2" in one_line(err)
    assert isinstance(open_database(built.path, llama), LayerDatabase) and math.isfinite(manifest["build_seconds"])


# --------------------------------------------------------------------------------------------------------------------
# (f) stacked levels, per-linear levels, databases on a reference plan's inputs, count levels


@pytest.mark.parametrize("nm, dtype", [(None, torch.float32), (None, torch.bfloat16), ((2, 4), torch.float32)])
def test_solving_levels_stacked_is_bit_identical_to_solving_each_alone(nm, dtype):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 64, generator=g) * torch.rand(64, generator=g) * 3
    lin = torch.nn.Linear(64, 40, bias=False).to(dtype)
    lin.weight.data.copy_(torch.randn(40, 64, generator=g))
    solver = SparseGPT(lin)
    solver.add_batch(X)
    Hinv, dead = solver.inverse_hessian()
    levels = [0.5] if nm else [0.2, 0.37, 0.5, 0.81]
    for max_elements in (1 << 24, 40 * 64 * 2):  # all copies at once, or two at a time
        stacked = SparseGPT.solve_levels(lin.weight.data, Hinv, dead, levels, nm, 16, max_elements=max_elements)
        for s, (W, pruned) in zip(levels, stacked):
            alone, pruned_alone = SparseGPT.solve(lin.weight.data, Hinv, dead, s, nm, 16)
            assert torch.equal(W, alone) and torch.equal(pruned, pruned_alone) and W.dtype == dtype


def module_plan(llama, ratios):
    from lmmlab.prune.database import layer_numel
    from lmmlab.plan import CompressionPlan

    return CompressionPlan.per_module(ratios, layer_numel(llama), method="sparsegpt")


def test_a_stitched_per_linear_plan_equals_sparsegpt_on_the_same_inputs(llama, batches, db, dense):
    rng = random.Random(4)
    ratios = [{name: rng.choice((0.0,) + GRID) for name in llama.linears(i)} for i in range(llama.num_layers)]
    expected = sparsegpt_on_dense_inputs(llama, batches, ratios)
    db.apply(llama, module_plan(llama, ratios), dense=dense)
    assert same_bits(weights(llama), expected)
    for i, layer in enumerate(ratios):
        for name, s in layer.items():
            W = llama.linears(i)[name].weight
            assert int((W == 0).sum()) == removed_count(W.numel(), s)


def test_a_database_on_a_reference_plans_inputs_stitches_exactly_sequential_sparsegpt(llama, batches, dense,
                                                                                     tmp_path):
    from lmmlab.prune.sparsegpt import apply_sparsegpt

    rng = random.Random(5)
    ratios = [{name: rng.choice((0.0,) + GRID) for name in llama.linears(i)} for i in range(llama.num_layers)]
    reference = module_plan(llama, ratios)
    dense.restore(llama)
    database = build_database(llama, batches, levels=GRID, path=tmp_path / "ref", reference=reference,
                              progress=False)
    assert same_bits(weights(llama), {k: dense[k] for k in weights(llama)})  # the build leaves the model dense
    apply_sparsegpt(llama, reference, batches)
    sequential = weights(llama)
    dense.restore(llama)
    database.forget()
    database.apply(llama, reference, dense=dense)
    assert same_bits(weights(llama), sequential)
    assert database.reference == [{n: float(s) for n, s in layer.items()} for layer in ratios]
    assert database.inputs.startswith("reference ")
    dense.restore(llama)


def test_count_levels_switch_in_exact_weight_counts(llama, batches, dense, tmp_path):
    from lmmlab.prune.database import count_levels, layer_numel

    numel = layer_numel(llama)
    reference = module_plan(llama, [{name: 0.5 for name in llama.linears(i)} for i in range(llama.num_layers)])
    levels = count_levels(reference, numel, hidden=64, k=3)
    delta = int(0.5 * 0.5 / 3 * 64 ** 2)
    for i, layer in enumerate(levels):
        for name, grid in layer.items():
            n = numel[i][name]
            assert len(grid) == 7 and grid[3] == 0.5
            for j, s in enumerate(grid):
                if s is not None:
                    assert removed_count(n, s) == removed_count(n, 0.5) + (j - 3) * delta
                else:
                    assert not 1 <= removed_count(n, 0.5) + (j - 3) * delta <= int(n * 0.99)
    database = build_database(llama, batches, levels=levels, path=tmp_path / "count", reference=reference,
                              progress=False)
    total = sum(removed_count(n, 0.5) for layer in numel for n in layer.values())
    up, down = (0, "gate_proj"), (2, "k_proj")  # one level up in one linear, one down in another (other sizes)
    ratios = [{name: grid[3] for name, grid in layer.items()} for layer in levels]
    ratios[up[0]][up[1]] = levels[up[0]][up[1]][4]
    ratios[down[0]][down[1]] = levels[down[0]][down[1]][2]
    database.apply(llama, module_plan(llama, ratios), dense=dense)
    assert sum(int((lin.weight == 0).sum()) for lin in llama.prunable().values()) == total
    dense.restore(llama)
    with pytest.raises(ValueError) as err:
        count_levels(reference, numel, hidden=64, k=0)
    assert "k >= 1" in one_line(err)


def test_a_reference_off_the_levels_is_a_one_line_error_and_builds_nothing(llama, batches, tmp_path):
    ratios = [{name: 0.5 for name in llama.linears(i)} for i in range(llama.num_layers)]
    with pytest.raises(ValueError) as err:
        build_database(llama, batches, levels=GRID, path=tmp_path / "db", reference=module_plan(llama, ratios),
                       progress=False)
    assert "reference plan's ratio 0.5 for q_proj of layer 0 is not among the database's levels" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_per_linear_grids_project_with_their_own_levels():
    grids = [[0.3, 0.5, 0.7], [0.1, 0.2, 0.3, 0.4], [None, 0.55, 0.6, None]]
    levels, residual = project_to_grid([0.62, 0.21, 0.58], grids, 0.45, [1.0, 2.0, 1.0])
    assert all(s in [g for g in grid if g is not None] for s, grid in zip(levels, grids))
    assert abs(residual) <= max(w * step for w, step in ((1, 0.2), (2, 0.1), (1, 0.05))) / 4 / 2 + 1e-12
