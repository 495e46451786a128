"""`lmmlab bench ...`: timings and byte counts, as plain dicts for JSON.

Goals: wanda_s <= 1.3 x calib_forward_s (calibrating costs about one forward pass), sparsegpt_s <= 2.5 x
calib_forward_s, and remask_s <= 0.05 x eval_s (a search trial's pruning is a small fraction of its evaluation); each
time is the median of `repeat` runs in the same process, so the ratios compare like with like.

KV cache with KIVI's group 32 / window 128 (keys flush every 128 tokens, values keep a sliding window of the newest
128), bytes ÷ fp16 bytes at LLaVA-1.5-7B's head dim 128 (`ratio_by_context`; the ratio depends on the context, not on
the layer or head count):
  context   2-bit   3-bit   4-bit   6-bit   8-bit
  1000      0.2818  0.3370  0.3922  0.5028  0.6132
  1024      0.2383  0.2969  0.3555  0.4727  0.5898
  4096      0.2002  0.2617  0.3232  0.4463  0.5693
A context that is a multiple of 128 is the best case for the keys (no key window); the 128 fp16 values are always
held. Goals at 1024 tokens: ratio_2bit <= 0.24 and ratio_4bit <= 0.36.
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import replace

import torch

from lmmlab.progress import bar
from lmmlab.kv.attention import kivi_attention_forward, packed_scores, packed_values
from lmmlab.prune.calibrate import calibrate
from lmmlab.kv.cache import KVCache, kv_cache_for
from lmmlab.kv.budget import kv_nbytes
from lmmlab.models import Loaded
from lmmlab.kv.budget import KIVI_GROUP_SIZE, KIVI_RESIDUAL, KV_BITS
from lmmlab.plan import CompressionPlan
from lmmlab.prune.scores import DenseWeights, apply_plan, sparsity_of
from lmmlab.prune.sparsegpt import apply_sparsegpt
from lmmlab.tasks import Task


def _seconds(fn, repeat: int = 1, setup=None) -> float:
    """Median of `repeat` wall-clock runs of fn, each after an untimed setup()."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def bench_prune(loaded: Loaded, task: Task, sparsity: float = 0.5, repeat: int = 3) -> dict:
    """Calibration forward, Wanda (calibration + scores + masks), SparseGPT and re-mask times on `task`'s
    calibration items; evaluation time on its validation split."""
    batches = task.calibration_batches(loaded)
    dense = DenseWeights(loaded)
    uniform = CompressionPlan.uniform(loaded.num_layers, sparsity, method="wanda")
    other = CompressionPlan([min(0.9, sparsity + (0.1 if i % 2 else -0.1)) for i in range(loaded.num_layers)],
                            method="wanda")
    result: dict = {}

    def wanda_from_scratch():
        result["stats"] = calibrate(loaded, batches)
        apply_plan(loaded, uniform, dense, result["stats"])

    try:
        calib_forward_s = _seconds(lambda: [loaded.model(**b, use_cache=False) for b in batches], repeat)
        restore = lambda: dense.restore(loaded)  # noqa: E731
        wanda_s = _seconds(wanda_from_scratch, repeat, setup=restore)
        achieved = sparsity_of(loaded)
        remask_s = _seconds(lambda: apply_plan(loaded, other, dense, result["stats"]), repeat)
        eval_s = _seconds(lambda: task.evaluate(loaded, split="validation"), repeat)
        sparsegpt_plan = CompressionPlan.uniform(loaded.num_layers, sparsity, method="sparsegpt")
        sparsegpt_s = _seconds(lambda: apply_sparsegpt(loaded, sparsegpt_plan, batches), repeat, setup=restore)
    finally:
        dense.restore(loaded)
    return {
        "model": loaded.name, "task": task.describe(), "device": str(loaded.device),
        "threads": torch.get_num_threads(), "repeats": repeat, "timing": "median",
        "calibration_items": sum(len(b["input_ids"]) for b in batches),
        "calibration_tokens": sum(int(b["attention_mask"].sum()) for b in batches), "sparsity": sparsity,
        "calib_forward_s": calib_forward_s, "wanda_s": wanda_s, "wanda_over_forward": wanda_s / calib_forward_s,
        "sparsegpt_s": sparsegpt_s, "sparsegpt_over_forward": sparsegpt_s / calib_forward_s, "remask_s": remask_s, "eval_s": eval_s, "remask_over_eval": remask_s / eval_s,
        "achieved_sparsity": achieved,
    }


SHAPES = {  # (decoder layers, KV heads, head dim) as in their configs
    "llava-1.5-7b": (32, 32, 128),
}


def kv_ratios(layers: int, heads: int, head_dim: int, context: int) -> dict:
    """Bytes held / bytes of an fp16 DynamicCache after `context` tokens of fp16 states, at the default group size and
    window (`kv_ratio_by_context` at one context), and the fp16 bytes themselves."""
    by_width = kv_ratio_by_context(layers, heads, head_dim, contexts=(context,), widths=(2, 4, 8))[str(context)]
    return {**{f"ratio_{b}bit": ratio for b, ratio in by_width.items()},
            "fp16_bytes": kv_nbytes([16] * layers, heads, head_dim, context, dtype_bytes=2)}


KV_CONTEXTS = (1000, 1024, 4096)  # one that is not a multiple of the window, one that is, and a long one
KV_WIDTHS = tuple(b for b in KV_BITS if b < 16)  # every quantized width


def kv_ratio_by_context(layers: int, heads: int, head_dim: int, contexts=KV_CONTEXTS, widths=KV_WIDTHS,
                        group_size: int = KIVI_GROUP_SIZE, residual_length: int = KIVI_RESIDUAL) -> dict:
    """{str(context): {str(bits): bytes held / fp16 bytes}} for fp16 states, from `kv_nbytes` (the closed form equals
    a filled cache's `nbytes()`, tests/test_kvcache.py), so long contexts at a 7B shape need no 1-GB cache."""
    ratios = {}
    for context in contexts:
        fp16 = kv_nbytes([16] * layers, heads, head_dim, context, group_size, residual_length, dtype_bytes=2)
        ratios[str(context)] = {str(b): kv_nbytes([b] * layers, heads, head_dim, context, group_size,
                                                  residual_length, dtype_bytes=2) / fp16 for b in widths}
    return ratios


@torch.no_grad()
def _decode_tokens_per_s(loaded: Loaded, make_cache, context: int, steps: int) -> float:
    """Batch-1 greedy decoding speed after a `context`-token text prefill into the cache (steps timed together)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, loaded.model.config.get_text_config().vocab_size, (1, context), generator=g)
    cache = make_cache()
    logits = loaded.model(input_ids=ids.to(loaded.device), cache=cache, use_cache=True).logits[:, -1]
    start = time.perf_counter()
    for _ in range(steps):
        logits = loaded.model(input_ids=logits.argmax(-1, keepdim=True), cache=cache, use_cache=True).logits[:, -1]
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    return steps / (time.perf_counter() - start)


class _Attention(torch.nn.Module):
    """What transformers' attention functions read from the attention module: its KV grouping and causality."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def memory_bandwidth_gb_s(megabytes: int = 512, repeat: int = 5, device: str = "cpu") -> float:
    """The memory bandwidth of `device`: bytes read plus bytes written per second by a large tensor copy (median of
    `repeat`), in GB/s (10^9 bytes)."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    return 2 * src.numel() * 4 / _seconds(lambda: (dst.copy_(src), _sync(device)), repeat) / 1e9


def read_bandwidth_gb_s(megabytes: int = 512, repeat: int = 5, device: str = "cpu") -> float:
    """Bytes read per second by a sum over a large tensor (median of `repeat`), in GB/s: what attention over a cache
    needs, next to the copy's read + write figure."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    return src.numel() * 4 / _seconds(lambda: (src.sum(), _sync(device)), repeat) / 1e9


class _Preallocated:
    """fp16 keys and values in buffers sized for the whole run and written in place, as transformers' `StaticCache`
    holds them: the plain cache without `DynamicCache`'s copy of the whole store at every step."""

    def __init__(self, layers: int, capacity: int):
        self.capacity, self.layers, self.length = capacity, [None] * layers, [0] * layers

    def update(self, keys: torch.Tensor, values: torch.Tensor, i: int):
        B, H, t, D = keys.shape
        if self.layers[i] is None:
            self.layers[i] = (keys.new_empty(B, H, self.capacity, D), values.new_empty(B, H, self.capacity, D))
        n = self.length[i]
        for buffer, new in zip(self.layers[i], (keys, values)):
            buffer[:, :, n : n + t] = new
        self.length[i] = n + t
        return tuple(buffer[:, :, : n + t] for buffer in self.layers[i])

    def nbytes(self) -> int:
        return sum(2 * k[:, :, :n].numel() * k.element_size() for (k, _), n in zip(self.layers, self.length))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _products(cache: KVCache, new: torch.Tensor, device) -> None:
    """`packed_scores` and `packed_values` over every layer's stores, for the query `new` and uniform weights."""
    for layer in cache.layers:
        keys, values = layer._quantized_keys, layer._quantized_values
        if keys is None or values is None:  # a context within the window stores nothing quantized yet
            continue
        q = new.float().reshape(*new.shape[:2], 1, -1)
        packed_scores(q, keys)
        weights = torch.full((*new.shape[:2], 1, values.num_tokens), 1 / values.num_tokens, device=q.device)
        packed_values(weights, values)
    _sync(device)


def _decode_step(cache, new: torch.Tensor, module: torch.nn.Module, scaling: float, device) -> None:
    """One decode step over every layer of `cache`: store `new` as the token's keys and values, attend `new` to all."""
    for i in range(len(cache.layers)):
        keys, values = cache.update(new, new, i)
        kivi_attention_forward(module, new, keys, values, None, scaling=scaling)
    _sync(device)


def decode_step_rows(layers: int, heads: int, head_dim: int, *, contexts=(1024, 4096), widths=(16, 8, 4, 2),
                     steps: int = 5, dtype=torch.float16, device: str = "cpu",
                     paths=("dequantize", "packed")) -> list[dict]:
    """Decode steps at a model's attention shapes (batch 1, `heads` query and KV heads): after a `context`-token
    prefill, each step stores one token's keys and values in every layer and attends one query over all of them,
    through the attention function a model with lmmlab's attention uses. Paths: "plain" (transformers'
    `DynamicCache`, fp16, SDPA), "static" (fp16 in preallocated buffers written in place, SDPA: the plain cache
    without `DynamicCache`'s copy of its store at every step), "dequantize" (the KIVI cache dequantized into a float
    tensor, then SDPA) and
    "packed" (`lmmlab.attention`'s decode attention over the packed store); tokens/s is 1 / the median step, and for
    "packed" `kernel_tokens_per_s` times the two folded products alone (the rest of a step is Python and small torch
    ops: the window, the softmax, quantizing the value that leaves the window).
    `bytes_per_step` is what a step must read at least: the cache's bytes (`nbytes()`) before the first timed step
    (context + 1 tokens)."""
    from transformers.cache_utils import DynamicCache

    module, scaling = _Attention(), head_dim ** -0.5
    rows = []
    for context in bar(contexts, desc="bench kv: decode steps (contexts)", unit="context"):
        for bits in widths:
            for path in (("plain", "static") if bits == 16 else paths):
                g = torch.Generator(device).manual_seed(context + bits)
                if path == "plain":
                    cache = DynamicCache()
                elif path == "static":
                    cache = _Preallocated(layers, capacity=context + steps + 1)
                else:
                    cache = KVCache([bits] * layers, read=path)
                for i in range(layers):
                    k, v = (torch.randn(1, heads, context, head_dim, generator=g, device=device).to(dtype)
                            for _ in range(2))
                    cache.update(k, v, i)
                    del k, v
                new = torch.randn(1, heads, 1, head_dim, generator=g, device=device).to(dtype)
                step = functools.partial(_decode_step, cache, new, module, scaling, device)
                step()  # warm-up (builds the kernels on first use)
                nbytes = cache.nbytes() if path != "plain" else sum(
                    layer.keys.numel() * 2 * layer.keys.element_size() for layer in cache.layers)
                seconds = _seconds(step, steps)
                row = {"context": context, "bits": bits, "path": path, "tokens_per_s": 1 / seconds,
                       "bytes_per_step": nbytes}
                if path == "packed":  # the two folded products alone, every layer: what the kernels reach
                    row["kernel_tokens_per_s"] = 1 / _seconds(functools.partial(_products, cache, new, device), steps)
                rows.append(row)
                del cache
    return rows


def bench_kv(loaded: Loaded, context: int = 1024, decode_steps: int = 32, *, decode_contexts=(1024, 4096),
             step_repeats: int = 5) -> dict:
    """Compression ratios of the quantized cache, on `loaded` and at LLaVA-1.5-7B's shapes; `loaded`'s greedy
    decoding speed with a plain cache and with each read of the quantized one; and decode steps at LLaVA-1.5-7B's
    shapes (`decode`: `decode_step_rows` at `decode_contexts`) against the memory bandwidth measured in the same run
    (`bandwidth_gb_s`, a copy's bytes read + written per second; `read_bandwidth_gb_s`, a sum's bytes read): each
    row's `limit_tokens_per_s` = bandwidth / bytes_per_step, the speed at which the step would only read its cache
    once. All on `loaded`'s device.

    Goal: at 4096 tokens, 4- and 2-bit packed decode ≥ 1.0 × the plain cache's tokens/s and within 2 ×
    of the bandwidth limit (`of_limit` ≥ 0.5)."""
    own = (loaded.num_layers, loaded.num_kv_heads, loaded.head_dim)
    result: dict = {"model": loaded.name, "device": str(loaded.device), "threads": torch.get_num_threads(),
                    "context": context, "group_size": KIVI_GROUP_SIZE, "residual_length": KIVI_RESIDUAL}
    result[loaded.name] = {"shape": own, **kv_ratios(*own, context)}
    for bits in (16, 4, 2):
        plan = CompressionPlan.uniform(loaded.num_layers, kv_bits=bits)
        for read in (("packed", "dequantize") if bits < 16 else ("dequantize",)):
            key = f"decode_tokens_per_s_{bits}bit" + ("_dequantize" if bits < 16 and read == "dequantize" else "")
            result[loaded.name][key] = _decode_tokens_per_s(
                loaded, lambda: kv_cache_for(plan, loaded, read=read), context, decode_steps)
    for name, shape in SHAPES.items():
        result[name] = {"shape": shape, **kv_ratios(*shape, context)}
    # the headline figures the issue asks for: LLaVA-1.5-7B's shapes
    result.update({k: result["llava-1.5-7b"][k] for k in ("ratio_2bit", "ratio_4bit", "ratio_8bit")})
    result["ratio_by_context"] = kv_ratio_by_context(*SHAPES["llava-1.5-7b"])
    device = str(loaded.device)
    result["bandwidth_gb_s"] = bandwidth = memory_bandwidth_gb_s(device=device)
    result["read_bandwidth_gb_s"] = read_bandwidth_gb_s(device=device)
    rows = decode_step_rows(*SHAPES["llava-1.5-7b"], contexts=decode_contexts, steps=step_repeats, device=device)
    plain = {r["context"]: r["tokens_per_s"] for r in rows if r["path"] == "plain"}
    static = {r["context"]: r["tokens_per_s"] for r in rows if r["path"] == "static"}
    for r in rows:
        r["limit_tokens_per_s"] = bandwidth * 1e9 / r["bytes_per_step"]
        r["of_limit"] = r["tokens_per_s"] / r["limit_tokens_per_s"]
        if "kernel_tokens_per_s" in r:
            r["kernel_of_limit"] = r["kernel_tokens_per_s"] / r["limit_tokens_per_s"]
        r["over_plain"] = r["tokens_per_s"] / plain[r["context"]] if r["context"] in plain else None
        r["over_static"] = r["tokens_per_s"] / static[r["context"]] if r["context"] in static else None
    result["decode_shape"] = "llava-1.5-7b"
    result["decode"] = rows
    return result


def bench_search(loaded: Loaded, task: Task, n_trials: int = 20, kv_group_size: int = 8, kv_residual: int = 8, *,
                 database=None, multi_fidelity_trials: int | None = None, n_eval: int | None = None) -> dict:
    """Per-trial cost of the per-layer search on the task's validation split (its first `n_eval` items; None: the
    task's default count), in throw-away sqlite studies: a plain study of `n_trials`, then a multi-fidelity one (up
    to `multi_fidelity_trials`, default 4 × n_trials) compared at the plain study's wall time; with a layer
    `database`, a third study searches SparseGPT levels and reports its per-trial overhead.

    Goals: trial_overhead_s <= 0.05 × trial_eval_s (also with the database); trials_per_min_multifidelity >= 3 ×
    trials_per_min at a best objective within the plain study's best plan's 95 % interval (both best plans
    re-scored on the validation split with their per-item values)."""
    import tempfile

    import optuna

    from lmmlab.lab.stats import paired_p

    runs = _SearchRuns(loaded, task, kv_group_size, kv_residual, n_eval)
    with tempfile.TemporaryDirectory() as tmp:
        plain, wall = runs.study(tmp, "plain", n_trials)
        table = runs.table(plain)
        mf, mf_wall = runs.study(tmp, "mf", multi_fidelity_trials or 4 * n_trials, multi_fidelity=True)
        states = [t.state for t in mf.study.get_trials(deepcopy=False)]
        mf_finished = sum(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states)
        a, b = runs.rescore(runs.best_until(plain, wall)), runs.rescore(runs.best_until(mf, wall))
        db = runs.database_study(tmp, n_trials, database) if database is not None else {}
    runs.pruner.restore()
    overhead, eval_s = float(table.overhead_s.median()), float(table.eval_s.median())  # medians over the trials
    low, high = a["interval"]
    return {"model": loaded.name, "task": task.describe(), "device": str(loaded.device),
            "threads": torch.get_num_threads(), "n_trials": n_trials, "n_eval": n_eval,
            "trial_overhead_s": overhead, "trial_eval_s": eval_s, "overhead_over_eval": overhead / eval_s,
            "trial_sample_s": float(table.sample_s.median()), "timing": "median over trials",
            "trial_wall_s": wall / n_trials, "trials_per_min": 60 * n_trials / wall,
            "minutes_per_100_trials": 100 * wall / n_trials / 60,
            "multifidelity_trials": mf_finished, "multifidelity_pruned": states.count(optuna.trial.TrialState.PRUNED),
            "multifidelity_wall_s": mf_wall, "trials_per_min_multifidelity": 60 * mf_finished / mf_wall,
            "speedup_multifidelity": (mf_finished / mf_wall) / (n_trials / wall),
            "equal_wall_s": wall, "best_objective": a["primary"], "best_objective_ci": [low, high],
            "best_objective_multifidelity": b["primary"],
            "multifidelity_within_interval": bool(low <= b["primary"] <= high),
            "paired_p": paired_p(a["per_item"], b["per_item"], a["metric"]), **db}


class _SearchRuns:
    """`bench_search`'s studies on one model and task: run one, find its best trial by a wall time, re-score it."""

    def __init__(self, loaded: Loaded, task: Task, kv_group_size: int, kv_residual: int, n_eval: int | None):
        from lmmlab.prune.pruner import Pruner
        from lmmlab.search.per_layer import PerLayerConfig

        self.loaded, self.task = loaded, task
        self.pruner = Pruner.for_task(loaded, task)
        self.base = PerLayerConfig(target_sparsity=0.6, kv_budget_bits=4, kv_group_size=kv_group_size,
                                   kv_residual=kv_residual, n_eval=n_eval)

    def study(self, tmp: str, name: str, trials: int, **extra):
        from lmmlab.search.per_layer import search

        start = time.perf_counter()
        result = search(self.loaded, self.task, replace(self.base, n_trials=trials, **extra), pruner=self.pruner,
                        storage=f"sqlite:///{tmp}/{name}.db")
        return result, time.perf_counter() - start

    def table(self, result):
        from lmmlab.search.per_layer import trials_table

        return trials_table(result.study)

    def best_until(self, result, seconds: float):
        """The best COMPLETE trial finished within `seconds` of the study's first trial."""
        import optuna

        trials = result.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        t0 = min(t.datetime_start for t in result.study.get_trials(deepcopy=False))
        done = [t for t in trials if (t.datetime_complete - t0).total_seconds() <= seconds]
        sign = 1 if self.task.direction == "maximize" else -1
        return max(done, key=lambda t: sign * t.value)

    def rescore(self, trial) -> dict:
        from lmmlab.kv.cache import KVCacheFactory
        from lmmlab.lab.stats import row_interval

        plan = CompressionPlan(**trial.user_attrs["plan"])
        self.pruner.apply(plan)
        m = self.task.evaluate(self.loaded, split="validation", n=self.base.n_eval,
                               make_cache=KVCacheFactory(plan, self.loaded))
        return {"primary": m.primary, "per_item": m.per_item, "metric": m.per_item_metric,
                "interval": row_interval(m.per_item, m.per_item_metric)}

    def database_study(self, tmp: str, n_trials: int, database) -> dict:
        self.pruner.database = database
        result, wall = self.study(tmp, "db", n_trials, method="sparsegpt")
        t = self.table(result)
        self.pruner.database = None
        return {"database_trial_overhead_s": float(t.overhead_s.median()),
                "database_trial_eval_s": float(t.eval_s.median()),
                "database_overhead_over_eval": float(t.overhead_s.median() / t.eval_s.median()),
                "database_trials_per_min": 60 * n_trials / wall}


def run(what: str, loaded: Loaded, task: Task, *, database_levels: str | None = None,
        decode_contexts: tuple[int, ...] = (1024, 4096)) -> dict:
    """`lmmlab bench prune|kv|search` on a loaded model: `bench_prune`, `bench_kv`, or `bench_search` (with
    `database_levels`, also over a SparseGPT layer database of that grid)."""
    if what == "kv":
        return bench_kv(loaded, decode_contexts=decode_contexts)
    if what == "search":
        database = None
        if database_levels:
            from lmmlab.prune.database import parse_levels
            from lmmlab.prune.pruner import Pruner

            database = Pruner.for_task(loaded, task).attach_database(levels=parse_levels(database_levels))
            database.dense = None  # the bench's own pruner gives the dense weights
        return bench_search(loaded, task, database=database)
    if what == "prune":
        return bench_prune(loaded, task)
    raise ValueError(f"unknown benchmark {what!r}; allowed: prune, kv, search, memory")
