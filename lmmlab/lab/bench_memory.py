"""`lmmlab bench memory`: peak memory of calibration, search set-up and one search trial at a real model's widths.

A model too big for this machine is measured at a few of its decoder layers and extrapolated: a randomly initialised
Llama with the real widths (LLaVA-1.5's language model, Vicuna-1.5: 7B hidden 4096, intermediate 11008, 32 heads,
vocab 32064, 32 layers; 13B 5120 / 13824 / 40 heads / 40 layers) is saved as a checkpoint at two depths d₁ < d₂
(`layers` // 2 and `layers`), each is measured in a fresh process, and every figure m is extended linearly to the
full depth L: m(L) = m(d₂) + (L − d₂)·(m(d₂) − m(d₁)) / (d₂ − d₁). What does not grow with depth (embeddings, the
LM head, activations, the one linear being re-masked, the Python runtime) stays in the intercept.

Peaks per phase: on the CPU the process's resident set (VmHWM, reset before each phase by writing 5 to
/proc/self/clear_refs), which is both the device and the host; on CUDA `torch.cuda.max_memory_allocated` for the
device and VmHWM for the host. Phases, as `lmmlab search` runs them:
  calibration  `Pruner.for_task`: one forward over the calibration windows with hooks (‖X_j‖² per linear), and
               `DenseWeights` (a host copy, or on the CPU the checkpoint, checked once)
  setup        OWL's allocation from the dense weights (the warm start)
  trial        `Pruner.apply` of a non-uniform plan (restore + re-mask one linear at a time) and the validation
               windows through a quantized KV cache, as `search`'s trial does
`peak_over_model` = the trial's extrapolated device peak ÷ the fp16 model's bytes (goal ≤ 1.25);
`host_over_model` = the largest extrapolated host peak of any phase ÷ the same (goal ≤ 1.5).
The vision tower (CLIP ViT-L/14, ~0.3B parameters, 4 % of 7B) is not built: lmmlab prunes the language model only.
The windows are random token ids (a random model has no text to read), through the text task's protocol.
"""
from __future__ import annotations

import gc
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from lmmlab.tasks.base import SPLITS
from lmmlab.tasks.text import TextTask

# The language model of each LLaVA-1.5 (Vicuna-1.5, a Llama-2); "tiny" is for the test suite.
MODEL_SHAPES = {
    "llava-1.5-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                     "num_hidden_layers": 32, "vocab_size": 32064},
    "llava-1.5-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                      "num_hidden_layers": 40, "vocab_size": 32064},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 8,
             "vocab_size": 512},
}
PHASES = ("calibration", "setup", "trial")


class RandomTokens(TextTask):
    """The text task's windows and KV-aware perplexity protocol on uniformly random token ids."""

    name = "random-tokens"

    def __init__(self, vocab_size: int, **options):
        super().__init__(**options)
        self.vocab_size = vocab_size

    def describe(self) -> str:
        return f"random-tokens(vocab={self.vocab_size}, seqlen={self.seqlen})"

    def windows(self, tokenizer, split: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(SPLITS.index(split))
        return torch.randint(3, self.vocab_size, (16, self.seqlen), generator=g)


def check_shape(shape: str, layers: int) -> int:
    """The full depth of `shape`; one clear error for an unknown shape or a depth that cannot be extrapolated."""
    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(MODEL_SHAPES)}")
    full = MODEL_SHAPES[shape]["num_hidden_layers"]
    if not 2 <= layers <= full:
        raise ValueError(f"--layers must be between 2 and {full} for {shape} (two depths are measured); got {layers}")
    return full


def build_checkpoint(shape: str, layers: int, out: Path, dtype: torch.dtype) -> None:
    """A randomly initialised Llama with `shape`'s widths and `layers` decoder layers, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmmlab.models import build_tokenizer

    config = LlamaConfig(**{**MODEL_SHAPES[shape], "num_hidden_layers": layers}, num_key_value_heads=None,
                         max_position_embeddings=4096, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    del model
    gc.collect()


def host_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def host_peak() -> int:
    """The process's peak resident set since the last reset, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(path: str, device: str, dtype: str, seqlen: int, n_calibration: int, n_eval: int,
            repeat: int) -> dict:
    """Peaks of every phase for the checkpoint at `path` (run in a fresh process: peaks are per process)."""
    from lmmlab.prune.pruner import Pruner
    from lmmlab.kv.cache import KVCacheFactory
    from lmmlab.models import load_model
    from lmmlab.plan import CompressionPlan

    cuda = device.startswith("cuda")

    def device_reset():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        host_peak_reset()

    def device_peak() -> int:
        return torch.cuda.max_memory_allocated() if cuda else host_peak()

    gc.collect()
    runtime = host_peak()  # torch, transformers and lmmlab imported
    device_reset()
    loaded = load_model(path, dtype=dtype, device=device)
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    out = {"runtime_host_bytes": runtime, "model_bytes": model_bytes,
           "load": {"device": device_peak(), "host": host_peak()}}
    task = RandomTokens(loaded.model.config.vocab_size, seqlen=seqlen)
    n = loaded.num_layers
    plans = [CompressionPlan([0.4 if i % 2 else 0.6 for i in range(n)], [4 if i % 2 else 2 for i in range(n)],
                             kv_group_size=32, kv_residual=64),
             CompressionPlan([0.6 if i % 2 else 0.4 for i in range(n)], [2 if i % 2 else 4 for i in range(n)],
                             kv_group_size=32, kv_residual=64)]
    with torch.no_grad():
        device_reset()
        pruner = Pruner.for_task(loaded, task, n=n_calibration)
        out["calibration"] = {"device": device_peak(), "host": host_peak()}
        device_reset()
        pruner.allocation("owl", 0.5)
        out["setup"] = {"device": device_peak(), "host": host_peak()}
        device_reset()
        pruner.apply(plans[0])
        task.evaluate(loaded, split="validation", n=n_eval, make_cache=KVCacheFactory(plans[0], loaded))
        out["trial"] = {"device": device_peak(), "host": host_peak()}
        times = []
        for i in range(repeat):
            start = time.perf_counter()
            pruner.apply(plans[(i + 1) % 2])
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    out.update(dense_source=pruner.dense.source, remask_s=statistics.median(times))
    return out


def extrapolate(m1: float, m2: float, d1: int, d2: int, full: int) -> float:
    return m2 + (full - d2) * (m2 - m1) / (d2 - d1)


def bench_memory(shape: str, *, layers: int = 2, device: str | None = None, dtype: str = "float16",
                 seqlen: int = 256, n_calibration: int = 8, n_eval: int = 4, repeat: int = 3,
                 workdir: str | Path | None = None) -> dict:
    """Peak device and host memory of calibration, search set-up and one trial for `shape` at depths `layers` // 2
    and `layers`, extrapolated to the full depth (see the module docstring)."""
    full = check_shape(shape, layers)
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"unknown dtype {dtype!r}; allowed: float16, bfloat16, float32")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    depths = (max(1, layers // 2), layers)
    measured = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for d in depths:
            path = Path(tmp) / f"{shape}-{d}"
            build_checkpoint(shape, d, path, getattr(torch, dtype))
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                measured[d] = pool.submit(measure, str(path), device, dtype, seqlen, n_calibration, n_eval,
                                          repeat).result()
    (d1, a), (d2, b) = measured.items()
    ext = lambda f: extrapolate(f(a), f(b), d1, d2, full)  # noqa: E731
    model_bytes = ext(lambda m: m["model_bytes"])
    phases = {p: {"device_bytes": ext(lambda m: m[p]["device"]), "host_bytes": ext(lambda m: m[p]["host"])}
              for p in ("load",) + PHASES}
    for p in phases.values():
        p.update(device_over_model=p["device_bytes"] / model_bytes, host_over_model=p["host_bytes"] / model_bytes)
    remask_per_layer = [m["remask_s"] / d for d, m in measured.items()]
    return {
        "shape": shape, "widths": MODEL_SHAPES[shape], "device": device, "dtype": dtype,
        "threads": torch.get_num_threads(), "depths_measured": list(depths), "full_depth": full,
        "seqlen": seqlen, "calibration_windows": n_calibration, "eval_windows": n_eval,
        "dense_source": b["dense_source"], "model_bytes": model_bytes, "phases": phases,
        "peak_over_model": phases["trial"]["device_over_model"],
        "host_over_model": max(phases[p]["host_over_model"] for p in PHASES),
        "remask_s_per_layer": remask_per_layer[-1], "remask_s_full_depth": remask_per_layer[-1] * full,
        "remask_timing": f"median of {repeat}",
        "measured": {str(d): m for d, m in measured.items()},
    }
