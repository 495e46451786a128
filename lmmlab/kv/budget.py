"""What a KV cache costs and how a plan's widths meet a budget: the widths and KIVI layout lmmlab stores, the bytes a
cache holds after T tokens in closed form, the effective bits per element they imply, and the repair of per-layer
widths onto a mean-bits budget.

A layer's keys and values at b < 16 bits, T tokens, R the residual window and G the group size: q_k = T − T mod R
keys and q_v = max(0, T − R) values are quantized (bit-packed codes plus an fp16 scale and zero point per group), the
rest is held in full precision; at 16 bits every state is held as it comes (`part_nbytes`, `kv_nbytes`). The
effective bits of a part are its bytes · 8 over T · D elements (`effective_bits` for a layer's two parts together).
"""
from __future__ import annotations

import math
from typing import Sequence

KV_BITS = (2, 3, 4, 6, 8, 16)  # the widths a key or value may be stored at (16: as the model computes them)
# KIVI's group size and full-precision window, sized for LLaVA's ~600-token prompts; the default model's ~20-token
# prompts need 8 / 8.
KIVI_GROUP_SIZE, KIVI_RESIDUAL = 32, 128
KV_CONTEXT = 1024  # the context at which KV bytes and effective bits are stated unless another is given


def check_kv_bits(bits, name: str = "kv bit-width") -> None:
    """One clear error for the first width not in KV_BITS."""
    bad = [b for b in bits if b not in KV_BITS]
    if bad:
        raise ValueError(f"{name} {bad[0]} not supported; allowed: {', '.join(map(str, KV_BITS))}")


def check_kv_layout(group_size: int, residual_length: int) -> None:
    """KIVI's grouping: keys are quantized in whole groups of `group_size` tokens, flushed `residual_length` at a time."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"kv group size must be a positive integer; got {group_size!r}")
    if (isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < group_size
            or residual_length % group_size):
        raise ValueError(f"kv residual length must be a positive multiple of the kv group size {group_size} "
                         f"(keys are quantized in whole groups of tokens); got {residual_length!r}")


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


# --- meeting a budget --------------------------------------------------------------------------------------------

def fit_kv_bits(raw: list[int], budget: float, widths: tuple[int, ...], cost: dict[int, float] | None = None
                ) -> list[int]:
    """Per-layer KV widths whose mean cost is at most `budget`: while it is over, the widest layer (the deepest of
    equals) steps down to the next allowed width. `cost[b]` is what a width costs in the budget's unit: the nominal
    width (default), or the effective bits per element it really stores at a stated context (`effective_bits`). A
    plan already within the budget is returned unchanged."""
    return _fit([raw], budget, widths, [cost])[0]


def fit_kv_pairs(keys: list[int], values: list[int], budget: float, widths: tuple[int, ...],
                 key_cost: dict[int, float] | None = None, value_cost: dict[int, float] | None = None
                 ) -> tuple[list[int], list[int]]:
    """Per-layer key and value widths whose combined mean cost, mean over layers of (key_cost[k] + value_cost[v]) / 2,
    is at most `budget`: while it is over, the widest part steps down to the next allowed width — on a tie, values
    before keys (KIVI: keys carry the per-channel outliers), then the deepest layer. Costs as in `fit_kv_bits`
    (nominal widths by default, or each part's effective bits). A plan already within the budget is unchanged."""
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} key widths but {len(values)} value widths; give one of each per layer")
    keys, values = _fit([keys, values], budget, widths, [key_cost, value_cost or key_cost])
    return keys, values


def _fit(parts: list[list[int]], budget: float, widths: tuple[int, ...], costs: list[dict[int, float] | None]
         ) -> list[list[int]]:
    """The repair both fits share: while the mean over parts and layers of cost[b] is over `budget`, the widest
    width steps down, ties to the later part (values after keys), then to the deepest layer."""
    widths = tuple(sorted(set(widths)))
    costs = [c or {b: float(b) for b in widths} for c in costs]
    narrowest = sum(c[widths[0]] for c in costs) / len(costs)
    if budget < narrowest - 1e-9:
        raise ValueError(f"KV budget {budget} bits is below the narrowest allowed width {widths[0]} "
                         f"({narrowest:.4g} bits)")
    bad = [b for part in parts for b in part if b not in widths]
    if bad:
        raise ValueError(f"kv width {bad[0]} is not among the allowed {', '.join(map(str, widths))}")
    parts = [list(part) for part in parts]
    layers = len(parts[0])

    def spent() -> float:
        return sum(costs[p][b] for p, part in enumerate(parts) for b in part)

    while spent() > budget * len(parts) * layers + 1e-9:
        p, i = max(((p, i) for p in range(len(parts)) for i in range(layers) if parts[p][i] > widths[0]),
                   key=lambda pi: (parts[pi[0]][pi[1]], pi[0], pi[1]))
        parts[p][i] = widths[widths.index(parts[p][i]) - 1]
    return parts
