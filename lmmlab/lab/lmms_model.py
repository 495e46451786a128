"""A model loaded, compressed to a plan and scored by lmms-eval in one call (`lmmlab lmms-eval`): the tasks and
data are checked first, then the model loads, is pruned to the plan's sparsity (scores calibrated on the model's
default task, or `calibration_task`) and answers lmms-eval's requests through the plan's per-layer KV cache
(`lmmlab.tasks.lmms.evaluate_lmms`)."""
from __future__ import annotations

import logging
from pathlib import Path

from lmmlab.plan import CompressionPlan

log = logging.getLogger(__name__)


def parse_data(tasks: list[str], texts: list[str]) -> dict[str, str]:
    """`--data TASK=PATH` (repeatable; a bare PATH serves a single task) as {task: path}."""
    data = {}
    for text in texts:
        task, sep, path = text.partition("=")
        if not sep:
            if len(tasks) != 1 or len(texts) != 1:
                raise ValueError(f"--data {text!r}: give TASK=PATH for each of {', '.join(tasks)}")
            task, path = tasks[0], text
        if task in data:
            raise ValueError(f"--data names {task!r} twice")
        data[task] = path
    return data


def run_lmms(model: str, tasks: list[str], data: dict[str, str], *, plan: str | Path | None = None,
             calibration_task: str | None = None, n_calibration: int | None = None, dtype: str | None = None,
             device: str | None = None, seed: int = 0, **options) -> tuple[dict, CompressionPlan | None]:
    """lmms-eval's result dict for `model` (compressed to the `plan` JSON when given) on `tasks` over local parquet
    `data`, and the plan; `options` go to `evaluate_lmms` (limit, max_new_tokens, batch_size, bootstrap_iters)."""
    from lmmlab.lab.session import build_task, calibrated_pruner, load_checked
    from lmmlab.tasks import lmms

    try:
        tasks = lmms.check_lmms_tasks(tasks)
    except ModuleNotFoundError as err:
        raise ValueError(str(err)) from None
    lmms.check_data(tasks, data)
    compression = CompressionPlan.load(plan) if plan is not None else None
    loaded = load_checked(model, dtype=dtype, device=device)
    if compression is not None:
        from lmmlab.prune.export import check_plan

        task = build_task(model)

        check_plan(loaded, compression)  # before calibrating
        task.check_model(loaded)
        calibrated_pruner(loaded, task, calibration_task=calibration_task, n=n_calibration, seed=seed).apply(compression)
        log.info("pruned %s to %s (mean sparsity %.3f)", model, compression.method, compression.mean_sparsity)
    return lmms.evaluate_lmms(loaded, tasks, data=data, plan=compression, seed=seed, **options), compression
