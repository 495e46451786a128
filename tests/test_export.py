"""The compressed-tensors export: round trip to the same logits, the bytes it stores, its config, and the CLI."""
import json

import pytest
import torch
from safetensors import safe_open

from lmmlab.models.checkpoint import decompress_weight
from lmmlab.prune import export as ex
from lmmlab.prune.pruner import Pruner
from lmmlab.cli import main
from lmmlab.models import load_model
from lmmlab.plan import CompressionPlan
from lmmlab.tasks import get_task

COMPRESSED = (".compressed", ".bitmask", ".row_offsets", ".shape")


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, device="cpu")
    return loaded, Pruner.for_task(loaded, get_task("text"), n=8)


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    loaded = load_model(tiny_llava_dir, device="cpu")
    return loaded, Pruner.for_task(loaded, get_task("shapes"), n=8)


def inputs(loaded):
    if loaded.is_multimodal:  # a batch with images, so the vision tower's linears count
        return get_task("shapes").calibration_batches(loaded, n=2)[0]
    return {"input_ids": torch.arange(24).reshape(2, 12) % loaded.text_config.vocab_size}


def stored_names(folder) -> set[str]:
    names = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            names |= set(handle.keys())
    return names


# wanda at 50 % unstructured (the LLaVA's vision side too) and 2:4 (one layer of the Llama left dense).
CASES = [("llama", [0.5, 0.5, 0.5], "unstructured", 0.0), ("llama", [0.5, 0.0, 0.5], "2:4", 0.0),
         ("llava", [0.5, 0.5], "unstructured", 0.5), ("llava", [0.5, 0.5], "2:4", 0.0)]


@pytest.mark.parametrize("model, sparsity, pattern, vision", CASES)
def test_export_round_trip_gives_the_same_logits_and_stores_the_bytes_computed(request, tmp_path, model, sparsity,
                                                                                pattern, vision):
    loaded, pruner = request.getfixturevalue(model)
    plan = CompressionPlan(sparsity, [4] * len(sparsity), method="wanda", pattern=pattern, vision_sparsity=vision)
    pruner.apply(plan)
    out = tmp_path / "export"
    ex.export(loaded, plan, out)

    back = load_model(out, device="cpu")
    with torch.no_grad():
        assert torch.equal(back.model(**inputs(loaded)).logits, loaded.model(**inputs(loaded)).logits)
    mine, theirs = loaded.model.state_dict(), back.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert CompressionPlan.load(out / ex.PLAN_FILE) == plan  # per-layer KV widths included

    fmt = "sparse-24-bitmask" if pattern == "2:4" else "sparse-bitmask"
    sparse = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sparse["quant_method"] == "compressed-tensors"
    config = sparse["sparsity_config"]
    assert (config["format"], config["sparsity_structure"], config["targets"]) == (fmt, pattern, ["Linear"])
    assert any(name.endswith("lm_head") for name in config["ignore"])

    # Which linears are compressed: the pruned ones; a layer at sparsity 0 and an unpruned vision side stay dense.
    compressed = [lin.weight for lin in loaded.prunable(vision=True).values() if ex.is_compressed(lin.weight, fmt)]
    pruned = [lin.weight for (i, _), lin in loaded.prunable(vision=vision > 0).items() if i < 0 or sparsity[i] > 0]
    assert {W.data_ptr() for W in compressed} == {W.data_ptr() for W in pruned}
    names = stored_names(out)
    assert sum(n.endswith(".compressed") for n in names) == len(compressed)
    assert sum(n.endswith(".row_offsets") for n in names) == (len(compressed) if fmt == "sparse-bitmask" else 0)
    assert len(config["ignore"]) == sum(isinstance(m, torch.nn.Linear) for m in loaded.model.modules()) - len(pruned)

    # The bytes: the compressed tensors in the file are the formula's, and the whole file is the "bitmask" figure.
    assert ex.tensor_bytes(out, COMPRESSED) == sum(ex.compressed_bytes(W, fmt) for W in compressed)
    sizes = {f: ex.weight_format_bytes(loaded, f, pattern=pattern) for f in ex.FORMATS}
    assert ex.tensor_bytes(out) == sizes["bitmask"]
    assert sizes["dense"] > sizes["bitmask"] > sizes["nonzeros"]
    assert sizes["dense"] == sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert ex.tensor_bytes(out) < ex.disk_bytes(out) < ex.tensor_bytes(out) + 100_000  # plus the JSON headers
    pruner.restore()


def test_bitmask_layout_is_compressed_tensors():
    W = torch.tensor([[0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.0], [3.0] + [0.0] * 8])
    t = ex.compress_weight(W, "sparse-bitmask")
    assert t["compressed"].tolist() == [1.5, -2.0, 3.0]
    assert t["bitmask"].tolist() == [[0b10, 0b1], [0b1, 0]]  # bit j % 8 of byte j // 8, per row
    assert t["row_offsets"].tolist() == [0, 2] and t["shape"].tolist() == [2, 9]
    assert sum(x.numel() * x.element_size() for x in t.values()) == ex.compressed_bytes(W, "sparse-bitmask")
    assert torch.equal(decompress_weight(t), W)

    W24 = torch.tensor([[0.0, 1.0, -3.0, 0.0, 0.0, 0.0, 0.0, 2.0]])  # the second group holds one non-zero
    t = ex.compress_weight(W24, "sparse-24-bitmask")
    assert t["compressed"].shape == (1, 4) and t["shape"].shape == (2, 1) and "row_offsets" not in t
    assert sum(x.numel() * x.element_size() for x in t.values()) == ex.compressed_bytes(W24, "sparse-24-bitmask")
    assert torch.equal(decompress_weight(t), W24)
    assert ex.compressed_bytes(torch.ones(2, 8), "sparse-24-bitmask") is None  # not 2:4: cannot take the format
    with pytest.raises(ValueError, match="allowed: dense, bitmask, nonzeros"):
        ex.weight_format_bytes(None, "csr")


def test_cli_export_and_prune_export(tiny_llama_dir, tmp_path, capsys):
    CompressionPlan([0.5, 0.6, 0.7], [8, 4, 4]).save(tmp_path / "plan.json")
    base = ["--model", str(tiny_llama_dir), "--task", "text", "--n-calibration", "8", "--device", "cpu"]
    assert main(["export", *base, "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "a")]) == 0
    assert "exported sparse-bitmask (unstructured" in capsys.readouterr().out
    assert main(["prune", *base, "--pattern", "2:4", "--export", "--out", str(tmp_path / "b")]) == 0
    assert "exported sparse-24-bitmask (2:4" in capsys.readouterr().out
    for folder, sparsity in (("a", [0.5, 0.6, 0.7]), ("b", [0.5] * 3)):
        back = load_model(tmp_path / folder, device="cpu")
        for i in range(back.num_layers):
            assert all(abs((lin.weight == 0).float().mean() - sparsity[i]) < 0.02 for lin in back.linears(i).values())
        assert CompressionPlan.load(tmp_path / folder / ex.PLAN_FILE).sparsity == sparsity


@pytest.mark.parametrize("case", ["not empty", "another model"])
def test_cli_export_rejects_bad_input_with_one_line_and_writes_nothing(tiny_llama_dir, tmp_path, capsys, case):
    out = tmp_path / "out"
    layers, message = (3, f"--out {out} exists and is not empty") if case == "not empty" else \
        (5, "plan has 5 layers but the model has 3 decoder layers")
    CompressionPlan([0.5] * layers).save(tmp_path / "plan.json")
    if case == "not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["--model", str(tiny_llama_dir), "--task", "text", "--plan", str(tmp_path / "plan.json"), "--out", str(out)]
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, no temporary left behind
    assert case != "not empty" or [p.name for p in out.iterdir()] == ["keep.txt"]
