"""KIVI's folded decode products (lmmlab.attention) as Triton kernels on CUDA, reading the packed store as it is held.

The same two products as `packed_scores_reference` / `packed_values_reference` and the C kernels
(`lmmlab/csrc/kivi_attention.c`), with each group's fp16 scale and zero point folded in (KIVI, Liu et al. 2024, §4):
    keys   (per channel, groups of G tokens, g = t / G):    q · k_t = Σ_c (q_c · s_gc) · code_tc + Σ_c q_c · z_gc
    values (per token, groups of G channels, j = c / G):   o_c = Σ_t (p_t · s_t,j) · code_tc + Σ_t p_t · z_t,j
The kernels load the packed codes (uint8) and the fp16 scales and zero points straight from the store, unpack the codes
in registers (code i of a chunk of CB bytes is channel k·PC + i, at bits [b·i, b·i + b) of the chunk's little-endian
word, as `lmmlab.kvcache.pack` lays it out) and never build a float copy of the store. The stores may be views of
larger buffers along the token axis (`Quantized.append(..., reserve=)`): every tensor is read through its own strides.

Work split (decode: B·H of about 32, R = 1, T up to 4096+):
  scores   one program per (batch·head, NG key groups): the program folds the query into each group's scales once
           and writes its NG·G scores for every query row; no reduction across programs.
  values   split-K over tokens: program (batch·head, split) sums its own run of token tiles for every query row into
           partial[B, H, split, R, D] (for R = 1 in per-element registers, reduced over tokens once at the end); the
           splits are then summed by torch in a fixed order (deterministic).
Any width in {2, 3, 4, 6, 8}, any head size D and group size G (tiles are padded to powers of two and masked), any
R ≥ 1, B, H, T ≥ 1. Tiles hold about `TILE` codes as fp32 registers. The width, D, G, R and the tile sizes are
compile-time constants (one compilation each; the tiles per split are a power of two, so T adds only a few), while
B, H, T and the strides are not. (Constant loop counts also keep Triton 3.6's interpreter, TRITON_INTERPRET=1, working
under numpy >= 2.4, where it cannot loop over a count passed at run time.)
"""
from __future__ import annotations

import functools

import torch

from lmmlab.kv.quant import KEY_AXIS, VALUE_AXIS, Quantized, _chunk

try:  # Triton is optional: without it (or without CUDA) `available()` is False and nothing here is called
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = tl = None

TILE = 4096  # codes per program and step, as fp32 registers: keys [NG, G_PAD, D_PAD], values [BLOCK_T, NJ, G_PAD]
SPLITS_PER_SM = 4  # split-K target for values: about this many programs per multiprocessor


def available() -> bool:
    """Whether the Triton kernels can run here: Triton importable and a CUDA device present. Never raises."""
    try:
        return triton is not None and torch.cuda.is_available()
    except Exception:
        return False


if triton is not None:

    @triton.jit
    def _unpack(rows, c, mask, P, c_sp, BITS: tl.constexpr, PC: tl.constexpr, CB: tl.constexpr):
        """fp32 codes of channels c in the packed rows starting at `rows` (uint8 pointers; rows and c broadcast to the
        tile's shape), 0 where masked. Chunk k = c / PC is CB bytes from byte k·CB; code i = c mod PC of it sits at
        bits [BITS·i, BITS·i + BITS) of its little-endian word (a 3-byte chunk's last bytes can be cut off by P)."""
        first = (c // PC) * CB  # the chunk's first byte
        word = tl.load(rows + first * c_sp, mask=mask & (first < P), other=0).to(tl.int32)
        if CB == 3:
            word = word | (tl.load(rows + (first + 1) * c_sp, mask=mask & (first + 1 < P), other=0).to(tl.int32) << 8)
            word = word | (tl.load(rows + (first + 2) * c_sp, mask=mask & (first + 2 < P), other=0).to(tl.int32) << 16)
        return ((word >> ((c % PC) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)

    @triton.jit
    def _scores_kernel(codes, scale, zero, q, out,
                       H, T, P,
                       c_sb, c_sh, c_st, c_sp,  # codes uint8 [B, H, T, P]
                       s_sb, s_sh, s_sg, s_sd,  # scale, zero fp16 [B, H, T/G, 1, D] (the size-1 axis left out)
                       BITS: tl.constexpr, PC: tl.constexpr, CB: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                       R: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr, NG: tl.constexpr):
        """scores[b, h, r, t] (out fp32 [B, H, R, T]) for the NG key groups of program (b·H + h, block)."""
        bh = tl.program_id(0)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        g = tl.program_id(1) * NG + tl.arange(0, NG)  # [NG] key groups
        j = tl.arange(0, G_PAD)  # [G_PAD] token within its group
        c = tl.arange(0, D_PAD)  # [D_PAD] channel
        g_ok, c_ok = g < T // G, c < D
        t = g[:, None] * G + j[None, :]  # [NG, G_PAD] tokens
        t_ok = g_ok[:, None] & (j[None, :] < G)
        rows = codes + b * c_sb + h * c_sh + t[:, :, None].to(tl.int64) * c_st  # [NG, G_PAD, 1]
        code = _unpack(rows, c[None, None, :], t_ok[:, :, None] & c_ok[None, None, :], P, c_sp,
                       BITS, PC, CB)  # [NG, G_PAD, D_PAD]
        at = b * s_sb + h * s_sh + g[:, None].to(tl.int64) * s_sg + c[None, :] * s_sd  # [NG, D_PAD]
        gc_ok = g_ok[:, None] & c_ok[None, :]
        s = tl.load(scale + at, mask=gc_ok, other=0.0).to(tl.float32)  # [NG, D_PAD] s_gc
        z = tl.load(zero + at, mask=gc_ok, other=0.0).to(tl.float32)  # [NG, D_PAD] z_gc
        for r in range(R):  # the codes stay in registers for every query row
            row = bh.to(tl.int64) * R + r
            qr = tl.load(q + row * D + c, mask=c_ok, other=0.0)  # [D_PAD]
            qs = qr[None, :] * s  # [NG, D_PAD]: q_c · s_gc, once per group
            bias = tl.sum(qr[None, :] * z, axis=1)  # [NG]: Σ_c q_c · z_gc
            score = tl.sum(qs[:, None, :] * code, axis=2) + bias[:, None]  # [NG, G_PAD]
            tl.store(out + row * T + t, score, mask=t_ok)

    @triton.jit
    def _value_tile(codes, scale, zero, b, h, t, c, j, c_ok, j_ok, T, P, c_sb, c_sh, c_st, c_sp, s_sb, s_sh, s_st,
                    s_sj, BITS: tl.constexpr, PC: tl.constexpr, CB: tl.constexpr):
        """Tokens t [BLOCK_T] of a value store: codes [BLOCK_T, NJ, G_PAD] (channels c [NJ, G_PAD]) and the
        scales and zero points s_tj, z_tj [BLOCK_T, NJ] (groups j [NJ]), as fp32; 0 outside the store."""
        t_ok = t < T
        rows = codes + b * c_sb + h * c_sh + t[:, None, None].to(tl.int64) * c_st  # [BLOCK_T, 1, 1]
        code = _unpack(rows, c[None, :, :], t_ok[:, None, None] & c_ok[None, :, :], P, c_sp, BITS, PC, CB)
        at = b * s_sb + h * s_sh + t[:, None].to(tl.int64) * s_st + j[None, :] * s_sj  # [BLOCK_T, NJ]
        tj_ok = t_ok[:, None] & j_ok[None, :]
        s = tl.load(scale + at, mask=tj_ok, other=0.0).to(tl.float32)
        z = tl.load(zero + at, mask=tj_ok, other=0.0).to(tl.float32)
        return code, s, z

    @triton.jit
    def _values_kernel(codes, scale, zero, p, partial,
                       H, T, P,
                       c_sb, c_sh, c_st, c_sp,  # codes uint8 [B, H, T, P]
                       s_sb, s_sh, s_st, s_sj,  # scale, zero fp16 [B, H, T, D/G, 1] (the size-1 axis left out)
                       BITS: tl.constexpr, PC: tl.constexpr, CB: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                       R: tl.constexpr, ITERS: tl.constexpr, NJ: tl.constexpr, G_PAD: tl.constexpr,
                       R_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
        """partial[b, h, split, r, :] (fp32 [B, H, splits, R, D]) = Σ over this split's ITERS tiles of BLOCK_T tokens
        of p[b, h, r, t] · v[t, :], for program (b·H + h, split)."""
        bh, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        j = tl.arange(0, NJ)  # [NJ] value group (channels j·G .. j·G + G − 1)
        i = tl.arange(0, G_PAD)  # [G_PAD] channel within its group
        c = j[:, None] * G + i[None, :]  # [NJ, G_PAD] channel
        j_ok = j < D // G
        c_ok = j_ok[:, None] & (i[None, :] < G)
        p_bh = p + bh.to(tl.int64) * R * T
        dst = partial + (bh.to(tl.int64) * splits + split) * R * D
        t0 = split * ITERS * BLOCK_T
        if R == 1:  # decode, one row: sum per element over the tiles, reduce over tokens once at the end
            acc1 = tl.zeros((BLOCK_T, NJ, G_PAD), dtype=tl.float32)  # (p_t · s_tj) · code_tc
            zacc1 = tl.zeros((BLOCK_T, NJ), dtype=tl.float32)  # p_t · z_tj
            for it in range(ITERS):
                t = t0 + it * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] tokens
                code, s, z = _value_tile(codes, scale, zero, b, h, t, c, j, c_ok, j_ok, T, P, c_sb, c_sh, c_st,
                                         c_sp, s_sb, s_sh, s_st, s_sj, BITS, PC, CB)
                pt = tl.load(p_bh + t, mask=t < T, other=0.0)  # [BLOCK_T]
                acc1 += (pt[:, None] * s)[:, :, None] * code
                zacc1 += pt[:, None] * z
            o = tl.sum(acc1, axis=0) + tl.sum(zacc1, axis=0)[:, None]  # [NJ, G_PAD]
            tl.store(dst + c, o, mask=c_ok)
        else:  # several rows: each tile's codes are unpacked once and reduced over its tokens for every row
            rs = tl.arange(0, R_PAD)  # [R_PAD] query rows
            acc = tl.zeros((R_PAD, NJ, G_PAD), dtype=tl.float32)  # Σ_t (p_t · s_tj) · code_tc
            zacc = tl.zeros((R_PAD, NJ), dtype=tl.float32)  # Σ_t p_t · z_tj
            for it in range(ITERS):
                t = t0 + it * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] tokens
                code, s, z = _value_tile(codes, scale, zero, b, h, t, c, j, c_ok, j_ok, T, P, c_sb, c_sh, c_st,
                                         c_sp, s_sb, s_sh, s_st, s_sj, BITS, PC, CB)
                for r in range(R):
                    pt = tl.load(p_bh + r * T + t, mask=t < T, other=0.0)  # [BLOCK_T]
                    w = pt[:, None] * s  # [BLOCK_T, NJ]: p_t · s_tj
                    part = tl.sum(w[:, :, None] * code, axis=0)  # [NJ, G_PAD]
                    zpart = tl.sum(pt[:, None] * z, axis=0)  # [NJ]
                    mine = rs == r
                    acc = tl.where(mine[:, None, None], acc + part[None, :, :], acc)
                    zacc = tl.where(mine[:, None], zacc + zpart[None, :], zacc)
            o = acc + zacc[:, :, None]  # [R_PAD, NJ, G_PAD]
            tl.store(dst + rs[:, None, None] * D + c[None, :, :], o, mask=(rs < R)[:, None, None] & c_ok[None, :, :])


# --- launchers ---------------------------------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _warps(elements: int) -> int:
    return min(16, max(4, elements // 1024))


def _packing(store: Quantized) -> dict:
    per_chunk, chunk_bytes = _chunk(store.bits)
    return dict(BITS=store.bits, PC=per_chunk, CB=chunk_bytes)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter on the CPU (TRITON_INTERPRET=1): a few splits, to exercise the reduction


def triton_scores(q: torch.Tensor, keys: Quantized) -> torch.Tensor:
    """q [B, H, R, D] fp32 · the stored keys (per channel, `axis=KEY_AXIS`) -> scores fp32 [B, H, R, T]: what
    `packed_scores_reference` returns, to float rounding."""
    assert keys.axis == KEY_AXIS, "triton_scores reads a key store (grouped per channel over tokens)"
    q = q.float().contiguous()
    B, H, R, D = q.shape
    T, G = keys.num_tokens, keys.group_size
    assert D == keys.head_dim and keys.codes.shape[:2] == (B, H) and keys.scale.shape[2] * G == T
    out = q.new_empty(B, H, R, T)
    if out.numel() == 0:
        return out
    D_PAD, G_PAD = _pow2(D), _pow2(G)
    NG = max(1, min(TILE // (D_PAD * G_PAD), _pow2(T // G)))  # key groups per program
    cs, ss = keys.codes.stride(), keys.scale.stride()
    assert keys.zero.stride() == ss
    _scores_kernel[(B * H, triton.cdiv(T // G, NG))](
        keys.codes, keys.scale, keys.zero, q, out, H, T, keys.codes.shape[3], *cs, ss[0], ss[1], ss[2], ss[4],
        D=D, G=G, R=R, D_PAD=D_PAD, G_PAD=G_PAD, NG=NG, num_warps=_warps(NG * G_PAD * D_PAD), **_packing(keys))
    return out


def triton_values(p: torch.Tensor, values: Quantized, num_splits: int | None = None) -> torch.Tensor:
    """Attention weights p [B, H, R, T] fp32 · the stored values (per token, `axis=VALUE_AXIS`) -> fp32 [B, H, R, D]:
    what `packed_values_reference` returns, to float rounding. The tokens are split over about `num_splits` programs
    per head (default: enough to fill the GPU), whose partial sums are then added in a fixed order."""
    assert values.axis == VALUE_AXIS, "triton_values reads a value store (grouped per token over channels)"
    p = p.float().contiguous()
    B, H, R, T = p.shape
    D, G = values.head_dim, values.group_size
    assert values.num_tokens == T and values.codes.shape[:2] == (B, H) and values.scale.shape[3] * G == D
    if B * H * R == 0 or T == 0:
        return p.new_zeros(B, H, R, D)
    NJ, G_PAD, R_PAD = _pow2(D // G), _pow2(G), _pow2(R)
    BLOCK_T = max(1, min(TILE // (NJ * G_PAD), _pow2(T)))  # tokens per tile
    tiles = triton.cdiv(T, BLOCK_T)
    if num_splits is None:
        num_splits = triton.cdiv(SPLITS_PER_SM * _multiprocessors(p.device), B * H)
    ITERS = _pow2(triton.cdiv(tiles, max(1, num_splits)))  # tiles per split: a power of two, so few compilations
    splits = triton.cdiv(tiles, ITERS)
    partial = p.new_empty(B, H, splits, R, D)
    cs, ss = values.codes.stride(), values.scale.stride()
    assert values.zero.stride() == ss
    _values_kernel[(B * H, splits)](
        values.codes, values.scale, values.zero, p, partial, H, T, values.codes.shape[3], *cs,
        ss[0], ss[1], ss[2], ss[3], D=D, G=G, R=R, ITERS=ITERS, NJ=NJ, G_PAD=G_PAD, R_PAD=R_PAD, BLOCK_T=BLOCK_T,
        num_warps=_warps(BLOCK_T * NJ * G_PAD), **_packing(values))
    return partial[:, :, 0] if splits == 1 else partial.sum(dim=2)
