"""Reading the checkpoints lmmlab exports (the layouts are `prune.export`'s).

A dense export is an ordinary save_pretrained folder and loads like any other. A bitmask export is readable by lmmlab
only, and laid out so that stock loaders refuse it instead of loading randomly initialised linears: its config.json
is a stub whose model_type (`BITMASK_MODEL_TYPE`) no transformers version knows, holding the real model config and
the sparsity_config under `BITMASK_KEY`, and its safetensors files are named `BITMASK_WEIGHTS`*.safetensors, not
model*.safetensors. `read_config` finds the real config, `exported_model` decompresses the compressed linears back to
dense weights before transformers builds the model. A folder from an earlier lmmlab, with the sparsity_config in an
ordinary config.json's quantization_config, is read too."""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import torch

BITMASK, BITMASK_24 = "sparse-bitmask", "sparse-24-bitmask"
BITMASK_MODEL_TYPE = "lmmlab_bitmask"  # the stub config.json's model_type: AutoConfig refuses it
BITMASK_ARCHITECTURE = "LmmlabBitmaskExport"
BITMASK_KEY = "lmmlab_bitmask"  # the stub's entry with the real config and the sparsity_config
BITMASK_WEIGHTS = "lmmlab-bitmask"  # the stem of its safetensors files, in place of save_pretrained's "model"
BITMASK_VERSION = 1

# The tensors each sparse format stores per compressed linear, under P.<name>.
PARAMS = {BITMASK: ("compressed", "bitmask", "row_offsets", "shape"), BITMASK_24: ("compressed", "bitmask", "shape")}


def decompress_weight(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense W from its tensors in either format (by local name): zeros where the bitmask is 0."""
    from compressed_tensors.utils import unpack_bitmasks

    shape = [int(x) for x in tensors["shape"].flatten()]
    keep = unpack_bitmasks(tensors["bitmask"], shape)
    W = torch.zeros(shape, dtype=tensors["compressed"].dtype)
    W[keep] = tensors["compressed"].flatten()
    return W


def bitmask_stub(model_config: dict, sparsity_config: dict) -> dict:
    """The config.json of a bitmask export: a model_type stock loaders refuse, the real config inside."""
    return {"model_type": BITMASK_MODEL_TYPE, "architectures": [BITMASK_ARCHITECTURE],
            BITMASK_KEY: {"version": BITMASK_VERSION, "sparsity_config": sparsity_config, "config": model_config,
                          "note": "written by lmmlab: only lmmlab.models.load_model(folder) reads it; the weights "
                                  "of its pruned linears are stored compressed"}}


def sparsity_config(config) -> dict | None:
    """The sparse compressed-tensors config in a transformers config's quantization_config (an export of an earlier
    lmmlab); None for an ordinary checkpoint."""
    quant = getattr(config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    sparse = (quant or {}).get("sparsity_config") or None
    return sparse if sparse and sparse.get("format") in PARAMS else None


def bitmask_entry(folder: str | Path) -> dict | None:
    """The `BITMASK_KEY` entry of a local folder's config.json (None unless it is a bitmask export)."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        return None
    raw = json.loads(file.read_text())
    if raw.get("model_type") != BITMASK_MODEL_TYPE:
        return None
    entry = raw.get(BITMASK_KEY) or {}
    if entry.get("version") != BITMASK_VERSION or (entry.get("sparsity_config") or {}).get("format") not in PARAMS:
        raise ValueError(f"{folder} is a bitmask export of another lmmlab version (layout "
                         f"{entry.get('version')!r}; this lmmlab reads {BITMASK_VERSION})")
    return entry


def read_config(source: str | Path):
    """(the transformers config, the sparsity_config or None) of a folder or hub id: a bitmask export's real config,
    else AutoConfig's."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    entry = bitmask_entry(source)
    if entry is not None:
        raw = entry["config"]
        return CONFIG_MAPPING[raw["model_type"]].from_dict(raw), entry["sparsity_config"]
    config = AutoConfig.from_pretrained(source)
    return config, sparsity_config(config)


@contextmanager
def quiet_stub(sparse: dict | None):
    """Silence transformers' warning that a bitmask export's stub config.json is of another model type, while its
    processor loads (the processor files themselves are ordinary)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if sparse is not None:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def exported_model(folder: str | Path, config, sparse: dict, dtype: torch.dtype | None = None):
    """The dense model of a sparse export (`read_config` gave its config and sparsity_config), its compressed linears
    decompressed; transformers >= 5 no longer decompresses these formats itself, so the weights are decompressed here
    and handed to from_pretrained."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    for prefix in [n[:-len(".compressed")] for n in state if n.endswith(".compressed")]:
        parts = {part: state.pop(f"{prefix}.{part}") for part in PARAMS[sparse["format"]]}
        state[f"{prefix}.weight"] = decompress_weight(parts)
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dense once loaded; transformers would otherwise look for a quantizer
    multimodal = hasattr(config, "vision_config")
    cls = LlavaForConditionalGeneration if multimodal else MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
