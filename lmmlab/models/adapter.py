"""The one model adapter: `load_model` and `Loaded`.

Everything that depends on the architecture — where the language model's decoder layers are, which linears in them are
prunable, how many KV heads they have — lives here. Nothing else in lmmlab looks inside a model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lmmlab.files import atomic_folder


VISION = -1  # the "layer" index in (layer, name) keys for linears of the vision tower and the projector
PRUNABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # the attention block's linears; the others are the MLP's


def save_atomic(model, processor, out: Path, extra: dict[str, dict] | None = None) -> None:
    """save_pretrained into a temporary sibling folder, then rename, so a killed run leaves no half-written model."""
    with atomic_folder(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")


def saved_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """{parameter name in the model: its name in the model's save_pretrained checkpoint}. transformers renames some
    modules on save (a LLaVA's `model.language_model.layers.0...` is saved as `language_model.model.layers.0...`);
    this asks transformers itself for the reverse of the renaming it applies on load."""
    from transformers.core_model_loading import revert_weight_conversion

    tokens = {name: torch.empty(0) for name in names}
    by_token = {id(token): name for name, token in tokens.items()}
    return {by_token[id(token)]: saved for saved, token in revert_weight_conversion(model, tokens).items()}


# Embedded models: a short name -> a function that returns their cached folder (building it once). The toy and
# SmolLM2 register themselves in lmmlab.models.__init__.
EMBEDDED: dict[str, Callable[[], Path]] = {}
DEFAULT_MODEL = "lmmlab-default"


@dataclass
class Loaded:
    """A loaded model with the places lmmlab works on: the language model's decoder layers and their linears."""

    name: str
    model: nn.Module
    processor: object  # LlavaProcessor for multimodal models, a tokenizer for text-only ones
    layers: nn.ModuleList  # the language model's decoder layers

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def text_config(self):
        config = self.model.config
        return getattr(config, "text_config", None) or config

    @property
    def is_multimodal(self) -> bool:
        return hasattr(self.model.config, "vision_config")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        c = self.text_config
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.text_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def image_token_id(self) -> int | None:
        """The token a multimodal prompt's image features replace (None for a text-only model)."""
        config = self.model.config
        if not self.is_multimodal:
            return None
        token = getattr(config, "image_token_id", None)
        return getattr(config, "image_token_index", None) if token is None else token

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def linears(self, layer: int) -> dict[str, nn.Linear]:
        """The prunable linear sublayers of one decoder layer, by short name (q_proj, ..., down_proj)."""
        found = {}
        for name, module in self.layers[layer].named_modules():
            short = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and short in PRUNABLE:
                found[short] = module
        return found

    def vision_linears(self) -> dict[str, nn.Linear]:
        """Linears of the vision tower and the multimodal projector, by module path (none for text-only models)."""
        inner = getattr(self.model, "model", self.model)
        found = {}
        for part in ("vision_tower", "multi_modal_projector"):
            module = getattr(inner, part, None)
            for name, sub in module.named_modules() if module is not None else ():
                if isinstance(sub, nn.Linear):
                    found[f"{part}.{name}"] = sub
        return found

    def prunable(self, vision: bool = False) -> dict[tuple[int, str], nn.Linear]:
        """Every prunable linear by (decoder layer, name); with vision=True also (VISION, path) for the vision side."""
        found = {(i, name): lin for i in range(self.num_layers) for name, lin in self.linears(i).items()}
        if vision:
            found.update({(VISION, name): lin for name, lin in self.vision_linears().items()})
        return found


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers, for Llava (model.model.language_model) and Llama-family causal LMs."""
    inner = getattr(model, "model", model)
    language_model = getattr(inner, "language_model", inner)
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layers where lmmlab looks (model.[language_model.]layers)")
    return layers


def resolve(name_or_path: str | Path) -> str:
    """An embedded model's short name -> its cached folder (built once); a folder must hold a config.json."""
    if str(name_or_path) in EMBEDDED:
        return str(EMBEDDED[str(name_or_path)]())
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no model (no config.json); pass a folder written by save_pretrained")
        return str(path)
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith(("/", ".")):
        raise ValueError(
            f"unknown model {str(name_or_path)!r}: pass {' or '.join(map(repr, EMBEDDED))}, a local folder with a saved model, "
            "or a hub id such as 'llava-hf/llava-1.5-7b-hf'"
        )
    return str(name_or_path)


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, device: str | None = None
) -> Loaded:
    """Load the default model, a saved folder, or a hub id into a `Loaded` (model in eval mode)."""
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer
    from transformers import LlavaForConditionalGeneration

    if isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"unknown dtype {dtype!r}; allowed: float32, float16, bfloat16")
        dtype = getattr(torch, dtype)
    source = resolve(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    from lmmlab.kv.attention import use_packed_attention
    from lmmlab.models.checkpoint import exported_model, quiet_stub, read_config

    try:
        config, sparse = read_config(source)  # a bitmask export's real config and sparsity_config (prune.export)
    except OSError as err:
        raise ValueError(f"cannot load model {str(name_or_path)!r}: {err}") from None
    model = None if sparse is None else exported_model(source, config, sparse, dtype)  # a bitmask export, decompressed
    # other checkpoints load straight onto an accelerator (no full copy in host memory on the way); on the CPU the
    # weights stay mapped
    placement = {"device_map": device} if device.startswith("cuda") else {}
    with quiet_stub(sparse):
        if hasattr(config, "vision_config"):
            if model is None:
                model = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype, **placement)
            processor = AutoProcessor.from_pretrained(source)
        else:
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
            processor = AutoTokenizer.from_pretrained(source)
    model.to(device).eval()
    use_packed_attention(model)  # SDPA as before, plus decode attention over a packed KV store (lmmlab.attention)
    return Loaded(name=str(name_or_path), model=model, processor=processor, layers=decoder_layers(model))
