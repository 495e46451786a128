"""The headline comparison: the TPE joint plan against uniform and OWL baselines at the same budgets, on test.

For every (target sparsity, KV budget) pair, a TPE study searches on the task's validation split; its best plan and the
baselines (uniform magnitude, Wanda and SparseGPT, OWL-Wanda; uniform KV at the widest width within the budget) are
then evaluated once on the test split.
"""
from __future__ import annotations

import logging
from typing import Sequence

from lmmlab.ablate import Pruner, row, weight_part
from lmmlab.kvcache import kv_cache_for
from lmmlab.models import Loaded
from lmmlab.plan import KIVI_GROUP_SIZE, KIVI_RESIDUAL, KV_BITS, CompressionPlan
from lmmlab.search import DEFAULT_STORAGE, memory_bytes, search
from lmmlab.tasks import Task

log = logging.getLogger(__name__)

BASELINES = (("magnitude", "uniform"), ("wanda", "uniform"), ("wanda", "owl"), ("sparsegpt", "uniform"))


def compare(loaded: Loaded, task: Task, sparsities: Sequence[float] = (0.5, 0.6, 0.7), kv_budgets: Sequence[float] = (16, 4),
            n_trials: int = 100, method: str = "wanda", storage: str = DEFAULT_STORAGE, study_prefix: str = "compare",
            kv_group_size: int = KIVI_GROUP_SIZE, kv_residual: int = KIVI_RESIDUAL, kv_widths: Sequence[int] = KV_BITS,
            split: str = "test", n: int | None = None, n_eval: int | None = None, seed: int = 0,
            pruner: Pruner | None = None) -> list[dict]:
    """One row per (budget, method): TPE's best plan (allocation "tpe") and every baseline, on `split`. Each row
    keeps its per-item values (`per_item`) for `paired_table`."""
    pruner = pruner or Pruner.for_task(loaded, task, seed=seed)
    rows = []
    try:
        for target in sparsities:
            runs = []  # (budget, label, plan), in table order
            for budget in kv_budgets:
                kv = max(b for b in kv_widths if b <= budget)
                runs += [(budget, allocation, pruner.plan(m, allocation, target, kv, kv_group_size=kv_group_size,
                                                          kv_residual=kv_residual)) for m, allocation in BASELINES]
                result = search(loaded, task, target_sparsity=target, kv_budget_bits=budget, n_trials=n_trials,
                                storage=storage, study_name=f"{study_prefix}-{task.name}-{method}-s{target:g}-kv{budget:g}",
                                method=method, kv_widths=tuple(kv_widths), kv_group_size=kv_group_size,
                                kv_residual=kv_residual, n_eval=n_eval, seed=seed, pruner=pruner)
                runs.append((budget, "tpe", result.best_plan))
            # Evaluate plans with the same weights one after another, so each is pruned (SparseGPT: solved) once.
            order = sorted(range(len(runs)), key=lambda r: weight_part(runs[r][2]))
            scored = {}
            for r in order:
                budget, allocation, plan = runs[r]
                pruner.apply(plan)
                metrics = task.evaluate(loaded, split=split, n=n, make_cache=lambda: kv_cache_for(plan, loaded))
                scored[r] = {**row(plan, allocation, target, loaded, metrics, task, split, seed),
                             "kv_budget_bits": budget, "trials": n_trials if allocation == "tpe" else 0,
                             "per_item_metric": metrics.per_item_metric, "per_item": metrics.per_item}
                log.info("s=%.2f kv<=%g %s %s: %s %.4f", target, budget, plan.method, allocation,
                         task.primary_metric, metrics.primary)
            rows += [scored[r] for r in range(len(runs))]
    finally:
        pruner.restore()
    return rows


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
                   context_tokens: int = 1024, split: str = "test", n: int | None = None) -> list[dict]:
    """The primary metric (and the task's other metrics) and memory of (allocation label, plan) pairs, a search's Pareto front
    say, on `split`."""
    rows = []
    try:
        for allocation, plan in labelled:
            pruner.apply(plan)
            metrics = task.evaluate(loaded, split=split, n=n, make_cache=lambda: kv_cache_for(plan, loaded),
                                    with_loss=False)
            rows.append({"method": plan.method, "allocation": allocation, "target_sparsity": plan.mean_sparsity,
                         "mean_kv_bits": plan.mean_kv_bits, "primary_metric": metrics.primary_metric,
                         "primary": metrics.primary, **metrics.values, **memory_bytes(loaded, plan, context_tokens)})
    finally:
        pruner.restore()
    return rows


def paired_table(rows: Sequence[dict], direction: str, reference: str = "tpe") -> list[dict]:
    """The `reference` plan against every other plan at the same (sparsity, KV budget), on the same items: the mean
    per-item difference (per_item_metric: correctness, window NLL, ...), its 95 % bootstrap interval, a paired
    permutation p-value, and who is better in the task's direction ("tie" when the interval covers 0). For
    perplexity the per-item values are window NLLs, so exp(mean difference) is the perplexity ratio."""
    from lmmlab.stats import paired

    out = []
    keyed = {}
    for r in rows:
        keyed.setdefault((r["target_sparsity"], r["kv_budget_bits"]), []).append(r)
    for (target, budget), group in keyed.items():
        ours = [r for r in group if r["allocation"] == reference]
        for ref in ours:
            for other in (r for r in group if r is not ref):
                test = paired(ref["per_item"], other["per_item"])
                higher_is_better = direction == "maximize"
                winner = {"tie": "tie", "a higher": reference if higher_is_better else "baseline",
                          "b higher": "baseline" if higher_is_better else reference}[test.verdict]
                out.append({"target_sparsity": target, "kv_budget_bits": budget,
                            "baseline": f"{other['method']}-{other['allocation']}",
                            "per_item_metric": ref["per_item_metric"], "mean_diff": test.mean_diff,
                            "ci_low": test.low, "ci_high": test.high, "p_value": test.p_value, "n": test.n,
                            "better": winner})
    return out
