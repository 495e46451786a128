"""`lmmlab demo` (`make demo`): the whole story on one model and task at a small size — the dense model, pruning
methods, KV widths, and the staged search's joint plan against the baselines at the same budgets, every number on the
test split with its interval and paired test. The tables go to results/tables/<tag>_*.csv, the figures to
results/figures; `lmmlab headline` is the full comparison (every baseline, three sparsities, 64 test windows)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from lmmlab.progress import bar
from lmmlab.files import write_json, write_table
from lmmlab.lab import ablate
from lmmlab.lab.ablate import label
from lmmlab.lab.evaluate import format_metrics
from lmmlab.lab.headline import headline, headline_tests, write_headline
from lmmlab.lab.session import model_label
from lmmlab.models import Loaded
from lmmlab.prune.pruner import Pruner
from lmmlab.search.staged import SearchConfig
from lmmlab.tasks import Task

STORAGE = "sqlite:///results/demo.db"  # the Optuna storage of the demo's studies


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; the defaults are `make demo`'s. The pruner is calibrated by the caller (the CLI: on
    `n_calibration` items)."""

    sparsities: tuple[float, ...] = (0.5,)  # targets of the pruning rows and of the search
    kv_budgets: tuple[float, ...] = (3.0,)  # mean KV bits of the search's cells (keys and values apart)
    n: int | None = 8  # test items of every row (None: the task's default)
    n_calibration: int | None = 16  # calibration items of the pruner (None: the task's; SmolLM2's text: 32 windows)
    methods: tuple[str, ...] = ("magnitude", "wanda")  # the pruning rows (sparsegpt: + one sequential solve each)
    allocations: tuple[str, ...] = ("uniform", "owl")
    patterns: tuple[str, ...] = ("2:4",)
    kv_widths: tuple[int, ...] = (16, 4, 3, 2)  # the KV rows (dense weights)
    baselines: tuple[tuple[str, str], ...] = (("magnitude", "uniform"), ("wanda", "uniform"), ("wanda", "owl"))
    search: SearchConfig = field(default_factory=lambda: SearchConfig(  # its KV layout is the KV rows' too
        method="wanda", bases=("uniform", "owl"), tpe_trials=6, generations=(2,), offspring=4,
        selection=((2, 256), (1, 512)), fitness_rows=4, fitness_tokens=512, n_eval=8))


@dataclass
class DemoReport:
    text: str  # what happened, as tables
    paths: list[Path]  # the tables and figures written


def run(loaded: Loaded, task: Task, pruner: Pruner, config: DemoConfig = DemoConfig(), *,
        storage: str = STORAGE, tag: str | None = None, results: str | Path = "results",
        progress: bool = False) -> DemoReport:
    """Run the demo (see the module docstring) and return its report."""
    tag = tag or f"demo-{model_label(loaded)}-{task.name}"
    tables, figures = Path(results) / "tables", Path(results) / "figures"
    text = [f"{loaded.name}: {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f} M parameters, "
            f"{loaded.num_layers} decoder layers, {loaded.num_kv_heads} KV heads × {loaded.head_dim}; task: "
            f"{task.describe()}"]
    stages = bar(total=4, desc="demo (stages: dense, pruning, KV widths, search vs baselines)", unit="stage",
                 enabled=progress or None)
    dense = task.evaluate(loaded, split="test", n=config.n, progress=progress)
    stages.update(1)
    text.append(format_metrics(f"\ndense model on the test split ({dense.n} items)", dense))
    paths = [tables / f"{tag}_dense.json"]
    write_json(paths[-1], dense.to_dict())

    prune = ablate.ablate_prune(loaded, task, methods=config.methods, sparsities=config.sparsities,
                                allocations=config.allocations, patterns=config.patterns, n=config.n, pruner=pruner)
    paths.append(tables / f"{tag}_prune.csv")
    write_table(paths[-1], prune)
    calibration = sum(len(batch["input_ids"]) for batch in pruner.batches)
    text.append(f"\npruning (calibrated as published, on {calibration} calibration items) — test "
                f"{task.primary_metric}:\n" + pruning_table(prune))
    stages.update(1)

    layout = config.search
    kv = ablate.ablate_kv(loaded, task, widths=config.kv_widths, mixed=False, group_size=layout.kv_group_size,
                          residual_length=layout.kv_residual, n=config.n)
    paths.append(tables / f"{tag}_kv.csv")
    write_table(paths[-1], kv)
    text.append(f"\nKV cache at uniform widths (KIVI layout, groups of {layout.kv_group_size}, {layout.kv_residual}-"
                f"token window) — test {task.primary_metric}:\n" + columns(kv, ["kv_plan", "mean_kv_bits_effective",
                                                                               "kv_ratio", "primary", "ci_low",
                                                                               "ci_high", "verdict"], task))
    stages.update(1)

    rows = headline(loaded, task, sparsities=config.sparsities, kv_budgets=config.kv_budgets, config=config.search,
                    baselines=config.baselines, kv_baselines=("uniform",), two_stage_at=(), storage=storage,
                    study_prefix=tag, n=config.n, pruner=pruner, progress=progress)
    paths += write_headline(rows, task.direction, tables / f"{tag}_compare.csv")
    stages.update(1)
    stages.close()
    text.append(f"\nthe staged search's joint plan vs the baselines at the same budgets — test "
                f"{task.primary_metric}:\n" + columns([{**r, "plan": label(r)} for r in rows],
                                                     ["kv_budget_bits", "target_sparsity", "plan", "mean_kv_bits",
                                                      "primary", "ci_low", "ci_high", "versus", "p_value",
                                                      "verdict"], task))
    tests = headline_tests(rows, task.direction)
    text.append("\nsearch vs each baseline on the same items (Holm over the baselines):\n" + columns(
        tests, ["target_sparsity", "kv_budget_bits", "baseline", "mean_diff", "p_value", "p_holm", "better_holm"],
        task))
    from lmmlab.lab import plots  # matplotlib, here: the CLI reads this module's defaults at every start

    paths += [plots.save(plots.ablation_figure(pd.DataFrame(prune), dense.primary), f"{tag}_prune", figures),
              plots.save(plots.kv_figure(pd.DataFrame(kv)), f"{tag}_kv", figures)]
    text.append("\nwrote " + ", ".join(map(str, paths)) + "\nthe full comparison: lmmlab headline (README)")
    return DemoReport("\n".join(text), paths)


def pruning_table(rows: Sequence[dict]) -> str:
    """Method × (allocation, pattern, sparsity) of the pruning rows, the primary metric."""
    table = pd.DataFrame(rows)
    runs = table[table.allocation != "dense"]
    return runs.assign(run=runs.allocation + " " + runs.pattern).pivot_table(
        index=["run", "target_sparsity"], columns="method", values="primary", sort=False).round(3).to_string()


def columns(rows, names: list[str], task: Task) -> str:
    return pd.DataFrame(list(rows))[names].rename(columns={"primary": task.primary_metric}).round(4).to_string(
        index=False)
