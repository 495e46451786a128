"""`lmmlab` subcommands: each parses its options, calls one library function and prints what it returns. User
mistakes become one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
import logging
import sys
import time
from pathlib import Path

from lmmlab.files import write_json, write_table

RESULTS = Path("results")
TABLES, FIGURES = RESULTS / "tables", RESULTS / "figures"


# --- shared steps -----------------------------------------------------------------------------------------------

def show_progress(args) -> bool:
    """Progress bars on stderr (redrawn on a terminal, a line every 30 s in a log), unless --quiet."""
    return not args.quiet


def task_of(args):
    """The task the command scores on, checked before any model loads: --task, --data, --task-option."""
    from lmmlab.lab.session import build_task, parse_options

    return build_task(args.model, args.task, args.data, parse_options(args.task_option))


def model_of(args, task=None):
    """The model of --model/--dtype/--device, checked against the task; with --compressed its pruned linears held
    compressed in memory (`models.sparse_linear`)."""
    from lmmlab.lab.session import load_checked

    loaded = load_checked(args.model, task, dtype=args.dtype, device=args.device)
    if getattr(args, "compressed", False):
        from lmmlab.models.sparse_linear import compress_linears

        compress_linears(loaded)
    return loaded


def pruner_of(args, loaded, task, n: int | None = None):
    from lmmlab.lab.session import calibrated_pruner

    return calibrated_pruner(loaded, task, calibration_task=args.calibration_task, n=n, seed=getattr(args, "seed", 0))


def staged_config(args, **overrides):
    """The staged search's config from the command line (`search.staged.SearchConfig`), checked."""
    from lmmlab.kv.pairs import parse_pairs
    from lmmlab.search.evolution import parse_selection
    from lmmlab.search.staged import SearchConfig

    config = SearchConfig(
        target_sparsity=args.target_sparsity, kv_budget=args.kv_budget,
        kv_pairs=parse_pairs(args.kv_pairs) if args.kv_pairs else (), kv_clusters=args.kv_clusters,
        method=args.method or "sparsegpt", granularity=args.granularity,
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()), sampler=args.sampler,
        bases=tuple(args.bases), tpe_trials=args.n_trials or SearchConfig().tpe_trials,
        fitness_tokens=args.fitness_tokens, generations=tuple(args.generations), offspring=args.offspring,
        selection=parse_selection(args.selection), count_levels=args.count_levels, database_inputs=args.first_inputs,
        fitness_rows=args.fitness_rows, top_k=args.top_k, n_eval=args.n_eval, kv_group_size=args.kv_group_size,
        kv_residual=args.kv_residual, seed=args.seed)
    config = replace(config, **overrides)
    config.check()
    return config


def demo_config(args):
    """The demo's config from the command line (`lab.demo.DemoConfig`; the parser's defaults are its defaults)."""
    from lmmlab.lab.demo import DemoConfig

    return DemoConfig(sparsities=tuple(args.sparsities), kv_budgets=tuple(args.kv_budgets), n=args.n,
                      n_calibration=args.n_calibration, search=staged_config(args))


def per_layer_config(args, **overrides):
    """The per-layer search's config from the command line (`search.per_layer.PerLayerConfig`)."""
    from lmmlab.search.per_layer import PerLayerConfig

    return PerLayerConfig(
        target_sparsity=args.target_sparsity, kv_budget_bits=args.kv_budget, n_trials=args.n_trials or 100,
        objective=args.objective, multi_objective=args.multi_objective, method=args.method or "wanda",
        cost_model=getattr(args, "cost_model", None),
        kv_widths=tuple(args.kv_widths), spread=args.spread, groups=args.groups, kv_group_size=args.kv_group_size,
        kv_residual=args.kv_residual, n_eval=args.n_eval, context_tokens=args.context_tokens, seed=args.seed,
        kv_budget_unit=args.kv_budget_unit, sampler=args.sampler, multi_fidelity=args.multi_fidelity,
        separate_kv=args.separate_kv, warm_allocations=tuple(args.warm_starts), **overrides)


def attach_database(args, pruner) -> None:
    """With --database-levels or --database, give the pruner its SparseGPT layer database (built once, reused);
    --database-inputs LEVEL solves each layer on the uniform plan's pruned inputs at that level."""
    from lmmlab.plan import CompressionPlan
    from lmmlab.prune.database import DEFAULT_LEVELS, parse_levels

    if args.database_levels is None and args.database is None:
        return
    inputs = args.database_inputs
    reference = None if inputs == "dense" else CompressionPlan.uniform(pruner.loaded.num_layers, float(inputs),
                                                                       method="sparsegpt")
    pruner.attach_database(levels=parse_levels(args.database_levels or DEFAULT_LEVELS), path=args.database,
                           reference=reference, progress=show_progress(args))


def check_database_options(args, method: str) -> None:
    """Bad level grids and database inputs fail before any model loads; SparseGPT stitched needs a database."""
    from lmmlab.prune.database import parse_levels

    levels = parse_levels(args.database_levels) if args.database_levels is not None else None
    if args.database_inputs != "dense":
        try:
            level = float(args.database_inputs)
        except ValueError:
            level = None
        if level is None or (levels is not None and all(abs(level - g) > 1e-9 for g in levels)):
            raise ValueError(f"--database-inputs {args.database_inputs!r}: give 'dense' or a level of the grid")
    if method == "sparsegpt" and args.database_levels is None and args.database is None:
        raise ValueError("searching sparsegpt needs a layer database: pass --database-levels (e.g. 0.3:0.9:0.05) or "
                         "--database PATH")


def print_table(rows, columns: list[str], metric: str) -> None:
    import pandas as pd

    print(pd.DataFrame(rows)[columns].rename(columns={"primary": metric}).round(4).to_string(index=False))


# --- commands ---------------------------------------------------------------------------------------------------

def cmd_demo(args) -> None:
    from lmmlab.lab import demo

    start = time.perf_counter()
    task = task_of(args)
    loaded = model_of(args, task)
    config = demo_config(args)
    report = demo.run(loaded, task, pruner_of(args, loaded, task, n=config.n_calibration), config,
                      storage=args.storage, tag=args.tag, results=RESULTS, progress=show_progress(args))
    print(report.text)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


def cmd_train_default(args) -> None:
    from lmmlab import models

    start = time.perf_counter()
    if args.if_stale:
        if args.out is not None:
            raise ValueError("--if-stale looks at the cache ($LMMLAB_CACHE); it takes no --out")
        path = models.ensure_default()
        print(f"default model up to date at {path} ({time.perf_counter() - start:.0f} s)")
        return
    path = models.train_default(out=args.out)
    print(f"default model trained in {time.perf_counter() - start:.0f} s and saved to {path}")


def cmd_eval(args) -> None:
    from lmmlab.lab.evaluate import evaluate, format_metrics, widths_plan
    from lmmlab.kv.budget import check_kv_bits

    task = task_of(args)
    check_kv_bits(args.kv_bits)
    loaded = model_of(args, task)
    plan = widths_plan(loaded, args.kv_bits, kv_group_size=args.kv_group_size, kv_residual=args.kv_residual)
    metrics = evaluate(loaded, task, plan, split=args.split, n=args.n, progress=show_progress(args))
    kv = "" if set(plan.kv_bits) == {16} else f", KV bits {'-'.join(map(str, plan.kv_bits))}"
    print(format_metrics(f"{args.model} on {task.describe()}, {args.split} ({metrics.n} items{kv})", metrics))
    if args.json:
        write_json(args.json, {"model": args.model, "task": task.name, "split": args.split, **metrics.to_dict()})
        print(f"wrote {args.json}")


def cmd_prune(args) -> None:
    from lmmlab.plan import CompressionPlan, pattern_sparsity
    from lmmlab.prune.card import read_metrics
    from lmmlab.prune.export import check_out, check_plan, compress

    check_out(Path(args.out))
    target = pattern_sparsity(args.pattern, args.sparsity)
    if not 0 <= args.vision_sparsity < 1:
        raise ValueError(f"--vision-sparsity must be in [0, 1); got {args.vision_sparsity}")
    plan = CompressionPlan.load(args.plan) if args.plan else None
    metrics = read_metrics(args.metrics) if args.metrics else None
    task = task_of(args)
    loaded = model_of(args, task)
    if plan is not None:
        check_plan(loaded, plan)  # before calibrating
    pruner = pruner_of(args, loaded, task, n=args.n_calibration)
    plan = plan or pruner.plan(args.method, args.allocation, target, pattern=args.pattern,
                               vision_sparsity=args.vision_sparsity)
    s = compress(pruner, plan, args.out, fmt=args.format, allocation=None if args.plan else args.allocation,
                 metrics=metrics)
    mib = {fmt: s[f"weights_{fmt}_bytes"] / 2**20 for fmt in ("dense", "bitmask", "nonzeros")}
    layout = f" ({s['layout']}, {s['dense_linears']} linears left dense)" if s["format"] == "bitmask" else ""
    print(f"exported {s['format']}{layout} to {args.out}: {s['disk_bytes'] / 2**20:.2f} MiB of safetensors; weights "
          f"dense {mib['dense']:.2f} MiB, bitmask {mib['bitmask']:.2f} MiB, non-zeros only {mib['nonzeros']:.2f} MiB")
    print(f"pruned with {plan.method} ({plan.pattern}, mean sparsity {plan.mean_sparsity:.3f}); achieved "
          f"{s['achieved_sparsity']:.3f}; decoder linears keep {s['kept_bytes'] / 2**20:.2f} of "
          f"{s['dense_bytes'] / 2**20:.2f} MiB as non-zeros; saved to {args.out}")


def cmd_ablate_prune(args) -> None:
    from lmmlab.lab.ablate import ablate_prune

    task = task_of(args)
    loaded = model_of(args, task)
    rows = ablate_prune(loaded, task, methods=args.methods, sparsities=args.sparsities, allocations=args.allocations,
                        split=args.split, n=args.n, pruner=pruner_of(args, loaded, task),
                        sequential=not args.one_pass_baselines)
    write_table(args.out, rows)
    print_table(rows, ["method", "allocation", "pattern", "calibration", "target_sparsity", "achieved_sparsity",
                       "primary", "ci_low", "ci_high", "p_value", "verdict"], task.primary_metric)
    print(f"wrote {args.out}")


def cmd_ablate_calibration(args) -> None:
    from lmmlab.lab.ablate import ablate_calibration

    if "sparsegpt" in args.methods:
        check_database_options(args, "sparsegpt")
    task = task_of(args)
    loaded = model_of(args, task)
    pruner = pruner_of(args, loaded, task)
    attach_database(args, pruner)
    rows = ablate_calibration(loaded, task, methods=args.methods, sparsities=args.sparsities, split=args.split,
                              n=args.n, pruner=pruner)
    write_table(args.out, rows)
    print_table(rows, ["method", "target_sparsity", "calibration", "achieved_sparsity", "primary", "ci_low", "ci_high",
                       "versus", "p_value", "verdict"], task.primary_metric)
    print(f"wrote {args.out}")


def cmd_ablate_kv(args) -> None:
    from lmmlab.lab.ablate import ablate_kv

    task = task_of(args)
    loaded = model_of(args, task)
    rows = ablate_kv(loaded, task, widths=args.widths, mixed=not args.no_mixed, group_size=args.kv_group_size,
                     residual_length=args.kv_residual, split=args.split, n=args.n)
    write_table(args.out, rows)
    print_table(rows, ["kv_plan", "mean_kv_bits", "mean_kv_bits_effective", "kv_bytes", "kv_ratio", "primary",
                       "ci_low", "ci_high", "p_value", "verdict"], task.primary_metric)
    print(f"wrote {args.out}")


def cmd_search(args) -> None:
    if args.space == "staged" and not args.multi_objective:
        return cmd_staged_search(args)
    from lmmlab.search import per_layer
    from lmmlab.search.storage import check_heartbeat, check_storage, safe_url

    config = per_layer_config(args)
    check_heartbeat(args.heartbeat)
    config.check(task_of(args))
    check_database_options(args, config.method)
    check_storage(args.storage)  # a missing driver or an unreachable database: one line, before the model loads
    worker = args.worker or per_layer.default_worker()
    task = task_of(args)
    loaded = model_of(args, task)
    pruner = pruner_of(args, loaded, task)
    attach_database(args, pruner)
    result = per_layer.search(loaded, task, config, pruner=pruner, storage=args.storage, study_name=args.study_name,
                              worker=worker, heartbeat=args.heartbeat)
    paths = per_layer.write_results(result, args.out_dir)
    table = per_layer.trials_table(result.study)
    best = table.nlargest if task.direction == "maximize" else table.nsmallest
    shown = table[table.on_front] if args.multi_objective else best(5, "primary")
    print_table(shown, ["trial", "source", "primary", "loss", "mean_sparsity", "mean_kv_bits",
                        "mean_kv_bits_effective", "memory_bytes", "kv_bits"], task.primary_metric)
    print(f"study {result.study.study_name!r} in {safe_url(args.storage)}: {len(table)} finished trials "
          f"(worker {worker}, sampler seed {per_layer.worker_seed(args.seed, worker)})")
    plan = result.best_plan
    values = f", value bits {plan.value_bits}" if plan.value_bits else ""
    print(f"best plan: sparsity {[round(x, 3) for x in plan.sparsity]}, KV bits {plan.kv_bits}{values}")
    print("wrote " + " and ".join(map(str, paths)))


PER_LAYER_ONLY = ("objective", "spread", "groups", "worker", "heartbeat", "multi_fidelity", "separate_kv",
                  "warm_starts", "database_levels", "database", "database_inputs", "kv_widths")


def cmd_staged_search(args) -> None:
    from lmmlab.search.staged import StagedSearch, chosen_name, two_stage_search, write_results
    from lmmlab.search.storage import check_storage, safe_url

    if args.kv_budget_unit != "nominal":
        raise ValueError("the staged search counts nominal KV bits (keys and values apart); use --space per-layer for "
                         "effective-bit budgets")
    defaults = build_parser().parse_args(["search"])
    given = [name for name in PER_LAYER_ONLY if getattr(args, name) != getattr(defaults, name)]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is an option of the per-layer search; add --space per-layer "
                         "or drop it")
    config = staged_config(args)
    check_storage(args.storage)
    task = task_of(args)
    loaded = model_of(args, task)
    pruner = pruner_of(args, loaded, task)
    options = dict(pruner=pruner, storage=args.storage, study_name=args.study_name, progress=show_progress(args))
    if args.two_stage:
        first, result = two_stage_search(loaded, task, config, **options)
        paths = write_results(result, args.out_dir, [first.study, result.study])
    else:
        result = StagedSearch(loaded, task, config, **options).run()
        paths = write_results(result, args.out_dir)
    print(f"study {result.study.study_name!r} in {safe_url(args.storage)}; final candidates on validation:")
    print_table(result.candidates, ["name", "realize", "validation"], "validation")
    plan = result.best_plan
    print(f"chosen: {chosen_name(result)} ({result.realize}); mean sparsity {plan.mean_sparsity:.4f}, mean KV bits "
          f"{plan.mean_kv_bits:g} (keys {plan.mean_key_bits:g}, values {plan.mean_value_bits:g})")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items()))
    print("wrote " + ", ".join(map(str, paths)))


def cmd_database(args) -> None:
    from lmmlab.prune.allocate import ALLOCATIONS
    from lmmlab.prune.database import parse_levels, plan_on_levels, project_to_grid

    levels = parse_levels(args.levels)
    if args.out is not None and args.out.exists() and not (args.out / "manifest.json").is_file():
        raise ValueError(f"{args.out} exists and is not a layer database; remove it or choose another --out")
    if args.inputs != "dense" and args.inputs not in ALLOCATIONS:
        raise ValueError(f"unknown database inputs {args.inputs!r}; allowed: dense or an allocation "
                         f"({', '.join(ALLOCATIONS)}) at --target")
    if args.inputs != "dense":
        project_to_grid([args.target], levels, args.target)  # a target the grid cannot hold fails here
    task = task_of(args)
    loaded = model_of(args, task)
    pruner = pruner_of(args, loaded, task, n=args.n_calibration)
    reference = (None if args.inputs == "dense" else
                 plan_on_levels(loaded, pruner.allocation(args.inputs, args.target, "sparsegpt"), args.target, levels))
    database = pruner.attach_database(levels=levels, path=args.out, reference=reference, progress=show_progress(args))
    m = database.manifest
    print(f"layer database at {database.path}: {m['num_layers']} layers × {len(levels)} levels "
          f"({levels[0]:g}–{levels[-1]:g}), inputs {database.inputs}, {m.get('bytes', 0) / 2**20:.1f} MiB, "
          f"built in {m.get('build_seconds', float('nan')):.0f} s")


def cmd_lmms_eval(args) -> None:
    from lmmlab.lab.lmms_model import parse_data, run_lmms

    if args.json is not None and args.json.is_dir():
        raise ValueError(f"--json {args.json} is a folder; give a file name")
    results, plan = run_lmms(args.model, args.tasks, parse_data(args.tasks, args.data), plan=args.plan,
                             calibration_task=args.calibration_task, n_calibration=args.n_calibration,
                             dtype=args.dtype, device=args.device, limit=args.limit,
                             max_new_tokens=args.max_new_tokens, log_samples=args.json is not None)
    what = "dense" if plan is None else f"{plan.method} {plan.mean_sparsity:.2f}, KV bits {plan.mean_kv_bits:g}"
    for task in args.tasks:
        metrics = {k.split(",")[0]: v for k, v in results["results"][task].items()
                   if "," in k and "stderr" not in k and isinstance(v, float)}
        print(f"{args.model} ({what}) on lmms-eval {task} ({results['n-samples'][task]['effective']} documents): "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.json:
        write_json(args.json, {"model": args.model, "plan": None if plan is None else json.loads(plan.to_json()),
                               "results": results["results"],
                               "answers": {t: [{"doc_id": x["doc_id"], "target": str(x["target"]),
                                                "answer": x["filtered_resps"][0]} for x in samples]
                                           for t, samples in results.get("samples", {}).items()}})
        print(f"wrote {args.json}")


def cmd_dashboard(args) -> None:
    import optuna_dashboard

    from lmmlab.search.storage import safe_url, storage_for

    print(f"optuna-dashboard for {safe_url(args.storage)} on http://{args.host}:{args.port}/ (Ctrl-C stops it)",
          flush=True)
    optuna_dashboard.run_server(storage_for(args.storage), host=args.host, port=args.port)


def cmd_compare(args) -> None:
    from lmmlab.lab.compare import claims, compare, paired_table, write_comparison

    config = per_layer_config(args)
    check_database_options(args, config.method)
    task = task_of(args)
    config.check(task)
    loaded = model_of(args, task)
    pruner = pruner_of(args, loaded, task)
    attach_database(args, pruner)
    rows = compare(loaded, task, config, sparsities=args.sparsities, kv_budgets=args.kv_budgets, storage=args.storage,
                   study_prefix=args.study_prefix, n=args.n, pruner=pruner, sequential=not args.one_pass_baselines)
    paths = write_comparison(rows, task.direction, args.out)
    print(f"test {task.primary_metric} ({task.direction}):")
    print_table(rows, ["kv_budget_bits", "target_sparsity", "method", "allocation", "calibration", "achieved_sparsity",
                       "mean_kv_bits", "mean_kv_bits_effective", "primary", "ci_low", "ci_high", "versus", "p_value",
                       "verdict"], task.primary_metric)
    print("\n".join(claims(rows)))
    print("\nTPE vs each baseline on the same items (mean per-item difference, 95 % interval, paired p):")
    print_table(paired_table(rows, task.direction), ["target_sparsity", "kv_budget_bits", "baseline", "mean_diff",
                                                     "ci_low", "ci_high", "p_value", "p_holm", "better_holm"], "")
    print("wrote " + ", ".join(map(str, paths)))


def cmd_headline(args) -> None:
    from lmmlab.lab import headline
    from lmmlab.lab.ablate import label
    from lmmlab.lab.session import model_label
    from lmmlab.search.storage import check_storage

    config = staged_config(args)
    for budget in args.kv_budgets:
        replace(config, kv_budget=budget).check()
    baselines = [headline.parse_baseline(text) for text in args.baselines]
    check_storage(args.storage)
    task = task_of(args)
    loaded = model_of(args, task)
    rows, paths = headline.run(
        loaded, task, pruner_of(args, loaded, task), args.out or TABLES / f"{model_label(loaded)}_headline.csv",
        config=config, sparsities=args.sparsities, kv_budgets=args.kv_budgets, dense_gap_at=args.dense_gap_at,
        storage=args.storage, study_prefix=args.study_prefix, baselines=baselines, kv_baselines=args.kv_baselines,
        two_stage_at=args.two_stage_at, n=args.n, keep_databases=args.keep_databases,
        keep_other_cells=not args.drop_other_cells, progress=show_progress(args))
    print(f"test {task.primary_metric} ({task.direction}):")
    print_table([{**r, "plan": label(r)} for r in rows], ["kv_budget_bits", "target_sparsity", "plan",
                                                          "achieved_sparsity", "mean_kv_bits", "primary", "ci_low",
                                                          "ci_high", "versus", "p_value", "verdict"],
                task.primary_metric)
    print(f"\n{headline.SEARCH} vs each baseline on the same items (Holm over the baselines of a cell):")
    print_table(headline.headline_tests(rows, task.direction), ["target_sparsity", "kv_budget_bits", "baseline",
                                                                "mean_diff", "p_value", "p_holm", "better_holm"], "")
    print("wrote " + ", ".join(map(str, paths)))


def cmd_ablate_samplers(args) -> None:
    import pandas as pd

    from lmmlab.lab import sampler_ablation
    from lmmlab.lab.session import model_label

    bad = [s for s in args.samplers if s not in sampler_ablation.ABLATION_SAMPLERS]
    if bad:
        raise ValueError(f"unknown sampler {bad[0]!r}; allowed: {', '.join(sampler_ablation.ABLATION_SAMPLERS)}")
    if len(args.seeds) < 1 or args.evaluations < 1:
        raise ValueError("give at least one seed and one evaluation")
    config = staged_config(args)
    task = task_of(args)
    loaded = model_of(args, task)
    table, paths = sampler_ablation.run(
        loaded, task, pruner_of(args, loaded, task), args.out or TABLES / f"{model_label(loaded)}_ablate_samplers.csv",
        config=config, storage=args.storage, samplers=args.samplers, seeds=args.seeds, evaluations=args.evaluations,
        progress=show_progress(args))
    final = table.groupby(["sampler", "seed"]).best_so_far.last().groupby("sampler").agg(["median", "min", "max"])
    print(f"best KL fitness after {args.evaluations} evaluations, over seeds {args.seeds}:")
    print(pd.DataFrame(final).round(5).to_string())
    print("wrote " + " and ".join(map(str, paths)))


def cmd_report(args) -> None:
    from lmmlab.lab.report import write_report

    print("wrote " + ", ".join(map(str, write_report(args.results, args.readme))))


def cmd_bench_e2e(args) -> dict:
    """`bench e2e`: every input checked before anything is built; the rows written only when all are measured."""
    from lmmlab.lab.bench_e2e import QUICK, bench_e2e

    options = dict(steps=args.steps, repeats=args.repeats, prefill_tokens=args.prefill_tokens)
    if args.quick:
        options.update(QUICK)
    if args.rows is not None:  # fit the cost model on rows measured before
        if not args.rows.is_file():
            raise FileNotFoundError(f"--rows {args.rows}: no such file (a JSON written by `lmmlab bench e2e`)")
        result = json.loads(args.rows.read_text())
    else:
        shapes = (args.shape or "smollm2-135m,llava-1.5-7b").split(",")
        result = bench_e2e(shapes, contexts=tuple(args.contexts), plans=tuple(args.plans),
                           kv_bits=tuple(args.kv_widths), layers=args.layers, dtype=args.dtype, threads=args.threads,
                           kernel=args.kernel, fresh_process=not args.in_process, **options)
        args.json = args.json or TABLES / "bench_e2e.json"
    if args.fit_cost:
        from lmmlab.search.cost import fit_e2e

        model, result["cost_model"] = fit_e2e(result["rows"])
        model.save(args.cost_out or TABLES / "cost_model.json")
    return result


def cmd_bench(args) -> None:
    from lmmlab.lab import bench

    if args.what == "e2e":
        result = cmd_bench_e2e(args)
    elif args.what == "memory":
        from lmmlab.lab.bench_memory import bench_memory, check_shape

        args.shape = args.shape or "llava-1.5-7b"
        check_shape(args.shape, args.layers)  # before anything is built
        result = bench_memory(args.shape, layers=args.layers, dtype=args.dtype or "float16")
    else:
        if any(c < 1 for c in args.decode_contexts):
            raise ValueError(f"--decode-contexts must be positive token counts; got {args.decode_contexts}")
        task = task_of(args)
        result = bench.run(args.what, model_of(args, task), task, database_levels=args.database_levels,
                           decode_contexts=tuple(args.decode_contexts))
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


# --- options, declared once ---------------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser, default: str = "lmmlab-default") -> None:
    p.add_argument("--model", default=default,
                   help="lmmlab-default (the toy LLaVA), smollm2-135m, a saved folder or a hub id")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on GPU, else float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def add_compressed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compressed", action="store_true",
                   help="hold the model's pruned linears compressed in memory (bitmask + kept values; decode reads "
                        "them as they are); such a model cannot be pruned again")


def add_task_args(p: argparse.ArgumentParser) -> None:
    from lmmlab.tasks import task_names

    p.add_argument("--task", default=None, help=f"what the model is scored on: {', '.join(task_names())} (default: "
                                                 "shapes for lmmlab-default, text for any other model)")
    p.add_argument("--data", default=None, help="the task's data: a file or folder (text, parquet, JSONL), or a "
                                                "dataset name (default: the task's own offline data)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. seqlen=256 (repeatable)")
    p.add_argument("--calibration-task", default=None,
                   help="calibrate pruning scores on this task's default data instead (e.g. text for a LLaVA, as the "
                        "seed code calibrates on C4)")


def add_model_task_args(p: argparse.ArgumentParser, model: str = "lmmlab-default") -> None:
    add_model_args(p, model)
    add_task_args(p)


def add_split_args(p: argparse.ArgumentParser) -> None:
    from lmmlab.tasks import SPLITS

    p.add_argument("--split", default="test", choices=list(SPLITS))
    p.add_argument("--n", type=int, default=None, help="number of items (default: the task's size for the split)")


def add_kv_layout_args(p: argparse.ArgumentParser) -> None:
    from lmmlab.kv.budget import KIVI_GROUP_SIZE, KIVI_RESIDUAL

    p.add_argument("--kv-group-size", type=int, default=KIVI_GROUP_SIZE,
                   help=f"tokens per key group, channels per value group (default {KIVI_GROUP_SIZE}, KIVI's)")
    p.add_argument("--kv-residual", type=int, default=KIVI_RESIDUAL,
                   help=f"newest tokens kept in full precision, a multiple of the group size (default {KIVI_RESIDUAL})")


def add_budget_args(p: argparse.ArgumentParser) -> None:
    from lmmlab.kv.budget import KV_CONTEXT
    from lmmlab.search.per_layer import KV_UNITS

    p.add_argument("--kv-budget-unit", default="nominal", choices=list(KV_UNITS),
                   help="KV budgets count mean nominal widths, or effective bits per element stored at "
                        "--context-tokens (codes + fp16 scales and zero points + full-precision windows)")
    p.add_argument("--context-tokens", type=int, default=KV_CONTEXT,
                   help="context at which KV memory and effective bits are counted")


def add_baseline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--one-pass-baselines", action="store_true",
                   help="calibrate the Wanda/RIA baselines on one pass of the dense model (default: layer by layer on "
                        "the pruned layers' outputs, as their reference code does)")


def add_storage_args(p: argparse.ArgumentParser, prefix: str | None = None) -> None:
    from lmmlab.search.per_layer import DEFAULT_STORAGE

    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="Optuna storage URL: sqlite:///FILE, postgresql://USER:PASS@HOST:PORT/DB (pip install "
                        "'lmmlab[postgres]') or journal:///FILE (one host, no server); a study there is resumed")
    if prefix:
        p.add_argument("--study-prefix", default=prefix, help="studies are named <prefix>-<task>-... (resumed)")


def add_database_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-levels", default=None,
                   help="a SparseGPT layer database's grid (START:STOP:STEP or a comma list); built once, reused")
    p.add_argument("--database", type=Path, default=None,
                   help="the layer database's folder (default: under $LMMLAB_CACHE/databases)")
    p.add_argument("--database-inputs", default="dense",
                   help="what each layer is solved on: 'dense' (the dense model's inputs, EvoPress) or a grid level "
                        "(the uniform plan's pruned layers, as sequential SparseGPT)")


def add_staged_args(p: argparse.ArgumentParser, *, targets: bool = True) -> None:
    """The staged search's options (`search.staged.SearchConfig`; defaults from there). `targets=False`: no
    --target-sparsity / --kv-budget, for the commands that take lists of them (--sparsities, --kv-budgets)."""
    from lmmlab.plan import METHODS
    from lmmlab.search.samplers import SAMPLERS
    from lmmlab.search.staged import BASES, GRANULARITIES, INPUTS, STAGES, SearchConfig

    d = SearchConfig()
    if targets:
        p.add_argument("--target-sparsity", type=float, help="parameter-weighted mean sparsity, in [0, 1)")
        p.add_argument("--kv-budget", type=float, help="mean KV bits per layer at most this, keys and values apart")
    p.add_argument("--method", default=None, choices=METHODS,
                   help="staged: sparsegpt (default; stitched from level databases); per-layer: wanda (default)")
    p.add_argument("--n-trials", type=int, default=None,
                   help=f"trials the study should hold: staged, first-stage trials (default {d.tpe_trials}); "
                        "per-layer: 100")
    p.add_argument("--sampler", help=f"the (first stage's) sampler: {', '.join(SAMPLERS)}")
    p.add_argument("--stages", help=f"stages to run, in order: {', '.join(STAGES)}")
    p.add_argument("--granularity", help=f"evolution genes: {', '.join(GRANULARITIES)}")
    p.add_argument("--bases", nargs="+", help=f"first-stage base allocations and warm starts, from {', '.join(BASES)}")
    p.add_argument("--kv-pairs", default=None,
                   help="K >= V pairs a layer may take, e.g. KV8,K8V4,KV4,K4V2,KV2 (default: those, KV16 at budget 16)")
    p.add_argument("--kv-clusters", type=int, help="layer clusters by KV sensitivity")
    p.add_argument("--generations", type=int, nargs="+",
                   help="evolution generations per round (one round per number; each re-bases its database)")
    p.add_argument("--offspring", type=int, help="evolution mutants per generation")
    p.add_argument("--selection", help="multi-step selection, survivors:tokens per step")
    p.add_argument("--count-levels", type=int,
                   help="evolution databases: count levels on each side of the reference plan (EvoPress: 8)")
    p.add_argument("--first-inputs", choices=list(INPUTS),
                   help="the first stage's database: solved on the dense model's inputs, or on the best base's")
    p.add_argument("--fitness-rows", type=int, help="search windows (calibration split)")
    p.add_argument("--fitness-tokens", type=int, help="tokens per first-stage trial")
    p.add_argument("--top-k", type=int, help="dense next-token probabilities kept per position")
    p.add_argument("--n-eval", type=int, default=None, help="validation items per trial or final candidate")
    p.add_argument("--seed", type=int)
    p.set_defaults(**staged_defaults(d))
    add_kv_layout_args(p)


def staged_defaults(config) -> dict:
    """The defaults of `add_staged_args`'s options, from a `SearchConfig` (argparse dest -> value)."""
    return dict(target_sparsity=config.target_sparsity, kv_budget=config.kv_budget, sampler=config.sampler,
                stages=",".join(config.stages), granularity=config.granularity, bases=list(config.bases),
                kv_clusters=config.kv_clusters, generations=list(config.generations), offspring=config.offspring,
                selection=",".join(f"{s}:{t}" for s, t in config.selection), count_levels=config.count_levels,
                first_inputs=config.database_inputs, fitness_rows=config.fitness_rows,
                fitness_tokens=config.fitness_tokens, top_k=config.top_k, seed=config.seed)


def add_per_layer_args(p: argparse.ArgumentParser) -> None:
    """The per-layer search's own options (`search.per_layer.PerLayerConfig`)."""
    from lmmlab.kv.budget import KV_BITS
    from lmmlab.search.per_layer import WARM_ALLOCATIONS, WARM_CHOICES, PerLayerConfig
    from lmmlab.search.storage import HEARTBEAT_S

    d = PerLayerConfig()
    p.add_argument("--objective", default=None, help="the task's primary metric (default) or 'loss'")
    p.add_argument("--multi-objective", action="store_true",
                   help="primary metric vs memory (weights + KV at --context-tokens), the budgets searched too")
    p.add_argument("--cost-model", default=None,
                   help="with --multi-objective: minimise the decode seconds per token this cost model (written by "
                        "`lmmlab bench e2e --fit-cost`) predicts at --context-tokens instead of memory")
    p.add_argument("--kv-widths", type=int, nargs="+", default=list(KV_BITS), help="allowed KV widths")
    p.add_argument("--spread", type=float, default=d.spread, help="per-layer sparsity offsets within ± this")
    p.add_argument("--groups", type=int, default=None, help="bins of consecutive layers sharing one choice")
    p.add_argument("--multi-fidelity", action="store_true",
                   help="score each trial on 1/16 then 1/4 of the validation items first; successive halving stops "
                        "the hopeless ones")
    p.add_argument("--separate-kv", action="store_true", help="keys and values at their own widths per layer")
    p.add_argument("--warm-starts", nargs="+", default=list(WARM_ALLOCATIONS),
                   help=f"allocations enqueued as the first trials, from {', '.join(WARM_CHOICES)}")
    p.add_argument("--worker", default=None, help="this worker's name, recorded on its trials; with --seed it seeds "
                                                  "the sampler (default: hostname-pid)")
    p.add_argument("--heartbeat", type=int, default=HEARTBEAT_S,
                   help="seconds between a running trial's heartbeats; a trial that missed 3 is a killed worker's and "
                        "is run again (a study keeps its creator's)")
    add_budget_args(p)
    add_database_args(p)


def add_search_parser(sub) -> None:
    p = sub.add_parser("search", help="joint search over per-linear sparsity and per-layer KV widths: TPE over a "
                                      "low-dimensional space, then evolution per linear (resumable Optuna study)")
    add_model_task_args(p)
    p.add_argument("--space", default="staged", choices=["staged", "per-layer"],
                   help="staged (default): TPE + evolution with the KL fitness; per-layer: one Optuna study over "
                        "per-layer offsets and widths scored on validation (multi-objective, many workers)")
    add_staged_args(p)
    p.add_argument("--two-stage", action="store_true",
                   help="the ablation: weights searched at 16 bits first, then the KV pairs, at equal evaluations")
    add_per_layer_args(p)
    add_storage_args(p)
    p.add_argument("--study-name", default=None, help="default: derived from the model, method and budgets")
    p.add_argument("--out-dir", type=Path, default=TABLES, help="where the trials CSV and best plan go")
    p.set_defaults(func=cmd_search)


def add_headline_parser(sub) -> None:
    from lmmlab.lab.headline import BASELINES, KV_BASELINES

    p = sub.add_parser("headline", help="the staged search vs Wanda and SparseGPT under uniform, OWL, ATP, "
                                        "AlphaPruning and DLP (KV uniform and KVTuner-style), on test, paired and "
                                        "Holm-adjusted; <model>_headline.csv")
    add_model_task_args(p)
    add_staged_args(p, targets=False)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--kv-budgets", type=float, nargs="+", default=[16, 3],
                   help="mean nominal KV bits per layer, keys and values apart")
    p.add_argument("--baselines", nargs="+", default=[f"{m}-{a}" for m, a in BASELINES],
                   help="method-allocation pairs (default: wanda and sparsegpt × uniform owl atp alphapruning dlp)")
    p.add_argument("--kv-baselines", nargs="+", default=list(KV_BASELINES), choices=list(KV_BASELINES))
    p.add_argument("--two-stage-at", type=float, nargs="*", default=[0.7],
                   help="sparsities whose KV-limited cells also run the two-stage ablation")
    p.add_argument("--dense-gap-at", type=float, nargs="*", default=[0.7],
                   help="sparsities at which a dense-input database measures its stitching gap (KV 16)")
    add_storage_args(p, "headline")
    p.add_argument("--n", type=int, default=None, help="test items (default: the task's)")
    p.add_argument("--keep-databases", action="store_true", help="keep the level databases (GBs) after each target")
    p.add_argument("--out", type=Path, default=None, help="the table (default: results/tables/<model>_headline.csv)")
    p.add_argument("--drop-other-cells", action="store_true",
                   help="write only this run's cells (by default the cells of an earlier table at --out that this "
                        "run does not redo stay in it, and the redone ones are replaced)")
    p.set_defaults(func=cmd_headline)


def add_compare_parser(sub) -> None:
    from lmmlab.plan import METHODS
    from lmmlab.search.samplers import SAMPLERS

    p = sub.add_parser("compare", help="the per-layer search's plan vs uniform/OWL baselines at the same budgets, on "
                                       "test")
    add_model_task_args(p)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--kv-budgets", type=float, nargs="+", default=[16, 4])
    p.add_argument("--n-trials", type=int, default=100)
    p.add_argument("--method", default="wanda", choices=METHODS)
    p.add_argument("--sampler", default="tpe", help=f"Optuna sampler: {', '.join(SAMPLERS)}")
    p.add_argument("--target-sparsity", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--kv-budget", type=float, default=16.0, help=argparse.SUPPRESS)
    p.add_argument("--n-eval", type=int, default=None, help="validation items per trial (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    add_kv_layout_args(p)
    add_per_layer_args(p)
    add_baseline_args(p)
    add_storage_args(p, "compare")
    p.add_argument("--n", type=int, default=None, help="test items (default: the task's)")
    p.add_argument("--out", type=Path, default=TABLES / "compare.csv")
    p.set_defaults(func=cmd_compare)


def add_ablation_parsers(sub) -> None:
    from lmmlab.lab.ablate import KV_WIDTHS, SPARSITIES
    from lmmlab.plan import METHODS
    from lmmlab.prune.allocate import ALLOCATIONS

    p = sub.add_parser("ablate-prune", help="every method × sparsity × allocation (and 2:4, 4:8) on a split, as CSV")
    add_model_task_args(p)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--allocations", nargs="+", default=["uniform", "owl"], choices=list(ALLOCATIONS),
                   help="per-layer ratios (atp, dlp: their hyperparameter chosen on the validation split)")
    add_split_args(p)
    add_baseline_args(p)
    p.add_argument("--out", type=Path, default=TABLES / "ablate_prune.csv")
    p.set_defaults(func=cmd_ablate_prune)

    p = sub.add_parser("ablate-calibration",
                       help="Wanda/RIA calibrated layer by layer (as published) vs on one pass of the dense model")
    add_model_task_args(p)
    p.add_argument("--methods", nargs="+", default=["wanda", "ria"], choices=["wanda", "ria", "sparsegpt"],
                   help="sparsegpt: the layer database (dense-model inputs) against sequential SparseGPT")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    add_database_args(p)
    add_split_args(p)
    p.add_argument("--out", type=Path, default=TABLES / "ablate_calibration.csv")
    p.set_defaults(func=cmd_ablate_calibration)

    p = sub.add_parser("ablate-kv", help="accuracy and KV bytes of uniform and mixed per-layer KV widths as CSV")
    add_model_task_args(p)
    p.add_argument("--widths", nargs="+", type=int, default=list(KV_WIDTHS), help="uniform widths to run")
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed (early/late) per-layer plans")
    add_kv_layout_args(p)
    add_split_args(p)
    p.add_argument("--out", type=Path, default=TABLES / "ablate_kv.csv")
    p.set_defaults(func=cmd_ablate_kv)


def add_samplers_parser(sub) -> None:
    from lmmlab.lab.sampler_ablation import ABLATION_SAMPLERS

    p = sub.add_parser("ablate-samplers", help="the first stage's TPE vs TPE per layer, the evolution, random search "
                                               "and CMA-ES at equal evaluations of the KL fitness, over seeds")
    add_model_task_args(p, "smollm2-135m")
    add_staged_args(p)
    p.set_defaults(target_sparsity=0.7, kv_budget=3.0)
    p.add_argument("--samplers", nargs="+", default=list(ABLATION_SAMPLERS), help=f"from {', '.join(ABLATION_SAMPLERS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--evaluations", type=int, default=40, help="fitness evaluations per run, warm starts included")
    p.add_argument("--storage", default=None, help="Optuna storage (default: a sqlite file beside --out)")
    p.add_argument("--out", type=Path, default=None,
                   help="the table (default: results/tables/<model>_ablate_samplers.csv; the figure goes to "
                        "results/figures)")
    p.set_defaults(func=cmd_ablate_samplers)


def add_model_parsers(sub) -> None:
    from lmmlab.plan import METHODS
    from lmmlab.prune.allocate import ALLOCATIONS
    from lmmlab.prune.export import DEFAULT_EXPORT_FORMAT, EXPORT_FORMATS

    p = sub.add_parser("train-default", help="(re)build the embedded default model and save it to the cache")
    p.add_argument("--out", type=Path, default=None, help="folder to save to (default: the cache, $LMMLAB_CACHE)")
    p.add_argument("--if-stale", action="store_true", help="train only if the cache holds no model of today's recipe")
    p.set_defaults(func=cmd_train_default)

    p = sub.add_parser("eval", help="a task's metrics, loss, latency and memory of a model on a split")
    add_model_task_args(p)
    add_split_args(p)
    p.add_argument("--kv-bits", type=int, nargs="+", default=[16],
                   help="KV cache bits: one width for every layer or one per layer, from 2 3 4 6 8 16 (default 16)")
    add_kv_layout_args(p)
    p.add_argument("--json", type=Path, default=None, help="also write the metrics to this JSON file")
    add_compressed_arg(p)
    p.set_defaults(func=cmd_eval)

    for name in ("prune", "export"):
        p = sub.add_parser(name, help="prune a model (calibrating on the calibration split) and export it with its "
                           "plan and model card" if name == "prune" else "prune a model to a plan and export it")
        add_model_task_args(p)
        p.add_argument("--plan", type=Path, required=name == "export", default=None,
                       help="a CompressionPlan JSON (per-layer sparsity, KV widths; overrides the options below)")
        if name == "prune":
            p.add_argument("--method", default="wanda", choices=METHODS)
            p.add_argument("--sparsity", type=float, default=0.5, help="mean fraction of weights removed, in [0, 1)")
            p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4, 4:8")
            p.add_argument("--allocation", default="uniform", choices=list(ALLOCATIONS),
                           help="per-layer ratios (atp, dlp: their hyperparameter chosen on the validation split)")
            p.add_argument("--vision-sparsity", type=float, default=0.0,
                           help="also prune the vision tower's and projector's linears at this ratio")
        p.add_argument("--n-calibration", type=int, default=None, help="calibration items (default: the task's)")
        add_compressed_arg(p)
        p.add_argument("--format", choices=EXPORT_FORMATS, default=DEFAULT_EXPORT_FORMAT,
                       help="dense: a plain checkpoint with the zeros in place that stock transformers loads; bitmask: "
                            "non-zeros and a 1-bit mask, fewer bytes on disk, readable by lmmlab only "
                            f"(default {DEFAULT_EXPORT_FORMAT})")
        p.add_argument("--metrics", type=Path, default=None,
                       help="a JSON of the scores to put in the model card (e.g. what `lmmlab eval --json` wrote)")
        p.add_argument("--out", type=Path, required=True, help="new folder (must not exist or be empty)")
        p.set_defaults(func=cmd_prune, **({"method": "wanda", "sparsity": 0.5, "allocation": "uniform",
                                           "pattern": "unstructured", "vision_sparsity": 0.0} if name == "export"
                                          else {}))

    p = sub.add_parser("database", help="build (or check) a SparseGPT layer database: every decoder layer solved "
                                        "at a grid of levels, on the dense model's or a reference plan's inputs")
    add_model_task_args(p)
    from lmmlab.prune.database import DEFAULT_LEVELS

    p.add_argument("--levels", default=DEFAULT_LEVELS, help="the grid: START:STOP:STEP or a comma list")
    p.add_argument("--inputs", default="dense",
                   help="what each layer is solved on: dense (the dense model's inputs), or an allocation's pruned "
                        "layers at --target (uniform, atp, dlp, ...), projected onto the grid")
    p.add_argument("--target", type=float, default=0.7, help="the reference allocation's mean sparsity")
    p.add_argument("--out", type=Path, default=None, help="folder (default: under $LMMLAB_CACHE/databases)")
    p.add_argument("--n-calibration", type=int, default=None, help="calibration items (default: the task's)")
    p.set_defaults(func=cmd_database)


def add_demo_parser(sub) -> None:
    from lmmlab.lab.demo import STORAGE, DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="one model and task: dense, pruning, KV widths, the staged search vs baselines")
    add_model_task_args(p, "smollm2-135m")
    add_staged_args(p, targets=False)
    p.set_defaults(**staged_defaults(d.search), method=d.search.method, n_trials=d.search.tpe_trials,
                   n_eval=d.search.n_eval)
    p.add_argument("--sparsities", type=float, nargs="+", default=list(d.sparsities))
    p.add_argument("--kv-budgets", type=float, nargs="+", default=list(d.kv_budgets))
    p.add_argument("--tag", default=None, help="prefix of the tables and figures (default: demo-<model>-<task>)")
    p.add_argument("--n", type=int, default=d.n, help="test items")
    p.add_argument("--n-calibration", type=int, default=d.n_calibration,
                   help="calibration items (default %(default)s)")
    add_storage_args(p)
    p.set_defaults(func=cmd_demo, storage=STORAGE)


def add_other_parsers(sub) -> None:
    from lmmlab.search.per_layer import DEFAULT_STORAGE

    p = sub.add_parser("dashboard", help="optuna-dashboard on 127.0.0.1 for a study database")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="the Optuna storage URL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("lmms-eval", help="lmms-eval's own scienceqa_img / pope / textvqa_val over local parquet "
                       "files, the model pruned to --plan and decoding through its KV cache (needs `make lmms`)")
    add_model_args(p)
    p.add_argument("--tasks", nargs="+", required=True, help="lmms-eval task names: scienceqa_img pope textvqa_val")
    p.add_argument("--data", action="append", required=True, metavar="TASK=PATH",
                   help="each task's parquet file or lmms-lab folder (repeatable; a bare PATH for a single task)")
    p.add_argument("--plan", type=Path, default=None, help="a CompressionPlan JSON (sparsity and KV widths)")
    p.add_argument("--calibration-task", default=None, help="calibrate the plan's pruning on this task's data")
    p.add_argument("--n-calibration", type=int, default=None, help="calibration items (default: the task's)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's generation length")
    p.add_argument("--json", type=Path, default=None, help="also write the results and per-document samples here")
    p.set_defaults(func=cmd_lmms_eval)

    p = sub.add_parser("report", help="results/REPORT.md from results/tables (and the README's headline table)")
    p.add_argument("--results", type=Path, default=RESULTS, help="the results folder")
    p.add_argument("--readme", type=Path, default=Path("README.md"), help="the README whose headline table to update")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="benchmarks printed as JSON")
    p.add_argument("what", choices=["prune", "kv", "search", "memory", "e2e"], help="what to measure")
    add_model_task_args(p)
    p.add_argument("--shape", default=None,
                   help="memory: the widths to build at random: llava-1.5-7b (default), llava-1.5-13b or tiny; e2e: "
                        "a comma list of smollm2-135m (real weights), llava-1.5-7b, tiny (default: the first two)")
    p.add_argument("--layers", type=int, default=2,
                   help="memory, e2e: decoder layers built (measured at layers // 2 and layers, extrapolated to full depth)")
    p.add_argument("--database-levels", default=None,
                   help="search: also time trials that stitch SparseGPT levels from a layer database of this grid")
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 4096],
                   help="kv: contexts of the decode steps timed at LLaVA-1.5-7B's shapes")
    p.add_argument("--json", "--out", dest="json", type=Path, default=None,
                   help="also write the result to this JSON file (e2e: default results/tables/bench_e2e.json)")
    add_bench_e2e_args(p)
    p.set_defaults(func=cmd_bench)


def add_bench_e2e_args(p: argparse.ArgumentParser) -> None:
    from lmmlab.lab.bench_e2e import KV_WIDTHS, PLANS

    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], help="e2e: contexts decoded at")
    p.add_argument("--plans", nargs="+", default=list(PLANS), help="e2e: weight plans, of " + ", ".join(PLANS).replace("%", "%%"))
    p.add_argument("--kv-widths", type=int, nargs="+", default=list(KV_WIDTHS),
                   help="e2e: KV cache widths (16: the plain cache; others KIVI, read packed)")
    p.add_argument("--steps", type=int, default=8, help="e2e: greedy steps per timed group")
    p.add_argument("--repeats", type=int, default=3, help="e2e: timed groups (the median is reported; >= 3)")
    p.add_argument("--prefill-tokens", type=int, default=64, help="e2e: tokens of the one timed real prefill")
    p.add_argument("--threads", type=int, default=None, help="e2e: torch and kernel threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="e2e: 2 steps, 3 repeats, 8 prefill tokens (for tests)")
    p.add_argument("--in-process", action="store_true",
                   help="e2e: measure every layout in this process (quick; peak RSS then holds what ran before)")
    p.add_argument("--kernel", action="store_true",
                   help="e2e: also the sparse kernel vs the read bandwidth at LLaVA-1.5-7B's linear shapes")
    p.add_argument("--fit-cost", action="store_true",
                   help="e2e: fit the per-layer decode cost model (lmmlab.search.cost) on the rows, report its error "
                        "on held-out rows and write it to --cost-out")
    p.add_argument("--cost-out", type=Path, default=None, help="e2e: default results/tables/cost_model.json")
    p.add_argument("--rows", type=Path, default=None,
                   help="e2e: take the rows from this bench_e2e.json instead of measuring (with --fit-cost)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmmlab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (they go to stderr)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_demo_parser, add_model_parsers, add_ablation_parsers, add_search_parser, add_compare_parser,
                add_headline_parser, add_samplers_parser, add_other_parsers):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        import optuna
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from lmmlab import progress

    before = progress.ENABLED
    progress.enable(show_progress(args))
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"lmmlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        progress.enable(before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
