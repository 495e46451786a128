"""A transformers KV cache with quantization bit-widths per decoder layer, keys and values each at their own, in
KIVI's layout.

KIVI (Liu et al., 2024) observes that keys have outlier *channels* and values do not, so it quantizes
  keys   per channel: each group is one channel over `group_size` consecutive tokens,
  values per token:   each group is `group_size` consecutive channels of one token,
asymmetrically (x ≈ zero + code · scale, code in [0, 2^b − 1]). The newest tokens wait in full precision, as in
KIVI's reference (`LlamaAttention_KIVI`), in two windows of different lengths:
  keys   flush in chunks: when `residual_length` (R) of them have gathered they are quantized together (R / G whole
         key groups) and the key window empties; a prefill of T tokens quantizes its first T − T mod R keys;
  values slide: the newest R values stay in full precision, and each value older than that is quantized on its own
         (a value group never spans tokens); a prefill of T > R tokens quantizes its first T − R values.
So after T tokens q_k = T − T mod R keys and q_v = max(0, T − R) values are quantized, and T − q_k keys and
min(T, R) values are held as they come.

Storage is real: codes are bit-packed along the channel axis (four 2-bit codes per byte, eight 3-bit codes per three
bytes, ...), scales and zero points are fp16, and `nbytes()` counts exactly the tensors held. A layer with keys and
values at 16 bits is transformers' own `DynamicLayer`, storing the states as they come; in a layer with one part at
16 bits and the other quantized (KVTuner's separate key and value widths), the 16-bit part's window never flushes, so
it holds all of that part's states as they come, exactly what a `DynamicLayer` holds and reads for it.

Attention always sees the tokens of the current forward pass in full precision, as in KIVI (they are quantized only
after it has read them); earlier tokens are read back from the quantized stores. `kv_nbytes` is the same count in
closed form and `effective_bits` the bits per stored element it implies (`effective_key_bits` and
`effective_value_bits` per part; a layer's effective bits are the mean of its two parts').
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache, DynamicLayer

from lmmlab.plan import KIVI_GROUP_SIZE, KIVI_RESIDUAL, CompressionPlan, check_kv_bits, check_kv_layout

KEY_AXIS, VALUE_AXIS = -2, -1  # the axis a group runs along: tokens for keys (per channel), channels for values


def _tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- bit packing along the last axis ---------------------------------------------------------------------------

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


# --- group-wise asymmetric quantization ------------------------------------------------------------------------

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


READS = ("dequantize", "packed")  # how a quantized part is handed to attention (KiviLayer's `read`)


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


def check_settings(bits: int, group_size: int, residual_length: int, head_dim: int | None = None,
                   value_bits: int | None = None) -> None:
    """One clear error for a width or group layout the cache cannot store (`value_bits`: the value width when it is
    not `bits`). The head dimension matters only for quantized values: they are grouped along channels."""
    check_kv_bits([bits])
    if value_bits is not None:
        check_kv_bits([value_bits], "value bit-width")
    check_kv_layout(group_size, residual_length)
    if head_dim is not None and (bits if value_bits is None else value_bits) < 16 and head_dim % group_size:
        raise ValueError(f"kv group size {group_size} must divide the head dimension {head_dim} "
                         "(values are grouped along channels)")


def check_read(read: str) -> None:
    if read not in READS:
        raise ValueError(f"unknown KV read {read!r}; allowed: {', '.join(READS)}")


# --- the cache ---------------------------------------------------------------------------------------------------

class KiviLayer(BaseQuantizedLayer):
    """One decoder layer's cache: quantized key and value stores, a key window that flushes every `residual_length`
    tokens (`self.keys`) and a value window sliding over the newest `residual_length` tokens (`self.values`).
    Keys are stored at `bits`, values at `value_bits` (default `bits`); a part at 16 bits is never quantized: its
    window keeps all of its tokens as they come.

    `read="dequantize"` hands attention one float tensor per part (the store dequantized, then the window and the new
    states); `read="packed"` hands it a `PackedStates` for a part with a store, for `lmmlab.attention`'s packed
    decode attention. The stores grow into buffers with spare room for min(2 · residual_length, max(group_size,
    tokens / 8)) more tokens, so a decode step writes its token in place instead of copying the store."""

    def __init__(self, bits: int, group_size: int = KIVI_GROUP_SIZE, residual_length: int = KIVI_RESIDUAL,
                 value_bits: int | None = None, read: str = "dequantize"):
        check_settings(bits, group_size, residual_length, value_bits=value_bits)
        check_read(read)
        super().__init__()
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.value_bits = bits if value_bits is None else value_bits
        self.read = read

    @property
    def key_bits(self) -> int:
        return self.bits

    def _quantize(self, tensor: torch.Tensor, axis: int) -> Quantized:
        bits = self.key_bits if axis == KEY_AXIS else self.value_bits
        return quantize(tensor, bits, self.group_size, axis)

    def _dequantize(self, q_tensor: Quantized, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize(q_tensor, self.keys.dtype, out=out)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_settings(self.bits, self.group_size, self.residual_length, key_states.shape[-1], self.value_bits)
        super().lazy_initialization(key_states, value_states)

    @property
    def quantized_tokens(self) -> int:
        """Keys held quantized: whole chunks of `residual_length` tokens."""
        return 0 if self._quantized_keys is None else self._quantized_keys.num_tokens

    @property
    def quantized_value_tokens(self) -> int:
        """Values held quantized: every token but the newest `residual_length`."""
        return 0 if self._quantized_values is None else self._quantized_values.num_tokens

    @property
    def residual_tokens(self) -> int:
        """Keys in the full-precision window (0 .. residual_length − 1 between passes)."""
        return self.cumulative_length - self.quantized_tokens

    @property
    def residual_value_tokens(self) -> int:
        """Values in the full-precision window: min(tokens so far, residual_length) between passes."""
        return self.cumulative_length - self.quantized_value_tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new states [B, H, t, D]; return all keys and values so far (stored ones dequantized, then the
        window, then the new states, in token order). The new states are read before any of them is quantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        return self._update_keys(key_states), self._update_values(value_states)

    def _update_keys(self, new: torch.Tensor) -> torch.Tensor:
        if self.key_bits == 16:  # as a DynamicLayer: every key in the window, read as it is
            self.keys = torch.cat([self.keys, new], dim=-2)
            return self.keys
        window = self._extend(self.keys, new)
        out = self._read(self._quantized_keys, window)
        flush = window.shape[-2] - window.shape[-2] % self.residual_length  # whole chunks of R
        if flush:
            self._quantized_keys = self._append(self._quantized_keys,
                                                self._quantize(window[..., :flush, :].contiguous(), KEY_AXIS))
        # the window to keep; a concatenation made here is kept as it is, the model's own states are copied
        self.keys = window if not flush and window is not new else window[..., flush:, :].clone()
        return out

    def _update_values(self, new: torch.Tensor) -> torch.Tensor:
        if self.value_bits == 16:  # as a DynamicLayer: every value in the window, read as it is
            self.values = torch.cat([self.values, new], dim=-2)
            return self.values
        window = self._extend(self.values, new)
        out = self._read(self._quantized_values, window)
        old = max(0, window.shape[-2] - self.residual_length)  # all but the newest R
        if old:
            self._quantized_values = self._append(self._quantized_values,
                                                  self._quantize(window[..., :old, :].contiguous(), VALUE_AXIS))
        self.values = window[..., old:, :].clone()
        return out

    @staticmethod
    def _extend(window: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return torch.cat([window, new], dim=-2) if window.dim() == 4 else new

    def _read(self, stored: Quantized | None, tail: torch.Tensor) -> torch.Tensor | PackedStates:
        """[stored, tail] along tokens: the store dequantized into one tensor with the tail, or, when reading packed,
        the store as it is."""
        if stored is None:
            return tail
        packed = PackedStates(stored, tail)
        return packed if self.read == "packed" else packed.materialize()

    def _append(self, store: Quantized | None, new: Quantized) -> Quantized:
        if store is None:
            return new
        spare = min(2 * self.residual_length, max(self.group_size, store.num_tokens // 8))  # ≤ 1/8 of a long store
        return store.append(new, reserve=spare)

    def nbytes(self) -> int:
        """Bytes held: packed codes, fp16 scales and zero points, and both full-precision windows."""
        return self._held(Quantized.nbytes)

    def allocated_nbytes(self) -> int:
        """`nbytes()` plus the stores' spare room (at most 1/8 of a long store, and `2 · residual_length` tokens)."""
        return self._held(Quantized.allocated_nbytes)

    def _held(self, store_bytes) -> int:
        if not self.is_initialized:
            return 0
        held = _tensor_bytes(self.keys, self.values)
        for store in (self._quantized_keys, self._quantized_values):
            if store is not None:
                held += store_bytes(store)
        return held

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self._quantized_keys is not None:
            self._quantized_keys = self._quantized_keys.map(fn)
        if self._quantized_values is not None:
            self._quantized_values = self._quantized_values.map(fn)

    # Beam search and multiple return sequences move whole batch rows: exact on the packed store as well.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])


def layer_nbytes(layer) -> int:
    """Bytes one cache layer holds: a `KiviLayer`'s own count, else its key and value tensors."""
    if isinstance(layer, KiviLayer):
        return layer.nbytes()
    if not getattr(layer, "is_initialized", False):
        return 0
    return _tensor_bytes(layer.keys, layer.values)


class KVCache(Cache):
    """A `transformers.Cache` whose layer i stores keys and values at `bits[i]` bits (16 = as they come), or, with
    `value_bits`, keys at `bits[i]` and values at `value_bits[i]` bits.

    Pass it to a model as `cache=` (or to `model.generate(..., cache=...)`). `nbytes()` is the bytes of the states it
    holds; `allocated_nbytes()` adds the stores' spare room; `fp16_nbytes()` is what an fp16 `DynamicCache` would hold
    for the same tokens. `read="packed"` needs a model whose attention is lmmlab's
    (`lmmlab.attention.use_packed_attention`; `load_model` sets it, and `kv_cache_for` picks the read).
    """

    def __init__(self, bits: Sequence[int], group_size: int = KIVI_GROUP_SIZE, residual_length: int = KIVI_RESIDUAL,
                 value_bits: Sequence[int] | None = None, read: str = "dequantize"):
        bits = [int(b) for b in bits]
        if not bits:
            raise ValueError("a KV cache needs a bit-width for at least one layer")
        values = bits if value_bits is None else [int(b) for b in value_bits]
        if len(values) != len(bits):
            raise ValueError(f"value_bits has {len(values)} entries but bits has {len(bits)}; give one per layer")
        for k, v in zip(bits, values):
            check_settings(k, group_size, residual_length, value_bits=v)
        check_read(read)
        self.bits, self.value_bits = bits, values
        self.group_size, self.residual_length, self.read = group_size, residual_length, read
        super().__init__(layers=[DynamicLayer() if k == v == 16 else KiviLayer(k, group_size, residual_length, v, read)
                                 for k, v in zip(bits, values)])

    @property
    def key_bits(self) -> list[int]:
        return self.bits

    def nbytes_per_layer(self) -> list[int]:
        return [layer_nbytes(layer) for layer in self.layers]

    def nbytes(self) -> int:
        return sum(self.nbytes_per_layer())

    def allocated_nbytes(self) -> int:
        return sum(layer.allocated_nbytes() if isinstance(layer, KiviLayer) else layer_nbytes(layer)
                   for layer in self.layers)

    def fp16_nbytes(self) -> int:
        """Bytes of the same keys and values in an fp16 `DynamicCache`: the reference for compression ratios."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                B, H, _, D = layer.keys.shape
                total += 2 * B * H * layer.get_seq_length() * D * 2
        return total

    def quantized_tokens(self) -> list[int]:
        """Keys per layer held in quantized form (0 for 16-bit keys): whole chunks of the residual length."""
        return [layer.quantized_tokens if isinstance(layer, KiviLayer) else 0 for layer in self.layers]

    def quantized_value_tokens(self) -> list[int]:
        """Values per layer held in quantized form (0 for 16-bit values): all but the newest residual length."""
        return [layer.quantized_value_tokens if isinstance(layer, KiviLayer) else 0 for layer in self.layers]


def kv_cache_for(plan: CompressionPlan, loaded, *, read: str | None = None) -> KVCache:
    """A fresh cache for `loaded`'s decoder with the plan's per-layer key and value widths, group size and residual
    window; it reads packed where the model's attention can (`lmmlab.attention.reads_packed`), unless `read` says."""
    from lmmlab.attention import reads_packed

    plan.check_layers(loaded.num_layers)
    for k, v in set(zip(plan.key_widths, plan.value_widths)):
        check_settings(k, plan.kv_group_size, plan.kv_residual, loaded.head_dim, value_bits=v)
    read = read or ("packed" if reads_packed(loaded.model) else "dequantize")
    return KVCache(plan.key_widths, plan.kv_group_size, plan.kv_residual, value_bits=plan.value_widths, read=read)


def quantized_counts(context: int, residual_length: int) -> tuple[int, int]:
    """(keys, values) a KIVI layer holds quantized after T = `context` tokens: T − T mod R and max(0, T − R)."""
    return context - context % residual_length, max(0, context - residual_length)


PARTS = ("key", "value")


def part_nbytes(bits: int, part: str, *, head_dim: int, context: int, group_size: int = KIVI_GROUP_SIZE,
                residual_length: int = KIVI_RESIDUAL, dtype_bytes: int = 2) -> int:
    """Bytes one batch row and KV head of one layer's keys (`part="key"`) or values hold after T = `context` tokens
    at `bits`: q = T − T mod R keys or q = max(0, T − R) values quantized, and
      codes   q · ceil(D·b/8)                  (bit-packed along channels, one row per token)
      scales  (q/G · D keys, q · D/G values) groups · 2 · 2   (an fp16 scale and zero point per group)
      window  (T − q) · D · dtype_bytes        (the full-precision window)
    and at 16 bits T · D · dtype_bytes (never quantized)."""
    if part not in PARTS:
        raise ValueError(f"unknown KV part {part!r}; allowed: {', '.join(PARTS)}")
    if bits == 16:
        return context * head_dim * dtype_bytes
    q_k, q_v = quantized_counts(context, residual_length)
    q = q_k if part == "key" else q_v
    groups = q // group_size * head_dim if part == "key" else q * (head_dim // group_size)
    return q * math.ceil(head_dim * bits / 8) + groups * 2 * 2 + (context - q) * head_dim * dtype_bytes


def kv_nbytes(bits: Sequence[int], num_kv_heads: int, head_dim: int, context: int,
              group_size: int = KIVI_GROUP_SIZE, residual_length: int = KIVI_RESIDUAL, dtype_bytes: int = 2,
              batch: int = 1, value_bits: Sequence[int] | None = None) -> int:
    """What a `KVCache` with these widths holds after `context` tokens, without building it (same count as
    `nbytes()` of a cache filled with `dtype_bytes`-byte states): keys at `bits[i]` and values at `value_bits[i]`
    (default `bits[i]`), each part as `part_nbytes`, times batch rows and KV heads. With keys and values both at
    b < 16 bits, T = context, q_k = T − T mod R quantized keys and q_v = max(0, T − R) quantized values, that is per
    batch row and KV head:
      codes   (q_k + q_v) · ceil(D·b/8) bytes              (bit-packed along channels, one row per token)
      scales  (q_k/G · D + q_v · D/G) groups · 2 · 2 bytes   (an fp16 scale and zero point per group)
      windows ((T − q_k) + (T − q_v)) · D · dtype_bytes      (the full-precision key and value windows)
    and at 16 bits 2 · T · D · dtype_bytes (a `DynamicLayer`)."""
    values = list(bits) if value_bits is None else list(value_bits)
    if len(values) != len(bits):
        raise ValueError(f"value_bits has {len(values)} entries but bits has {len(bits)}; give one per layer")
    layout = dict(head_dim=head_dim, context=context, group_size=group_size, residual_length=residual_length,
                  dtype_bytes=dtype_bytes)
    return sum(batch * num_kv_heads * (part_nbytes(k, "key", **layout) + part_nbytes(v, "value", **layout))
               for k, v in zip(bits, values))


def _part_bits(bits: int, part: str, head_dim: int, context: int, group_size: int, residual_length: int) -> float:
    if context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    if part == "key":
        check_settings(bits, group_size, residual_length)
    else:
        check_settings(16, group_size, residual_length, head_dim, value_bits=bits)
    return part_nbytes(bits, part, head_dim=head_dim, context=context, group_size=group_size,
                       residual_length=residual_length, dtype_bytes=2) * 8 / (context * head_dim)


def effective_key_bits(bits: int, *, head_dim: int, context: int, group_size: int = KIVI_GROUP_SIZE,
                       residual_length: int = KIVI_RESIDUAL) -> float:
    """Bits per stored key element after `context` tokens with fp16 states (codes, fp16 scales and zero points and
    the full-precision window, over context · head_dim elements; 16 bits -> exactly 16.0)."""
    return _part_bits(bits, "key", head_dim, context, group_size, residual_length)


def effective_value_bits(bits: int, *, head_dim: int, context: int, group_size: int = KIVI_GROUP_SIZE,
                         residual_length: int = KIVI_RESIDUAL) -> float:
    """Bits per stored value element after `context` tokens with fp16 states, as `effective_key_bits` (the group
    size must divide the head dimension when quantized: values are grouped along channels)."""
    return _part_bits(bits, "value", head_dim, context, group_size, residual_length)


def effective_bits(bits: int, *, head_dim: int, context: int, group_size: int = KIVI_GROUP_SIZE,
                   residual_length: int = KIVI_RESIDUAL, value_bits: int | None = None) -> float:
    """Bits per stored K/V element after `context` tokens with fp16 states, keys at `bits` and values at `value_bits`
    (default `bits`): codes, fp16 scales and zero points and the full-precision windows, over 2 · context · head_dim
    elements (per head; 16 bits -> exactly 16.0)
    = kv_nbytes([bits], 1, head_dim, context, group_size, residual_length, 2, value_bits=[value_bits]) · 8 / (2·T·D)
    = (effective_key_bits(bits) + effective_value_bits(value_bits)) / 2."""
    values = bits if value_bits is None else value_bits
    if context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    check_settings(bits, group_size, residual_length, head_dim, value_bits=values)
    nbytes = kv_nbytes([bits], 1, head_dim, context, group_size, residual_length, dtype_bytes=2, value_bits=[values])
    return nbytes * 8 / (2 * context * head_dim)


class KVCacheFactory:
    """The zero-argument cache factory `evaluate` takes, for one plan; it keeps the last cache it made."""

    def __init__(self, plan: CompressionPlan, loaded):
        self.plan, self.loaded = plan, loaded
        self.last: KVCache | None = None

    def __call__(self) -> KVCache:
        self.last = kv_cache_for(self.plan, self.loaded)
        return self.last


def window_warning(cache: KVCache) -> str | None:
    """Why quantized layers hold no quantized token (the prompts never filled the residual window: keys flush once R
    tokens have gathered, values once more than R have), or None. A layer counts as idle when neither of its
    quantized parts holds a quantized token."""
    idle = [i for i, (k, v, q_k, q_v) in enumerate(zip(cache.bits, cache.value_bits, cache.quantized_tokens(),
                                                       cache.quantized_value_tokens()))
            if min(k, v) < 16 and q_k == q_v == 0]
    if not idle:
        return None
    return (f"KV layers {idle} quantized nothing: the prompts ({cache.get_seq_length()} tokens) never fill the "
            f"{cache.residual_length}-token residual window, so nothing was quantized; pass a smaller kv residual "
            "and group size")
