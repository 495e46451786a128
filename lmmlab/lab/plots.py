"""Figures for the notebooks and the README. Each function takes plain data (tables, plans, dicts) and returns a
matplotlib Figure; `save` writes it to results/figures/NAME.png."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd

from lmmlab.plan import CompressionPlan

FIGURES = Path("results") / "figures"
METHOD_COLOURS = {"magnitude": "tab:gray", "wanda": "tab:blue", "ria": "tab:green", "sparsegpt": "tab:orange",
                  "dense": "black"}
ALLOCATION_STYLES = {"uniform": "--", "owl": ":", "tpe": "-"}
UNITS = {"accuracy": " (fraction correct)", "perplexity": " (lower is better)", "loss": " (nats)"}


def metric_label(table: pd.DataFrame, split: str = "test") -> str:
    """'test accuracy (fraction correct)', 'test perplexity (lower is better)', ... from a table's primary_metric."""
    name = table.primary_metric.iloc[0] if "primary_metric" in table and len(table) else "primary metric"
    return f"{split} {name}{UNITS.get(name, '')}"


def _is_fraction(table: pd.DataFrame) -> bool:
    return "primary_metric" in table and len(table) and table.primary_metric.iloc[0] != "perplexity"


def save(fig: plt.Figure, name: str, folder: Path = FIGURES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def gallery_figure(images: Sequence, captions: Sequence[str], title: str) -> plt.Figure:
    """Items of a task at a glance: each image with its caption (question, answer, the model's prediction)."""
    fig, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 3.2), squeeze=False)
    for ax, image, caption in zip(axes[0], images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    fig.suptitle(title)
    return fig


def accuracy_by_kind_figure(by_kind: dict[str, float], title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(by_kind), list(by_kind.values()), color="tab:blue")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("question kind")
    ax.set_ylabel("accuracy (fraction correct)")
    ax.set_title(title)
    for x, v in enumerate(by_kind.values()):
        ax.text(x, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    return fig


def layer_outliers_figure(layers: pd.DataFrame) -> plt.Figure:
    """Per decoder layer: OWL's outlier ratio, and the largest / median input-channel activation norm."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    left.bar(layers.layer, 100 * layers.outlier_ratio, color="tab:purple")
    left.set_xlabel("decoder layer")
    left.set_ylabel("Wanda scores > 5 × mean (%)")
    left.set_title("OWL outlier ratio per layer")
    right.plot(layers.layer, layers.max_input_norm, "o-", label="largest channel")
    right.plot(layers.layer, layers.median_input_norm, "s--", label="median channel")
    right.set_yscale("log")
    right.set_xlabel("decoder layer")
    right.set_ylabel("‖X_j‖₂ over calibration tokens")
    right.set_title("Input activation norms of the layer's linears")
    right.legend()
    fig.tight_layout()
    return fig


def convergence_figure(trials: pd.DataFrame, baselines: dict[str, float] | None = None) -> plt.Figure:
    """Each trial's validation objective and the best so far; warm-start trials marked."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    objective = trials.primary_metric.iloc[0] if (trials.objective == trials.primary).all() else "loss"
    for source, marker in (("uniform", "s"), ("owl", "D"), ("tpe", "o")):
        part = trials[trials.source == source]
        ax.scatter(part.trial, part.objective, marker=marker, s=18, alpha=0.7, label=f"{source} trial")
    ax.plot(trials.trial, trials.best_so_far, color="black", label="best so far")
    for name, value in (baselines or {}).items():
        ax.axhline(value, linestyle=":", linewidth=1, color="gray")
        ax.text(trials.trial.max(), value, f" {name}", va="center", fontsize=8)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {objective}{UNITS.get(objective, '')}")
    if objective == "accuracy":
        ax.set_ylim(max(0.0, trials.best_so_far.max() - 0.4), 1.0)
    elif objective == "perplexity":
        ax.set_yscale("log")
    ax.set_title("TPE search: convergence")
    ax.legend(fontsize=8, loc="best")
    return fig


def plan_figure(plan: CompressionPlan, title: str, target: float | None = None) -> plt.Figure:
    """A plan drawn per layer: sparsity bars (with the target) and KV bits."""
    layers = range(plan.num_layers)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.4), sharex=True)
    top.bar(layers, plan.sparsity, color="tab:blue")
    if target is not None:
        top.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
        top.legend(fontsize=8)
    top.set_ylabel("sparsity (fraction removed)")
    top.set_ylim(0, 1)
    top.set_title(title)
    if plan.separate_kv:
        bottom.bar([i - 0.2 for i in layers], plan.key_widths, width=0.4, color="tab:orange", label="keys")
        bottom.bar([i + 0.2 for i in layers], plan.value_widths, width=0.4, color="tab:green", label="values")
    else:
        bottom.bar(layers, plan.kv_bits, color="tab:orange")
    bottom.axhline(plan.mean_kv_bits, color="black", linestyle="--", linewidth=1,
                   label=f"mean {plan.mean_kv_bits:.2f} bits")
    bottom.set_ylabel("KV cache bits")
    bottom.set_xlabel("decoder layer")
    bottom.set_yticks([2, 4, 8, 16])
    bottom.legend(fontsize=8)
    fig.tight_layout()
    return fig


def importances_figure(importances: dict[str, float]) -> plt.Figure:
    """Parameter importances (s<l>: layer l's sparsity offset, kv<l>: its KV width)."""
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="tab:green")
    ax.set_xlabel("importance (PED-ANOVA, fraction of total)")
    ax.set_ylabel("search parameter")
    ax.set_title("Which per-layer choices matter")
    return fig


def _interval_bars(ax, x, part: pd.DataFrame, color=None) -> None:
    """Each point's 95 % interval (the table's ci_low / ci_high, where it has them) as a vertical bar."""
    if not {"ci_low", "ci_high"} <= set(part.columns):
        return
    low, high = part.primary - part.ci_low, part.ci_high - part.primary
    ax.errorbar(x, part.primary, yerr=[low.clip(lower=0), high.clip(lower=0)], fmt="none", ecolor=color,
                elinewidth=0.8, capsize=2, alpha=0.6)


def ablation_figure(table: pd.DataFrame, dense_value: float) -> plt.Figure:
    """The test metric vs target sparsity: one colour per method, one line style per allocation."""
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    runs = table[(table.pattern == "unstructured") & (table.allocation != "dense")]
    for (method, allocation), part in runs.groupby(["method", "allocation"]):
        part = part.sort_values("target_sparsity")
        ax.plot(part.target_sparsity, part.primary, ALLOCATION_STYLES.get(allocation, "-"), marker="o",
                markersize=3, color=METHOD_COLOURS.get(method), label=f"{method} · {allocation}",
                linewidth=2.4 if allocation == "tpe" else 1.2)
        _interval_bars(ax, part.target_sparsity, part, METHOD_COLOURS.get(method))
    ax.axhline(dense_value, color="black", linewidth=1, label=f"dense {dense_value:.4g}")
    ax.set_xlabel("mean sparsity of the decoder's linears (fraction removed)")
    ax.set_ylabel(metric_label(table))
    if not _is_fraction(table):
        ax.set_yscale("log")
    ax.set_title("Pruning methods × allocations (bars: 95 % intervals)")
    ax.legend(fontsize=7, ncol=2, loc="best")
    return fig


def kv_figure(table: pd.DataFrame) -> plt.Figure:
    """Uniform KV widths: the test metric and the loss against KV bytes per item."""
    uniform = table[table.kv_plan.str.startswith("uniform")].sort_values("mean_kv_bits")
    mixed = table[~table.kv_plan.str.startswith("uniform")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, column, label in ((left, "primary", metric_label(table)), (right, "loss", "loss (nats)")):
        ax.plot(uniform.kv_bytes / 1024, uniform[column], "o-", label="uniform width")
        if column == "primary":
            _interval_bars(ax, uniform.kv_bytes / 1024, uniform, "tab:blue")
        for _, r in uniform.iterrows():
            ax.annotate(f"{int(r.mean_kv_bits)}b", (r.kv_bytes / 1024, r[column]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        ax.scatter(mixed.kv_bytes / 1024, mixed[column], marker="D", color="tab:red", label="mixed per layer")
        ax.set_xlabel("KV cache per item (KiB)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    if _is_fraction(table):
        left.set_ylim(max(0.0, table.primary.min() - 0.1), 1.0)
    fig.suptitle("KV-cache quantization (KIVI layout), dense weights")
    fig.tight_layout()
    return fig


def pareto_figure(points: pd.DataFrame, front: pd.DataFrame, context_tokens: int) -> plt.Figure:
    """The test metric vs total memory (weights + KV at a context) for every method, with the TPE front(s) on top
    (one per pruning method in `front.method`)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for (method, allocation), part in points.groupby(["method", "allocation"]):
        ax.scatter(part.memory_bytes / 2**20, part.primary, s=20, alpha=0.7, color=METHOD_COLOURS.get(method),
                   marker="o" if allocation == "uniform" else "^", label=f"{method} · {allocation}")
        _interval_bars(ax, part.memory_bytes / 2**20, part, METHOD_COLOURS.get(method))
    for (method, part), marker in zip(front.groupby("method"), "*Ps"):
        part = part.sort_values("memory_bytes")
        ax.plot(part.memory_bytes / 2**20, part.primary, "-", marker=marker, markersize=8, linewidth=2,
                color="crimson" if method == "wanda" else "darkred", label=f"TPE front · {method}")
        _interval_bars(ax, part.memory_bytes / 2**20, part, "crimson" if method == "wanda" else "darkred")
    ax.set_xlabel(f"memory: non-zero weights + KV cache at {context_tokens} tokens (MiB)")
    ax.set_ylabel(metric_label(points))
    if _is_fraction(points):
        ax.set_ylim(max(0.0, front.primary.min() - 0.15), 1.0)
    else:
        ax.set_yscale("log")
    ax.set_title("Quality vs memory (bars: 95 % intervals)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return fig


def sampler_ablation_figure(summary: pd.DataFrame, direction: str, objective: str = "validation objective",
                            log_y: bool = False) -> plt.Figure:
    """Best objective so far per sampler against trials and against wall seconds: the median over seeds (line) and
    its min-max range (band). `summary`: `samplers.summarise`'s table (sampler, axis, x, median, min, max)."""
    from lmmlab.search.samplers import SAMPLERS

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    names = list(dict.fromkeys(summary.sampler))
    for i, name in enumerate(names):
        colour = f"C{SAMPLERS.index(name) if name in SAMPLERS else len(SAMPLERS) + i}"
        for ax, axis in zip(axes, ("trials", "seconds")):
            part = summary[(summary.sampler == name) & (summary.axis == axis)]
            ax.plot(part.x, part["median"], color=colour, label=name)
            ax.fill_between(part.x, part["min"], part["max"], color=colour, alpha=0.2, linewidth=0)
    better = "lower" if direction == "minimize" else "higher"
    seeds = int(summary.seeds.max()) if "seeds" in summary and len(summary) else 0
    axes[0].set_ylabel(f"best {objective} so far ({better} is better)")
    axes[0].set_xlabel("trials (evaluations)")
    if log_y:
        axes[0].set_yscale("log")
    axes[1].set_xlabel("wall seconds")
    axes[0].set_title(f"Sampler ablation: median and range over {seeds} seeds")
    axes[1].set_title("... against wall time")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig
