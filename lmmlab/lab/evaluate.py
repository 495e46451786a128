"""`lmmlab eval`: a model's metrics on one split of a task, with its KV cache at given widths, and their summary."""
from __future__ import annotations

from typing import Sequence

from lmmlab.kv.budget import KIVI_GROUP_SIZE, KIVI_RESIDUAL, check_kv_bits
from lmmlab.kv.cache import kv_cache_for
from lmmlab.models import Loaded
from lmmlab.plan import CompressionPlan
from lmmlab.tasks import Metrics, Task


def widths_plan(loaded: Loaded, kv_bits: Sequence[int], *, kv_group_size: int = KIVI_GROUP_SIZE,
                kv_residual: int = KIVI_RESIDUAL) -> CompressionPlan:
    """The dense plan with KV widths `kv_bits`: one for every layer, or one per decoder layer."""
    check_kv_bits(kv_bits)
    bits = list(kv_bits) * loaded.num_layers if len(kv_bits) == 1 else list(kv_bits)
    if len(bits) != loaded.num_layers:
        raise ValueError(f"--kv-bits has {len(bits)} widths; give one for every layer or one per decoder layer "
                         f"({loaded.num_layers})")
    plan = CompressionPlan([0.0] * loaded.num_layers, bits, kv_group_size=kv_group_size, kv_residual=kv_residual)
    if set(bits) != {16}:
        kv_cache_for(plan, loaded)  # a layout the model cannot hold fails here, before evaluating
    return plan


def evaluate(loaded: Loaded, task: Task, plan: CompressionPlan, *, split: str = "test", n: int | None = None,
             progress: bool = False) -> Metrics:
    """The task's metrics of the model as it is, its KV cache at the plan's widths (a plain cache at 16 bits)."""
    quantized = set(plan.key_widths) | set(plan.value_widths) != {16}
    make_cache = (lambda: kv_cache_for(plan, loaded)) if quantized else None
    return task.evaluate(loaded, split=split, n=n, make_cache=make_cache, progress=progress)


def format_metrics(title: str, metrics: Metrics) -> str:
    """The metrics as a small two-column table under `title`."""
    rows = [(metrics.primary_metric, f"{metrics.primary:.4f}")]
    rows += [(f"  {name}", f"{value:.4f}") for name, value in metrics.values.items() if name != metrics.primary_metric]
    rows += [
        ("loss", f"{metrics.loss:.4f}"),
        ("latency / item", f"{metrics.latency_s * 1e3:.2f} ms"),
        ("KV cache / item", f"{metrics.kv_bytes / 1024:.1f} KiB"),
        ("peak memory", f"{metrics.peak_mem_bytes / 2**20:.0f} MiB"),
        ("items", str(metrics.n)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, "-" * (width + 12)] + [f"{k:<{width}}  {v:>10}" for k, v in rows])
