"""Decode attention that reads KIVI's packed KV store as it is held, plugged into transformers' attention interface.

For a query q and a key store quantized per channel in groups of G tokens (k_tc = z_gc + s_gc · code_tc, g = t / G),
the scale and zero point fold into the query (KIVI, Liu et al. 2024, §4):
    q · k_t = Σ_c (q_c · s_gc) · code_tc + Σ_c q_c · z_gc
and for a value store quantized per token in groups of G channels (v_tc = z_t,j + s_t,j · code_tc, j = c / G) they
fold into the attention weights p:
    Σ_t p_t · v_tc = Σ_t (p_t · s_t,j) · code_tc + Σ_t p_t · z_t,j
so a decode step reads the packed codes once and never builds a float copy of the store. The newest tokens (the
full-precision window and this pass's states, `PackedStates.tail`) are attended as they are, in the same softmax.

Three implementations of the two folded products, one result to float rounding:
  C        `lmmlab/csrc/kivi_attention.c` on the CPU (built by `lmmlab.native`; codes unpacked in registers)
  Triton   `lmmlab.triton_attention` on CUDA, where Triton is installed
  torch    `packed_scores_reference` / `packed_values_reference`: the formulas above in plain torch (they unpack the
           codes into a float tensor): the spec, and the fallback elsewhere. Where neither kernel runs,
           `fast_packed_reads` is False and `kv_cache_for` keeps the dequantize path.

The attention function `kivi_attention_forward` is registered as "lmmlab_kivi": for a one-token query over a
`PackedStates` it runs `decode_attention`; for anything else (prefill, plain tensors, the vision tower) it hands
transformers' SDPA the same tensors as before (a `PackedStates` materialized), so a model switched to it
(`use_packed_attention`, which `load_model` does) computes exactly what it did with "sdpa".
"""
from __future__ import annotations

import ctypes

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from lmmlab.kv.quant import PackedStates, Quantized, _chunk, unpack

ATTENTION = "lmmlab_kivi"
BACKENDS = ("auto", "c", "triton", "torch")


# --- the folded products in torch: the spec ----------------------------------------------------------------------

def packed_scores_reference(q: torch.Tensor, keys: Quantized) -> torch.Tensor:
    """q [B, H, R, D] fp32 (R query rows per KV head) · the stored keys -> scores fp32 [B, H, R, T], with each key
    group's scale and zero point folded into the query."""
    B, H, R, D = q.shape
    T, G = keys.num_tokens, keys.group_size
    codes = unpack(keys.codes, keys.bits, D).float().view(B, H, T // G, G, D)  # [B, H, T/G, G, D]
    s, z = keys.scale.float().squeeze(3), keys.zero.float().squeeze(3)  # [B, H, T/G, D]
    q_s = q[:, :, None] * s[:, :, :, None]  # [B, H, T/G, R, D]: q_c · s_gc
    bias = torch.einsum("bhrd,bhgd->bhgr", q, z)  # [B, H, T/G, R]: Σ_c q_c · z_gc
    scores = torch.einsum("bhgrd,bhgtd->bhgrt", q_s, codes) + bias[..., None]  # [B, H, T/G, R, G]
    return scores.permute(0, 1, 3, 2, 4).reshape(B, H, R, T)


def packed_values_reference(p: torch.Tensor, values: Quantized) -> torch.Tensor:
    """Attention weights p [B, H, R, T] fp32 · the stored values -> fp32 [B, H, R, D], with each value group's
    scale folded into the weights and its zero point summed apart."""
    B, H, R, T = p.shape
    D, G = values.head_dim, values.group_size
    codes = unpack(values.codes, values.bits, D).float().view(B, H, T, D // G, G)  # [B, H, T, D/G, G]
    s, z = values.scale.float().squeeze(-1), values.zero.float().squeeze(-1)  # [B, H, T, D/G]
    w = p[..., None] * s[:, :, None]  # [B, H, R, T, D/G]: p_t · s_tj
    out = torch.einsum("bhrtj,bhtjg->bhrjg", w, codes).reshape(B, H, R, D)
    return out + torch.einsum("bhrt,bhtj->bhrj", p, z).repeat_interleave(G, dim=-1)


# --- the same products in C on the CPU ---------------------------------------------------------------------------

def _heads_apart(x: torch.Tensor) -> int | None:
    """Elements between consecutive (batch, head) blocks of a store tensor [B, H, T, ...] whose blocks are each
    contiguous and evenly spaced (as in a buffer with spare tokens); None otherwise."""
    inner = x[0, 0] if x.shape[0] and x.shape[1] else x
    if not inner.is_contiguous() or (x.shape[0] > 1 and x.stride(0) != x.shape[1] * x.stride(1)):
        return None
    return x.stride(1)


def _rows_apart(x: torch.Tensor) -> int | None:
    """Elements between consecutive rows of x [B, H, R, N] whose rows are contiguous and evenly spaced (x itself, or
    its first N columns of wider rows); None otherwise."""
    B, H, R, N = x.shape
    ld = x.stride(2)
    if (N > 1 and x.stride(3) != 1) or ld < N or (H > 1 and x.stride(1) != R * ld) or \
            (B > 1 and x.stride(0) != H * R * ld):
        return None
    return ld


def _c_product(name: str, store: Quantized, rows: torch.Tensor, out: torch.Tensor) -> bool:
    """Run kivi_scores (rows = queries, out = scores) or kivi_values (rows = attention weights, out = values); False
    where the kernels are missing or cannot take this layout."""
    from lmmlab.kv.native import kernels

    if rows.device.type != "cpu" or store.codes.device.type != "cpu":
        return False
    lib = kernels()
    codes_apart, scale_apart = _heads_apart(store.codes), _heads_apart(store.scale)
    ld = _rows_apart(out if name == "kivi_scores" else rows)
    if lib is None or None in (codes_apart, scale_apart, ld) or _heads_apart(store.zero) != scale_apart:
        return False
    B, H, R = rows.shape[:3]
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    status = getattr(lib, name)(ptr(store.codes), ptr(store.scale), ptr(store.zero), ptr(rows), ptr(out), B * H,
                                store.num_tokens, store.head_dim, store.group_size, R, store.bits, codes_apart,
                                scale_apart, ld, torch.get_num_threads())
    return status == 0


def packed_scores(q: torch.Tensor, keys: Quantized, backend: str = "auto", *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """`packed_scores_reference`, in C on the CPU where the kernels build, in Triton on CUDA where it is installed;
    written into `out` [B, H, R, T] when given (e.g. the first T columns of the step's whole score rows)."""
    return _packed("scores", q.float().contiguous(), keys, backend, out)


def packed_values(p: torch.Tensor, values: Quantized, backend: str = "auto") -> torch.Tensor:
    """`packed_values_reference`, in C on the CPU where the kernels build, in Triton on CUDA where it is installed
    (`p` may be the first T columns of wider rows of weights)."""
    return _packed("values", p.float(), values, backend)


def _packed(product: str, rows: torch.Tensor, store: Quantized, backend: str,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """rows [B, H, R, ·] (queries or attention weights) times the store, by the chosen backend: scores [B, H, R, T] or
    values [B, H, R, D]. The C values kernel needs whole chunks of codes in a group (G a multiple of the codes per
    chunk); other layouts, and a missing kernel, fall back to the torch reference."""
    chosen = _backend(backend, rows)
    if chosen == "c" and (product == "scores" or store.group_size % _chunk(store.bits)[0] == 0):
        target = rows.new_empty(*rows.shape[:3], store.num_tokens if product == "scores" else store.head_dim) \
            if out is None else out
        if _c_product(f"kivi_{product}", store, rows, target):
            return target
    if chosen == "triton":
        from lmmlab.kv import triton_attention

        result = getattr(triton_attention, f"triton_{product}")(rows.contiguous(), store)
    else:
        result = (packed_scores_reference if product == "scores" else packed_values_reference)(rows, store)
    return result if out is None else out.copy_(result)  # a copy only where the caller gave the place


def _backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown packed attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if x.device.type == "cpu":
        return "c"
    return "triton" if x.device.type == "cuda" and _triton() else "torch"


def _triton() -> bool:
    from lmmlab.kv.triton_attention import available

    return available()


def fast_packed_reads(device: torch.device | str) -> bool:
    """Whether packed decode attention has a fused kernel on `device`: the C kernels on a CPU where they build, the
    Triton kernels on CUDA where Triton is installed."""
    from lmmlab.kv.native import kernels

    kind = torch.device(device).type
    return (kind == "cpu" and kernels() is not None) or (kind == "cuda" and _triton())


# --- attention over [packed store, tail] ---------------------------------------------------------------------------

def decode_attention(query: torch.Tensor, key: torch.Tensor | PackedStates, value: torch.Tensor | PackedStates,
                     attention_mask: torch.Tensor | None, scaling: float, backend: str = "auto") -> torch.Tensor:
    """softmax(q·Kᵀ·scaling + mask) · V for query [B, Hq, L, D] over keys and values [B, Hkv, T, D] (either one a
    `PackedStates` or a tensor; Hq a multiple of Hkv, grouped as `repeat_kv` groups them) -> [B, L, Hq, D], as
    transformers' attention functions return it. The attention mask is SDPA's: bool (True = attend) or additive."""
    B, Hq, L, D = query.shape
    Hkv = key.shape[1]
    rows = Hq // Hkv * L
    q = (query.float() * scaling).reshape(B, Hkv, rows, D)  # KV head h serves query heads h·n_rep .. (h+1)·n_rep − 1
    scores = q.new_empty(B, Hkv, rows, key.shape[2])  # [stored keys, tail] along the last axis
    stored = 0
    if isinstance(key, PackedStates):
        stored = key.stored.num_tokens
        packed_scores(q, key.stored, backend, out=scores[..., :stored])
        key = key.tail
    scores[..., stored:] = q @ key.float().transpose(-1, -2)
    scores = scores.view(B, Hq, L, -1)  # [B, Hq, L, T]
    if attention_mask is not None:
        mask = attention_mask[..., : scores.shape[-1]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    p = torch.softmax(scores, dim=-1).view(B, Hkv, rows, -1)
    if isinstance(value, PackedStates):
        stored = value.stored.num_tokens
        out = packed_values(p[..., :stored], value.stored, backend) + p[..., stored:] @ value.tail.float()
    else:
        out = p @ value.float()
    return out.view(B, Hq, L, D).transpose(1, 2).contiguous().to(query.dtype)


def kivi_attention_forward(module: torch.nn.Module, query: torch.Tensor, key, value,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: packed decode attention for a one-token query over a packed
    store, else SDPA on the same tensors as before."""
    packed = isinstance(key, PackedStates) or isinstance(value, PackedStates)
    plain = dropout == 0.0 and not kwargs.get("output_attentions") and kwargs.get("softcap") is None and \
        kwargs.get("sliding_window") is None and kwargs.get("s_aux") is None
    if packed and plain and query.shape[2] == 1:
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return decode_attention(query, key, value, attention_mask, scale), None
    key, value = (x.materialize() if isinstance(x, PackedStates) else x for x in (key, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Make "lmmlab_kivi" a transformers attention implementation, with SDPA's masks."""
    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION, kivi_attention_forward)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)


# Language models whose attention hands the cache's keys and values straight to the attention function (some others,
# e.g. mllama or doge, reshape them after `cache.update`, which a `PackedStates` does not support).
PACKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch the language model's attention from SDPA to "lmmlab_kivi" (any vision tower keeps its own), for the
    model types in `PACKED_MODEL_TYPES`; True if it did. Other models, and models on another attention, stay as they
    are (their caches then read dequantized)."""
    config = model.config
    text = getattr(config, "text_config", None)
    current = getattr(text or config, "_attn_implementation", None)
    if getattr(text or config, "model_type", None) not in PACKED_MODEL_TYPES or current not in ("sdpa", ATTENTION):
        return False
    register()
    model.set_attn_implementation(ATTENTION if text is None else {"text_config": ATTENTION})
    return True


def reads_packed(model: torch.nn.Module) -> bool:
    """Whether `model`'s language model attends through "lmmlab_kivi" (so a cache may hand it `PackedStates`) and
    that is fast where the model lies (`fast_packed_reads`)."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    return getattr(text, "_attn_implementation", None) == ATTENTION and \
        fast_packed_reads(next(model.parameters()).device)
