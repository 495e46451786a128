"""`lmmlab` subcommands: thin wrappers over the library. User mistakes become one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from lmmlab.files import write_json, write_table, write_text_atomic

RESULTS = Path("results")


def format_metrics(title: str, metrics) -> str:
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


def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE from --task-option, the value as int, float or string."""
    if "=" not in text:
        raise ValueError(f"--task-option {text!r} is not KEY=VALUE (e.g. seqlen=256)")
    key, value = text.split("=", 1)
    for convert in (int, float):
        try:
            return key.strip(), convert(value)
        except ValueError:
            pass
    return key.strip(), value


def show_progress(args) -> bool:
    """Progress bars on stderr: on a terminal, unless --quiet."""
    return not args.quiet and sys.stderr.isatty()


def task_from_args(args):
    """The task the command scores on (checked before any model is loaded): --task, --data, --task-option."""
    from lmmlab.lab.session import default_task
    from lmmlab.tasks import get_task

    options = dict(parse_option(o) for o in getattr(args, "task_option", None) or [])
    return get_task(args.task or default_task(args.model), data=args.data, **options)


def calibrated_pruner(args, loaded, task, n: int | None = None, seed: int = 0):
    """Calibration on --calibration-task (e.g. text windows for a LLaVA, as the seed code calibrates on C4), else on
    the task itself."""
    from lmmlab.prune.pruner import Pruner
    from lmmlab.tasks import get_task

    name = getattr(args, "calibration_task", None)
    source = get_task(name) if name and name != task.name else task
    source.check_model(loaded)
    return Pruner.for_task(loaded, source, n=n, seed=seed)


def search_options(args) -> dict:
    """The search's sampler, multi-fidelity, separate K/V widths and warm starts from the command line."""
    return {"sampler": args.sampler, "multi_fidelity": args.multi_fidelity, "separate_kv": args.separate_kv,
            "warm_allocations": tuple(args.warm_starts)}


def attach_database(args, pruner, method: str) -> None:
    """With --database-levels (or --database), give the pruner its SparseGPT layer database (built once, then
    reused); a SparseGPT search needs one."""
    from lmmlab.prune.database import parse_levels

    if args.database_levels is None and args.database is None:
        if method == "sparsegpt":
            raise ValueError("searching sparsegpt needs a layer database: pass --database-levels (e.g. 0.3:0.9:0.05) "
                             "or --database PATH")
        return
    from lmmlab.plan import CompressionPlan

    levels = parse_levels(args.database_levels or "0.3:0.9:0.05")
    inputs = getattr(args, "database_inputs", "dense")
    reference = None if inputs == "dense" else CompressionPlan.uniform(pruner.loaded.num_layers, float(inputs),
                                                                       method="sparsegpt")
    pruner.attach_database(levels=levels, path=args.database, reference=reference, progress=show_progress(args))


def check_search_options(args) -> None:
    """Bad sampler names and level grids fail before any model loads."""
    from lmmlab.prune.database import parse_levels
    from lmmlab.search.per_layer import WARM_CHOICES, check_sampler

    check_sampler(args.sampler, multi_objective=getattr(args, "multi_objective", False))
    levels = parse_levels(args.database_levels) if args.database_levels is not None else None
    if args.database_inputs != "dense":
        try:
            level = float(args.database_inputs)
        except ValueError:
            level = None
        if level is None or (levels is not None and all(abs(level - g) > 1e-9 for g in levels)):
            raise ValueError(f"--database-inputs {args.database_inputs!r}: give 'dense' or a level of the grid")
    bad = [a for a in args.warm_starts if a not in WARM_CHOICES]
    if bad:
        raise ValueError(f"unknown warm start {bad[0]!r}; allowed: {', '.join(WARM_CHOICES)}")


def load(args, task=None):
    """The model of --model/--dtype/--device, checked against the task."""
    from lmmlab.models import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    if task is not None:
        task.check_model(loaded)
    return loaded


def cmd_train_default(args) -> None:
    from lmmlab import models

    start = time.perf_counter()
    path = models.train_default(out=args.out)
    print(f"default model trained in {time.perf_counter() - start:.0f} s and saved to {path}")


def cmd_eval(args) -> None:
    from lmmlab.kv.cache import kv_cache_for
    from lmmlab.plan import CompressionPlan
    from lmmlab.kv.budget import check_kv_bits

    task = task_from_args(args)
    check_kv_bits(args.kv_bits)
    loaded = load(args, task)
    bits = args.kv_bits * loaded.num_layers if len(args.kv_bits) == 1 else args.kv_bits
    if len(bits) != loaded.num_layers:
        raise ValueError(f"--kv-bits has {len(bits)} widths; give one for every layer or one per decoder layer "
                         f"({loaded.num_layers})")
    plan = CompressionPlan([0.0] * loaded.num_layers, bits, kv_group_size=args.kv_group_size,
                           kv_residual=args.kv_residual)
    make_cache = (lambda: kv_cache_for(plan, loaded)) if set(bits) != {16} else None
    if make_cache is not None:
        kv_cache_for(plan, loaded)  # reject a bad layout before evaluating
    metrics = task.evaluate(loaded, split=args.split, n=args.n, make_cache=make_cache, progress=True)
    kv = "" if make_cache is None else f", KV bits {'-'.join(map(str, bits))}"
    print(format_metrics(f"{args.model} on {task.describe()}, {args.split} ({metrics.n} items{kv})", metrics))
    if args.json:
        write_json(args.json, {"model": args.model, "task": task.name, "split": args.split, **metrics.to_dict()})
        print(f"wrote {args.json}")


def cmd_demo(args) -> None:
    """The story on one model and task: dense -> pruning methods × allocations -> KV widths -> the TPE joint plan
    against the baselines at the same budgets, final numbers on the test split."""
    import pandas as pd

    from lmmlab.lab import ablate
    from lmmlab.lab import plots
    from lmmlab.lab.compare import compare

    start = time.perf_counter()
    task = task_from_args(args)
    loaded = load(args, task)
    layout = {"kv_group_size": args.kv_group_size, "kv_residual": args.kv_residual}
    tag = args.tag or f"demo-{Path(args.model).name}-{task.name}"
    tables, figures = RESULTS / "tables", RESULTS / "figures"
    print(f"{args.model}: {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f} M parameters, "
          f"{loaded.num_layers} decoder layers, {loaded.num_kv_heads} KV heads × {loaded.head_dim}; "
          f"task: {task.describe()}")

    dense = task.evaluate(loaded, split="test", n=args.n, progress=True)
    print(format_metrics(f"\ndense model on the test split ({dense.n} items)", dense))
    write_json(tables / f"{tag}_dense.json", dense.to_dict())

    print(f"\npruning the decoder's linears (one calibration pass; input norms cached) — test {task.primary_metric}:")
    pruner = calibrated_pruner(args, loaded, task)
    prune_rows = ablate.ablate_prune(loaded, task, sparsities=args.sparsities, patterns=("2:4",), n=args.n,
                                     pruner=pruner, sequential=not args.one_pass_baselines)
    prune = pd.DataFrame(prune_rows)
    write_table(tables / f"{tag}_prune.csv", prune_rows)
    runs = prune[prune.allocation != "dense"]
    wide = runs.assign(run=runs.allocation + " " + runs.pattern).pivot_table(
        index=["run", "target_sparsity"], columns="method", values="primary", sort=False)
    print(wide.round(3).to_string())
    print(f"(dense {dense.primary:.3f})")

    print(f"\nKV cache at uniform widths (KIVI layout, groups of {args.kv_group_size}, "
          f"{args.kv_residual}-token window) — test {task.primary_metric}:")
    kv_rows = ablate.ablate_kv(loaded, task, mixed=False, group_size=args.kv_group_size,
                               residual_length=args.kv_residual, n=args.n)
    kv = pd.DataFrame(kv_rows)
    write_table(tables / f"{tag}_kv.csv", kv_rows)
    print(kv[["kv_plan", "mean_kv_bits_effective", "kv_bytes", "kv_ratio", "primary", "ci_low", "ci_high",
              "p_value", "verdict"]].rename(
        columns={"primary": task.primary_metric, "kv_bytes": "kv_bytes_per_item"}).round(4).to_string(index=False))

    print(f"\nTPE joint plan ({args.trials} trials each on validation, study in {args.storage}) vs the baselines "
          f"at the same budgets — test {task.primary_metric}:")
    versus = compare(loaded, task, sparsities=args.sparsities, kv_budgets=args.kv_budgets, n_trials=args.trials,
                     storage=args.storage, study_prefix=f"demo-{Path(args.model).name}", pruner=pruner, n=args.n,
                     n_eval=args.n_eval, sequential=not args.one_pass_baselines,
                     kv_budget_unit=args.kv_budget_unit, kv_context=args.context_tokens, **layout)
    print_comparison(versus, task, tables / f"{tag}_compare.csv")

    paths = [plots.save(plots.ablation_figure(prune, dense.primary), f"{tag}_prune", figures),
             plots.save(plots.kv_figure(kv), f"{tag}_kv", figures)]
    print("wrote " + ", ".join(map(str, paths)) + f" and {tables}/{tag}_*.csv")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


def cmd_prune(args) -> None:
    from lmmlab import models
    from lmmlab.prune.export import check_out
    from lmmlab.plan import CompressionPlan, parse_pattern
    from lmmlab.prune.scores import sparsity_of

    out = Path(args.out)
    check_out(out)
    nm = parse_pattern(args.pattern)
    sparsity = 1 - nm[0] / nm[1] if nm else args.sparsity  # N:M fixes the ratio
    if not 0 <= sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1); got {sparsity}")
    if not 0 <= args.vision_sparsity < 1:
        raise ValueError(f"--vision-sparsity must be in [0, 1); got {args.vision_sparsity}")
    if nm and args.allocation != "uniform" and not args.plan:
        raise ValueError(f"--allocation {args.allocation} needs an unstructured pattern: N:M fixes every layer's ratio")
    plan = CompressionPlan.load(args.plan) if args.plan else None
    task = task_from_args(args)
    loaded = load(args, task)
    if plan is None:
        plan = CompressionPlan([sparsity] * loaded.num_layers, method=args.method, pattern=args.pattern,
                               vision_sparsity=args.vision_sparsity)
    plan.check_layers(loaded.num_layers)
    pruner = calibrated_pruner(args, loaded, task, n=args.n_calibration)
    if plan.vision_sparsity and not pruner.has_vision_stats:
        raise ValueError(f"vision sparsity (--vision-sparsity, or the plan's vision_sparsity) needs a task with images; "
                         f"{task.name!r} calibrates the language model only")
    if args.allocation != "uniform" and not args.plan:
        plan = dataclasses.replace(plan, sparsity=pruner.allocation(args.allocation, sparsity))
    pruner.apply(plan)
    if args.export:
        print_export(loaded, plan, out)
    else:
        models.save_atomic(loaded.model, loaded.processor, out,
                           extra={"compression_plan.json": json.loads(plan.to_json())})
    per_layer = [sum(lin.weight.numel() for lin in loaded.linears(i).values()) for i in range(loaded.num_layers)]
    summary = plan.weight_summary(per_layer, loaded.model.dtype.itemsize)
    print(f"pruned with {plan.method} ({plan.pattern}, mean sparsity {plan.mean_sparsity:.3f}); "
          f"achieved {sparsity_of(loaded):.3f}; decoder linears keep {summary['kept_bytes'] / 2**20:.2f} of "
          f"{summary['dense_bytes'] / 2**20:.2f} MiB as non-zeros; saved to {out}")


def print_export(loaded, plan, out: Path) -> None:
    """Export the pruned model to `out` and print its format and bytes."""
    from lmmlab.prune.export import FORMATS, disk_bytes, export, weight_format_bytes

    config = export(loaded, plan, out)
    mib = {fmt: weight_format_bytes(loaded, fmt, pattern=plan.pattern) / 2**20 for fmt in FORMATS}
    print(f"exported {config['format']} ({config['sparsity_structure']}, {len(config['ignore'])} linears left dense) "
          f"to {out}: {disk_bytes(out) / 2**20:.2f} MiB of safetensors; weights dense {mib['dense']:.2f} MiB, "
          f"bitmask {mib['bitmask']:.2f} MiB, non-zeros only {mib['nonzeros']:.2f} MiB")


def cmd_ablate_prune(args) -> None:
    import pandas as pd

    from lmmlab.lab import ablate

    task = task_from_args(args)
    loaded = load(args, task)
    rows = ablate.ablate_prune(loaded, task, methods=args.methods, sparsities=args.sparsities,
                               allocations=args.allocations, split=args.split,
                               n=args.n, pruner=calibrated_pruner(args, loaded, task),
                               sequential=not args.one_pass_baselines)
    table = pd.DataFrame(rows)
    write_table(args.out, rows)
    print(table[["method", "allocation", "pattern", "calibration", "target_sparsity", "achieved_sparsity", "primary",
                 "ci_low", "ci_high", "p_value", "verdict"]]
          .rename(columns={"primary": task.primary_metric}).to_string(index=False))
    print(f"wrote {args.out}")


def cmd_ablate_calibration(args) -> None:
    import pandas as pd

    from lmmlab.lab import ablate

    task = task_from_args(args)
    loaded = load(args, task)
    pruner = calibrated_pruner(args, loaded, task)
    if args.database_levels or args.database:
        attach_database(args, pruner, "sparsegpt")
    elif "sparsegpt" in args.methods:
        raise ValueError("sparsegpt is one-pass only when stitched from a layer database: pass --database-levels")
    rows = ablate.ablate_calibration(loaded, task, methods=args.methods, sparsities=args.sparsities,
                                     split=args.split, n=args.n, pruner=pruner)
    write_table(args.out, rows)
    print(pd.DataFrame(rows)[["method", "target_sparsity", "calibration", "achieved_sparsity", "primary", "ci_low",
                              "ci_high", "versus", "p_value", "verdict"]]
          .rename(columns={"primary": task.primary_metric}).round(4).to_string(index=False))
    print(f"wrote {args.out}")


def cmd_ablate_kv(args) -> None:
    import pandas as pd

    from lmmlab.lab import ablate

    task = task_from_args(args)
    loaded = load(args, task)
    rows = ablate.ablate_kv(loaded, task, widths=args.widths, mixed=not args.no_mixed, group_size=args.kv_group_size,
                            residual_length=args.kv_residual, split=args.split, n=args.n)
    table = pd.DataFrame(rows)
    write_table(args.out, rows)
    print(table[["kv_plan", "mean_kv_bits", "mean_kv_bits_effective", "kv_bytes", "kv_ratio", "primary",
                 "ci_low", "ci_high", "p_value", "verdict"]]
          .rename(columns={"primary": task.primary_metric}).to_string(index=False))
    print(f"wrote {args.out}")


def cmd_search(args) -> None:
    if args.space == "staged" and not args.multi_objective:
        return cmd_staged_search(args)
    from lmmlab.search import per_layer as tpe
    from lmmlab.search.storage import check_heartbeat, check_storage, safe_url

    args.method = args.method or "wanda"
    args.n_trials = args.n_trials or 100
    check_heartbeat(args.heartbeat)
    check_search_options(args)
    check_storage(args.storage)  # a missing driver or an unreachable database: one line, before the model loads
    worker = args.worker or tpe.default_worker()
    task = task_from_args(args)
    loaded = load(args, task)
    pruner = calibrated_pruner(args, loaded, task, seed=args.seed)
    attach_database(args, pruner, args.method)
    result = tpe.search(loaded, task, target_sparsity=args.target_sparsity, kv_budget_bits=args.kv_budget,
                        n_trials=args.n_trials, storage=args.storage, study_name=args.study_name,
                        objective=args.objective, multi_objective=args.multi_objective, method=args.method,
                        kv_widths=tuple(args.kv_widths), spread=args.spread, groups=args.groups,
                        kv_group_size=args.kv_group_size, kv_residual=args.kv_residual, n_eval=args.n_eval,
                        context_tokens=args.context_tokens, seed=args.seed, worker=worker, heartbeat=args.heartbeat,
                        kv_budget_unit=args.kv_budget_unit, pruner=pruner, **search_options(args))
    name = result.study.study_name
    table = tpe.trials_table(result.study)
    trials_csv, plan_json = args.out_dir / f"{name}_trials.csv", args.out_dir / f"{name}_best_plan.json"
    write_text_atomic(trials_csv, table.to_csv(index=False))
    result.best_plan.save(plan_json)
    shown = ["trial", "source", "primary", "loss", "mean_sparsity", "mean_kv_bits", "mean_kv_bits_effective",
             "memory_bytes", "kv_bits"]
    best = table.nlargest if task.direction == "maximize" else table.nsmallest
    rows = table[table.on_front] if args.multi_objective else best(5, "primary")
    print(rows[shown].rename(columns={"primary": task.primary_metric}).to_string(index=False))
    print(f"study {name!r} in {safe_url(args.storage)}: {len(table)} finished trials "
          f"(worker {worker}, sampler seed {tpe.worker_seed(args.seed, worker)})")
    plan = result.best_plan
    values = f", value bits {plan.value_bits}" if plan.value_bits else ""
    print(f"best plan: sparsity {[round(x, 3) for x in plan.sparsity]}, KV bits {plan.kv_bits}{values}")
    print(f"wrote {trials_csv} and {plan_json}")


def cmd_staged_search(args) -> None:
    """The staged search (`staged`): its trials, best plan and final candidates."""
    import pandas as pd

    from lmmlab.search.staged import StagedSearch, staged_trials_table, two_stage_search
    from lmmlab.search.storage import check_storage, safe_url

    if args.kv_budget_unit != "nominal":
        raise ValueError("the staged search counts nominal KV bits (keys and values apart); use --space per-layer for "
                         "effective-bit budgets")
    defaults = build_parser().parse_args(["search"])  # to see which per-layer options were given
    per_layer = ("objective", "spread", "groups", "worker", "heartbeat", "multi_fidelity", "separate_kv",
                 "warm_starts", "database_levels", "database", "database_inputs", "kv_widths")
    given = [name for name in per_layer if getattr(args, name) != getattr(defaults, name)]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is an option of the per-layer search; add --space per-layer "
                         "or drop it")
    config = staged_config(args)
    check_storage(args.storage)
    task = task_from_args(args)
    loaded = load(args, task)
    pruner = calibrated_pruner(args, loaded, task, seed=args.seed)
    if args.two_stage:
        first, result = two_stage_search(loaded, task, config, pruner=pruner, storage=args.storage,
                                         study_name=args.study_name, progress=show_progress(args))
        studies = [first.study, result.study]
    else:
        result = StagedSearch(loaded, task, config, pruner=pruner, storage=args.storage, study_name=args.study_name,
                              progress=show_progress(args)).run()
        studies = [result.study]
    name = result.study.study_name
    table = pd.concat([staged_trials_table(study) for study in studies], ignore_index=True)
    trials_csv, plan_json = args.out_dir / f"{name}_trials.csv", args.out_dir / f"{name}_best_plan.json"
    final_csv = args.out_dir / f"{name}_final.csv"
    write_text_atomic(trials_csv, table.to_csv(index=False))
    write_table(final_csv, [{k: v for k, v in c.items() if k != "plan"} for c in result.candidates])
    result.best_plan.save(plan_json)
    counts = table.groupby("stage").size().to_dict() if len(table) else {}
    print(f"study {name!r} in {safe_url(args.storage)}: " + ", ".join(f"{n} {stage} trials" for stage, n in
                                                                    counts.items()))
    print(pd.DataFrame(result.candidates)[["name", "realize", "validation"]]
          .rename(columns={"validation": f"validation {task.primary_metric}"}).to_string(index=False))
    plan = result.best_plan
    print(f"chosen: {result.candidates[[c['plan'] for c in result.candidates].index(json.loads(plan.to_json()))]['name']}"
          f" ({result.realize}); mean sparsity {plan.mean_sparsity:.4f}, mean KV bits {plan.mean_kv_bits:g} "
          f"(keys {plan.mean_key_bits:g}, values {plan.mean_value_bits:g})")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items()))
    print(f"wrote {trials_csv}, {final_csv} and {plan_json}")


def cmd_database(args) -> None:
    from lmmlab.prune.database import parse_levels

    levels = parse_levels(args.levels)
    if args.out is not None and args.out.exists() and not (args.out / "manifest.json").is_file():
        raise ValueError(f"{args.out} exists and is not a layer database; remove it or choose another --out")
    from lmmlab.prune.allocate import ALLOCATIONS
    from lmmlab.prune.database import project_to_grid

    if args.inputs != "dense" and args.inputs not in ALLOCATIONS:
        raise ValueError(f"unknown database inputs {args.inputs!r}; allowed: dense or an allocation "
                         f"({', '.join(ALLOCATIONS)}) at --target")
    if args.inputs != "dense":
        project_to_grid([args.target], levels, args.target)  # a target the grid cannot hold fails here
    task = task_from_args(args)
    loaded = load(args, task)
    pruner = calibrated_pruner(args, loaded, task, n=args.n_calibration)
    reference = None
    if args.inputs != "dense":
        from lmmlab.prune.database import layer_numel
        from lmmlab.plan import CompressionPlan

        numel = layer_numel(loaded)
        per_layer = pruner.allocation(args.inputs, args.target, "sparsegpt")
        flat = [per_layer[i] for i, layer in enumerate(numel) for _ in layer]
        projected, _ = project_to_grid(flat, levels, args.target, [float(n) for layer in numel for n in layer.values()])
        it = iter(projected)
        reference = CompressionPlan.per_module([{n: next(it) for n in layer} for layer in numel], numel,
                                               method="sparsegpt")
    database = pruner.attach_database(levels=levels, path=args.out, reference=reference, progress=show_progress(args))
    m = database.manifest
    print(f"layer database at {database.path}: {m['num_layers']} layers × {len(levels)} levels "
          f"({levels[0]:g}–{levels[-1]:g}), inputs {database.inputs}, {m.get('bytes', 0) / 2**20:.1f} MiB, "
          f"built in {m.get('build_seconds', float('nan')):.0f} s")


def cmd_ablate_samplers(args) -> None:
    import pandas as pd

    from lmmlab.lab import plots
    from lmmlab.lab.sampler_ablation import ABLATION_SAMPLERS, sampler_ablation
    from lmmlab.search.samplers import summarise

    bad = [s for s in args.samplers if s not in ABLATION_SAMPLERS]
    if bad:
        raise ValueError(f"unknown sampler {bad[0]!r}; allowed: {', '.join(ABLATION_SAMPLERS)}")
    if len(args.seeds) < 1 or args.evaluations < 1:
        raise ValueError("give at least one seed and one evaluation")
    config = staged_config(args)
    task = task_from_args(args)
    loaded = load(args, task)
    out = args.out or RESULTS / "tables" / f"{model_label(loaded)}_ablate_samplers.csv"
    storage = args.storage or f"sqlite:///{out.with_suffix('.db')}"
    pruner = calibrated_pruner(args, loaded, task, seed=args.seed)
    table = sampler_ablation(loaded, task, config=config, samplers=args.samplers, seeds=args.seeds,
                             evaluations=args.evaluations, pruner=pruner, storage=storage,
                             progress=show_progress(args))
    write_text_atomic(out, table.to_csv(index=False))
    figure = plots.save(plots.sampler_ablation_figure(summarise(table), "minimize", objective="KL fitness"),
                        out.stem, out.parent.parent / "figures")
    final = table.groupby(["sampler", "seed"]).best_so_far.last().groupby("sampler").agg(["median", "min", "max"])
    print(f"best KL fitness after {args.evaluations} evaluations, over seeds {args.seeds}:")
    print(pd.DataFrame(final).round(5).to_string())
    print(f"wrote {out} and {figure}")


def cmd_dashboard(args) -> None:
    import optuna_dashboard

    from lmmlab.search.storage import safe_url, storage_for

    print(f"optuna-dashboard for {safe_url(args.storage)} on http://{args.host}:{args.port}/ (Ctrl-C stops it)",
          flush=True)
    optuna_dashboard.run_server(storage_for(args.storage), host=args.host, port=args.port)


def cmd_headline(args) -> None:
    from dataclasses import replace

    import pandas as pd

    from lmmlab.lab.headline import SEARCH, headline, headline_tests, write_headline

    config = staged_config(args)
    for budget in args.kv_budgets:
        replace(config, kv_budget=budget).check()
    baselines = []
    for text in args.baselines:
        method, _, allocation = text.partition("-")
        from lmmlab.prune.allocate import ALLOCATIONS
        from lmmlab.plan import METHODS

        if method not in METHODS or allocation not in ALLOCATIONS:
            raise ValueError(f"bad baseline {text!r}; give method-allocation, method from {', '.join(METHODS)}, "
                             f"allocation from {', '.join(ALLOCATIONS)}")
        baselines.append((method, allocation))
    from lmmlab.search.storage import check_storage

    check_storage(args.storage)
    task = task_from_args(args)
    loaded = load(args, task)
    out = args.out or RESULTS / "tables" / f"{model_label(loaded)}_headline.csv"
    pruner = calibrated_pruner(args, loaded, task, seed=args.seed)
    checkpoint = out.with_name(out.stem + ".partial.json")
    rows = headline(loaded, task, sparsities=args.sparsities, kv_budgets=args.kv_budgets, config=config,
                    baselines=baselines, kv_baselines=args.kv_baselines, two_stage_at=args.two_stage_at,
                    storage=args.storage, study_prefix=args.study_prefix, n=args.n, pruner=pruner,
                    keep_databases=args.keep_databases, checkpoint=checkpoint, progress=show_progress(args))
    paths = write_headline(rows, task.direction, out)
    gaps = headline_gaps(args, loaded, task, pruner, config)
    if gaps:
        gap_csv = out.with_name(out.stem.replace("_headline", "") + "_stitching_gap.csv")
        write_table(gap_csv, gaps)
        paths.append(gap_csv)
    checkpoint.unlink(missing_ok=True)
    table = pd.DataFrame(rows)
    from lmmlab.lab.ablate import label

    table["plan"] = [label(r) for r in rows]
    shown = ["kv_budget_bits", "target_sparsity", "plan", "achieved_sparsity", "mean_kv_bits", "primary", "ci_low",
             "ci_high", "versus", "p_value", "verdict"]
    print(f"test {task.primary_metric} ({task.direction}):")
    print(table[shown].rename(columns={"primary": task.primary_metric}).round(4).to_string(index=False))
    tests = pd.DataFrame(headline_tests(rows, task.direction))
    print(f"\n{SEARCH} vs each baseline on the same items (Holm over the baselines of a cell):")
    print(tests.round(4).to_string(index=False))
    print("wrote " + ", ".join(map(str, paths)))


def headline_gaps(args, loaded, task, pruner, config) -> list[dict]:
    """Every headline cell's stitching gaps (from its study's final candidates), and at --dense-gap-at the gap of a
    database on the dense model's inputs for that cell's first-stage plan."""
    import optuna

    from dataclasses import replace

    from lmmlab.lab.headline import dense_input_gap, stitching_gaps
    from lmmlab.search.staged import first_grid
    from lmmlab.search.storage import storage_for

    rows = []
    for target in args.sparsities:
        for budget in args.kv_budgets:
            name = f"{args.study_prefix}-{task.name}-s{target:g}-kv{budget:g}"
            final = optuna.load_study(study_name=name, storage=storage_for(args.storage)).user_attrs.get("final")
            if not final:
                continue
            cell = {"target_sparsity": target, "kv_budget_bits": budget}
            rows += [{**cell, **gap} for gap in stitching_gaps(final["candidates"])]
            if target in args.dense_gap_at and budget >= 16:
                from lmmlab.plan import CompressionPlan

                tpe = next(c for c in final["candidates"] if c["name"] == "tpe")
                grid = first_grid(target, replace(config, target_sparsity=target).grid_step)
                rows.append({**cell, **dense_input_gap(loaded, task, pruner, CompressionPlan(**tpe["plan"]), grid,
                                                      n=args.n_eval, progress=show_progress(args))})
    return rows


def cmd_compare(args) -> None:
    from lmmlab.lab.compare import BASELINES, compare

    check_search_options(args)
    baselines = BASELINES
    task = task_from_args(args)
    loaded = load(args, task)
    pruner = calibrated_pruner(args, loaded, task, seed=args.seed)
    attach_database(args, pruner, args.method)
    rows = compare(loaded, task, sparsities=args.sparsities, kv_budgets=args.kv_budgets, n_trials=args.n_trials,
                   method=args.method, storage=args.storage, study_prefix=args.study_prefix,
                   kv_group_size=args.kv_group_size,
                   kv_residual=args.kv_residual, n=args.n, n_eval=args.n_eval, seed=args.seed,
                   pruner=pruner, sequential=not args.one_pass_baselines, kv_budget_unit=args.kv_budget_unit,
                   kv_context=args.context_tokens, baselines=baselines, **search_options(args))
    print(f"test {task.primary_metric} ({task.direction}):")
    print_comparison(rows, task, args.out)


def model_label(loaded) -> str:
    """A short name for file names: smollm2 for SmolLM2-135M, lmmlab-default for the toy, else the folder name."""
    name = Path(loaded.name).name
    return "smollm2" if name.startswith("smollm2") else name


def print_comparison(rows: list[dict], task, out: Path) -> None:
    """Write a comparison's table (with each row's interval and its paired test against the strongest baseline), its
    per-item values and its pairwise tests (TPE vs each baseline); print them."""
    import pandas as pd

    from lmmlab.lab.compare import claims, paired_table

    table = pd.DataFrame(rows)
    items = pd.DataFrame({f"{r['method']}-{r['allocation']}-s{r['target_sparsity']:g}-kv{r['kv_budget_bits']:g}":
                          r["per_item"] for r in rows})
    tests = pd.DataFrame(paired_table(rows, task.direction))
    out = Path(out)
    write_table(out, rows)
    write_text_atomic(out.with_name(out.stem + "_items.csv"), items.to_csv(index=False))
    write_text_atomic(out.with_name(out.stem + "_paired.csv"), tests.to_csv(index=False))
    shown = ["kv_budget_bits", "target_sparsity", "method", "allocation", "calibration", "achieved_sparsity",
             "mean_kv_bits", "mean_kv_bits_effective", "primary", "ci_low", "ci_high", "versus", "p_value", "verdict"]
    print(table[shown].rename(columns={"primary": task.primary_metric}).round(4).to_string(index=False))
    print("(ci: 95 % interval; p_value: paired test against the strongest baseline at the same budget on the same "
          "items — exact McNemar for accuracy, paired bootstrap otherwise; a win is claimed only at p < 0.05)")
    print("\n".join(claims(rows)))
    print("\nTPE vs each baseline on the same items (mean per-item difference, 95 % bootstrap interval, paired p):")
    print(tests.round(4).to_string(index=False))
    print(f"wrote {out} and its _items.csv / _paired.csv")


def cmd_bench(args) -> None:
    from lmmlab.lab.bench import bench_kv, bench_prune, bench_search

    if args.what == "memory":
        from lmmlab.lab.bench_memory import bench_memory, check_shape

        check_shape(args.shape, args.layers)  # before anything is built
        result = bench_memory(args.shape, layers=args.layers, dtype=args.dtype or "float16")
    else:
        task = task_from_args(args)
        loaded = load(args, task)
        if args.what == "kv":
            if any(c < 1 for c in args.decode_contexts):
                raise ValueError(f"--decode-contexts must be positive token counts; got {args.decode_contexts}")
            result = bench_kv(loaded, decode_contexts=tuple(args.decode_contexts))
        elif args.what == "search":
            database = None
            if args.database_levels:
                from lmmlab.prune.pruner import Pruner
                from lmmlab.prune.database import parse_levels

                database = Pruner.for_task(loaded, task).attach_database(levels=parse_levels(args.database_levels))
                database.dense = None  # the bench's own pruner gives the dense weights
            result = bench_search(loaded, task, database=database)
        else:
            result = bench_prune(loaded, task)
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lmmlab-default",
                   help="lmmlab-default (the toy LLaVA), smollm2-135m, a saved folder or a hub id")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on GPU, else float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def add_task_args(p: argparse.ArgumentParser) -> None:
    from lmmlab.tasks import task_names

    p.add_argument("--task", default=None,
                   help=f"what the model is scored on: {', '.join(task_names())} (default: shapes for "
                        "lmmlab-default, text for any other model)")
    p.add_argument("--data", default=None, help="the task's data: a file or folder (text, parquet, JSONL), or a "
                                                "dataset name (default: the task's own offline data)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. seqlen=256 (repeatable)")
    p.add_argument("--calibration-task", default=None,
                   help="calibrate pruning scores on this task's default data instead (e.g. text for a LLaVA, as the "
                        "seed code calibrates on C4)")


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


def add_search_power_args(p: argparse.ArgumentParser, headline: bool = False) -> None:
    """The search's sampler, multi-fidelity trials, separate K/V widths, warm starts and SparseGPT layer database."""
    from lmmlab.search.samplers import SAMPLERS
    from lmmlab.search.per_layer import WARM_ALLOCATIONS, WARM_CHOICES

    p.add_argument("--sampler", default="tpe", help=f"Optuna sampler: {', '.join(SAMPLERS)} (default tpe)")
    p.add_argument("--multi-fidelity", action="store_true",
                   help="score each trial on 1/16 then 1/4 of the validation items first; a successive-halving "
                        "pruner stops the hopeless ones")
    p.add_argument("--separate-kv", action="store_true", default=headline,
                   help="keys and values at their own widths per layer (budget on their combined mean)")
    p.add_argument("--warm-starts", nargs="+", default=list(WARM_CHOICES if headline else WARM_ALLOCATIONS),
                   help=f"allocations enqueued as the first trials, from {', '.join(WARM_CHOICES)}")
    p.add_argument("--database-levels", default="0.3:0.9:0.05" if headline else None,
                   help="a SparseGPT layer database's grid (START:STOP:STEP or a comma list); built once, reused")
    p.add_argument("--database", type=Path, default=None,
                   help="the layer database's folder (default: under $LMMLAB_CACHE/databases)")
    p.add_argument("--database-inputs", default="dense",
                   help="what each layer is solved on: 'dense' (the dense model's inputs, EvoPress) or a grid level "
                        "(the uniform plan's pruned layers, as sequential SparseGPT)")


def add_staged_args(p: argparse.ArgumentParser) -> None:
    """The staged search's options (`staged.SearchConfig`; defaults from there)."""
    from lmmlab.search.staged import BASES, GRANULARITIES, INPUTS, STAGES, SearchConfig

    d = SearchConfig()
    p.add_argument("--stages", default=",".join(d.stages), help=f"stages to run, in order: {', '.join(STAGES)}")
    p.add_argument("--granularity", default=d.granularity, help=f"evolution genes: {', '.join(GRANULARITIES)}")
    p.add_argument("--bases", nargs="+", default=list(d.bases),
                   help=f"first-stage base allocations and warm starts, from {', '.join(BASES)}")
    p.add_argument("--kv-pairs", default=None,
                   help="K >= V pairs a layer may take, e.g. KV8,K8V4,KV4,K4V2,KV2 (default: those, KV16 too at budget 16)")
    p.add_argument("--kv-clusters", type=int, default=d.kv_clusters, help="layer clusters by KV sensitivity")
    p.add_argument("--generations", type=int, nargs="+", default=list(d.generations),
                   help="evolution generations per round (one round per number; each re-bases its database)")
    p.add_argument("--offspring", type=int, default=d.offspring, help="evolution mutants per generation")
    p.add_argument("--selection", default=",".join(f"{s}:{t}" for s, t in d.selection),
                   help="multi-step selection, survivors:tokens per step")
    p.add_argument("--count-levels", type=int, default=d.count_levels,
                   help="evolution databases: count levels on each side of the reference plan (EvoPress: 8)")
    p.add_argument("--first-inputs", default=d.database_inputs, choices=list(INPUTS),
                   help="the first stage's database: solved on the dense model's inputs, or on the best base's")
    p.add_argument("--fitness-rows", type=int, default=d.fitness_rows, help="search windows (calibration split)")
    p.add_argument("--fitness-tokens", type=int, default=d.fitness_tokens, help="tokens per first-stage trial")
    p.add_argument("--top-k", type=int, default=d.top_k, help="dense next-token probabilities kept per position")
    p.add_argument("--two-stage", action="store_true",
                   help="the ablation: weights searched at 16 bits first, then the KV pairs, at equal evaluations")


def staged_config(args):
    """The staged search's config from the command line, checked (before any model loads)."""
    from lmmlab.search.evolution import parse_selection
    from lmmlab.kv.pairs import parse_pairs
    from lmmlab.search.staged import SearchConfig

    config = SearchConfig(
        target_sparsity=args.target_sparsity, kv_budget=args.kv_budget,
        kv_pairs=parse_pairs(args.kv_pairs) if args.kv_pairs else (), kv_clusters=args.kv_clusters,
        method=args.method or "sparsegpt", granularity=args.granularity,
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()), sampler=args.sampler,
        bases=tuple(args.bases), tpe_trials=args.n_trials or SearchConfig().tpe_trials,
        fitness_tokens=args.fitness_tokens, generations=tuple(args.generations), offspring=args.offspring,
        selection=parse_selection(args.selection), count_levels=args.count_levels,
        database_inputs=args.first_inputs, fitness_rows=args.fitness_rows, top_k=args.top_k, n_eval=args.n_eval,
        kv_group_size=args.kv_group_size, kv_residual=args.kv_residual, seed=args.seed)
    config.check()
    return config


def add_budget_args(p: argparse.ArgumentParser, search: bool = False) -> None:
    """How a KV budget is counted, and (comparisons) how the baselines calibrate."""
    p.add_argument("--kv-budget-unit", default="nominal", choices=["nominal", "effective"],
                   help="KV budgets count mean nominal widths, or effective bits per element stored at "
                        "--context-tokens (codes + fp16 scales and zero points + full-precision windows; 16 bits as "
                        "fp16)")
    p.add_argument("--context-tokens", type=int, default=1024,
                   help="context at which KV memory and effective bits are counted")
    if not search:
        p.add_argument("--one-pass-baselines", action="store_true",
                       help="calibrate the Wanda/RIA baselines on one pass of the dense model (default: layer by "
                            "layer on the pruned layers' outputs, as their reference code does)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmmlab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (they go to stderr, shown on "
                                                                  "a terminal only)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="one model and task: dense, pruning, KV widths, TPE joint plans vs baselines")
    add_model_args(p)
    add_task_args(p)
    add_kv_layout_args(p)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--kv-budgets", type=float, nargs="+", default=[16, 4])
    p.add_argument("--trials", type=int, default=20, help="TPE trials per budget")
    p.add_argument("--tag", default=None, help="prefix of the tables and figures (default: demo-<model>-<task>)")
    p.add_argument("--n", type=int, default=None, help="test items (default: the task's)")
    p.add_argument("--n-eval", type=int, default=None, help="validation items per trial (default: the task's)")
    p.add_argument("--storage", default="sqlite:///results/studies.db", help="Optuna storage for the demo's studies")
    add_budget_args(p)
    p.set_defaults(model="smollm2-135m")  # the real-model story; --model lmmlab-default tells it on the toy LLaVA
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-default", help="(re)build the embedded default model and save it to the cache")
    p.add_argument("--out", type=Path, default=None, help="folder to save to (default: the cache, $LMMLAB_CACHE)")
    p.set_defaults(func=cmd_train_default)

    p = sub.add_parser("eval", help="a task's metrics, loss, latency and memory of a model on a split")
    add_model_args(p)
    add_task_args(p)
    add_split_args(p)
    p.add_argument("--kv-bits", type=int, nargs="+", default=[16],
                   help="KV cache bits: one width for every layer or one per layer, from 2 3 4 6 8 16 (default 16)")
    add_kv_layout_args(p)
    p.add_argument("--json", type=Path, default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_eval)

    from lmmlab.prune.allocate import ALLOCATIONS
    from lmmlab.plan import METHODS
    from lmmlab.lab.ablate import SPARSITIES
    from lmmlab.plan import METHODS as PLAN_METHODS

    p = sub.add_parser("prune", help="prune a model (calibrating on the calibration split) and save it with its plan")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--method", default="wanda", choices=PLAN_METHODS)
    p.add_argument("--sparsity", type=float, default=0.5, help="mean fraction of weights removed, in [0, 1)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4, 4:8")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "owl", "atp", "alphapruning"],
                   help="per-layer ratios (atp: its slope searched on the validation split)")
    p.add_argument("--vision-sparsity", type=float, default=0.0,
                   help="also prune the vision tower's and projector's linears at this ratio (default: leave dense)")
    p.add_argument("--plan", type=Path, default=None, help="a CompressionPlan JSON (overrides the five above)")
    p.add_argument("--n-calibration", type=int, default=None, help="calibration items (default: the task's)")
    p.add_argument("--out", type=Path, required=True, help="new folder for the pruned model (save_pretrained)")
    p.add_argument("--export", action="store_true",
                   help="write a compressed-tensors checkpoint (sparse-bitmask; sparse-24-bitmask for 2:4) instead")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", help="prune a model to a plan and write it as a compressed-tensors checkpoint")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--plan", type=Path, required=True, help="a CompressionPlan JSON (per-layer sparsity, KV widths)")
    p.add_argument("--n-calibration", type=int, default=None, help="calibration items (default: the task's)")
    p.add_argument("--out", type=Path, required=True, help="new folder for the checkpoint (must not exist or be empty)")
    # `prune --plan PLAN --export`: the prune-only options at their defaults, which a plan overrides anyway
    p.set_defaults(func=cmd_prune, export=True, method="wanda", sparsity=0.5, pattern="unstructured",
                   allocation="uniform", vision_sparsity=0.0)

    p = sub.add_parser("ablate-prune", help="accuracy of every method x sparsity x allocation (and 2:4, 4:8) as CSV")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--allocations", nargs="+", default=["uniform", "owl"], choices=list(ALLOCATIONS),
                   help="per-layer ratios (atp: its slope searched on the validation split)")
    add_split_args(p)
    p.add_argument("--one-pass-baselines", action="store_true",
                   help="calibrate Wanda/RIA on one pass of the dense model (default: layer by layer, as published)")
    p.add_argument("--out", type=Path, default=RESULTS / "tables" / "ablate_prune.csv")
    p.set_defaults(func=cmd_ablate_prune)

    p = sub.add_parser("ablate-calibration",
                       help="Wanda/RIA calibrated layer by layer (as published) vs on one pass of the dense model")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--methods", nargs="+", default=["wanda", "ria"], choices=["wanda", "ria", "sparsegpt"],
                   help="sparsegpt: the layer database (dense-model inputs) against sequential SparseGPT")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    p.add_argument("--database-levels", default=None, help="sparsegpt: the layer database's grid")
    p.add_argument("--database", type=Path, default=None, help="sparsegpt: the layer database's folder")
    add_split_args(p)
    p.add_argument("--out", type=Path, default=RESULTS / "tables" / "ablate_calibration.csv")
    p.set_defaults(func=cmd_ablate_calibration)

    from lmmlab.lab.ablate import KV_WIDTHS

    p = sub.add_parser("ablate-kv", help="accuracy and KV bytes of uniform and mixed per-layer KV widths as CSV")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--widths", nargs="+", type=int, default=list(KV_WIDTHS), help="uniform widths to run")
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed (early/late) per-layer plans")
    add_kv_layout_args(p)
    add_split_args(p)
    p.add_argument("--out", type=Path, default=RESULTS / "tables" / "ablate_kv.csv")
    p.set_defaults(func=cmd_ablate_kv)

    from lmmlab.search.per_layer import DEFAULT_STORAGE
    from lmmlab.search.storage import HEARTBEAT_S

    storage_help = ("Optuna storage URL: sqlite:///FILE, postgresql://USER:PASS@HOST:PORT/DB (pip install "
                    "'lmmlab[postgres]') or journal:///FILE (one host, no server)")

    p = sub.add_parser("search", help="joint search over per-linear sparsity and per-layer KV widths: TPE over a "
                                      "low-dimensional space, then evolution per linear (resumable Optuna study)")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--space", default="staged", choices=["staged", "per-layer"],
                   help="staged (default): TPE + evolution with the KL fitness; per-layer: one Optuna study over "
                        "per-layer offsets and widths scored on validation (multi-objective, many workers)")
    p.add_argument("--target-sparsity", type=float, default=0.5, help="parameter-weighted mean sparsity, in [0, 1)")
    p.add_argument("--kv-budget", type=float, default=16.0,
                   help="mean KV bits per layer at most this (nominal, or effective: --kv-budget-unit)")
    p.add_argument("--n-trials", type=int, default=None,
                   help="finished trials the study should hold (resumes); staged: first-stage trials (default 40), "
                        "per-layer: 100")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=storage_help + "; workers naming one storage and "
                   "study share it")
    p.add_argument("--study-name", default=None, help="default: derived from the model, method and budgets")
    p.add_argument("--worker", default=None, help="this worker's name, recorded on its trials; with --seed it seeds "
                                                  "the sampler (default: hostname-pid)")
    p.add_argument("--heartbeat", type=int, default=HEARTBEAT_S,
                   help="seconds between a running trial's heartbeats; a trial that missed 3 is a killed worker's and "
                        "is run again (a study keeps its creator's)")
    p.add_argument("--objective", default=None,
                   help="the task's primary metric (default; accuracy, perplexity, ...) or 'loss'")
    p.add_argument("--multi-objective", action="store_true",
                   help="accuracy vs memory (weights + KV at --context-tokens), searching the budgets too")
    p.add_argument("--method", default=None, choices=PLAN_METHODS,
                   help="staged: sparsegpt (default; stitched from level databases); per-layer: wanda (default)")
    add_staged_args(p)
    p.add_argument("--kv-widths", type=int, nargs="+", default=[2, 3, 4, 6, 8, 16], help="allowed KV widths")
    p.add_argument("--spread", type=float, default=0.25, help="per-layer sparsity offsets within ± this")
    p.add_argument("--groups", type=int, default=None, help="bins of consecutive layers sharing one choice")
    add_kv_layout_args(p)
    p.add_argument("--n-eval", type=int, default=None, help="validation items per trial (default: the task's)")
    add_budget_args(p, search=True)
    p.add_argument("--seed", type=int, default=0)
    add_search_power_args(p)
    p.add_argument("--out-dir", type=Path, default=RESULTS / "tables", help="where the trials CSV and best plan go")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("dashboard", help="optuna-dashboard on 127.0.0.1 for a study database")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=storage_help)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("compare", help="TPE joint plan (per-layer space) vs uniform/OWL baselines at the same "
                                       "budgets, on test")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--kv-budgets", type=float, nargs="+", default=[16, 4])
    p.add_argument("--n-trials", type=int, default=100)
    p.add_argument("--method", default="wanda", choices=PLAN_METHODS,
                   help="the pruning method TPE allocates for (sparsegpt: over the layer database)")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--study-prefix", default="compare", help="studies are named <prefix>-<task>-<method>-s<S>-kv<B> "
                                                            "(an existing one is resumed)")
    add_kv_layout_args(p)
    p.add_argument("--n", type=int, default=None, help="test items (default: the task's)")
    p.add_argument("--n-eval", type=int, default=None, help="validation items per trial (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    add_budget_args(p)
    add_search_power_args(p)
    p.add_argument("--out", type=Path, default=RESULTS / "tables" / "compare.csv")
    p.set_defaults(func=cmd_compare)

    from lmmlab.lab.headline import BASELINES as HEADLINE_BASELINES, KV_BASELINES

    p = sub.add_parser("headline", help="the staged search vs Wanda and SparseGPT under uniform, OWL, ATP, "
                                        "AlphaPruning and DLP (KV uniform and KVTuner-style), on test, paired and "
                                        "Holm-adjusted; <model>_headline.csv")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--kv-budgets", type=float, nargs="+", default=[16, 3],
                   help="mean nominal KV bits per layer, keys and values apart")
    p.add_argument("--target-sparsity", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--kv-budget", type=float, default=16.0, help=argparse.SUPPRESS)
    p.add_argument("--n-trials", type=int, default=None, help="first-stage trials per cell (default 40)")
    p.add_argument("--method", default="sparsegpt", choices=PLAN_METHODS)
    add_staged_args(p)
    p.add_argument("--sampler", default="tpe", help="the first stage's sampler")
    p.add_argument("--baselines", nargs="+", default=[f"{m}-{a}" for m, a in HEADLINE_BASELINES],
                   help="method-allocation pairs (default: wanda and sparsegpt x uniform owl atp alphapruning dlp)")
    p.add_argument("--kv-baselines", nargs="+", default=list(KV_BASELINES), choices=list(KV_BASELINES))
    p.add_argument("--two-stage-at", type=float, nargs="*", default=[0.7],
                   help="sparsities whose KV-limited cells also run the two-stage ablation")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--study-prefix", default="headline", help="studies are named <prefix>-<task>-s<S>-kv<B> "
                                                             "(an existing one is resumed)")
    add_kv_layout_args(p)
    p.add_argument("--n", type=int, default=None, help="test items (default: the task's)")
    p.add_argument("--n-eval", type=int, default=None, help="validation items for the final choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-databases", action="store_true", help="keep the level databases (GBs) after each target")
    p.add_argument("--dense-gap-at", type=float, nargs="*", default=[0.7],
                   help="sparsities at which a dense-input database is built to measure its stitching gap (KV 16)")
    p.add_argument("--out", type=Path, default=None, help="the table (default: results/tables/<model>_headline.csv)")
    p.set_defaults(func=cmd_headline)

    p = sub.add_parser("database", help="build (or check) a SparseGPT layer database: every decoder layer solved "
                                        "at a grid of levels, on the dense model's or a reference plan's inputs")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--levels", default="0.3:0.9:0.05", help="the grid: START:STOP:STEP or a comma list")
    p.add_argument("--inputs", default="dense",
                   help="what each layer is solved on: dense (the dense model's inputs), or an allocation's pruned "
                        "layers at --target (uniform, atp, dlp, ...), projected onto the grid")
    p.add_argument("--target", type=float, default=0.7, help="the reference allocation's mean sparsity")
    p.add_argument("--out", type=Path, default=None, help="folder (default: under $LMMLAB_CACHE/databases)")
    p.add_argument("--n-calibration", type=int, default=None, help="calibration items (default: the task's)")
    p.set_defaults(func=cmd_database)

    from lmmlab.lab.sampler_ablation import ABLATION_SAMPLERS

    p = sub.add_parser("ablate-samplers", help="the first stage's TPE vs TPE per layer, the evolution, random search "
                                               "and CMA-ES at equal evaluations of the KL fitness, over seeds")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--samplers", nargs="+", default=list(ABLATION_SAMPLERS), help=f"from {', '.join(ABLATION_SAMPLERS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--evaluations", type=int, default=40, help="fitness evaluations per run, warm starts included")
    p.add_argument("--target-sparsity", type=float, default=0.7)
    p.add_argument("--kv-budget", type=float, default=3.0)
    p.add_argument("--n-trials", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default="sparsegpt", choices=PLAN_METHODS)
    add_staged_args(p)
    p.add_argument("--sampler", default="tpe", help=argparse.SUPPRESS)
    add_kv_layout_args(p)
    p.add_argument("--n-eval", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="the calibration's and the search windows' seed")
    p.add_argument("--storage", default=None, help="Optuna storage (default: a sqlite file beside --out)")
    p.add_argument("--out", type=Path, default=None,
                   help="the table (default: results/tables/<model>_ablate_samplers.csv; the figure goes to "
                        "results/figures)")
    p.set_defaults(func=cmd_ablate_samplers)

    p = sub.add_parser("bench", help="benchmarks printed as JSON")
    p.add_argument("what", choices=["prune", "kv", "search", "memory"], help="what to measure")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--shape", default="llava-1.5-7b",
                   help="memory: the widths to build at random: llava-1.5-7b, llava-1.5-13b or tiny")
    p.add_argument("--layers", type=int, default=2,
                   help="memory: decoder layers built (measured at layers // 2 and layers, extrapolated to full depth)")
    p.add_argument("--database-levels", default=None,
                   help="search: also time trials that stitch SparseGPT levels from a layer database of this grid")
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 4096],
                   help="kv: contexts of the decode steps timed at LLaVA-1.5-7B's shapes")
    p.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"lmmlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
