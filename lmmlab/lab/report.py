"""`lmmlab report`: results/REPORT.md, generated from the committed tables in results/tables — every result with the
command that made it and the commit that last wrote it — and the README's headline table (a test checks that the
README shows exactly what the CSV holds)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd

HEADLINE = "smollm2_headline.csv"
BEGIN, END = "<!-- headline:begin -->", "<!-- headline:end -->"

# table file -> (what it is, the command that writes it); a table not listed here is reported under "Other tables"
SOURCES = {
    "smollm2_headline.csv": ("The headline: the staged search vs every baseline, SmolLM2-135M, test perplexity",
                             "lmmlab headline --model smollm2-135m"),
    "smollm2_stitching_gap.csv": ("Stitching gap per level database (stitched vs solved sequentially, validation)",
                                  "lmmlab headline --model smollm2-135m"),
    "smollm2_ablate_samplers.csv": ("Sampler ablation at equal evaluations (KL fitness, 70 %, KV ≤ 3)",
                                    "lmmlab ablate-samplers --model smollm2-135m"),
    "demo-smollm2-text_compare.csv": ("`make demo`: the staged search (Wanda) vs baselines, 8 test windows",
                                      "make demo"),
    "smollm2-135m-text_ablate_calibration.csv": ("Wanda / RIA calibrated layer by layer vs one pass",
                                                 "lmmlab ablate-calibration --model smollm2-135m"),
    "ablation_pruning.csv": ("Toy LLaVA: pruning methods × sparsity (notebook 03)", "make figures"),
    "ablation_kv.csv": ("Toy LLaVA: KV widths (notebook 03)", "make figures"),
    "tpe_vs_baselines.csv": ("Toy LLaVA: the per-layer TPE plan vs baselines (notebook 02)", "make figures"),
    "pareto_front.csv": ("Toy LLaVA: multi-objective fronts (notebook 04)", "make figures"),
    "bench_kv.json": ("KV bytes and decode tokens/s at LLaVA-1.5-7B's shapes", "lmmlab bench kv"),
    "bench_prune_smollm2-135m-text.json": ("Pruning times on SmolLM2-135M", "lmmlab bench prune --model smollm2-135m"),
    "bench_memory_llava-1.5-7b.json": ("Peak memory at LLaVA-1.5-7B widths", "lmmlab bench memory --shape llava-1.5-7b"),
    "bench_memory_llava-1.5-13b.json": ("Peak memory at LLaVA-1.5-13B widths",
                                        "lmmlab bench memory --shape llava-1.5-13b"),
    "bench_search.json": ("Per-trial overhead of the per-layer search", "lmmlab bench search"),
}


def last_commit(path: Path) -> str:
    """The short hash of the commit that last changed `path` ("uncommitted" outside git or before a commit)."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "uncommitted"


def fmt(x: float) -> str:
    """A perplexity or accuracy as the README shows it: 3 significant digits (23.0, not 23), thousands separated."""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def headline_table(csv: Path) -> str:
    """The headline as a Markdown table: a row per (sparsity, KV budget), the search's perplexity with its interval
    and Holm-adjusted verdict against every baseline, the strongest baseline and the search's difference to it, each
    baseline family's best, the two-stage plan, and (below 16 bits) what the search's KV widths cost against its own
    weights with a 16-bit cache."""
    from lmmlab.lab.headline import NOT_BASELINES, SAME_WEIGHTS_16, TWO_STAGE

    rows = pd.read_csv(csv)
    paired = pd.read_csv(csv.with_name(csv.stem + "_paired.csv"))
    lines = ["| sparsity | KV ≤ | staged search [95 % CI] | vs every baseline (Holm) | best baseline | search vs best "
             "| best Wanda | two-stage | same weights, 16-bit KV |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (target, budget), cell in rows.groupby(["target_sparsity", "kv_budget_bits"], sort=True):
        search = cell[cell.allocation == "search"].iloc[0]
        base = cell[~cell.allocation.isin(NOT_BASELINES)]
        best = base.loc[base.primary.idxmin()]
        wanda = base[base.method == "wanda"].primary.min()
        outside = {f"{m}-{a}" for m in rows.method.unique() for a in NOT_BASELINES}
        tests = paired[(paired.target_sparsity == target) & (paired.kv_budget_bits == budget)]
        family = tests[~tests.baseline.isin(outside)]
        wins = int((family.better_holm == "search").sum())
        verdict = f"better than {wins} of {len(family)} (max p_holm {family.p_holm.max():.3g})"
        two = cell[cell.allocation == TWO_STAGE]
        two_stage = fmt(two.primary.iloc[0]) if len(two) else ""
        same = cell[cell.allocation == SAME_WEIGHTS_16]
        kv_cost = ""
        if len(same):
            p = tests[tests.baseline.str.endswith(SAME_WEIGHTS_16)].p_value
            kv_cost = (f"{fmt(same.primary.iloc[0])} ({100 * (search.primary / same.primary.iloc[0] - 1):+.1f} %"
                       + (f", p {p.iloc[0]:.2g})" if len(p) else ")"))
        name = f"{best.method}-{best.allocation}" + ("" if best.get("kv_plan", "uniform") in ("uniform", "") or
                                                      pd.isna(best.get("kv_plan")) else f"-{best.kv_plan}")
        lines.append(f"| {target:g} | {budget:g} | **{fmt(search.primary)}** [{fmt(search.ci_low)}, "
                     f"{fmt(search.ci_high)}] | {verdict} | {fmt(best.primary)} ({name}) | "
                     f"{100 * (search.primary / best.primary - 1):+.1f} % | {fmt(wanda)} | {two_stage} | {kv_cost} |")
    return "\n".join(lines)


def readme_headline(results: Path) -> str:
    """What the README shows between its headline markers."""
    csv = results / "tables" / HEADLINE
    return headline_table(csv) if csv.is_file() else "(no headline table yet: run `lmmlab headline`)"


def table_summary(path: Path) -> str:
    """A table's first lines (CSV) or its top-level keys (JSON) as Markdown."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        keys = list(data) if isinstance(data, dict) else []
        return f"JSON with {len(keys)} keys: " + ", ".join(f"`{k}`" for k in keys[:12]) + (" …" if len(keys) > 12
                                                                                          else "")
    table = pd.read_csv(path)
    shown = [c for c in ("target_sparsity", "kv_budget_bits", "method", "allocation", "kv_plan", "sampler",
                         "primary", "ci_low", "ci_high", "verdict", "database", "gap_pct") if c in table]
    return f"{len(table)} rows; columns {', '.join(f'`{c}`' for c in shown or list(table.columns)[:8])}"


def report(results: str | Path = "results") -> str:
    """REPORT.md's text: the headline, then every table in results/tables with what made it and when."""
    results = Path(results)
    tables = sorted((results / "tables").glob("*.csv")) + sorted((results / "tables").glob("*.json"))
    parts = ["# lmmlab results", "", "Generated by `lmmlab report` from `results/tables/`; every table names the "
             "command that writes it and the commit that last changed it. Do not edit by hand.", "",
             "## Headline (SmolLM2-135M, test perplexity, 64 windows)", "", readme_headline(results), ""]
    listed = [t for t in tables if t.name in SOURCES]
    others = [t for t in tables if t.name not in SOURCES and not t.name.endswith(("_items.csv", "_paired.csv"))]
    for section, group in (("Tables", listed), ("Other tables", others)):
        if not group:
            continue
        parts += [f"## {section}", "", "| table | what | command | commit | contents |",
                  "| --- | --- | --- | --- | --- |"]
        for path in group:
            what, command = SOURCES.get(path.name, ("", ""))
            parts.append(f"| `{path.name}` | {what} | `{command}` | {last_commit(path)} | {table_summary(path)} |")
        parts.append("")
    return "\n".join(parts)


def write_report(results: str | Path = "results", readme: str | Path | None = "README.md") -> list[Path]:
    """Write results/REPORT.md, and the headline table into the README between its markers (when it has them)."""
    from lmmlab.files import write_text_atomic

    results = Path(results)
    paths = [results / "REPORT.md"]
    write_text_atomic(paths[0], report(results) + "\n")
    if readme is not None and Path(readme).is_file():
        text = Path(readme).read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            write_text_atomic(readme, f"{head}{BEGIN}\n{readme_headline(results)}\n{END}{tail}")
            paths.append(Path(readme))
    return paths
