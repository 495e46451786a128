"""The compressed layout of a pruned linear and its products: the C kernels of `csrc/sparse_matvec.c` (built and
cached like the KV kernels, `lmmlab.kv.native.load_library`), with torch doing the same where they cannot run.

A weight W [R, C] with Z kept entries is held as
    mask     uint8 [R, P]   bit (j mod 8) of byte (j div 8) of row r is 1 where W[r, j] is kept (compressed-tensors'
                            bit order); P = ⌈C/64⌉·8, so each row is whole 64-bit words
    values   [Z + PAD]      the kept entries row by row (fp32, fp16 or bf16), then PAD zeros the vector loads may read
    offsets  int64 [R + 1]  where row r starts in `values` (offsets[R] = Z)
`matvec` multiplies 1–4 tokens by it straight from this layout (the C kernel, path picked by CPU features or by
LMMLAB_SPARSE_PATH / `path`: auto, portable, avx2, avx512); `unpack_rows` rebuilds a block of dense rows, which is
what prefill and every path without the kernels (no compiler, CUDA) multiply by.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "sparse_matvec.c"
PATHS = ("auto", "portable", "avx2", "avx512")  # the C kernel's path codes 0..3
PATH_ENV = "LMMLAB_SPARSE_PATH"
PAD = 32  # values readable past the last kept one (VALUE_PAD in the C source)
MAX_TOKENS = 4  # the most tokens one matvec call takes
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The sparse kernels, built on first use; None (one warning) where there is no compiler or the build fails."""
    from lmmlab.kv.native import load_library

    lib = load_library(SOURCE, "sparse linear decode")
    if lib is None:
        return None
    p, i, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.sparse_matvec.argtypes = [p, p, p, i, p, p, i, i, i, l, l, i, i]
    lib.sparse_unpack.argtypes = [p, p, p, i, p, i, i, i, i, i]
    lib.sparse_matvec.restype = lib.sparse_unpack.restype = lib.sparse_paths.restype = i
    return lib


def available_paths() -> tuple[str, ...]:
    """The kernel paths this machine runs (portable, avx2, avx512); empty without the kernels."""
    lib = library()
    mask = lib.sparse_paths() if lib is not None else 0
    return tuple(name for code, name in enumerate(PATHS) if code and mask >> code & 1)


def path_code(path: str | None = None) -> int:
    """The C code of a kernel path: `path`, else $LMMLAB_SPARSE_PATH, else auto."""
    name = path or os.environ.get(PATH_ENV) or "auto"
    if name not in PATHS:
        raise ValueError(f"unknown sparse kernel path {name!r} (argument or ${PATH_ENV}); allowed: {', '.join(PATHS)}")
    return PATHS.index(name)


# ---------------------------------------------------------------------------------------------------- layout

def row_bytes(columns: int) -> int:
    """P: mask bytes per row, whole 64-column words."""
    return -(-columns // 64) * 8


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """keep bool [R, C] -> mask uint8 [R, P] (bit j mod 8 of byte j div 8; padding bits 0)."""
    R, C = keep.shape
    P = row_bytes(C)
    padded = torch.zeros(R, 8 * P, dtype=torch.uint8, device=keep.device)
    padded[:, :C] = keep
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=keep.device)
    return (padded.view(R, P, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, columns: int) -> torch.Tensor:
    """mask uint8 [R, P] -> keep bool [R, columns]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return ((mask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :columns]


def compress(W: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [R, C] -> (mask [R, P], values [Z + PAD] in `dtype`, offsets [R + 1]); kept are W's non-zeros."""
    keep = W != 0
    counts = keep.sum(1)
    offsets = torch.zeros(W.shape[0] + 1, dtype=torch.int64, device=W.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    values = torch.cat([W[keep].to(dtype), torch.zeros(PAD, dtype=dtype, device=W.device)])
    return pack_mask(keep), values, offsets


# ---------------------------------------------------------------------------------------------------- products

def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def unpack_rows(mask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, r0: int, r1: int,
                columns: int) -> torch.Tensor:
    """Rows [r0, r1) of the dense weight, [r1 - r0, columns] in the values' dtype (zeros where not kept): the C
    kernel on the CPU, torch (boolean scatter) elsewhere or without it."""
    lib = library() if values.device.type == "cpu" else None
    out = torch.empty(r1 - r0, columns, dtype=values.dtype, device=values.device)
    if lib is not None and values.element_size() in (2, 4) and mask.is_contiguous() and values.is_contiguous():
        status = lib.sparse_unpack(_ptr(mask), _ptr(values), _ptr(offsets), values.element_size(), _ptr(out), r0, r1,
                                   mask.shape[1], columns, torch.get_num_threads())
        if status == 0:
            return out
    out.zero_()
    out[unpack_mask(mask[r0:r1], columns)] = values[int(offsets[r0]):int(offsets[r1])]
    return out


def matvec(mask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor, *,
           path: str | None = None) -> torch.Tensor | None:
    """y fp32 [B, R] = x [B, C] (B ≤ 4) times the compressed weight transposed, by the C kernel straight from the
    layout; None where it cannot run (no kernels, not on the CPU, a dtype it does not read). A `path` (or
    $LMMLAB_SPARSE_PATH) this CPU cannot run raises ValueError."""
    code, lib = path_code(path), library()
    if lib is None or values.device.type != "cpu" or values.dtype not in KINDS or not 1 <= x.shape[0] <= MAX_TOKENS \
            or not all(t.is_contiguous() for t in (mask, values, offsets)):
        return None
    (B, C), (R, P) = x.shape, mask.shape
    xp = torch.zeros(B, 8 * P, dtype=torch.float32)  # zeros past C: masked-off lanes multiply finite numbers
    xp[:, :C] = x
    y = torch.empty(B, R, dtype=torch.float32)
    status = lib.sparse_matvec(_ptr(mask), _ptr(values), _ptr(offsets), KINDS[values.dtype], _ptr(xp), _ptr(y), R, P,
                               B, 8 * P, R, code, torch.get_num_threads())
    if status == -2:
        raise ValueError(f"sparse kernel path {PATHS[code]!r} does not run on this CPU; it runs: "
                         f"{', '.join(available_paths())}")
    if status:
        raise RuntimeError(f"sparse_matvec refused a layout of {R}x{P} mask bytes, {B} tokens (status {status})")
    return y
