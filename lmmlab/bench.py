"""`lmmlab bench ...`: timings of the pruning pipeline, as plain dicts for JSON.

Goals on the default model: wanda_s <= 1.3 x calib_forward_s (calibrating costs about one forward pass) and
remask_s <= 0.05 x eval_s (a search trial's pruning is a small fraction of its evaluation).
"""
from __future__ import annotations

import time

import torch

from lmmlab import data
from lmmlab.calibrate import calibrate, sample_batches
from lmmlab.evaluate import evaluate
from lmmlab.models import Loaded
from lmmlab.plan import CompressionPlan
from lmmlab.prune import DenseWeights, apply_plan, apply_sparsegpt, scores, sparsity_of


def _seconds(fn, repeat: int = 1, setup=None) -> float:
    """Best of `repeat` wall-clock runs of fn, each after an untimed setup()."""
    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def bench_prune(loaded: Loaded, sparsity: float = 0.5, repeat: int = 3) -> dict:
    batches = sample_batches(loaded, data.split("calibration"))
    validation = data.split("validation")
    dense = DenseWeights(loaded)
    uniform = CompressionPlan.uniform(loaded.num_layers, sparsity, method="wanda")
    other = CompressionPlan([min(0.9, sparsity + (0.1 if i % 2 else -0.1)) for i in range(loaded.num_layers)],
                            method="wanda")
    result: dict = {}

    def wanda_from_scratch():
        result["scores"] = scores("wanda", loaded, calibrate(loaded, batches))
        apply_plan(loaded, uniform, result["scores"], dense)

    try:
        calib_forward_s = _seconds(lambda: [loaded.model(**b, use_cache=False) for b in batches], repeat)
        restore = lambda: dense.restore(loaded)  # noqa: E731
        wanda_s = _seconds(wanda_from_scratch, repeat, setup=restore)
        achieved = sparsity_of(loaded)
        remask_s = _seconds(lambda: apply_plan(loaded, other, result["scores"], dense), repeat)
        eval_s = _seconds(lambda: evaluate(loaded, validation), 1)
        sparsegpt_plan = CompressionPlan.uniform(loaded.num_layers, sparsity, method="sparsegpt")
        sparsegpt_s = _seconds(lambda: apply_sparsegpt(loaded, sparsegpt_plan, batches), 1, setup=restore)
    finally:
        dense.restore(loaded)
    return {
        "model": loaded.name, "device": str(loaded.device), "threads": torch.get_num_threads(),
        "calibration_samples": sum(len(b["input_ids"]) for b in batches), "sparsity": sparsity,
        "calib_forward_s": calib_forward_s, "wanda_s": wanda_s, "wanda_over_forward": wanda_s / calib_forward_s,
        "sparsegpt_s": sparsegpt_s, "remask_s": remask_s, "eval_s": eval_s, "remask_over_eval": remask_s / eval_s,
        "achieved_sparsity": achieved,
    }
