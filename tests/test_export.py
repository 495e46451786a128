"""The export, dense and bitmask: round trip to the same logits, stock transformers loading the dense one (and
refusing the bitmask one), the bytes each stores, the model card, and the CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from lmmlab.models.checkpoint import BITMASK_KEY, BITMASK_MODEL_TYPE, decompress_weight
from lmmlab.prune import export as ex
from lmmlab.prune.card import FOLDER, model_card
from lmmlab.prune.scores import sparsity_of
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


GROUP = 4  # KV group size: divides the tiny models' head dimensions (16 and 12)


def pruned(request, model, sparsity, pattern, vision):
    loaded, pruner = request.getfixturevalue(model)
    plan = CompressionPlan(sparsity, [4] * len(sparsity), method="wanda", pattern=pattern, vision_sparsity=vision,
                           kv_group_size=GROUP)
    pruner.apply(plan)
    return loaded, pruner, plan


@pytest.mark.parametrize("fmt", ex.EXPORT_FORMATS)
@pytest.mark.parametrize("model, sparsity, pattern, vision", CASES)
def test_export_round_trip_gives_the_same_logits_and_stores_the_bytes_computed(request, tmp_path, model, sparsity,
                                                                                pattern, vision, fmt):
    loaded, pruner, plan = pruned(request, model, sparsity, pattern, vision)
    out = tmp_path / "export"
    written = ex.export(loaded, plan, out, fmt=fmt)

    back = load_model(out, device="cpu")
    with torch.no_grad():
        assert torch.equal(back.model(**inputs(loaded)).logits, loaded.model(**inputs(loaded)).logits)
    mine, theirs = loaded.model.state_dict(), back.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert CompressionPlan.load(out / ex.PLAN_FILE) == plan  # per-layer KV widths included
    assert (out / ex.CARD_FILE).is_file() and written["format"] == fmt
    assert written["achieved_sparsity"] == sparsity_of(loaded) and written["disk_bytes"] == ex.disk_bytes(out)

    sizes = {f: ex.weight_format_bytes(loaded, f, pattern=pattern) for f in ex.FORMATS}
    assert sizes["dense"] > sizes["bitmask"] > sizes["nonzeros"]
    assert sizes["dense"] == sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert ex.tensor_bytes(out) == sizes[fmt]  # each export's tensors hold its format's bytes
    assert ex.tensor_bytes(out) < ex.disk_bytes(out) < ex.tensor_bytes(out) + 100_000  # plus the JSON headers
    if fmt == "bitmask":
        check_bitmask_folder(loaded, out, sparsity, pattern, vision)
    else:
        config = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config and "sparsity_config" not in json.dumps(config)
        assert config["dtype"] == "float32" and config["architectures"] == [type(loaded.model).__name__]
        assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    pruner.restore()


def check_bitmask_folder(loaded, out, sparsity, pattern, vision):
    """Which linears a bitmask export compresses, its stub config.json and the bytes of its compressed tensors."""
    stub = json.loads((out / "config.json").read_text())
    assert stub["model_type"] == BITMASK_MODEL_TYPE and "quantization_config" not in stub
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lmmlab-bitmask.safetensors"]
    fmt = "sparse-24-bitmask" if pattern == "2:4" else "sparse-bitmask"
    config = stub[BITMASK_KEY]["sparsity_config"]
    assert stub[BITMASK_KEY]["config"]["architectures"] == [type(loaded.model).__name__]
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
    assert ex.tensor_bytes(out, COMPRESSED) == sum(ex.compressed_bytes(W, fmt) for W in compressed)


# A script for a fresh interpreter that never imports lmmlab: stock transformers loads each dense export and writes
# its logits, and must raise on each bitmask export, however it is asked.
STOCK = """
import json, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

torch.set_num_threads(2)
jobs, report = json.loads(sys.argv[1]), {"refused": {}}
for job in jobs["dense"]:
    cls, proc = (LlavaForConditionalGeneration, AutoProcessor) if job["llava"] else (AutoModelForCausalLM, AutoTokenizer)
    model = cls.from_pretrained(job["folder"]).eval()
    proc.from_pretrained(job["folder"])
    with torch.no_grad():
        torch.save(model(**torch.load(job["inputs"])).logits, job["logits"])
for job in jobs["bitmask"]:
    cls = LlavaForConditionalGeneration if job["llava"] else AutoModelForCausalLM
    tries = {"auto": lambda: AutoModelForCausalLM.from_pretrained(job["folder"]),
             "class": lambda: cls.from_pretrained(job["folder"]),
             "class with config": lambda: cls.from_pretrained(job["folder"], config=AutoConfig.from_pretrained(job["source"]))}
    for name, load in tries.items():
        try:
            load()
            report["refused"][job["folder"] + " " + name] = None
        except (OSError, ValueError) as err:
            report["refused"][job["folder"] + " " + name] = type(err).__name__ + ": " + str(err).splitlines()[0]
report["lmmlab_imported"] = any(name.split(".")[0] == "lmmlab" for name in sys.modules)
print(json.dumps(report))
"""


def run_stock(jobs: dict, cwd) -> dict:
    """Run `STOCK` on `jobs` in a new interpreter started away from the repository, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", STOCK, json.dumps(jobs)], capture_output=True, text=True,
                            cwd=cwd, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["lmmlab_imported"] is False
    return report


@pytest.mark.slow  # starts fresh Python processes: seconds of start-up each, kept out of `make test-fast`
def test_dense_export_loads_in_stock_transformers_and_bitmask_is_refused(request, tmp_path):
    """The dense export at 50 % unstructured and 2:4, of a Llama and a LLaVA, loads with stock transformers in an
    interpreter that never imports lmmlab and gives the pruned model's logits exactly; the bitmask export makes every
    stock loader raise instead of loading random weights."""
    jobs, expected = {"dense": [], "bitmask": []}, {}
    for k, (model, sparsity, pattern, vision) in enumerate(CASES):
        loaded, pruner, plan = pruned(request, model, sparsity, pattern, vision)
        batch = {name: t for name, t in inputs(loaded).items()}
        torch.save(batch, tmp_path / f"inputs{k}.pt")
        with torch.no_grad():
            expected[k] = loaded.model(**batch).logits
        ex.export(loaded, plan, tmp_path / f"dense{k}")
        jobs["dense"].append({"folder": str(tmp_path / f"dense{k}"), "llava": model == "llava",
                              "inputs": str(tmp_path / f"inputs{k}.pt"), "logits": str(tmp_path / f"logits{k}.pt")})
        if pattern == "unstructured":
            ex.export(loaded, plan, tmp_path / f"bitmask{k}", fmt="bitmask")
            jobs["bitmask"].append({"folder": str(tmp_path / f"bitmask{k}"), "llava": model == "llava",
                                    "source": str(request.getfixturevalue(f"tiny_{model}_dir"))})
        pruner.restore()

    report = run_stock(jobs, tmp_path)
    for k in expected:
        assert torch.equal(torch.load(tmp_path / f"logits{k}.pt"), expected[k]), CASES[k]
    assert len(report["refused"]) == 3 * len(jobs["bitmask"])
    for attempt, error in report["refused"].items():
        assert error is not None, f"stock transformers loaded a bitmask export ({attempt})"
    assert any("lmmlab_bitmask" in error for error in report["refused"].values())  # AutoConfig names the type


def test_load_model_reads_an_export_of_an_earlier_lmmlab(llama, tmp_path):
    """A bitmask export as an earlier lmmlab wrote it (an ordinary config.json carrying compressed-tensors'
    sparsity_config, model.safetensors) still loads, to the same weights."""
    loaded, pruner = llama
    plan = CompressionPlan([0.5] * 3)
    pruner.apply(plan)
    out = tmp_path / "export"
    ex.export(loaded, plan, out, fmt="bitmask")
    stub = json.loads((out / "config.json").read_text())[BITMASK_KEY]
    config = {**stub["config"], "quantization_config": {"quant_method": "compressed-tensors",
                                                        "sparsity_config": stub["sparsity_config"]}}
    (out / "config.json").write_text(json.dumps(config))
    (out / "lmmlab-bitmask.safetensors").rename(out / "model.safetensors")
    back = load_model(out, device="cpu")
    mine, theirs = loaded.model.state_dict(), back.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    pruner.restore()


def test_the_model_card_says_what_the_export_is_and_its_code_runs(llama, tmp_path):
    """The card names the source, method, allocation, achieved sparsity, KV plan and metrics, and its lmmlab snippet
    (the per-layer KV cache) runs on the folder."""
    loaded, pruner = llama
    plan = CompressionPlan([0.4, 0.5, 0.6], [4, 8, 16], value_bits=[2, 4, 16], method="wanda", kv_group_size=GROUP)
    pruner.apply(plan)
    metrics = {"perplexity": 12.5, "n": 8, "per_item": [1.0, 2.0], "primary_metric": "perplexity"}
    for fmt in ex.EXPORT_FORMATS:
        ex.export(loaded, plan, tmp_path / fmt, fmt=fmt, allocation="owl", metrics=metrics)
        card = (tmp_path / fmt / ex.CARD_FILE).read_text()
        assert card.startswith("---\n") and f"`{loaded.name}`" in card and "`wanda`" in card and "| allocation | owl |" in card
        assert f"| achieved sparsity | {sparsity_of(loaded):.4f}" in card
        assert "keys 9.33333 bits, values 7.33333 bits" in card and "| 2 | 0.6000 | 16 | 16 |" in card
        assert "| perplexity | 12.5 |" in card and "per_item" not in card
        assert ("AutoModelForCausalLM.from_pretrained" in card) == (fmt == "dense")
        assert ("Readable by lmmlab only" in card) == (fmt == "bitmask")
        snippet = card.split("```python\n")[-1].split("```")[0].replace(FOLDER, str(tmp_path / fmt))
        scope = {}
        exec(snippet, scope)
        assert scope["out"].shape[1] > scope["inputs"]["input_ids"].shape[1]
    assert "| allocation | per layer (the plan's ratios) |" in model_card(
        loaded, plan, {"format": "dense", "achieved_sparsity": 0.5, "disk_bytes": 1})
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


def test_cli_export_and_prune_write_either_format(tiny_llama_dir, tmp_path, capsys):
    CompressionPlan([0.5, 0.6, 0.7], [8, 4, 4], kv_group_size=GROUP).save(tmp_path / "plan.json")
    (tmp_path / "metrics.json").write_text(json.dumps({"perplexity": 31.25, "task": "text"}))
    base = ["--model", str(tiny_llama_dir), "--task", "text", "--n-calibration", "8", "--device", "cpu"]
    assert main(["export", *base, "--plan", str(tmp_path / "plan.json"), "--metrics", str(tmp_path / "metrics.json"),
                 "--out", str(tmp_path / "a")]) == 0
    assert f"exported dense to {tmp_path / 'a'}" in capsys.readouterr().out
    assert main(["prune", *base, "--pattern", "2:4", "--format", "bitmask", "--out", str(tmp_path / "b")]) == 0
    assert "exported bitmask (sparse-24-bitmask, " in capsys.readouterr().out
    assert (tmp_path / "a" / "model.safetensors").is_file() and (tmp_path / "b" / "lmmlab-bitmask.safetensors").is_file()
    card = (tmp_path / "a" / ex.CARD_FILE).read_text()
    assert "| perplexity | 31.25 |" in card and "| allocation | per layer (the plan's ratios) |" in card
    assert "| allocation | uniform |" in (tmp_path / "b" / ex.CARD_FILE).read_text()
    for folder, sparsity in (("a", [0.5, 0.6, 0.7]), ("b", [0.5] * 3)):
        back = load_model(tmp_path / folder, device="cpu")
        for i in range(back.num_layers):
            assert all(abs((lin.weight == 0).float().mean() - sparsity[i]) < 0.02 for lin in back.linears(i).values())
        assert CompressionPlan.load(tmp_path / folder / ex.PLAN_FILE).sparsity == sparsity


BAD = {"not empty": "--out {out} exists and is not empty",
       "another model": "plan has 5 layers but the model has 3 decoder layers",
       "other linears": "plan gives ratios to w1 in layer 0, which the model does not have",
       "vision": "plan prunes a vision tower (vision_sparsity 0.5) but the model is text-only",
       "kv group": "kv group size 24 must divide the head dimension 16",
       "no metrics": "no metrics file at"}


@pytest.mark.parametrize("command", ["export", "prune"])
@pytest.mark.parametrize("case", list(BAD))
def test_cli_export_rejects_bad_input_with_one_line_and_writes_nothing(tiny_llama_dir, tmp_path, capsys, case,
                                                                       command):
    out = tmp_path / "out"
    plan = {"another model": CompressionPlan([0.5] * 5),
            "other linears": CompressionPlan.per_module([{"w1": 0.5}] + [{"q_proj": 0.5}] * 2, [{"w1": 1}, *[{"q_proj": 1}] * 2]),
            "vision": CompressionPlan([0.5] * 3, vision_sparsity=0.5),
            "kv group": CompressionPlan([0.5] * 3, [4] * 3, kv_group_size=24, kv_residual=48)}.get(case, CompressionPlan([0.5] * 3))
    plan.save(tmp_path / "plan.json")
    if case == "not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["--model", str(tiny_llama_dir), "--task", "text", "--plan", str(tmp_path / "plan.json"), "--out", str(out)]
    args += ["--metrics", str(tmp_path / "missing.json")] if case == "no metrics" else []
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and BAD[case].format(out=out) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, no temporary left behind
    assert case != "not empty" or [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_refuses_an_unknown_format(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", str(tiny_llama_dir), "--plan", "p.json", "--format", "sparse", "--out",
              str(tmp_path / "out")])
    assert exit_.value.code == 2 and "invalid choice: 'sparse'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown export format 'sparse'; allowed: dense, bitmask"):
        ex.export(None, CompressionPlan([0.5]), tmp_path / "out", fmt="sparse")


def test_smollm2_dense_export_at_50_and_2_4_loads_in_stock_transformers(smollm2, tmp_path):
    """The real SmolLM2-135M, pruned at 50 % unstructured and 2:4, exported dense: stock transformers (no lmmlab
    imported) loads each and gives the pruned model's logits on one short forward."""
    pruner = Pruner.for_task(smollm2, get_task("text"), n=2)
    batch = {"input_ids": torch.arange(100, 116).reshape(1, 16)}
    torch.save(batch, tmp_path / "inputs.pt")
    jobs, expected = {"dense": [], "bitmask": []}, {}
    try:
        for k, pattern in enumerate(("unstructured", "2:4")):
            plan = CompressionPlan.uniform(smollm2.num_layers, 0.5, pattern=pattern)
            pruner.apply(plan)
            with torch.no_grad():
                expected[k] = smollm2.model(**batch).logits
            ex.export(smollm2, plan, tmp_path / f"dense{k}")
            assert ex.tensor_bytes(tmp_path / f"dense{k}") == ex.weight_format_bytes(smollm2, "dense")
            jobs["dense"].append({"folder": str(tmp_path / f"dense{k}"), "llava": False,
                                  "inputs": str(tmp_path / "inputs.pt"), "logits": str(tmp_path / f"logits{k}.pt")})
    finally:
        pruner.restore()
    run_stock(jobs, tmp_path)
    for k in expected:
        assert torch.equal(torch.load(tmp_path / f"logits{k}.pt"), expected[k])
