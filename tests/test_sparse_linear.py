"""Pruned linears kept compressed in memory (`lmmlab.models.sparse_linear`) and the sparse decode kernel
(`lmmlab.models.sparse_kernels`): the kernel equals the dense product on every path this CPU runs for every shape
class, prefill equals dense, a compressed model decodes the masked dense model's greedy tokens (a tiny Llama, and
SmolLM2 at 50 % unstructured and 2:4), resident bytes drop as `sparse_nbytes` computes, and a compressed model
refuses to be pruned again."""
import tempfile
from pathlib import Path

import pytest
import torch

from lmmlab.models import load_model
from lmmlab.models import sparse_kernels as sk
from lmmlab.models import sparse_linear as sl
from lmmlab.plan import CompressionPlan
from lmmlab.prune.pruner import Pruner
from lmmlab.tasks import get_task

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shape_classes() -> dict[str, torch.Tensor]:
    """Weights [R, C] of every shape class the kernel must get right (zeros = pruned)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for R, C in ((1, 1), (3, 7), (17, 65), (33, 130), (16, 64), (20, 200)):  # odd widths, rows not a multiple of 16
        W = torch.randn(R, C, generator=g)
        W[torch.rand(R, C, generator=g) < 0.5] = 0
        out[f"unstructured {R}x{C}"] = W
    W = torch.randn(19, 96, generator=g)
    W[0] = 0  # an empty row
    W[5, :3] = 0  # a full row but for its first columns
    W[7:9] = torch.randn(2, 96, generator=g)  # full rows
    out["empty and full rows"] = W
    W = torch.randn(21, 136, generator=g)  # 2:4: the two smallest of every group of four pruned
    groups = W.reshape(21, 34, 4)
    groups.scatter_(-1, groups.abs().topk(2, dim=-1, largest=False).indices, 0)
    out["2:4"] = W
    out["all pruned"] = torch.zeros(5, 70)
    out["dense"] = torch.randn(9, 72, generator=g)
    return out


def paths() -> list:
    """Every kernel path, a path this CPU lacks skipped with the reason."""
    have = sk.available_paths()
    return [pytest.param(p, marks=pytest.mark.skipif(p not in have, reason=f"this CPU runs only {have}: no {p}"))
            for p in sk.PATHS[1:]]


@pytest.mark.parametrize("path", paths())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_equals_the_dense_product_for_every_shape_class(path, dtype):
    g = torch.Generator().manual_seed(1)
    for name, W in shape_classes().items():
        mask, values, offsets = sk.compress(W, dtype)
        assert mask.shape == (W.shape[0], sk.row_bytes(W.shape[1])) and int(offsets[-1]) == int((W != 0).sum())
        dense = W.to(dtype).double()  # the weights as stored
        for B in range(1, sk.MAX_TOKENS + 1):
            x = torch.randn(B, W.shape[1], generator=g)
            y = sk.matvec(mask, values, offsets, x, path=path)
            ref = x.double() @ dense.T
            assert y.shape == (B, W.shape[0]) and y.dtype == torch.float32
            # fp32 accumulation in another order: the rounding of a sum of C products
            tol = 1e-5 * (x.double().abs() @ dense.abs().T) + 1e-6
            assert ((y.double() - ref).abs() <= tol).all(), f"{name}, {B} tokens"
        assert torch.equal(sk.unpack_rows(mask, values, offsets, 0, W.shape[0], W.shape[1]), W.to(dtype)), name


def test_auto_path_and_the_environment_pick_a_path_and_a_bad_name_is_refused(monkeypatch):
    W = shape_classes()["2:4"]
    mask, values, offsets = sk.compress(W, torch.float16)
    x = torch.randn(2, W.shape[1])
    assert torch.allclose(sk.matvec(mask, values, offsets, x), x @ W.half().float().T, atol=1e-4)
    with pytest.raises(ValueError, match="unknown sparse kernel path 'sse'.*allowed: auto, portable, avx2, avx512"):
        sk.matvec(mask, values, offsets, x, path="sse")
    monkeypatch.setenv(sk.PATH_ENV, "neon")
    with pytest.raises(ValueError, match="'neon'"):
        sk.matvec(mask, values, offsets, x)
    monkeypatch.setenv(sk.PATH_ENV, "portable")
    assert torch.allclose(sk.matvec(mask, values, offsets, x), x @ W.half().float().T, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_linear_equals_the_dense_linear_in_decode_and_prefill(monkeypatch, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(130, 37, bias=True)
    with torch.no_grad():
        linear.weight[torch.rand(37, 130) < 0.6] = 0
    sparse = sl.SparseLinear.from_linear(linear, dtype=dtype)
    W = linear.weight.detach().to(dtype).float()
    monkeypatch.setattr(sl, "BLOCK_ELEMENTS", 130 * 5)  # prefill in blocks of 5 rows: several, the last one short
    for tokens in (1, 3, 4, 5, 11):  # decode (the kernel) and prefill (blocks of dense rows)
        x = torch.randn(2, tokens, 130) if tokens > 4 else torch.randn(1, tokens, 130)
        with torch.no_grad():
            assert torch.allclose(sparse(x), x @ W.T + linear.bias, atol=1e-4), tokens
    assert torch.equal(sparse.to_dense(), linear.weight.detach().to(dtype))
    with pytest.raises(ValueError, match="float64.*allowed: float32, float16, bfloat16"):
        sl.SparseLinear.from_linear(linear, dtype=torch.float64)


def greedy(loaded, ids: torch.Tensor, n: int = 8) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     do_sample=False, pad_token_id=0)


def model_bytes(loaded) -> int:
    return sum(t.numel() * t.element_size() for t in (*loaded.model.parameters(), *loaded.model.buffers()))


def check_compressed_decode(loaded, pruner, plan, ids, n: int = 8) -> None:
    """Masked dense vs compressed: the same greedy tokens and near logits; resident bytes drop by exactly what
    `sparse_nbytes` computes; pruning again is refused; decompressing gives back the masked weights."""
    pruner.apply(plan)
    masked = {key: lin.weight.detach().clone() for key, lin in loaded.prunable().items()}
    expected, before = greedy(loaded, ids, n), model_bytes(loaded)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    counts = pruner.compress()
    assert sl.is_compressed(loaded) and not loaded.prunable() and counts["compressed"] == len(masked)
    computed = sum(sl.sparse_nbytes(*W.shape, int((W != 0).sum()), W.element_size()) for W in masked.values())
    assert counts["bytes_after"] == computed < counts["bytes_before"]
    assert before - model_bytes(loaded) == counts["bytes_before"] - computed
    assert torch.equal(greedy(loaded, ids, n), expected)
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, logits, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="cannot prune a model whose linears are held compressed"):
        pruner.apply(CompressionPlan([0.3] * loaded.num_layers, method=plan.method, pattern="unstructured"))
    from lmmlab.prune.export import export

    with pytest.raises(ValueError, match="cannot export a model whose linears are held compressed"):
        export(loaded, plan, Path(tempfile.mkdtemp()) / "out")
    pruner.apply(plan)  # the weights it already holds (KV widths aside): nothing to prune
    pruner.restore()  # decompressed, then dense again
    assert not sl.is_compressed(loaded) and loaded.prunable().keys() == masked.keys()


def test_compressed_tiny_llama_decodes_the_masked_models_greedy_tokens(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, device="cpu")
    pruner = Pruner.for_task(loaded, get_task("text"), n=4)
    ids = torch.arange(3, 15).reshape(1, 12)
    for sparsity, pattern in ((0.5, "unstructured"), (0.7, "unstructured"), (0.5, "2:4")):
        plan = CompressionPlan([sparsity] * loaded.num_layers, method="wanda", pattern=pattern)
        check_compressed_decode(loaded, pruner, plan, ids)
    assert sl.compress_linears(loaded)["compressed"] == 0  # dense linears: compressing them would not save
    pruner.apply(plan)
    sl.compress_linears(loaded)
    with pytest.raises(ValueError, match="cannot prune a model whose linears are held compressed"):
        Pruner.for_task(loaded, get_task("text"), n=2)
    assert sl.decompress_linears(loaded) == 3 * 7


def test_refuse_compressed_names_the_action_and_the_way_out():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    sl.refuse_compressed(model)  # dense: nothing to refuse
    model[0] = sl.SparseLinear.from_linear(model[0])
    with pytest.raises(ValueError, match="cannot export a model .* decompress_linears first") as err:
        sl.refuse_compressed(model, "export")
    assert "\n" not in str(err.value)


SMOLLM2_LAYERS = 3  # the first layers pruned and compressed (the rest run dense): the same code, a fraction of the time


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_compressed_smollm2_decodes_the_masked_models_greedy_tokens(smollm2, pattern):
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    batches = get_task("text").calibration_batches(smollm2, n=1)
    layers = smollm2.layers
    smollm2.layers = layers[:SMOLLM2_LAYERS]  # what the pruner sees; the model runs all of them
    pruner = Pruner.calibrated(smollm2, [{k: v[:, :64] for k, v in batches[0].items()}])
    try:
        plan = CompressionPlan.uniform(SMOLLM2_LAYERS, 0.5, method="magnitude", pattern=pattern)
        check_compressed_decode(smollm2, pruner, plan, ids, n=5)
    finally:
        sl.decompress_linears(smollm2)
        pruner.restore()
        smollm2.layers = layers


def test_a_pruned_export_loads_compressed_and_the_cli_refuses_to_prune_it_again(tiny_llama_dir, tmp_path, capsys):
    from lmmlab.cli import main
    from lmmlab.prune.export import export

    loaded = load_model(tiny_llama_dir, device="cpu")
    plan = CompressionPlan([0.6] * loaded.num_layers, method="magnitude")
    Pruner.for_task(loaded, get_task("text"), n=2).apply(plan)
    export(loaded, plan, tmp_path / "pruned")
    back = sl.load_compressed(tmp_path / "pruned", device="cpu")
    assert sl.is_compressed(back) and not back.prunable()
    ids = torch.arange(3, 9).reshape(1, 6)
    with torch.no_grad():
        assert torch.allclose(back.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-4)

    again = tmp_path / "again"
    capsys.readouterr()  # what loading printed so far
    assert main(["-q", "prune", "--model", str(tmp_path / "pruned"), "--compressed", "--task", "text",
                 "--n-calibration", "2", "--out", str(again)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # log warnings aside
    assert len(errors) == 1, errors
    assert errors[0].startswith("lmmlab prune: error: cannot prune a model whose linears are held compressed")
    assert not (again.exists() and any(again.iterdir()))
