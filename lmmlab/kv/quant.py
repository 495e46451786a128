"""KIVI's group-wise asymmetric quantization (Liu et al., 2024) and the bit packing a quantized KV store holds.

Keys have outlier *channels* and values do not, so
  keys   are quantized per channel: each group is one channel over `group_size` consecutive tokens (axis −2),
  values per token: each group is `group_size` consecutive channels of one token (axis −1),
asymmetrically, x ≈ zero + code · scale with code in [0, 2^b − 1], an fp16 scale and zero point per group. Codes
are bit-packed along the channel axis (four 2-bit codes per byte, eight 3-bit codes per three bytes, ...).
`PackedStates` is a quantized part as the packed-read attention (`kv.attention`) receives it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KEY_AXIS, VALUE_AXIS = -2, -1  # the axis a group runs along: tokens for keys (per channel), channels for values


def _tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte chunk: 2-bit 4→1, 3-bit 8→3, 4-bit 2→1, 6-bit 4→3, 8-bit 1→1."""
    lcm = bits * 8 // math.gcd(bits, 8)
    return lcm // bits, lcm // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2^bits, shape [..., n] -> uint8 [..., ceil(n·bits/8)] (the last chunk is zero-padded)."""
    per_chunk, chunk_bytes = _chunk(bits)
    n = codes.shape[-1]
    padded = -n % per_chunk
    if padded:
        codes = torch.nn.functional.pad(codes, (0, padded))
    c = codes.reshape(*codes.shape[:-1], -1, per_chunk).to(torch.int32)  # [..., chunks, per_chunk]
    shifts = torch.arange(per_chunk, device=codes.device, dtype=torch.int32) * bits
    word = (c << shifts).sum(-1, dtype=torch.int32)  # [..., chunks]; at most 24 bits used
    byte_shifts = torch.arange(chunk_bytes, device=codes.device, dtype=torch.int32) * 8
    packed = (word[..., None] >> byte_shifts) & 0xFF  # [..., chunks, chunk_bytes]
    return packed.reshape(*codes.shape[:-1], -1).to(torch.uint8)[..., : math.ceil(n * bits / 8)]


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., ceil(n·bits/8)] -> uint8 codes [..., n]."""
    per_chunk, chunk_bytes = _chunk(bits)
    if chunk_bytes == 1:  # 2, 4, 8 bits: each byte holds whole codes, shift the bytes directly
        shifts = torch.arange(per_chunk, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # [..., bytes, per_chunk]
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    padded = -packed.shape[-1] % chunk_bytes
    if padded:
        packed = torch.nn.functional.pad(packed, (0, padded))
    b = packed.reshape(*packed.shape[:-1], -1, chunk_bytes).to(torch.int32)  # [..., chunks, chunk_bytes]
    byte_shifts = torch.arange(chunk_bytes, device=packed.device, dtype=torch.int32) * 8
    word = (b << byte_shifts).sum(-1, dtype=torch.int32)  # [..., chunks]
    shifts = torch.arange(per_chunk, device=packed.device, dtype=torch.int32) * bits
    codes = (word[..., None] >> shifts) & ((1 << bits) - 1)  # [..., chunks, per_chunk]
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


@dataclass
class Quantized:
    """States [B, H, T, D] stored as packed codes plus an fp16 scale and zero point per group."""

    codes: torch.Tensor  # uint8 [B, H, T, ceil(D·bits/8)]
    scale: torch.Tensor  # fp16, keys [B, H, T/G, 1, D], values [B, H, T, D/G, 1]
    zero: torch.Tensor  # fp16, same shape as scale
    bits: int
    axis: int  # KEY_AXIS or VALUE_AXIS
    head_dim: int
    base: tuple[torch.Tensor, ...] | None = None  # buffers with spare tokens that codes/scale/zero are the head of
    filled: list[int] | None = None  # tokens written into `base` so far, shared by every view of it

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]

    @property
    def group_size(self) -> int:
        return self.num_tokens // self.scale.shape[2] if self.axis == KEY_AXIS else self.head_dim // self.scale.shape[3]

    def nbytes(self) -> int:
        """Bytes of the states stored (the spare room of `base` is `allocated_nbytes() - nbytes()`)."""
        return _tensor_bytes(self.codes, self.scale, self.zero)

    def allocated_nbytes(self) -> int:
        return self.nbytes() if self.base is None else _tensor_bytes(*self.base)

    def map(self, fn) -> "Quantized":
        """Apply `fn` to every stored tensor (they all lead with the batch axis); exact, no re-quantization."""
        return Quantized(fn(self.codes), fn(self.scale), fn(self.zero), self.bits, self.axis, self.head_dim)

    def append(self, other: "Quantized", reserve: int = 0) -> "Quantized":
        """Concatenate along tokens: both the codes and the scales have whole groups, so this is lossless. `other` is
        written into the spare room behind this store's tensors when there is enough (and no other append from the
        same buffers wrote there first), else all is moved into new buffers with room for `reserve` more tokens, so
        that appending a token at a time copies the store only once every `reserve` tokens (not at every step, as a
        concatenation would)."""
        token_dim, n, m = 2, self.num_tokens, other.num_tokens
        in_place = self.base is not None and self.filled[0] == n and self.base[0].shape[token_dim] >= n + m
        bases = self.base if in_place else (None, None, None)
        new_base, views = [], []
        for mine, new, base in zip((self.codes, self.scale, self.zero), (other.codes, other.scale, other.zero), bases):
            used, add = mine.shape[token_dim], new.shape[token_dim]
            if base is None:
                spare = -(-reserve * add // m)  # rows per token: 1 for codes and value scales, 1/G for key scales
                shape = list(mine.shape)
                shape[token_dim] = used + add + spare
                base = mine.new_empty(shape)
                base[:, :, :used] = mine
            base[:, :, used : used + add] = new
            new_base.append(base)
            views.append(base[:, :, : used + add])
        filled = self.filled if in_place else [0]
        filled[0] = n + m
        return Quantized(*views, self.bits, self.axis, self.head_dim, base=tuple(new_base), filled=filled)


def _grouped(x: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """[B, H, T, D] -> keys [B, H, T/G, G, D] (reduce dim -2), values [B, H, T, D/G, G] (reduce dim -1)."""
    B, H, T, D = x.shape
    if axis == KEY_AXIS:
        return x.reshape(B, H, T // group_size, group_size, D)
    return x.reshape(B, H, T, D // group_size, group_size)


def _round_fp16(x: torch.Tensor, down: bool) -> torch.Tensor:
    """x to fp16, rounded towards -inf (down) or +inf, so the fp16 grid still covers the group's range."""
    h = x.to(torch.float16)
    towards = torch.full_like(h, float("-inf") if down else float("inf"))
    off = h.float() > x if down else h.float() < x
    return torch.where(off, torch.nextafter(h, towards), h)


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int) -> Quantized:
    """Asymmetric group-wise quantization of x [B, H, T, D]; |x − dequantize(q)| ≤ scale/2 for every element."""
    B, H, T, D = x.shape
    g = _grouped(x.float(), group_size, axis)
    reduce = -2 if axis == KEY_AXIS else -1
    levels = (1 << bits) - 1
    zero = _round_fp16(g.amin(reduce, keepdim=True), down=True)  # fp16, ≤ the group's minimum
    scale = _round_fp16((g.amax(reduce, keepdim=True) - zero.float()) / levels, down=False)  # fp16, grid ≥ max
    s, z = scale.float(), zero.float()
    step = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: scale 0, every code 0
    codes = ((g - z) / step).round().clamp(0, levels).to(torch.uint8).reshape(B, H, T, D)
    return Quantized(pack(codes, bits), scale, zero, bits, axis, D)


def dequantize(q: Quantized, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """codes · scale + zero, as `dtype` [B, H, T, D]; written into `out` (a slice of a larger buffer) when given."""
    codes = unpack(q.codes, q.bits, q.head_dim)  # [B, H, T, D]
    B, H, T, D = codes.shape
    g = _grouped(codes, q.group_size, q.axis).float()
    x = torch.addcmul(q.zero.float(), g, q.scale.float()).reshape(B, H, T, D)
    if out is None:
        return x.to(dtype)
    return out.copy_(x)


@dataclass
class PackedStates:
    """A quantized cache part as a `read="packed"` layer hands it to attention: the older tokens as they are stored
    (`stored`: packed codes, scales, zero points) and the newer ones in full precision (`tail`: the window, then this
    pass's states), in token order. `lmmlab.attention` attends over it without a float copy of the store;
    `materialize()` is the tensor the dequantize-then-attend path reads."""

    stored: Quantized
    tail: torch.Tensor  # [B, H, w, D]

    @property
    def shape(self) -> torch.Size:
        B, H, w, D = self.tail.shape
        return torch.Size((B, H, self.stored.num_tokens + w, D))

    @property
    def dtype(self) -> torch.dtype:
        return self.tail.dtype

    @property
    def device(self) -> torch.device:
        return self.tail.device

    def materialize(self) -> torch.Tensor:
        """[dequantize(stored), tail] along tokens, assembled in one buffer [B, H, T, D]."""
        q = self.stored.num_tokens
        out = torch.empty(self.shape, dtype=self.tail.dtype, device=self.tail.device)
        dequantize(self.stored, self.tail.dtype, out=out[:, :, :q])
        out[:, :, q:] = self.tail
        return out
