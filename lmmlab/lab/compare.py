"""The headline comparison: the TPE joint plan against uniform and OWL baselines at the same budgets, on test.

For every (target sparsity, KV budget) pair, a TPE study searches on the task's validation split; its best plan and the
baselines (uniform magnitude, Wanda and SparseGPT, OWL-Wanda; uniform KV at the widest width within the budget) are
then evaluated once on the test split. The baselines are the methods as published: Wanda calibrated layer by layer on
the pruned layers' outputs, as its reference code does (`sequential`); the search re-masks from one pass of the dense
model (its cached statistics), and so does its TPE row.

Same budget, same zeros: every method removes ⌊numel · s⌋ weights of each linear, and plans whose achieved sparsity
differs by more than `SPARSITY_TOLERANCE` are not ranked. Every row carries a 95 % interval and a paired test against
the strongest baseline at its budget on the same test items (`stats.annotate`).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from lmmlab.progress import bar
from lmmlab.kv.budget import KIVI_GROUP_SIZE, KIVI_RESIDUAL
from lmmlab.kv.cache import kv_cache_for
from lmmlab.lab.ablate import label, row
from lmmlab.lab.stats import annotate
from lmmlab.models import Loaded
from lmmlab.plan import CompressionPlan
from lmmlab.prune.pruner import Pruner, calibration_of, weight_part
from lmmlab.prune.scores import sparsity_of
from lmmlab.search.per_layer import (DEFAULT_STORAGE, KV_UNITS, PerLayerConfig, effective_costs, memory_bytes,
                                     search)
from lmmlab.tasks import Task

log = logging.getLogger(__name__)

BASELINES = (("magnitude", "uniform"), ("wanda", "uniform"), ("wanda", "owl"), ("sparsegpt", "uniform"))
SPARSITY_TOLERANCE = 0.0005  # 0.05 %: plans further apart in achieved mean sparsity are not compared


def check_same_sparsity(rows: Sequence[dict], tolerance: float = SPARSITY_TOLERANCE) -> None:
    """Refuse to rank plans at one budget whose achieved mean sparsity differs by more than `tolerance`."""
    low = min(rows, key=lambda r: r["achieved_sparsity"])
    high = max(rows, key=lambda r: r["achieved_sparsity"])
    if high["achieved_sparsity"] - low["achieved_sparsity"] > tolerance:
        raise ValueError(f"refusing to rank plans at target sparsity {low['target_sparsity']:g}: achieved sparsity "
                         f"ranges from {low['achieved_sparsity']:.6f} ({low['method']}-{low['allocation']}) to "
                         f"{high['achieved_sparsity']:.6f} ({high['method']}-{high['allocation']}), more than "
                         f"{tolerance:.2%} apart; plans compared must remove the same number of weights")


def compare(loaded: Loaded, task: Task, config: PerLayerConfig = PerLayerConfig(), *,
            sparsities: Sequence[float] = (0.5, 0.6, 0.7), kv_budgets: Sequence[float] = (16, 4),
            storage: str = DEFAULT_STORAGE, study_prefix: str = "compare", split: str = "test", n: int | None = None,
            pruner: Pruner | None = None, sequential: bool = True,
            baselines: Sequence[tuple[str, str]] = BASELINES) -> list[dict]:
    """One row per (budget, method): the per-layer search's best plan (allocation "tpe"; `search.per_layer.search`
    with `config` at each target and budget) and every baseline, on `split`, with `ci_low`/`ci_high`, and
    `p_value`/`verdict` against the strongest baseline at the same budget. Each row keeps its per-item values
    (`per_item`) for `paired_table`. `sequential`: the Wanda baselines calibrate layer by layer. The KV budgets count
    `config.kv_budget_unit` (nominal widths or effective bits at `config.context_tokens`); `baselines`: (method,
    allocation) pairs, with uniform KV at the widest width in budget."""
    if config.kv_budget_unit not in KV_UNITS:
        raise ValueError(f"unknown KV budget unit {config.kv_budget_unit!r}; allowed: {', '.join(KV_UNITS)}")
    widths = config.kv_widths
    layout = {"kv_group_size": config.kv_group_size, "kv_residual": config.kv_residual}
    cost = (effective_costs(loaded, widths, config.context_tokens, config.kv_group_size, config.kv_residual)
            if config.kv_budget_unit == "effective" else {b: float(b) for b in widths})
    for budget in kv_budgets:
        if not any(c <= budget + 1e-9 for c in cost.values()):
            raise ValueError(f"KV budget {budget:g} {config.kv_budget_unit} bits is below every allowed width's "
                             f"(narrowest: {min(cost.values()):.4g})")
    pruner = pruner or Pruner.for_task(loaded, task, seed=config.seed)
    unit = "e" if config.kv_budget_unit == "effective" else ""
    rows = []
    try:
        for target in sparsities:
            runs = []  # (budget, label, plan, sequential), in table order
            for budget in kv_budgets:
                kv = max(b for b in widths if cost[b] <= budget + 1e-9)  # uniform: the widest in budget
                runs += [(budget, allocation, pruner.plan(m, allocation, target, kv, **layout), sequential)
                         for m, allocation in baselines]
                cell = replace(config, target_sparsity=target, kv_budget_bits=budget)
                result = search(loaded, task, cell, pruner=pruner, storage=storage,
                                study_name=f"{study_prefix}-{task.name}-{config.method}-s{target:g}-kv{budget:g}{unit}")
                runs.append((budget, "tpe", result.best_plan, False))
            rows += score_runs(loaded, task, pruner, target, runs, config, split, n)
    finally:
        pruner.restore()
    return annotate(rows, direction=task.direction, group_by=("target_sparsity", "kv_budget_bits"),
                    is_baseline=lambda r: r["allocation"] != "tpe", label=label)


def score_runs(loaded: Loaded, task: Task, pruner: Pruner, target: float, runs: list, config: PerLayerConfig,
               split: str, n: int | None) -> list[dict]:
    """Each (budget, label, plan, sequential) of one target on `split`, plans with the same weights one after
    another (each pruned, or solved, once); rows in the order given, checked to remove the same weights."""
    order = sorted(range(len(runs)), key=lambda r: weight_part(runs[r][2], runs[r][3]))
    scored = {}
    for r in bar(order, desc=f"compare at {target:g} (plans)", unit="plan"):
        budget, allocation, plan, seq = runs[r]
        pruner.apply(plan, sequential=seq)
        metrics = task.evaluate(loaded, split=split, n=n, make_cache=lambda: kv_cache_for(plan, loaded))
        scored[r] = {**row(plan, allocation, target, loaded, metrics, task, split, config.seed, sequential=seq,
                           kv_context=config.context_tokens, calibration=pruner.calibration(plan.method, seq)),
                     "kv_budget_bits": budget, "kv_budget_unit": config.kv_budget_unit,
                     "trials": config.n_trials if allocation == "tpe" else 0}
        log.info("s=%.2f kv<=%g %s %s: %s %.4f", target, budget, plan.method, allocation, task.primary_metric,
                 metrics.primary)
    check_same_sparsity(list(scored.values()))
    return [scored[r] for r in range(len(runs))]


def pareto_points(loaded: Loaded, task: Task, pruner: Pruner, sparsities: Sequence[float] = (0.5, 0.6, 0.7, 0.8),
                  kv_widths: Sequence[int] = (16, 4), methods: Sequence[str] = ("magnitude", "wanda", "sparsegpt"),
                  allocations: Sequence[str] = ("uniform", "owl"), kv_group_size: int = KIVI_GROUP_SIZE,
                  kv_residual: int = KIVI_RESIDUAL,
                  context_tokens: int = 1024, split: str = "test", n: int | None = None) -> list[dict]:
    """The primary metric and memory (non-zero weights + KV at `context_tokens`) of every baseline plan on `split`."""
    labelled = [(allocation, pruner.plan(method, allocation, target, kv, kv_group_size=kv_group_size,
                                         kv_residual=kv_residual))
                for method in methods for allocation in allocations for target in sparsities for kv in kv_widths]
    return evaluate_plans(loaded, task, pruner, labelled, context_tokens, split, n)


def evaluate_plans(loaded: Loaded, task: Task, pruner: Pruner, labelled: Sequence[tuple[str, CompressionPlan]],
                   context_tokens: int = 1024, split: str = "test", n: int | None = None,
                   baselines: Sequence[str] = ("uniform", "owl"), sequential: bool = True,
                   group_by: Sequence[str] = ("target_sparsity", "mean_kv_bits")) -> list[dict]:
    """The primary metric (and the task's other metrics) and memory of (allocation label, plan) pairs, a search's
    Pareto front say, on `split`, each with its 95 % interval and a paired test against the strongest plan labelled
    one of `baselines` in its `group_by` group (default: the same mean sparsity and mean KV bits; NaN where no
    baseline shares it). Baselines run as
    published (`sequential`: Wanda and RIA calibrate layer by layer); searched plans re-mask as the search did."""
    rows = []
    try:
        for allocation, plan in bar(labelled, desc="evaluate plans", unit="plan"):
            seq = sequential and allocation in baselines
            pruner.apply(plan, sequential=seq)
            metrics = task.evaluate(loaded, split=split, n=n, make_cache=lambda: kv_cache_for(plan, loaded),
                                    with_loss=False)
            rows.append({"method": plan.method, "allocation": allocation,
                         "calibration": calibration_of(plan.method, seq), "target_sparsity": round(plan.mean_sparsity, 6),
                         "achieved_sparsity": round(sparsity_of(loaded), 6), "mean_kv_bits": plan.mean_kv_bits,
                         "mean_kv_bits_effective": round(plan.mean_effective_kv_bits(loaded.head_dim, context_tokens), 4),
                         "primary_metric": metrics.primary_metric, "primary": metrics.primary, **metrics.values,
                         **memory_bytes(loaded, plan, context_tokens), "per_item_metric": metrics.per_item_metric,
                         "per_item": metrics.per_item})
    finally:
        pruner.restore()
    return annotate(rows, direction=task.direction, group_by=tuple(group_by),
                    is_baseline=lambda r: r["allocation"] in baselines, label=label)


def paired_table(rows: Sequence[dict], direction: str, reference: str = "tpe",
                 family: Callable[[dict], bool] = lambda r: True) -> list[dict]:
    """The `reference` plan against every other plan at the same (sparsity, KV budget), on the same items: the mean
    per-item difference (per_item_metric: correctness, window NLL, ...), its 95 % bootstrap interval, a paired
    p-value (exact McNemar for correctness, paired bootstrap otherwise: `stats.paired_p`), and who is better in the
    task's direction — "tie" unless p < 0.05 — and the same after Holm's correction over the baselines at that
    budget (`p_holm`, `better_holm`: the verdict for "better than every baseline"); `family` picks the rows tested (the
    Holm family). For perplexity the per-item values are window NLLs, so exp(mean difference) is the perplexity
    ratio."""
    from lmmlab.lab.stats import holm, paired, paired_p

    out = []
    keyed = {}
    for r in rows:
        keyed.setdefault((r["target_sparsity"], r["kv_budget_bits"]), []).append(r)
    for (target, budget), group in keyed.items():
        ours = [r for r in group if r["allocation"] == reference]
        for ref in ours:
            tests = []
            for other in (r for r in group if r is not ref and family(r)):
                test = paired(ref["per_item"], other["per_item"])
                p = paired_p(ref["per_item"], other["per_item"], ref["per_item_metric"])
                tests.append({"target_sparsity": target, "kv_budget_bits": budget,
                              "baseline": label(other),
                              "per_item_metric": ref["per_item_metric"], "mean_diff": test.mean_diff,
                              "ci_low": test.low, "ci_high": test.high, "p_value": p, "n": test.n})
            for t, p_holm in zip(tests, holm([t["p_value"] for t in tests])):
                ours_higher = t["mean_diff"] > 0
                higher_is_better = direction == "maximize"
                t["p_holm"] = p_holm
                t["better"] = "tie" if t["p_value"] >= 0.05 or t["mean_diff"] == 0 else (
                    reference if ours_higher == higher_is_better else "baseline")
                t["better_holm"] = t["better"] if p_holm < 0.05 else "tie"
            out += tests
    return out


def claims(rows: Sequence[dict], reference: str = "tpe") -> list[str]:
    """One sentence per `reference` row of an annotated table: its value and interval, the strongest baseline at its
    budget, and the verdict of the paired test — "better"/"worse" only at p < 0.05, else "tie"."""
    out = []
    for r in rows:
        if r["allocation"] != reference:
            continue
        budget = f", KV ≤ {r['kv_budget_bits']:g} bits" if "kv_budget_bits" in r else ""
        out.append(f"sparsity {r['target_sparsity']:g}{budget}: {label(r)} {r['primary']:.4g} "
                   f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}] vs {r['versus']}: {r['verdict']} "
                   f"(paired p = {r['p_value']:.3g}, n = {len(r['per_item'])})")
    return out


def write_comparison(rows: Sequence[dict], direction: str, out: str | Path) -> list[Path]:
    """A comparison's table (each row with its interval and its paired test against the strongest baseline), its
    per-item values and the searched plan's paired tests against each baseline: `out`, `<out>_items.csv`,
    `<out>_paired.csv`."""
    import pandas as pd

    from lmmlab.files import write_table

    out = Path(out)
    items = pd.DataFrame({f"{r['method']}-{r['allocation']}-s{r['target_sparsity']:g}-kv{r['kv_budget_bits']:g}":
                          r["per_item"] for r in rows})
    paths = [out, out.with_name(out.stem + "_items.csv"), out.with_name(out.stem + "_paired.csv")]
    write_table(out, rows)
    write_table(paths[1], items)
    write_table(paths[2], pd.DataFrame(paired_table(rows, direction)))
    return paths
