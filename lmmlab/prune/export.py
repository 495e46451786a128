"""Export: a pruned model written as a checkpoint folder, and what its weights cost in each storage format.

`export(loaded, plan, out, fmt=...)` writes a new folder, atomically, in one of two formats (`EXPORT_FORMATS`):

  dense (the default)  for stock tools: an ordinary save_pretrained checkpoint with the pruned weights as zeros in
                       place, in the model's dtype, no `quantization_config` and no `sparsity_config`;
                       `AutoModelForCausalLM` / `LlavaForConditionalGeneration.from_pretrained(folder)` load it with
                       stock transformers (and so does anything that reads a dense checkpoint). As many bytes as the
                       dense model.
  bitmask              for bytes on disk, readable by lmmlab only: every compressed linear as its non-zeros and a
                       1-bit-per-weight mask (compressed-tensors' sparse-bitmask and sparse-24-bitmask tensor
                       layouts, below). No released loader decompresses these any more (compressed-tensors >= 0.15
                       ships no sparse compressors; transformers 5, given a config.json with a `sparsity_config`,
                       loads without an error and leaves the compressed linears randomly initialised). So the folder
                       is laid out for stock loaders to refuse: config.json is a stub of model_type "lmmlab_bitmask"
                       (holding the real config and the sparsity_config; AutoConfig raises on it) and the weights are
                       lmmlab-bitmask*.safetensors, not model*.safetensors (a model class's from_pretrained raises:
                       no weights file). `lmmlab.models.checkpoint` reads it.

Both hold the processor (or tokenizer), `compression_plan.json` (the `CompressionPlan`: per-layer ratios and K/V
widths, which `lmmlab.kv.cache.kv_cache_for(plan, loaded)` turns into the per-layer KV cache) and a model card,
README.md (`prune.card`). `lmmlab.models.load_model(folder)` reads both back to the dense pruned weights, so the
reloaded model gives the in-memory pruned model's logits exactly.

In a bitmask export, a compressed linear at checkpoint path P, with weight W [R, C] of e bytes per element and Z non-zeros, is stored as

  sparse-bitmask (unstructured, and N:M patterns other than 2:4; sparsity_structure "unstructured" or "N:M")
    P.compressed   [Z]         W's non-zeros, row by row, W's dtype               Z·e bytes
    P.bitmask      [R, ⌈C/8⌉]  uint8; bit (j mod 8) of byte (j div 8) of row i     R·⌈C/8⌉
                               is W_ij ≠ 0
    P.row_offsets  [R]         int64, where row i starts in `compressed`         8·R
    P.shape        [2]         int64, (R, C)                                     16
  sparse-24-bitmask (the 2:4 pattern; sparsity_structure "2:4")
    P.compressed   [R, C/2]    the 2 weights kept in every group of 4            R·C/2·e
    P.bitmask      [R, ⌈C/8⌉]  uint8, as above                                   R·⌈C/8⌉
    P.shape        [2, 1]      int64, (R, C)                                     16

Compressed are the prunable linears (the decoder's q/k/v/o/gate/up/down, the vision tower's and the projector's)
whose compressed bytes are below their dense R·C·e, and, for sparse-24-bitmask, that hold at most 2 non-zeros in
every group of 4 along a row. So the layers a plan prunes are compressed, and the ones it leaves dense (a layer at
sparsity 0, the vision side unless `vision_sparsity` > 0) are stored dense and listed in the config's `ignore`, as are
every other linear (lm_head). The config's `targets` is ["Linear"].

Weight bytes (`weight_format_bytes`), every parameter and persistent buffer counted once (tied weights once):
  dense     Σ numel·e over everything: exactly the bytes of the tensors in a dense export's safetensors
  bitmask   the compressed linears at their bytes above, everything else dense: exactly the bytes of the tensors in
            a bitmask export's safetensors
  nonzeros  the prunable linears' non-zeros only, Z·e with no index (a lower bound no real format reaches; the
            `ablate.weight_bytes` figure), everything else dense
On disk (`disk_bytes`): the sizes of the folder's *.safetensors files, i.e. the tensor bytes plus each file's header.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lmmlab.files import atomic_folder
from lmmlab.kv.budget import check_settings
from lmmlab.models import Loaded, saved_names
from lmmlab.models.checkpoint import BITMASK, BITMASK_24, BITMASK_WEIGHTS, bitmask_stub
from lmmlab.models.sparse_linear import refuse_compressed
from lmmlab.plan import CompressionPlan

FORMATS = ("dense", "bitmask", "nonzeros")  # weight byte counts (`weight_format_bytes`)
EXPORT_FORMATS = ("dense", "bitmask")  # what `export` writes; an export's tensors hold its format's bytes above
DEFAULT_EXPORT_FORMAT = "dense"
PLAN_FILE = "compression_plan.json"
CARD_FILE = "README.md"


def sparse_format(pattern: str) -> str:
    """The compressed-tensors format of a plan's pattern: sparse-24-bitmask for 2:4, sparse-bitmask otherwise."""
    return BITMASK_24 if pattern == "2:4" else BITMASK


# ---------------------------------------------------------------------------------------------------- one weight

def follows_24(W: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive weights of a row (what sparse-24-bitmask can hold)."""
    R, C = W.shape
    return C % 4 == 0 and bool(((W.reshape(R, C // 4, 4) != 0).sum(-1) <= 2).all())


def compressed_bytes(W: torch.Tensor, fmt: str) -> int | None:
    """Bytes of W [R, C] in `fmt` (the table in the module docstring); None when W cannot take the format."""
    R, C = W.shape
    e, mask = W.element_size(), R * math.ceil(C / 8)
    if fmt == BITMASK:
        return int((W != 0).sum()) * e + mask + 8 * R + 16
    if fmt == BITMASK_24:
        return R * (C // 2) * e + mask + 16 if follows_24(W) else None
    raise ValueError(f"unknown sparse format {fmt!r}; allowed: {BITMASK}, {BITMASK_24}")


def is_compressed(W: torch.Tensor, fmt: str) -> bool:
    """Whether the export stores W (a prunable linear's weight) compressed: W takes the format, in fewer bytes."""
    size = compressed_bytes(W, fmt)
    return size is not None and size < W.numel() * W.element_size()


def stored_bytes(W: torch.Tensor, fmt: str) -> int:
    """Bytes of a prunable linear's weight W in an export in `fmt`: compressed when `is_compressed`, else dense."""
    dense, size = W.numel() * W.element_size(), compressed_bytes(W, fmt)
    return dense if size is None else min(size, dense)


def compress_weight(W: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """W [R, C] -> its tensors in `fmt`, by local name (compressed, bitmask, shape, and row_offsets for bitmask)."""
    from compressed_tensors.utils import pack_bitmasks

    W = W.detach().cpu()
    R, C = W.shape
    shape = torch.tensor([R, C], dtype=torch.int64)
    if fmt == BITMASK_24:
        if not follows_24(W):
            raise ValueError("sparse-24-bitmask needs at most 2 non-zeros in every group of 4 weights of a row")
        groups = W.reshape(-1, 4)  # the 2 largest |w| of each group of 4: every non-zero, padded with zeros
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
        keep = keep.reshape(R, C)
        return {"compressed": W[keep].reshape(R, C // 2).contiguous(), "bitmask": pack_bitmasks(keep),
                "shape": shape.reshape(2, 1)}
    keep = W != 0
    counts = keep.sum(-1)
    return {"compressed": W[keep].contiguous(), "bitmask": pack_bitmasks(keep),
            "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64), "shape": shape}


# ---------------------------------------------------------------------------------------------------- bytes

def _tensors(loaded: Loaded) -> list[torch.Tensor]:
    """Every parameter and persistent buffer once (tied weights once): what save_pretrained stores."""
    seen, found = set(), []
    for tensor in loaded.model.state_dict().values():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in seen:
            seen.add(key)
            found.append(tensor)
    return found


def weight_format_bytes(loaded: Loaded, fmt: str, *, pattern: str = "unstructured") -> int:
    """Bytes of the model's weights with its prunable linears stored as `fmt` ("dense", "bitmask" or "nonzeros", the
    formulas in the module docstring); `pattern` picks the bitmask layout (sparse-24-bitmask for 2:4)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; allowed: {', '.join(FORMATS)}")
    prunable = {lin.weight.data_ptr() for lin in loaded.prunable(vision=True).values()}
    sparse = sparse_format(pattern)
    total = 0
    for W in _tensors(loaded):
        dense = W.numel() * W.element_size()
        if fmt == "dense" or W.data_ptr() not in prunable:
            total += dense
        elif fmt == "nonzeros":
            total += int((W != 0).sum()) * W.element_size()
        else:
            total += stored_bytes(W, sparse)
    return total


def disk_bytes(folder: str | Path) -> int:
    """Size on disk of a model folder's *.safetensors files (tensors plus headers)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def tensor_bytes(folder: str | Path, suffixes: tuple[str, ...] | None = None) -> int:
    """Bytes of the tensors in a folder's *.safetensors (only names ending in one of `suffixes` when given)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                if suffixes is None or name.endswith(suffixes):
                    t = handle.get_slice(name)
                    numel = math.prod(t.get_shape())
                    total += numel * _DTYPE_BYTES[t.get_dtype()]
    return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


# ---------------------------------------------------------------------------------------------------- export

def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty; pass a new folder")


def check_format(fmt: str) -> None:
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(EXPORT_FORMATS)}")


def check_plan(loaded: Loaded, plan: CompressionPlan) -> None:
    """Refuse a plan made for another model: another number of decoder layers, per-linear ratios for linears the
    model's layers lack, KV settings its head dimension cannot take, or a vision ratio for a text-only model."""
    plan.check_layers(loaded.num_layers)
    for i, ratios in enumerate(plan.module_sparsity):
        unknown = sorted(set(ratios) - set(loaded.linears(i)))
        if unknown:
            raise ValueError(f"plan gives ratios to {', '.join(unknown)} in layer {i}, which the model does not have "
                             f"(its linears: {', '.join(sorted(loaded.linears(i)))}); is the plan for another model?")
    for k, v in sorted(set(zip(plan.key_widths, plan.value_widths))):
        check_settings(k, plan.kv_group_size, plan.kv_residual, loaded.head_dim, value_bits=v)
    if plan.vision_sparsity and not loaded.is_multimodal:
        raise ValueError(f"plan prunes a vision tower (vision_sparsity {plan.vision_sparsity:g}) but the model is "
                         "text-only; is the plan for another model?")


def compress(pruner, plan: CompressionPlan, out: str | Path, *, fmt: str = DEFAULT_EXPORT_FORMAT,
             allocation: str | None = None, metrics: dict | None = None) -> dict:
    """Prune the pruner's model to `plan` and `export` it to `out` in `fmt`; return what `export` returns plus the
    kept and dense bytes of the decoder linears (`plan.weight_summary`) and the model's weight bytes in every format
    (`weights_<format>_bytes`, `weight_format_bytes`)."""
    out = Path(out)
    check_format(fmt)
    check_out(out)
    loaded = pruner.loaded
    check_plan(loaded, plan)
    if plan.vision_sparsity and not pruner.has_vision_stats:
        raise ValueError("vision sparsity (--vision-sparsity, or the plan's vision_sparsity) needs a task with images; "
                         "this pruner calibrated the language model only")
    pruner.apply(plan)
    written = export(loaded, plan, out, fmt=fmt, allocation=allocation, metrics=metrics)
    per_layer = [sum(lin.weight.numel() for lin in loaded.linears(i).values()) for i in range(loaded.num_layers)]
    return {**plan.weight_summary(per_layer, loaded.model.dtype.itemsize), **written,
            **{f"weights_{f}_bytes": weight_format_bytes(loaded, f, pattern=plan.pattern) for f in FORMATS}}


def export(loaded: Loaded, plan: CompressionPlan, out: str | Path, *, fmt: str = DEFAULT_EXPORT_FORMAT,
           allocation: str | None = None, metrics: dict | None = None) -> dict:
    """Write the model, which must hold `plan`'s pruned weights (`Pruner.apply(plan)`), to the new folder `out` in
    `fmt` ("dense" or "bitmask", the module docstring), atomically: into a temporary sibling folder, then renamed; with
    the processor, `compression_plan.json` and the model card (`allocation` and `metrics` go into the card). Refuses an
    `out` that exists and is not empty, a plan for another model (`check_plan`) and a quantized model. Returns what
    it wrote: format, achieved_sparsity, disk_bytes, and for bitmask the layout, structure, the number of linears
    stored dense and the sparsity_config."""
    from lmmlab.prune.card import model_card
    from lmmlab.prune.scores import sparsity_of

    out = Path(out)
    check_format(fmt)
    refuse_compressed(loaded, "export")
    check_out(out)
    check_plan(loaded, plan)
    if getattr(loaded.model.config, "quantization_config", None) is not None:
        raise ValueError("the model is quantized (its config has a quantization_config); export a dense model")
    with atomic_folder(out) as tmp:  # an existing `out` is empty (checked above)
        loaded.model.save_pretrained(tmp)
        written = _to_bitmask(loaded, plan, tmp) if fmt == "bitmask" else {"format": "dense"}
        loaded.processor.save_pretrained(tmp)
        (tmp / PLAN_FILE).write_text(plan.to_json() + "\n")
        written.update(achieved_sparsity=sparsity_of(loaded), disk_bytes=disk_bytes(tmp))
        (tmp / CARD_FILE).write_text(model_card(loaded, plan, written, allocation=allocation, metrics=metrics))
    return written


def _to_bitmask(loaded: Loaded, plan: CompressionPlan, folder: Path) -> dict:
    """Turn the save_pretrained checkpoint in `folder` into a bitmask export: the prunable linears that
    `is_compressed` compressed, every other linear dense and listed in `ignore`, the files renamed and config.json
    replaced by its stub (`models.checkpoint`)."""
    from compressed_tensors.config import SparsityCompressionConfig

    fmt = sparse_format(plan.pattern)
    linears = {name: m for name, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear)}
    saved = saved_names(loaded.model, [f"{name}.weight" for name in linears])
    prunable = {id(lin) for lin in loaded.prunable(vision=True).values()}
    compressed, ignore = set(), []
    for name, linear in linears.items():
        if id(linear) in prunable and is_compressed(linear.weight, fmt):
            compressed.add(saved[f"{name}.weight"])
        else:
            ignore.append(saved[f"{name}.weight"][:-len(".weight")])
    zeros = sum(int((t == 0).sum()) for t in _tensors(loaded) if t.is_floating_point())
    params = sum(t.numel() for t in _tensors(loaded) if t.is_floating_point())
    config = SparsityCompressionConfig.load_from_registry(
        fmt, targets=["Linear"], ignore=ignore, global_sparsity=zeros / params,
        sparsity_structure=plan.pattern).model_dump()
    _compress_files(folder, compressed, fmt)
    config_file = folder / "config.json"
    config_file.write_text(json.dumps(bitmask_stub(json.loads(config_file.read_text()), config), indent=2) + "\n")
    return {"format": "bitmask", "layout": fmt, "structure": plan.pattern, "dense_linears": len(ignore),
            "sparsity_config": config}


def _bitmask_name(name: str) -> str:
    """save_pretrained's file name (model.safetensors, model-00001-of-00002.safetensors, the index) -> the bitmask
    export's, which stock loaders do not look for."""
    return BITMASK_WEIGHTS + name[len("model"):]


def _compress_files(folder: Path, names: set[str], fmt: str) -> None:
    """Replace each tensor `P.weight` named in `names` by its P.<param> tensors in `fmt`, in every *.safetensors of
    `folder` (and its shard index), and rename the files (`_bitmask_name`)."""
    from safetensors.torch import load_file, save_file

    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for file in sorted(folder.glob("model*.safetensors")):
        tensors = load_file(file)
        for name in [n for n in tensors if n in names]:
            prefix = name[:-len(".weight")]
            parts = compress_weight(tensors.pop(name), fmt)
            tensors.update({f"{prefix}.{part}": value for part, value in parts.items()})
            if index is not None:
                del index["weight_map"][name]
                index["weight_map"].update({f"{prefix}.{part}": file.name for part in parts})
        save_file(tensors, folder / _bitmask_name(file.name), metadata={"format": "pt"})
        file.unlink()
    if index is not None:
        index["weight_map"] = {name: _bitmask_name(file) for name, file in index["weight_map"].items()}
        index.setdefault("metadata", {})["total_size"] = tensor_bytes(folder)
        (folder / _bitmask_name(index_file.name)).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        index_file.unlink()
