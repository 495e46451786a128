"""The headline: the staged search's plan against every baseline at the same budgets, on the test split, each claim
with its interval and a paired test, Holm-adjusted over every baseline of its cell.

Cells: target sparsity × KV budget (mean nominal bits per layer, keys and values apart). In every cell:
  search      `staged.staged_search` (TPE over the low-dimensional space, then the evolution per linear on re-based
              databases; the final plan chosen on validation), realized as it chose (stitched or sequential)
  baselines   Wanda and SparseGPT × uniform / OWL / ATP / AlphaPruning / DLP, run as published (Wanda calibrated
              layer by layer, SparseGPT solved sequentially; ATP's slope and DLP's α chosen on validation for the
              method), each with uniform KV at the budget (the widest width w ≤ budget for keys and values) and, below
              16 bits, with KVTuner-style pairs (`kvpairs.kvtuner_plan` on the measured sensitivities)
  two-stage   (at `two_stage_at`, below 16 bits) the ablation the joint search answers to: weights searched first at 16
              bits, then the KV pairs on those weights, at equal evaluations (`staged.two_stage_search`)
  search-kv16 (below 16 bits) the search's own weights with a 16-bit cache: what its KV widths cost
Every row removes the same weights (achieved sparsity within `compare.SPARSITY_TOLERANCE`; checked). The paired
table holds the search against every baseline of its cell (Holm over them), and apart from that family against the
two-stage plan and against its own weights with a 16-bit cache.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from lmmlab.progress import bar
from lmmlab.kv import pairs as kvpairs
from lmmlab.prune.pruner import Pruner
from lmmlab.lab.ablate import label, row
from lmmlab.lab.compare import check_same_sparsity
from lmmlab.files import write_json
from lmmlab.kv.cache import kv_cache_for
from lmmlab.models import Loaded
from lmmlab.kv.budget import KV_BITS
from lmmlab.plan import CompressionPlan
from lmmlab.search.staged import SearchConfig, StagedSearch, realize_plan, two_stage_search
from lmmlab.lab.stats import annotate
from lmmlab.tasks import Task

log = logging.getLogger(__name__)

BASELINES = tuple((m, a) for m in ("wanda", "sparsegpt") for a in ("uniform", "owl", "atp", "alphapruning", "dlp"))
KV_BASELINES = ("uniform", "kvtuner")
SEARCH = "search"  # the searched plan's allocation label
TWO_STAGE = "two-stage"
SAME_WEIGHTS_16 = "search-kv16"  # the searched weights with a 16-bit cache (KV-limited cells)
NOT_BASELINES = (SEARCH, TWO_STAGE, SAME_WEIGHTS_16)


def parse_baseline(text: str) -> tuple[str, str]:
    """'sparsegpt-atp' -> ("sparsegpt", "atp"): a method and an allocation lmmlab knows; else a one-line error."""
    from lmmlab.plan import METHODS
    from lmmlab.prune.allocate import ALLOCATIONS

    method, _, allocation = text.partition("-")
    if method not in METHODS or allocation not in ALLOCATIONS:
        raise ValueError(f"bad baseline {text!r}; give method-allocation, method from {', '.join(METHODS)}, "
                         f"allocation from {', '.join(ALLOCATIONS)}")
    return method, allocation


def uniform_pairs(budget: float, num_layers: int) -> list[kvpairs.Pair]:
    """Keys and values of every layer at the widest width within `budget`."""
    width = max(b for b in KV_BITS if b <= budget + 1e-9)
    return [(width, width)] * num_layers


def with_pairs(plan: CompressionPlan, pairs: Sequence[kvpairs.Pair], config: SearchConfig) -> CompressionPlan:
    return replace(plan, kv_bits=[k for k, _ in pairs], value_bits=[v for _, v in pairs],
                   kv_group_size=config.kv_group_size, kv_residual=config.kv_residual)


def without_kv(plan: CompressionPlan) -> CompressionPlan:
    """`plan`'s weights with every key and value at 16 bits."""
    return replace(plan, kv_bits=[16] * plan.num_layers, value_bits=[])


def headline(loaded: Loaded, task: Task, *, sparsities: Sequence[float] = (0.5, 0.6, 0.7),
             kv_budgets: Sequence[float] = (16, 3), config: SearchConfig = SearchConfig(),
             baselines: Sequence[tuple[str, str]] = BASELINES, kv_baselines: Sequence[str] = KV_BASELINES,
             two_stage_at: Sequence[float] = (0.7,), storage: str = "sqlite:///results/studies.db",
             study_prefix: str = "headline", n: int | None = None, pruner: Pruner | None = None,
             keep_databases: bool = False, checkpoint: str | Path | None = None,
             progress: bool = False) -> list[dict]:
    """The headline rows (see the module docstring): one per (cell, plan), with interval, strongest baseline, paired
    p-value and verdict (`stats.annotate`), the search's timings on its row (`search_seconds`, `database_seconds`).
    `checkpoint`: a JSON file the rows of every finished target are kept in; a run that finds it skips those targets
    (the studies themselves resume from `storage`)."""
    for budget in kv_budgets:
        if budget < 16:
            kvpairs.check_budget(budget, replace(config, kv_budget=budget).pairs)
    pruner = pruner or Pruner.for_task(loaded, task, seed=config.seed)
    done = json.loads(Path(checkpoint).read_text()) if checkpoint and Path(checkpoint).is_file() else {}
    rows: list[dict] = []
    cells = bar(total=len(sparsities) * len(kv_budgets), desc="headline (cells)", enabled=progress or None)
    try:
        for target in sparsities:
            if f"{target:g}" not in done:
                plans, databases = [], set()
                for budget in kv_budgets:
                    cell = replace(config, target_sparsity=target, kv_budget=float(budget))
                    name = f"{study_prefix}-{task.name}-s{target:g}-kv{budget:g}"
                    searched, sensitivity = search_plans(loaded, task, pruner, cell, name, storage, databases,
                                                         two_stage=budget < 16 and target in two_stage_at,
                                                         progress=progress)
                    plans += searched + baseline_plans(loaded, pruner, cell, baselines, kv_baselines, sensitivity)
                    cells.update(1)
                done[f"{target:g}"] = {"rows": evaluate_cell_plans(loaded, task, pruner, target, plans, n,
                                                                   config.seed)}
                if checkpoint:
                    write_json(checkpoint, done)
                if not keep_databases:
                    remove_databases(pruner, databases)
            rows += done[f"{target:g}"]["rows"]
    finally:
        cells.close()
        pruner.restore()
    return annotate(rows, direction=task.direction, group_by=("target_sparsity", "kv_budget_bits"),
                    is_baseline=lambda r: r["allocation"] not in NOT_BASELINES, label=label)


def search_plans(loaded: Loaded, task: Task, pruner: Pruner, cell: SearchConfig, name: str, storage: str,
                 databases: set[str], *, two_stage: bool, progress: bool) -> tuple[list, list[float] | None]:
    """One cell's searched plans — the staged search's and (`two_stage`) the two-stage ablation's — as
    (budget, allocation, kind, plan, realize, database, timings) tuples, the databases they used added to
    `databases`; and the KV sensitivities the search measured (None at 16 bits)."""
    search = StagedSearch(loaded, task, cell, pruner=pruner, storage=storage, study_name=name, progress=progress)
    result = search.run()
    databases |= {c["database"] for c in result.candidates if c["database"]}
    timing = {"search_seconds": round(sum(v for k, v in result.timings.items()
                                          if not k.startswith(("database", "bases"))), 1),
              "database_seconds": round(sum(v for k, v in result.timings.items() if k.startswith("database")), 1),
              "fitness_tokens": cell.evaluations()}
    plans = [(cell.kv_budget, SEARCH, "search", result.best_plan, result.realize, result.database, timing)]
    if cell.kv_budget < 16:
        plans.append((cell.kv_budget, SAME_WEIGHTS_16, "search", without_kv(result.best_plan), result.realize,
                      result.database, {}))
    if two_stage:
        first, second = two_stage_search(loaded, task, cell, pruner=pruner, storage=storage,
                                         study_name=f"{name}-two-stage", progress=progress)
        databases |= {c["database"] for r in (first, second) for c in r.candidates if c["database"]}
        plans.append((cell.kv_budget, TWO_STAGE, "search", second.best_plan, second.realize, second.database,
                      {"fitness_tokens": cell.evaluations()}))
    return plans, search.study.user_attrs.get("kv_sensitivity")


def baseline_plans(loaded: Loaded, pruner: Pruner, cell: SearchConfig, baselines: Sequence[tuple[str, str]],
                   kv_baselines: Sequence[str], sensitivity: list[float] | None) -> list:
    """Every baseline of one cell, solved as published ("sequential"), with uniform KV at the budget and, below 16
    bits, KVTuner-style pairs on the measured sensitivities."""
    plans = []
    budget = cell.kv_budget
    for method, allocation in baselines:
        weights = pruner.plan(method, allocation, cell.target_sparsity, 16)
        for kind in (k for k in kv_baselines if budget < 16 or k == "uniform"):
            pairs = (uniform_pairs(budget, loaded.num_layers) if kind == "uniform" else
                     kvpairs.kvtuner_plan(sensitivity or [0.0] * loaded.num_layers, budget, cell.pairs))
            plans.append((budget, allocation, kind, with_pairs(weights, pairs, cell), "sequential", None, {}))
    return plans


def remove_databases(pruner: Pruner, databases: set[str]) -> None:
    """Delete the level databases of a finished target (gigabytes each), detaching the pruner's."""
    pruner.restore()
    pruner.database = None
    for path in databases:
        shutil.rmtree(path, ignore_errors=True)


def evaluate_cell_plans(loaded: Loaded, task: Task, pruner: Pruner, target: float, plans: list, n: int | None,
                        seed: int) -> list[dict]:
    """Every plan of one target on the test split, plans with the same weights one after another (each solved
    once); rows in the order given."""
    from lmmlab.prune.pruner import weight_part

    order = sorted(range(len(plans)), key=lambda k: (plans[k][4], str(plans[k][5]),
                                                     weight_part(plans[k][3], plans[k][4] == "sequential")))
    scored: dict[int, dict] = {}
    for k in bar(order, desc=f"headline at {target:g}: baselines and search on test", unit="plan"):
        budget, allocation, kind, plan, realize, database, extra = plans[k]
        start = time.perf_counter()
        realize_plan(pruner, plan, realize, database)
        metrics = task.evaluate(loaded, split="test", n=n, make_cache=lambda: kv_cache_for(plan, loaded))
        scored[k] = {**row(plan, allocation, target, loaded, metrics, task, "test", seed,
                           sequential=realize == "sequential",
                           calibration={"sequential": "sequential", "stitched": "stitched"}.get(realize, realize)),
                     "kv_budget_bits": float(budget), "kv_plan": kind if allocation not in NOT_BASELINES else "",
                     "realize": realize, "eval_seconds": round(time.perf_counter() - start, 1), **extra}
        log.info("s=%.2f kv<=%g %s: %s %.4f", target, budget, label(scored[k]), task.primary_metric, metrics.primary)
    by_budget: dict[float, list[dict]] = {}
    for r in scored.values():
        by_budget.setdefault(r["kv_budget_bits"], []).append(r)
    for group in by_budget.values():
        check_same_sparsity(group)
    return [scored[k] for k in range(len(plans))]


def headline_tests(rows: Sequence[dict], direction: str) -> list[dict]:
    """The search against every baseline of its cell (Holm over them: `compare.paired_table`), and against the
    two-stage plan and its own weights with a 16-bit cache (each its own test, outside the family)."""
    from lmmlab.lab.compare import paired_table

    tests = paired_table(rows, direction, reference=SEARCH, family=lambda r: r["allocation"] not in NOT_BASELINES)
    for other in (TWO_STAGE, SAME_WEIGHTS_16):
        for t in paired_table(rows, direction, reference=SEARCH, family=lambda r: r["allocation"] == other):
            tests.append({**t, "p_holm": t["p_value"], "better_holm": t["better"]})
    return tests


def write_headline(rows: Sequence[dict], direction: str, out: str | Path, *,
                   keep_other_cells: bool = True) -> list[Path]:
    """The table, its per-item values and its paired tests: `out`, `<out>_items.csv`, `<out>_paired.csv`.
    `keep_other_cells`: the cells (target × KV budget) of earlier files there that `rows` do not redo stay, before the
    new ones; a cell `rows` hold replaces its earlier rows (each cell's tests are their own Holm family)."""
    import pandas as pd

    from lmmlab.files import write_table

    out = Path(out)
    paths = [out, out.with_name(out.stem + "_items.csv"), out.with_name(out.stem + "_paired.csv")]
    cells = {(float(r["target_sparsity"]), float(r["kv_budget_bits"])) for r in rows}
    table = pd.DataFrame(list(rows)).drop(columns=["per_item"], errors="ignore")
    items = pd.DataFrame({f"{label(r)}{cell_suffix(r['target_sparsity'], r['kv_budget_bits'])}": r["per_item"]
                          for r in rows})
    tests = pd.DataFrame(headline_tests(rows, direction))
    if keep_other_cells:
        table, tests = (pd.concat([earlier_rows(path, cells), new]) for path, new in ((paths[0], table),
                                                                                       (paths[2], tests)))
        items = pd.concat([earlier_items(paths[1], cells), items], axis=1)
    for path, frame in zip(paths, (table, items, tests)):
        write_table(path, frame)
    return paths


def cell_suffix(target: float, budget: float) -> str:
    """How a cell ends the column names of `<out>_items.csv`."""
    return f"-s{target:g}-kv{budget:g}"


def earlier_rows(path: Path, cells: set[tuple[float, float]]):
    """The rows of an earlier table (or paired tests, or gaps) at `path` whose cell is not in `cells`."""
    import pandas as pd

    if not path.is_file():
        return pd.DataFrame()
    old = pd.read_csv(path)
    redone = [(float(t), float(b)) in cells for t, b in zip(old["target_sparsity"], old["kv_budget_bits"])]
    return old[[not r for r in redone]]


def earlier_items(path: Path, cells: set[tuple[float, float]]):
    """The columns of an earlier `<out>_items.csv` whose cell is not in `cells`."""
    import pandas as pd

    if not path.is_file():
        return pd.DataFrame()
    old = pd.read_csv(path)
    suffixes = tuple(cell_suffix(t, b) for t, b in cells)
    return old[[c for c in old.columns if not c.endswith(suffixes)]]


def stitching_gaps(study_rows: Sequence[dict]) -> list[dict]:
    """Each database's stitching gap from a staged search's final candidates (`StagedResult.candidates`): a plan
    stitched from a database against the same plan solved sequentially at its own ratios, on validation —
    the first stage's database (on the best base's inputs: "tpe" vs "tpe-sequential") and the last round's
    re-based one (on the round's starting plan: its plan vs "sequential")."""
    by_name = {c["name"]: c for c in study_rows}
    rounds = sorted(n for n in by_name if n.startswith("evolution"))
    pairs = [("first (best base's inputs)", "tpe", "tpe-sequential")]
    if rounds:
        pairs.append((f"re-based ({rounds[-1]}: its start's inputs)", rounds[-1], "sequential"))
    out = []
    for kind, stitched, sequential in pairs:
        if stitched in by_name and sequential in by_name:
            a, b = by_name[stitched]["validation"], by_name[sequential]["validation"]
            out.append({"database": kind, "stitched": a, "sequential": b, "gap_pct": 100 * (a / b - 1)})
    return out


@torch.no_grad()
def dense_input_gap(loaded: Loaded, task: Task, pruner: Pruner, plan: CompressionPlan, grid: Sequence[float], *,
                    n: int | None = None, progress: bool = False) -> dict:
    """The gap of a database on the dense model's inputs (EvoPress's): `plan` (on `grid`) stitched from a dense-input
    database of `grid` against the same plan solved sequentially, on validation. The database is removed after."""
    database = pruner.attach_database(levels=grid, progress=progress)
    try:
        pruner.apply(plan)
        stitched = task.evaluate(loaded, split="validation", n=n, with_loss=False).primary
        pruner.apply(plan, sequential=True)
        sequential = task.evaluate(loaded, split="validation", n=n, with_loss=False).primary
    finally:
        pruner.restore()
        pruner.database = None
        shutil.rmtree(database.path, ignore_errors=True)
    return {"database": "dense inputs (EvoPress)", "stitched": stitched, "sequential": sequential,
            "gap_pct": 100 * (stitched / sequential - 1), "build_seconds": database.manifest.get("build_seconds")}


def cell_gaps(loaded: Loaded, task: Task, pruner: Pruner, config: SearchConfig, *, sparsities: Sequence[float],
              kv_budgets: Sequence[float], storage: str, study_prefix: str, dense_gap_at: Sequence[float] = (),
              n_eval: int | None = None, progress: bool = False) -> list[dict]:
    """Every headline cell's stitching gaps (`stitching_gaps` of its study's final candidates), and at `dense_gap_at`
    (16-bit cells) the gap of a database on the dense model's inputs for that cell's first-stage plan."""
    import optuna

    from lmmlab.search.staged import first_grid
    from lmmlab.search.storage import storage_for

    rows = []
    for target in sparsities:
        for budget in kv_budgets:
            name = f"{study_prefix}-{task.name}-s{target:g}-kv{budget:g}"
            final = optuna.load_study(study_name=name, storage=storage_for(storage)).user_attrs.get("final")
            if not final:
                continue
            cell = {"target_sparsity": target, "kv_budget_bits": budget}
            rows += [{**cell, **gap} for gap in stitching_gaps(final["candidates"])]
            if target in dense_gap_at and budget >= 16:
                tpe = next(c for c in final["candidates"] if c["name"] == "tpe")
                grid = first_grid(target, config.grid_step)
                rows.append({**cell, **dense_input_gap(loaded, task, pruner, CompressionPlan(**tpe["plan"]), grid,
                                                      n=n_eval, progress=progress)})
    return rows


def run(loaded: Loaded, task: Task, pruner: Pruner, out: str | Path, *, config: SearchConfig = SearchConfig(),
        sparsities: Sequence[float] = (0.5, 0.6, 0.7), kv_budgets: Sequence[float] = (16, 3),
        dense_gap_at: Sequence[float] = (0.7,), storage: str = "sqlite:///results/studies.db",
        study_prefix: str = "headline", keep_other_cells: bool = True, progress: bool = False,
        **options) -> tuple[list[dict], list[Path]]:
    """`lmmlab headline`: the rows (`headline`, resumable through a checkpoint beside `out`), written with their
    items and paired tests (`write_headline`), and the stitching gaps (`<model>_stitching_gap.csv`); with
    `keep_other_cells`, the cells of earlier files that this run does not redo stay in them."""
    import pandas as pd

    from lmmlab.files import write_table

    out = Path(out)
    checkpoint = out.with_name(out.stem + ".partial.json")
    rows = headline(loaded, task, sparsities=sparsities, kv_budgets=kv_budgets, config=config, storage=storage,
                    study_prefix=study_prefix, pruner=pruner, checkpoint=checkpoint, progress=progress, **options)
    paths = write_headline(rows, task.direction, out, keep_other_cells=keep_other_cells)
    gaps = pd.DataFrame(cell_gaps(loaded, task, pruner, config, sparsities=sparsities, kv_budgets=kv_budgets,
                                  storage=storage, study_prefix=study_prefix, dense_gap_at=dense_gap_at,
                                  n_eval=config.n_eval, progress=progress))
    paths.append(out.with_name(out.stem.replace("_headline", "") + "_stitching_gap.csv"))
    if keep_other_cells:
        cells = {(float(t), float(b)) for t in sparsities for b in kv_budgets}
        gaps = pd.concat([earlier_rows(paths[-1], cells), gaps])
    if len(gaps):
        write_table(paths[-1], gaps)
    else:
        paths.pop()
    checkpoint.unlink(missing_ok=True)
    return rows, paths
