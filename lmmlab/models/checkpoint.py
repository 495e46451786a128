"""Loading a checkpoint lmmlab exported in a sparse format: its compressed linears decompressed back to dense weights
before transformers builds the model (`exported_model`; the layouts are `prune.export`'s)."""
from __future__ import annotations

from pathlib import Path

import torch

BITMASK, BITMASK_24 = "sparse-bitmask", "sparse-24-bitmask"


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


def sparsity_config(config) -> dict | None:
    """The sparse compressed-tensors config of a transformers config (None for an ordinary checkpoint)."""
    quant = getattr(config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    sparse = (quant or {}).get("sparsity_config") or None
    return sparse if sparse and sparse.get("format") in PARAMS else None


def exported_model(folder: str | Path, config, dtype: torch.dtype | None = None):
    """The dense model of an export (a config whose quantization_config holds a sparse compressed-tensors
    sparsity_config), its compressed linears decompressed; None for any other checkpoint. transformers >= 5 no longer
    decompresses these formats itself, so the weights are decompressed here and handed to from_pretrained."""
    import copy

    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    sparse = sparsity_config(config)
    if sparse is None:
        return None
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    for prefix in [n[:-len(".compressed")] for n in state if n.endswith(".compressed")]:
        parts = {part: state.pop(f"{prefix}.{part}") for part in PARAMS[sparse["format"]]}
        state[f"{prefix}.weight"] = decompress_weight(parts)
    config = copy.deepcopy(config)
    del config.quantization_config  # dense once loaded; transformers would otherwise look for a quantizer
    multimodal = hasattr(config, "vision_config")
    cls = LlavaForConditionalGeneration if multimodal else MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
