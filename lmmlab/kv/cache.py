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
after it has read them); earlier tokens are read back from the quantized stores (`kv.quant`). `kv.budget.kv_nbytes`
is the same count in closed form and `kv.budget.effective_bits` the bits per stored element it implies.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache, DynamicLayer

from lmmlab.kv.budget import KIVI_GROUP_SIZE, KIVI_RESIDUAL, check_settings
from lmmlab.kv.quant import KEY_AXIS, VALUE_AXIS, PackedStates, Quantized, _tensor_bytes, dequantize, quantize

if TYPE_CHECKING:
    from lmmlab.plan import CompressionPlan


READS = ("dequantize", "packed")  # how a quantized part is handed to attention (KiviLayer's `read`)


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
    from lmmlab.kv.attention import reads_packed

    plan.check_layers(loaded.num_layers)
    for k, v in set(zip(plan.key_widths, plan.value_widths)):
        check_settings(k, plan.kv_group_size, plan.kv_residual, loaded.head_dim, value_bits=v)
    read = read or ("packed" if reads_packed(loaded.model) else "dequantize")
    return KVCache(plan.key_widths, plan.kv_group_size, plan.kv_residual, value_bits=plan.value_widths, read=read)


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
