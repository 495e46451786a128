"""An ipywidgets explorer: sliders for target sparsity, method, allocation and KV bits per group of layers (keys and
values alike, or, with "separate K/V" ticked, each at its own width); each change re-masks from the dense weights
and cached input norms, evaluates the task and shows its metric, memory and a few predictions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lmmlab.prune.allocate import ALLOCATIONS
from lmmlab.prune.pruner import Pruner
from lmmlab.kv.cache import kv_cache_for
from lmmlab.kv.budget import KV_BITS
from lmmlab.plan import METHODS, CompressionPlan
from lmmlab.search.per_layer import memory_bytes
from lmmlab.tasks import Metrics, Task


@dataclass
class Preview:
    plan: CompressionPlan
    metrics: Metrics
    memory: dict

    def summary(self, shown: int = 6) -> str:
        m = self.metrics
        lines = [f"{m.primary_metric} {m.primary:.4g}   loss {m.loss:.4f}   "
                 f"weights {self.memory['weight_bytes'] / 2**20:.2f} MiB + KV {self.memory['kv_bytes_at_context'] / 2**20:.2f}"
                 f" MiB = {self.memory['memory_bytes'] / 2**20:.2f} MiB",
                 "sparsity per layer: " + " ".join(f"{s:.2f}" for s in self.plan.sparsity),
                 *self.kv_lines(), ""]
        for value, prediction in list(zip(m.per_item, m.predictions))[:shown]:
            lines.append(f"{m.per_item_metric} {value:.3g}   model: {prediction}")
        return "\n".join(lines)

    def kv_lines(self) -> list[str]:
        if not self.plan.separate_kv:
            return ["KV bits per layer:  " + " ".join(map(str, self.plan.kv_bits))]
        return ["K bits per layer:   " + " ".join(map(str, self.plan.key_widths)),
                "V bits per layer:   " + " ".join(map(str, self.plan.value_widths))
                + f"   (mean of K and V {self.plan.mean_kv_bits:.2f})"]


def group_bits(num_layers: int, bits_per_group: Sequence[int]) -> list[int]:
    """Spread one width per group over consecutive layers (groups as equal in size as possible)."""
    n = len(bits_per_group)
    return [bits_per_group[i * n // num_layers] for i in range(num_layers)]


def preview(pruner: Pruner, task: Task, method: str, allocation: str, target: float,
            bits_per_group: Sequence[int], kv_group_size: int = 8, kv_residual: int = 8,
            context_tokens: int = 1024, split: str = "validation", n: int | None = None,
            value_bits_per_group: Sequence[int] | None = None) -> Preview:
    """Apply the plan these settings describe (re-masking from the dense weights) and evaluate it. `bits_per_group`
    are the KV widths, or the key widths when `value_bits_per_group` gives the values their own."""
    loaded = pruner.loaded
    values = [] if value_bits_per_group is None else group_bits(loaded.num_layers, value_bits_per_group)
    plan = pruner.plan(method, allocation, target, group_bits(loaded.num_layers, bits_per_group),
                       kv_group_size=kv_group_size, kv_residual=kv_residual, value_bits=values)
    pruner.apply(plan)
    metrics = task.evaluate(loaded, split=split, n=n, make_cache=lambda: kv_cache_for(plan, loaded))
    return Preview(plan, metrics, memory_bytes(loaded, plan, context_tokens))


def explorer(pruner: Pruner, task: Task, groups: int = 3, **preview_options):
    """The widget: change any control and the model is re-pruned and re-evaluated on the task."""
    import ipywidgets as w
    from IPython.display import display

    target = w.FloatSlider(value=0.6, min=0.0, max=0.9, step=0.05, description="sparsity", continuous_update=False)
    method = w.Dropdown(options=METHODS, value="wanda", description="method")
    allocation = w.Dropdown(options=ALLOCATIONS, value="owl", description="allocation")
    bits = [w.Dropdown(options=KV_BITS, value=16, description=f"KV group {g + 1}") for g in range(groups)]
    separate = w.Checkbox(value=False, description="separate K/V")
    value_bits = [w.Dropdown(options=KV_BITS, value=16, description=f"V group {g + 1}") for g in range(groups)]
    value_row = w.HBox(value_bits, layout=w.Layout(display="none"))
    out = w.Output()

    def update(*_):
        value_row.layout.display = "flex" if separate.value else "none"
        for g, b in enumerate(bits):
            b.description = f"{'K' if separate.value else 'KV'} group {g + 1}"
        with out:
            out.clear_output(wait=True)
            result = preview(pruner, task, method.value, allocation.value, target.value, [b.value for b in bits],
                             value_bits_per_group=[b.value for b in value_bits] if separate.value else None,
                             **preview_options)
            print(result.summary())

    for control in (target, method, allocation, *bits, separate, *value_bits):
        control.observe(update, names="value")
    update()
    ui = w.VBox([w.HBox([target, method, allocation]), w.HBox([*bits, separate]), value_row, out])
    display(ui)
    return ui
