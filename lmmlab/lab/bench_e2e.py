"""`lmmlab bench e2e`: whole-model greedy decoding, batch 1, with pruned linears held compressed in memory
(`models.sparse_linear`) and a plain or packed KV cache, against the dense model, in tokens/s and resident bytes.

Shapes: "smollm2-135m" is the real SmolLM2 (all 30 layers, its weights, fp32 as loaded on the CPU); "llava-1.5-7b"
(and "tiny", for tests) are randomly initialised Llamas of that language model's widths (`bench_memory.MODEL_SHAPES`),
built at two depths d₁ = `layers` // 2 and d₂ = `layers`, each measured and every figure extended linearly to the full
depth L as `bench_memory` does: m(L) = m(d₂) + (L − d₂)·(m(d₂) − m(d₁)) / (d₂ − d₁) (for speed, the seconds per token).
Plans: dense, 50 % and 70 % unstructured, 2:4 — magnitude masks (|W|: the smallest removed; unstructured over the
whole matrix by one threshold estimated from a sample of 2^20 weights, so the achieved sparsity is reported), the
pruned linears then held compressed with values in the model's dtype. Each plan is decoded with the plain cache
(16 bits, transformers' DynamicLayer) and KIVI caches packed at 4 and 2 bits (`kv.cache.kv_cache_for`, read packed).

Speed: per shape one fresh process builds the model (at the larger depth) and every plan's linears (the compressed
ones made from magnitude-pruned copies), fills one cache per (depth, context, KV width) to `context` tokens with
random keys and values in the model's dtype (what a prefill stores, without the prefill's cost: decode reads the
same bytes), and times `repeats` rounds in which every (depth, plan) in turn — its linears swapped in, the model's
first `depth` layers run — takes one untimed and `steps` timed greedy steps (`interleaved_seconds`): a machine busy
with other work slows the plans and depths alike. tokens/s = 1 / the median
group's seconds per step. Memory: per (shape, plan, depth) one fresh process builds, prunes and compresses the model
alone and runs each (context, KV width) in turn; `peak_rss_bytes` is its peak resident set (VmHWM, reset through
/proc/self/clear_refs after the previous configuration's cache is freed; glibc is told to map every allocation over
64 KiB on its own, so freed caches leave the process); its own decode speed is kept as
`fresh_process_tokens_per_s`. `prefill_s` times
one real prefill of `prefill_tokens` tokens per process (not the whole context: on this CPU fp16 matrix products run at
~15 GFLOP/s). `bytes_per_token` is what one decode step must read at least, from the layout: every decoder weight
(dense, or mask + values + offsets), the norms, the LM head, and the cache's `nbytes()`; `limit_tokens_per_s` = the
read bandwidth measured in the same process (`bench.read_bandwidth_gb_s`: the median of 5 sums over a buffer of
max(512 MiB, 4x the last-level cache)) ÷ `bytes_per_token`.
"""
from __future__ import annotations

import functools
import gc
import logging
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from lmmlab.lab.bench_memory import MODEL_SHAPES, extrapolate, host_peak, host_peak_reset

log = logging.getLogger(__name__)

SHAPES = ("smollm2-135m", "llava-1.5-7b", "tiny")
REAL = {"smollm2-135m"}  # loaded with their weights at full depth; the others are built at random, extrapolated
PLANS = {"dense": (0.0, "unstructured"), "50%": (0.5, "unstructured"), "70%": (0.7, "unstructured"),
         "2:4": (0.5, "2:4")}
KV_WIDTHS = (16, 4, 2)
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_DTYPE = {"smollm2-135m": "float32", "llava-1.5-7b": "float16", "tiny": "float32"}
SAMPLE = 1 << 20  # weights sampled for an unstructured magnitude threshold
QUICK = {"steps": 2, "repeats": 3, "prefill_tokens": 8}  # `--quick`: seconds, for tests
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def max_positions(shape: str) -> int:
    """The longest context `shape` holds (its max_position_embeddings)."""
    if shape in REAL:
        from transformers import AutoConfig

        from lmmlab.models.adapter import resolve

        return AutoConfig.from_pretrained(resolve(shape)).max_position_embeddings
    return 4096


def full_depth(shape: str) -> int:
    return 30 if shape == "smollm2-135m" else MODEL_SHAPES[shape]["num_hidden_layers"]


def check_args(shape: str, contexts, layers: int, plans, kv_bits, dtype: str | None, steps: int,
               repeats: int) -> None:
    """One clear ValueError for any bad input, before anything is built or written."""
    from lmmlab.kv.budget import check_kv_bits

    if shape not in SHAPES:
        raise ValueError(f"unknown --shape {shape!r}; allowed: {', '.join(SHAPES)}")
    bad = [p for p in plans if p not in PLANS]
    if bad or not plans:
        raise ValueError(f"unknown plan {bad[0] if bad else '(none)'!r}; allowed: {', '.join(PLANS)}")
    check_kv_bits(list(kv_bits), "--kv-widths")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if steps < 1 or repeats < 3:
        raise ValueError(f"--steps must be >= 1 and --repeats >= 3 (a median of at least 3); got {steps}, {repeats}")
    if shape not in REAL and not 2 <= layers <= full_depth(shape):
        raise ValueError(f"--layers must be between 2 and {full_depth(shape)} for {shape} (two depths are measured); "
                         f"got {layers}")
    limit = max_positions(shape)
    if not contexts or any(not 1 <= c <= limit for c in contexts):
        raise ValueError(f"--contexts must be token counts in [1, {limit}] for {shape} (its "
                         f"max_position_embeddings); got {list(contexts)}")


# ---------------------------------------------------------------------------------------------------- one process

def build(shape: str, depth: int, dtype: torch.dtype, seed: int = 0):
    """The model to measure as a `Loaded`: SmolLM2 with its weights, or a random Llama of `shape`'s widths and
    `depth` decoder layers (grouped heads as the real one: none for LLaVA-1.5's Vicuna)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmmlab.kv.attention import use_packed_attention
    from lmmlab.models import Loaded, build_tokenizer, decoder_layers, load_model

    if shape in REAL:
        return load_model(shape, dtype=dtype, device="cpu")
    config = LlamaConfig(**{**MODEL_SHAPES[shape], "num_hidden_layers": depth}, num_key_value_heads=None,
                         max_position_embeddings=max_positions(shape), rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    use_packed_attention(model)
    return Loaded(name=shape, model=model, processor=build_tokenizer(), layers=decoder_layers(model))


@torch.no_grad()
def magnitude_(W: torch.Tensor, sparsity: float, pattern: str, g: torch.Generator) -> int:
    """Zero the smallest |W| of W [R, C] in place: N:M within each group of M of a row, unstructured below one
    threshold (the `sparsity` quantile of a seeded sample of W's weights). Returns the zeros W then holds."""
    from lmmlab.plan import parse_pattern
    from lmmlab.prune.scores import mask_nm

    nm = parse_pattern(pattern)
    if sparsity > 0 and nm is not None:
        W.mul_(mask_nm(W.abs().float(), *nm))
    elif sparsity > 0:
        flat = W.view(-1)
        sample = flat[torch.randint(flat.numel(), (min(SAMPLE, flat.numel()),), generator=g)].abs().float()
        W.masked_fill_(W.abs() <= torch.quantile(sample, sparsity).to(W.dtype), 0)
    return int((W == 0).sum())


@torch.no_grad()
def magnitude_prune(loaded, sparsity: float, pattern: str, seed: int = 0) -> float:
    """`magnitude_` on every prunable decoder linear of `loaded`, in place; returns the achieved sparsity."""
    g = torch.Generator().manual_seed(seed)
    weights = [linear.weight for linear in loaded.prunable().values()]
    return sum(magnitude_(W, sparsity, pattern, g) for W in weights) / max(1, sum(W.numel() for W in weights))


@torch.no_grad()
def variants(loaded, plans, seed: int = 0) -> tuple[dict[str, list], dict[str, float]]:
    """Each plan's prunable linears as they decode, from `loaded`'s dense ones: the dense linears themselves, or
    SparseLinears of their magnitude-pruned copies (one plan's copy made at a time); and the achieved sparsities."""
    from lmmlab.models.sparse_linear import SparseLinear, prunable_slots
    from lmmlab.models.sparse_kernels import compress

    slots = prunable_slots(loaded)
    modules, achieved = {}, {}
    for plan in plans:
        sparsity, pattern = PLANS[plan]
        if sparsity == 0:
            modules[plan], achieved[plan] = [linear for _, _, linear in slots], 0.0
            continue
        g, zeros, kept = torch.Generator().manual_seed(seed), 0, []
        for _, _, linear in slots:
            W = linear.weight.detach().clone()
            zeros += magnitude_(W, sparsity, pattern, g)
            kept.append(SparseLinear(W.shape[1], W.shape[0], *compress(W, W.dtype), linear.bias))
            del W
        modules[plan], achieved[plan] = kept, zeros / sum(lin.weight.numel() for _, _, lin in slots)
    return modules, achieved


def weight_bytes(loaded) -> dict[str, int]:
    """Bytes the model holds: `weights` all its parameters and buffers (the resident weights), `per_token` what one
    decode step reads of them (all but the embedding table, of which one row: tied embeddings count once, as the
    LM head)."""
    model = loaded.model
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    emb = model.get_input_embeddings().weight
    tied = emb is model.get_output_embeddings().weight
    table = emb.numel() * emb.element_size()
    row = emb.shape[1] * emb.element_size()
    return {"weights": held, "per_token": held - (0 if tied else table) + row}


def fill_cache(loaded, kv_bits: int, context: int, seed: int):
    """A fresh cache (plain at 16 bits, else KIVI packed) holding `context` tokens of random keys and values in
    every layer, as a prefill of that length stores them."""
    from lmmlab.kv.cache import kv_cache_for
    from lmmlab.plan import CompressionPlan

    cache = kv_cache_for(CompressionPlan.uniform(loaded.num_layers, kv_bits=kv_bits), loaded)
    g = torch.Generator().manual_seed(seed)
    dtype = loaded.model.get_input_embeddings().weight.dtype
    for i in range(loaded.num_layers):
        k, v = (torch.randn(1, loaded.num_kv_heads, context, loaded.head_dim, generator=g).to(dtype)
                for _ in range(2))
        cache.update(k, v, i)
    return cache


def cache_bytes(cache) -> int:
    """The bytes a cache holds (a plain DynamicLayer's keys and values too)."""
    from lmmlab.kv.cache import layer_nbytes

    return sum(layer_nbytes(layer) for layer in cache.layers)


@torch.no_grad()
def decode_seconds(loaded, cache, steps: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` groups of `steps` greedy steps (batch 1) after one untimed step."""
    model = loaded.model
    logits = model(input_ids=torch.tensor([[3]]), cache=cache, use_cache=True).logits[:, -1]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            logits = model(input_ids=logits.argmax(-1, keepdim=True), cache=cache, use_cache=True).logits[:, -1]
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def prefill_seconds(loaded, tokens: int, seed: int = 0) -> float:
    """Seconds of one real prefill of `tokens` random tokens into a fresh plain cache (after a short warm-up)."""
    from lmmlab.kv.cache import kv_cache_for
    from lmmlab.plan import CompressionPlan

    g = torch.Generator().manual_seed(seed)
    vocab = loaded.text_config.vocab_size
    ids = torch.randint(3, vocab, (1, tokens), generator=g)
    plan = CompressionPlan.uniform(loaded.num_layers)
    loaded.model(input_ids=ids[:, :2], cache=kv_cache_for(plan, loaded), use_cache=True)
    start = time.perf_counter()
    loaded.model(input_ids=ids, cache=kv_cache_for(plan, loaded), use_cache=True)
    return time.perf_counter() - start


@functools.cache
def process_read_bandwidth_gb_s() -> float:
    """`bench.read_bandwidth_gb_s` over max(512 MiB, 4 × the last-level cache), measured once per process: each fresh
    process measures its own; run in one process (`fresh_process=False`), every layout shares the first figure."""
    from lmmlab.lab.bench import read_bandwidth_gb_s
    from lmmlab.lab.bench_sparse import llc_bytes

    return read_bandwidth_gb_s(max(512, 4 * llc_bytes() >> 20), repeat=5)


def measure_layout(shape: str, depth: int, plan: str, contexts: tuple[int, ...], kv_bits: tuple[int, ...],
                   dtype: str, steps: int, repeats: int, prefill_tokens: int, threads: int) -> dict:
    """Everything measured in one fresh process for one weight layout: build, prune to `plan`, compress, then each
    (context, KV width) in turn (see the module docstring)."""
    from lmmlab.models.sparse_linear import compress_linears

    torch.set_num_threads(threads)
    loaded = build(shape, depth, getattr(torch, dtype))
    sparsity, pattern = PLANS[plan]
    achieved = magnitude_prune(loaded, sparsity, pattern)
    linear_bytes = sum(t.numel() * t.element_size() for lin in loaded.prunable().values() for t in lin.parameters())
    counts = compress_linears(loaded) if sparsity > 0 else {"compressed": 0, "bytes_after": linear_bytes}
    gc.collect()
    out = {"depth": depth, "achieved_sparsity": achieved, "compressed_linears": counts["compressed"],
           "linear_bytes": counts["bytes_after"],
           **weight_bytes(loaded), "prefill_s": prefill_seconds(loaded, prefill_tokens), "configs": []}
    out["bandwidth_gb_s"] = process_read_bandwidth_gb_s()
    for context in contexts:
        for bits in kv_bits:
            gc.collect()
            host_peak_reset()
            cache = fill_cache(loaded, bits, context, seed=context + bits)
            held = cache_bytes(cache)
            times = decode_seconds(loaded, cache, steps, repeats)
            out["configs"].append({"context": context, "kv_bits": bits, "cache_bytes": held,
                                   "s_per_token": statistics.median(times) / steps, "peak_rss_bytes": host_peak(),
                                   "times_s": times})
            del cache
    return out


def at_depth(loaded, depth: int):
    """A view of `loaded` that runs its first `depth` decoder layers (the model's config says how many run)."""
    from dataclasses import replace

    loaded.model.config.num_hidden_layers = depth
    return replace(loaded, layers=loaded.layers[:depth])


@torch.no_grad()
def interleaved_seconds(loaded, modules: dict[str, list], depths, contexts, kv_bits, steps: int,
                        repeats: int) -> dict:
    """{(depth, plan, context, KV width): seconds of each of `repeats` groups of `steps` greedy steps}, the plans and
    depths taking turns on one cache per (depth, context, width) — round r runs every (depth, plan) once, in an order
    rotated by r — so a machine busy with other work slows them alike. Each turn swaps the plan's linears in, runs
    the model's first `depth` layers, one untimed step first; a cache grows by plans × repeats × (steps + 1)
    tokens over the run."""
    from lmmlab.models.sparse_linear import prunable_slots

    slots, full = prunable_slots(loaded), loaded.num_layers
    turns = [(d, plan) for d in depths for plan in modules]
    times: dict = {}
    for context in contexts:
        for bits in kv_bits:
            caches = {d: fill_cache(at_depth(loaded, d), bits, context, seed=context + bits) for d in depths}
            for r in range(repeats):
                for d, plan in turns[r % len(turns):] + turns[:r % len(turns)]:
                    for (parent, short, _), module in zip(slots, modules[plan]):
                        setattr(parent, short, module)
                    view = at_depth(loaded, d)
                    times.setdefault((d, plan, context, bits), []).extend(
                        decode_seconds(view, caches[d], steps, 1))
            del caches
            gc.collect()
    for parent, short, linear in slots:
        setattr(parent, short, linear)
    at_depth(loaded, full)
    return times


def measure_speeds(shape: str, depths: tuple[int, ...], plans: tuple[str, ...], contexts: tuple[int, ...],
                   kv_bits: tuple[int, ...], dtype: str, steps: int, repeats: int, threads: int) -> dict[int, dict]:
    """Per depth: decode seconds per token of every plan × context × KV width, the model built once at the largest
    depth and the plans and depths interleaved (`interleaved_seconds`); the read bandwidth measured here."""
    torch.set_num_threads(threads)
    loaded = build(shape, max(depths), getattr(torch, dtype))
    modules, achieved = variants(loaded, plans)
    bandwidth = process_read_bandwidth_gb_s()
    times = interleaved_seconds(loaded, modules, depths, contexts, kv_bits, steps, repeats)
    return {d: {"depth": d, "achieved": achieved, "bandwidth_gb_s": bandwidth, "load_average": os.getloadavg(),
                "s_per_token": {f"{p}/{c}/{b}": statistics.median(t) / steps for (e, p, c, b), t in times.items()
                                if e == d},
                "times_s": {f"{p}/{c}/{b}": t for (e, p, c, b), t in times.items() if e == d}} for d in depths}


# ---------------------------------------------------------------------------------------------------- the bench

def in_fresh_process(fn, *args) -> dict:
    """fn(*args) in a fresh spawned process, glibc there set to give freed memory back (`MALLOC_ENV`)."""
    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_layout(*args) -> dict:
    """`measure_layout` in a fresh process."""
    return in_fresh_process(measure_layout, *args)


def at_full_depth(measured: dict[int, dict], full: int, f) -> float:
    """f of the one measured depth, or extrapolated from two to `full` (`bench_memory.extrapolate`)."""
    if len(measured) == 1:
        return f(next(iter(measured.values())))
    (d1, a), (d2, b) = sorted(measured.items())
    return extrapolate(f(a), f(b), d1, d2, full)


def combine(shape: str, plan: str, layouts: dict[int, dict], speeds: dict[int, dict]) -> list[dict]:
    """Rows of one plan: speed from the interleaved runs (`speeds`), memory and bytes from its own processes
    (`layouts`), each at the full depth."""
    full, last = full_depth(shape), layouts[max(layouts)]
    sparsity, pattern = PLANS[plan]
    rows = []
    for k, config in enumerate(last["configs"]):
        key = f"{plan}/{config['context']}/{config['kv_bits']}"
        pick = lambda m, name: m["configs"][k][name]  # noqa: E731
        lay = lambda f: at_full_depth(layouts, full, f)  # noqa: E731
        s_per_token = at_full_depth(speeds, full, lambda m: m["s_per_token"][key])
        fresh = lay(lambda m: pick(m, "s_per_token"))
        bytes_per_token = lay(lambda m: m["per_token"] + pick(m, "cache_bytes"))
        bandwidth = statistics.median(m["bandwidth_gb_s"] for m in (*layouts.values(), *speeds.values()))
        rows.append({
            "shape": shape, "context": config["context"], "plan": plan, "sparsity": sparsity, "pattern": pattern,
            "kv_bits": config["kv_bits"], "s_per_token": s_per_token,
            "tokens_per_s": 1 / s_per_token if s_per_token > 0 else None,
            "fresh_process_tokens_per_s": 1 / fresh if fresh > 0 else None,
            "peak_rss_bytes": lay(lambda m: pick(m, "peak_rss_bytes")), "bytes_per_token": bytes_per_token,
            "weight_bytes": lay(lambda m: m["weights"]), "linear_bytes": lay(lambda m: m["linear_bytes"]),
            "cache_bytes": lay(lambda m: pick(m, "cache_bytes")),
            "resident_bytes": lay(lambda m: m["weights"] + pick(m, "cache_bytes")),
            "prefill_s": lay(lambda m: m["prefill_s"]), "achieved_sparsity": last["achieved_sparsity"],
            "compressed_linears_per_layer": last["compressed_linears"] / last["depth"],
            "bandwidth_gb_s": bandwidth, "limit_tokens_per_s": bandwidth * 1e9 / bytes_per_token,
            "depths_measured": sorted(layouts), "full_depth": full,
            "measured": {str(d): {**m["configs"][k], "interleaved_s_per_token": speeds[d]["s_per_token"][key],
                                  "interleaved_times_s": speeds[d]["times_s"][key]} for d, m in layouts.items()}})
        rows[-1]["of_limit"] = None if s_per_token <= 0 else rows[-1]["tokens_per_s"] / rows[-1]["limit_tokens_per_s"]
    return rows


def relative_to_dense(rows: list[dict]) -> None:
    """Add `speedup_vs_dense` and `resident_vs_dense` (÷ the dense plan with the plain cache, same shape and
    context) and `peak_rss_vs_dense` to every row that has such a dense row (speed: None where an extrapolated
    time came out ≤ 0, timing noise swamping a layer's cost at tiny widths)."""
    dense = {(r["shape"], r["context"]): r for r in rows if r["plan"] == "dense" and r["kv_bits"] == 16}
    for r in rows:
        base = dense.get((r["shape"], r["context"]))
        if base is not None:
            r["speedup_vs_dense"] = (r["tokens_per_s"] / base["tokens_per_s"] if r["tokens_per_s"] and
                                     base["tokens_per_s"] else None)
            r["resident_vs_dense"] = r["resident_bytes"] / base["resident_bytes"]
            r["peak_rss_vs_dense"] = r["peak_rss_bytes"] / base["peak_rss_bytes"]


def bench_shape(shape: str, depths: tuple[int, ...], plans, contexts, kv_bits, dtype: str, steps: int,
                repeats: int, prefill_tokens: int, threads: int, fresh_process: bool) -> list[dict]:
    """Rows of one shape: per depth one process timing the plans interleaved, and per plan and depth one process
    measuring its memory (every one in this process without `fresh_process`)."""
    run = in_fresh_process if fresh_process else (lambda fn, *args: fn(*args))
    speeds = run(measure_speeds, shape, tuple(depths), tuple(plans), tuple(contexts), tuple(kv_bits), dtype, steps,
                 repeats, threads)
    rows = []
    for plan in plans:
        layouts = {d: run(measure_layout, shape, d, plan, tuple(contexts), tuple(kv_bits), dtype, min(steps, 2),
                          repeats, prefill_tokens, threads) for d in depths}
        rows += combine(shape, plan, layouts, speeds)
        log.info("bench e2e %s %s: %s tokens/s", shape, plan, [r["tokens_per_s"] for r in rows[-len(layouts[
            depths[-1]]["configs"]):]])
    return rows


def bench_e2e(shapes=("smollm2-135m", "llava-1.5-7b"), *, contexts=(1024, 4096), plans=tuple(PLANS),
              kv_bits=KV_WIDTHS, layers: int = 2, dtype: str | None = None, steps: int = 8, repeats: int = 3,
              prefill_tokens: int = 64, threads: int | None = None, kernel: bool = False,
              fresh_process: bool = True) -> dict:
    """Greedy decode rows of every shape × plan × context × KV width (see the module docstring), with the speedups
    and memory ratios against the dense model with the plain cache; with `kernel`, also the sparse kernel against
    the read bandwidth at LLaVA-1.5-7B's linear shapes at 70 % (`bench_sparse.bench_llava_widths`). Without
    `fresh_process` everything runs in this process (quick, for tests: peak RSS then also holds what ran
    before)."""
    shapes = [shapes] if isinstance(shapes, str) else list(shapes)
    if not shapes:
        raise ValueError(f"no --shape given; allowed: {', '.join(SHAPES)}")
    for shape in shapes:
        check_args(shape, contexts, layers, plans, kv_bits, dtype, steps, repeats)
    threads = threads or torch.get_num_threads()
    rows, dtypes = [], {}
    for shape in shapes:
        dtypes[shape] = dtype or DEFAULT_DTYPE[shape]
        full = full_depth(shape)
        depths = (full,) if shape in REAL or layers == full else (max(1, layers // 2), layers)
        rows += bench_shape(shape, depths, plans, contexts, kv_bits, dtypes[shape], steps, repeats, prefill_tokens,
                            threads, fresh_process)
    relative_to_dense(rows)
    out = {"shapes": shapes, "dtypes": dtypes, "threads": threads, "steps": steps, "repeats": repeats,
           "fresh_process": fresh_process, "prefill_tokens": prefill_tokens, "layers": layers,
           "load_average": os.getloadavg(), "rows": rows}
    if kernel:
        from lmmlab.lab.bench_sparse import bench_llava_widths

        torch.set_num_threads(threads)
        out["kernel"] = bench_llava_widths((0.7,), repeats=max(repeats, 5))
    return out
