"""The model card (README.md) an export carries: where the model came from, how it was pruned, what it achieved and
scored, its KV plan, and how to load and run it (with stock transformers for the dense format, lmmlab for both)."""
from __future__ import annotations

import json
import re
from numbers import Number
from pathlib import Path

from lmmlab.models import Loaded
from lmmlab.plan import CompressionPlan

METHOD_PAPERS = {"magnitude": "weight magnitude |W|", "wanda": "Wanda, Sun et al. 2023",
                 "ria": "RIA, Zhang et al. 2024", "sparsegpt": "SparseGPT, Frantar & Alistarh 2023"}
FOLDER = "path/to/this/folder"  # what the card's code calls the export folder


def model_card(loaded: Loaded, plan: CompressionPlan, written: dict, *, allocation: str | None = None,
               metrics: dict | None = None) -> str:
    """The card of an export of `loaded` pruned to `plan`; `written` is what `export` wrote (format, disk_bytes,
    achieved_sparsity); `allocation` names the per-layer ratios' origin (derived from the plan when None); `metrics`
    are the scores it was measured with (scalars shown, lists left out)."""
    parts = [_front_matter(loaded, written["format"]), _summary(loaded, plan, written, allocation),
             _per_layer(plan), _metrics(metrics), _loading(loaded, written["format"]), _lmmlab_snippet(loaded)]
    return "\n".join(part for part in parts if part)


def read_metrics(path: str | Path) -> dict:
    """A JSON object of the scores to put in a card (as `lmmlab eval --json` writes them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"metrics file {path} is not valid JSON: {err}") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics file {path} must hold a JSON object of metric names and values")
    return metrics


def _hub_id(name: str) -> str | None:
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def _front_matter(loaded: Loaded, fmt: str) -> str:
    lines = ["---"] + (["library_name: transformers"] if fmt == "dense" else [])
    base = _hub_id(loaded.name)
    lines += [f"base_model: {base}"] if base else []
    lines += ["tags:", "- lmmlab", "- pruned", f"- {fmt}", "---", ""]
    return "\n".join(lines)


def allocation_of(plan: CompressionPlan, allocation: str | None) -> str:
    """The allocation's name, or what the plan's ratios show when it was not given."""
    if allocation:
        return allocation
    if plan.per_linear:
        return "per linear (the plan's module_sparsity)"
    return "uniform" if len(set(plan.sparsity)) == 1 else "per layer (the plan's ratios)"


def kv_summary(plan: CompressionPlan) -> str:
    """The KV plan in one line: the mean key and value widths, and the group layout when some layer is quantized."""
    if set(plan.key_widths) | set(plan.value_widths) == {16}:
        return "16-bit keys and values in every layer (not quantized)"
    return (f"keys {plan.mean_key_bits:g} bits, values {plan.mean_value_bits:g} bits on average over layers (KIVI "
            f"groups of {plan.kv_group_size}, the newest {plan.kv_residual} tokens kept at 16 bits)")


def _summary(loaded: Loaded, plan: CompressionPlan, written: dict, allocation: str | None) -> str:
    fmt = written["format"]
    name = Path(loaded.name).name if Path(loaded.name).is_absolute() else loaded.name
    title = f"# {name}, pruned by lmmlab: {plan.method}, {plan.pattern}, {plan.mean_sparsity:.0%} sparse"
    what = ("A plain transformers checkpoint: the pruned weights are zeros stored in place, in the model's dtype, so "
            "stock `from_pretrained` loads it (no `quantization_config`, no `sparsity_config`)."
            if fmt == "dense" else
            "**Readable by lmmlab only** (`lmmlab.models.load_model`): the pruned linears are stored as their non-zeros "
            "and a 1-bit-per-weight mask, for bytes on disk. Its config.json is a stub stock loaders refuse (model "
            "type `lmmlab_bitmask`), so they raise instead of loading random weights. Export with `--format dense` "
            "for a checkpoint that stock transformers (and any tool reading a dense checkpoint) loads.")
    config = loaded.model.config
    rows = [("source model", f"`{loaded.name}`"),
            ("architecture", f"{', '.join(config.architectures or [type(loaded.model).__name__])}, "
                             f"{loaded.num_layers} decoder layers, {str(loaded.model.dtype).removeprefix('torch.')}"),
            ("format", f"`{fmt}`"),
            ("method", f"`{plan.method}` ({METHOD_PAPERS.get(plan.method, plan.method)}), one-shot, no fine-tuning"),
            ("pattern", f"`{plan.pattern}`"), ("allocation", allocation_of(plan, allocation)),
            ("planned sparsity", f"{plan.mean_sparsity:.4f} (mean over decoder layers)"),
            ("achieved sparsity", f"{written['achieved_sparsity']:.4f} (zeros over the decoder's prunable linears)")]
    if loaded.is_multimodal:
        rows.append(("vision sparsity", f"{plan.vision_sparsity:g} (vision tower and projector)"))
    rows += [("KV plan", kv_summary(plan)), ("weights on disk", f"{written['disk_bytes'] / 2**20:.2f} MiB")]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"{title}\n\n{what}\n\n| | |\n| --- | --- |\n{table}\n"


def _per_layer(plan: CompressionPlan) -> str:
    rows = "\n".join(f"| {i} | {s:.4f} | {k} | {v} |"
                     for i, (s, k, v) in enumerate(zip(plan.sparsity, plan.key_widths, plan.value_widths)))
    return ("## Per layer\n\nFrom `compression_plan.json` (lmmlab's `CompressionPlan`, which also holds any "
            f"per-linear ratios).\n\n| layer | sparsity | key bits | value bits |\n| --- | --- | --- | --- |\n{rows}\n")


def _metrics(metrics: dict | None) -> str:
    shown = {k: v for k, v in (metrics or {}).items() if isinstance(v, (Number, str)) and not isinstance(v, bool)}
    if not shown:
        return ""
    rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown.items())
    return f"## Metrics\n\nWhat it was scored with.\n\n| metric | value |\n| --- | --- |\n{rows}\n"


def _loading(loaded: Loaded, fmt: str) -> str:
    if fmt != "dense":
        return ("## Loading\n\nOnly with lmmlab (below). Stock `from_pretrained` raises on this folder: the pruned "
                "linears' weights are stored compressed, and no released loader decompresses them.\n")
    cls, proc = (("LlavaForConditionalGeneration", "AutoProcessor") if loaded.is_multimodal
                 else ("AutoModelForCausalLM", "AutoTokenizer"))
    return (f"## Load with stock transformers\n\n```python\nfrom transformers import {cls}, {proc}\n\n"
            f"model = {cls}.from_pretrained(\"{FOLDER}\")\nprocessor = {proc}.from_pretrained(\"{FOLDER}\")\n```\n\n"
            "The zeros are ordinary weights here: memory and speed are the dense model's (a sparse kernel or format "
            "is needed to gain from them), and the KV cache is transformers' own, at 16 bits.\n")


def _lmmlab_snippet(loaded: Loaded) -> str:
    prompt = ('processor(text="Hello", return_tensors="pt")' if not loaded.is_multimodal else
              'processor(images=Image.open("picture.png"), text="USER: <image>\\nWhat is in the picture? ASSISTANT:", '
              'return_tensors="pt")')
    return ("## Run with lmmlab's per-layer KV cache\n\n"
            "`kv_cache_for` builds a transformers `Cache` whose layer i stores keys and values at the plan's widths "
            "for layer i:\n\n"
            "```python\n" + ("from PIL import Image\n" if loaded.is_multimodal else "") +
            "from lmmlab.kv.cache import kv_cache_for\nfrom lmmlab.models import load_model\n"
            "from lmmlab.plan import CompressionPlan\n\n"
            f"loaded = load_model(\"{FOLDER}\")\n"
            f"plan = CompressionPlan.load(\"{FOLDER}/compression_plan.json\")\n"
            f"processor = loaded.processor\ninputs = {prompt}.to(loaded.device)\n"
            "out = loaded.model.generate(**inputs, cache=kv_cache_for(plan, loaded), max_new_tokens=16)\n```\n")
