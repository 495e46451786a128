"""Micro-benchmark of the sparse decode kernel (`lmmlab.models.sparse_kernels.matvec`) against torch's dense matvec.

Decode is bound by memory: every step reads each weight once. So each product is timed from a cold cache (a buffer
larger than the last-level cache is read before every timed call, untimed), and set beside the read bandwidth
measured the same way in the same loop (a sum over that buffer), the runs interleaved so a busy machine slows all
of them alike. Times are medians of `repeats`; GB/s is bytes that must be read ÷ median seconds (10^9 bytes).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from lmmlab.models.sparse_kernels import PATHS, available_paths, compress, matvec, path_code

LLAVA_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # LLaVA-1.5-7B: q/k/v/o, gate/up, down (rows, cols)


def llc_bytes() -> int:
    """The CPU's last-level cache in bytes (sysfs), 32 MiB where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


def _path_name(path: str | None) -> str:
    """The kernel path `path` (or $LMMLAB_SPARSE_PATH) picks; auto is the best this CPU runs."""
    code = path_code(path)
    return PATHS[code] if code else available_paths()[-1]


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _operands(rows: int, cols: int, sparsity: float, tokens: int, seed: int) -> dict:
    """Dense fp16/fp32 weights [rows, cols] with a random `sparsity` share of zeros, their compressed fp16 layout,
    and x [tokens, cols] in fp16 and fp32."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[torch.rand(rows, cols, generator=g) < sparsity] = 0
    x = torch.randn(tokens, cols, generator=g)
    return {"w32": W, "w16": W.half(), "x32": x, "x16": x.half(), "sparse": compress(W, torch.float16)}


def _runs(ops: dict, path: str | None) -> dict[str, Callable[[], object]]:
    mask, values, offsets = ops["sparse"]
    return {"dense_fp16": lambda: torch.nn.functional.linear(ops["x16"], ops["w16"]),
            "dense_fp32": lambda: torch.nn.functional.linear(ops["x32"], ops["w32"]),
            "sparse_fp16": lambda: matvec(mask, values, offsets, ops["x32"], path=path)}


def bench_matvec(rows: int, cols: int, sparsity: float, *, repeats: int = 15, tokens: int = 1,
                 path: str | None = None, seed: int = 0) -> dict:
    """Median seconds of y = x Wᵀ for x [tokens, cols], W [rows, cols] at `sparsity` (random unstructured zeros):
    torch dense fp16 and fp32 against the sparse kernel on fp16 values; the bytes each must read, their GB/s, the
    machine's read bandwidth (sum over a buffer 4x the last-level cache) and the kernel's share of it, and speedups."""
    if not available_paths():
        raise ValueError("the sparse kernels are not built on this machine (no C compiler): nothing to benchmark")
    ops = _operands(rows, cols, sparsity, tokens, seed)
    runs, flush = _runs(ops, path), torch.ones(4 * llc_bytes() // 4)
    times: dict[str, list[float]] = {name: [] for name in (*runs, "bandwidth")}
    for _ in range(repeats):
        for name, fn in runs.items():
            flush.sum()  # evict the weights: decode reads them from memory
            times[name].append(_timed(fn))
        times["bandwidth"].append(_timed(flush.sum))
    sec = {name: statistics.median(t) for name, t in times.items()}
    read = {"dense_fp16": rows * cols * 2, "dense_fp32": rows * cols * 4,
            "sparse_fp16": sum(t.numel() * t.element_size() for t in ops["sparse"])}
    gb_s = {name: read[name] / sec[name] / 1e9 for name in runs}
    limit = flush.numel() * 4 / sec["bandwidth"] / 1e9
    return {"rows": rows, "cols": cols, "sparsity": sparsity, "tokens": tokens, "threads": torch.get_num_threads(),
            "path": _path_name(path),
            "repeats": repeats, **{f"{n}_s": sec[n] for n in runs}, **{f"{n}_bytes": read[n] for n in runs},
            **{f"{n}_gb_s": gb_s[n] for n in runs}, "bandwidth_gb_s": limit,
            "sparse_fraction_of_bandwidth": gb_s["sparse_fp16"] / limit,
            "speedup_vs_fp16": sec["dense_fp16"] / sec["sparse_fp16"],
            "speedup_vs_fp32": sec["dense_fp32"] / sec["sparse_fp16"]}


def bench_llava_widths(sparsities: tuple[float, ...] = (0.5, 0.7), **kwargs) -> list[dict]:
    """`bench_matvec` at LLaVA-1.5-7B's linear shapes and each sparsity."""
    return [bench_matvec(rows, cols, s, **kwargs) for rows, cols in LLAVA_SHAPES for s in sparsities]
