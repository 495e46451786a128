import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from lmmlab.tasks import shapes as data
from lmmlab.tasks.shapes import answer_loss, evaluate
from lmmlab.kv.quant import KEY_AXIS, VALUE_AXIS, dequantize, pack, quantize, unpack
from lmmlab.kv.cache import KiviLayer, KVCache, kv_cache_for, window_warning
from lmmlab.kv.budget import (KIVI_GROUP_SIZE, KIVI_RESIDUAL, effective_bits, effective_key_bits, effective_value_bits,
                               kv_nbytes)
from lmmlab.plan import CompressionPlan

WIDTHS = (2, 3, 4, 6, 8)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("n", [1, 3, 8, 24, 32, 37, 128])
def test_pack_unpack_is_lossless_and_dense(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (2, 3, 5, n), generator=g).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, math.ceil(n * bits / 8))
    assert torch.equal(unpack(packed, bits, n), codes)


def _half_step(q, axis):
    """Each element's group scale / 2, broadcast to [B, H, T, D]."""
    s = q.scale.float() / 2
    B, H, T, D = q.codes.shape[0], q.codes.shape[1], q.num_tokens, q.head_dim
    grouped = (s.expand(B, H, s.shape[2], T // s.shape[2], D) if axis == KEY_AXIS
               else s.expand(B, H, T, s.shape[3], D // s.shape[3]))
    return grouped.reshape(B, H, T, D)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("axis", [KEY_AXIS, VALUE_AXIS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantized_error_is_at_most_half_a_step_of_its_group(bits, axis, dtype):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 4, 32, 16, generator=g) * torch.rand(1, 4, 1, 16, generator=g) * 5
    x[0, 0] += 300.0  # a far-off offset whose fp16 zero point must still cover the group
    x[1, 1, :8, :8] = 0.7  # constant groups
    x = x.to(dtype)
    q = quantize(x, bits, group_size=8, axis=axis)
    err = (dequantize(q, torch.float32) - x.float()).abs()
    assert (err <= _half_step(q, axis) * (1 + 1e-3) + 1e-6).all()
    assert q.scale.dtype == q.zero.dtype == torch.float16


def test_keys_are_grouped_per_channel_and_values_per_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 16, 8, generator=g)
    outlier_channel = x.clone()
    outlier_channel[..., 3] *= 100
    outlier_token = x.clone()
    outlier_token[..., 5, :] *= 100

    def err(t, axis):
        return (dequantize(quantize(t, 4, 8, axis), torch.float32) - t).abs()

    # An outlier channel spoils only its own key groups; an outlier token only its own value groups.
    others = [c for c in range(8) if c != 3]
    assert torch.equal(err(outlier_channel, KEY_AXIS)[..., others], err(x, KEY_AXIS)[..., others])
    rows = [t for t in range(16) if t != 5]
    assert torch.equal(err(outlier_token, VALUE_AXIS)[..., rows, :], err(x, VALUE_AXIS)[..., rows, :])
    # ...while the other layout smears it across the whole group.
    assert err(outlier_channel, VALUE_AXIS)[..., others].max() > 10 * err(x, VALUE_AXIS)[..., others].max()


def _counts(layer):
    return (layer.quantized_tokens, layer.residual_tokens, layer.quantized_value_tokens, layer.residual_value_tokens)


def _check_windows(layer, keys_in, values_in, T):
    """After T tokens: keys flushed in chunks of R, the newest min(T, R) values in full precision, and both stores
    exactly the quantization of those tokens (keys in whole chunks of groups, values token by token)."""
    R = layer.residual_length
    q_k, q_v = T - T % R, T - min(T, R)
    assert _counts(layer) == (q_k, T - q_k, q_v, min(T, R))
    assert torch.equal(layer.keys, keys_in[:, :, q_k:T]) and torch.equal(layer.values, values_in[:, :, q_v:T])
    for store, states, q, axis in ((layer._quantized_keys, keys_in, q_k, KEY_AXIS),
                                   (layer._quantized_values, values_in, q_v, VALUE_AXIS)):
        if q == 0:
            assert store is None
            continue
        expected = quantize(states[:, :, :q].contiguous(), layer.bits, layer.group_size, axis)
        assert torch.equal(store.codes, expected.codes) and torch.equal(store.scale, expected.scale)
        assert torch.equal(store.zero, expected.zero)


@pytest.mark.parametrize("prefill", [1, 5, 8, 13, 16, 21])
@pytest.mark.parametrize("chunk", [1, 3])
def test_value_window_slides_while_keys_flush_in_chunks(prefill, chunk):
    layer = KiviLayer(bits=4, group_size=4, residual_length=8)
    g = torch.Generator().manual_seed(prefill * 10 + chunk)
    keys_in, values_in = torch.randn(2, 1, 2, 40, 8, generator=g)
    T = prefill
    keys, values = layer.update(keys_in[:, :, :T], values_in[:, :, :T])
    # the prefill reads itself exactly, then keeps T mod 8 keys and min(T, 8) values in full precision
    assert torch.equal(keys, keys_in[:, :, :T]) and torch.equal(values, values_in[:, :, :T])
    k_counts = []
    while True:
        _check_windows(layer, keys_in, values_in, T)
        k_counts.append(layer.quantized_tokens)
        if T + chunk > 40:
            break
        before_k, before_v = layer.quantized_tokens, layer.quantized_value_tokens
        keys, values = layer.update(keys_in[:, :, T:T + chunk], values_in[:, :, T:T + chunk])
        T += chunk
        assert keys.shape[-2] == values.shape[-2] == T == layer.get_seq_length()
        # everything not yet quantized before this pass (its own tokens included) is read bit-exact...
        assert torch.equal(keys[:, :, before_k:], keys_in[:, :, before_k:T])
        assert torch.equal(values[:, :, before_v:], values_in[:, :, before_v:T])
        # ...and the stored tokens come back quantized
        if before_k:
            assert not torch.equal(keys[:, :, :before_k], keys_in[:, :, :before_k])
        if before_v:
            assert not torch.equal(values[:, :, :before_v], values_in[:, :, :before_v])
    assert all(q % 8 == 0 for q in k_counts) and k_counts[-1] == T - T % 8


def test_decoding_one_token_at_a_time_follows_kivi_step_by_step():
    layer = KiviLayer(bits=4, group_size=4, residual_length=8)
    states = torch.randn(1, 2, 30, 8, generator=torch.Generator().manual_seed(1))
    layer.update(states[:, :, :13], states[:, :, :13])  # prefill: 8 keys and 5 values quantized
    seen = [_counts(layer)]
    for t in range(13, 30):
        layer.update(states[:, :, t : t + 1], states[:, :, t : t + 1])
        seen.append(_counts(layer))
    # keys: the window fills to 8 and empties; values: always the newest 8, one more quantized per step
    assert seen[:5] == [(8, 5, 5, 8), (8, 6, 6, 8), (8, 7, 7, 8), (16, 0, 8, 8), (16, 1, 9, 8)]
    assert seen[-1] == (24, 6, 22, 8)


def _stored_tensors(layer):
    tensors = [layer.keys, layer.values]
    for q in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)):
        if q is not None:
            tensors += [q.codes, q.scale, q.zero]
    return tensors


def test_nbytes_is_the_size_of_the_tensors_held():
    cache = KVCache([2, 3, 6, 16], group_size=8, residual_length=16)
    g = torch.Generator().manual_seed(2)
    B, H, T, D = 2, 3, 45, 32
    for i in range(4):
        cache.update(torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g), i)
    per_layer = cache.nbytes_per_layer()
    for layer, nbytes in zip(cache.layers, per_layer):
        assert nbytes == sum(t.numel() * t.element_size() for t in _stored_tensors(layer) if t is not None)
    # the same by hand: 32 keys and 29 values quantized; 13 keys and 16 values fp32 in the windows; codes packed,
    # fp16 scale + zero per group (keys: 32/8 groups per channel; values: 32/8 groups per token)
    windows = B * H * (13 + 16) * D * 4
    scales = 2 * 2 * (B * H * (32 // 8) * D + B * H * 29 * (D // 8))
    for bits, nbytes in zip([2, 3, 6], per_layer):
        assert nbytes == B * H * (32 + 29) * D * bits // 8 + scales + windows
    assert per_layer[3] == 2 * B * H * T * D * 4
    assert cache.nbytes() == sum(per_layer)
    assert cache.fp16_nbytes() == 4 * 2 * B * H * T * D * 2
    assert cache.quantized_tokens() == [32, 32, 32, 0] and cache.quantized_value_tokens() == [29, 29, 29, 0]


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _prompt(model, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (2, n), generator=g)


def _generate(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kwargs)


def test_16_bit_cache_generates_exactly_what_dynamic_cache_does(tiny_llama, default):
    ids = _prompt(tiny_llama)
    kwargs = dict(max_new_tokens=24, min_new_tokens=24)
    expected = _generate(tiny_llama, ids, cache=DynamicCache(config=tiny_llama.config), **kwargs)
    got = _generate(tiny_llama, ids, cache=KVCache([16] * tiny_llama.config.num_hidden_layers), **kwargs)
    assert torch.equal(got, expected)

    samples = data.split("validation", 32)
    inputs = data.collate(default.processor, samples)
    plan = CompressionPlan.uniform(default.num_layers, kv_bits=16, kv_group_size=8, kv_residual=8)
    expected = default.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(default.model.generate(**inputs, max_new_tokens=3, do_sample=False,
                                              cache=kv_cache_for(plan, default)), expected)


def test_quantized_cache_plugs_into_generate_and_beam_search(tiny_llama):
    ids = _prompt(tiny_llama, n=37)
    n = tiny_llama.config.num_hidden_layers
    cache = KVCache([4] * n, group_size=8, residual_length=8)
    out = _generate(tiny_llama, ids, cache=cache, max_new_tokens=12, min_new_tokens=12)
    assert out.shape == (2, 49)
    # 37 + 11 tokens stored (the last one is never fed back): six whole key windows of 8, all quantized; the newest
    # 8 values in full precision
    assert cache.quantized_tokens() == [48] * n and cache.get_seq_length() == 48
    assert cache.quantized_value_tokens() == [40] * n
    beams = _generate(tiny_llama, ids, cache=KVCache([8] * n, group_size=8, residual_length=8), num_beams=3,
                      max_new_tokens=6, min_new_tokens=6)
    assert beams.shape == (2, 43)


def test_reordering_rows_is_exact_on_the_packed_store():
    layer = KiviLayer(bits=3, group_size=4, residual_length=4)
    states = torch.randn(3, 2, 10, 8, generator=torch.Generator().manual_seed(3))
    layer.update(states, states)
    before, _ = layer.update(states[:, :, :1], states[:, :, :1])
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    after, _ = layer.update(states[:, :, :1], states[:, :, :1])
    assert torch.equal(after[:, :, :11], before[[2, 0, 1]])


def test_per_layer_widths_are_really_different(tiny_llama):
    n = tiny_llama.config.num_hidden_layers
    widths = [2, 8, 16][:n]
    cache = KVCache(widths, group_size=8, residual_length=8)
    ids = _prompt(tiny_llama, n=48)
    dense = DynamicCache(config=tiny_llama.config)
    with torch.no_grad():
        tiny_llama(ids, cache=cache, use_cache=True)
        tiny_llama(ids, cache=dense, use_cache=True)
    assert [type(layer).__name__ for layer in cache.layers] == ["KiviLayer", "KiviLayer", "DynamicLayer"][:n]
    errors = []
    for layer, ref in zip(cache.layers, dense.layers):
        k = dequantize(layer._quantized_keys, torch.float32) if isinstance(layer, KiviLayer) else layer.keys
        errors.append((k - ref.keys).abs().max().item())
    assert errors[0] > 10 * errors[1] > 0 and errors[2] == 0
    per_layer = cache.nbytes_per_layer()
    assert per_layer[0] < per_layer[1] < per_layer[2]


def test_an_8_bit_cache_stays_closer_to_dense_than_a_2_bit_cache_on_the_default_model(default):
    """An ordering that holds for any trained toy, not a threshold one training run happens to meet: per question,
    the answer loss read through an 8-bit cache moves less from the dense loss than through a 2-bit cache, and the
    bytes fall with the width. (The size of the 2-bit effect on a real model is in tests/test_task_text.py.)"""
    samples = data.split("validation", 128)
    made = []

    def cache_for(bits):
        plan = CompressionPlan.uniform(default.num_layers, kv_bits=bits, kv_group_size=8, kv_residual=8)

        def make():
            made.append(kv_cache_for(plan, default))
            return made[-1]
        return make

    dense = torch.tensor(answer_loss(default, samples))
    eight = torch.tensor(answer_loss(default, samples, cache_for(8)))
    assert all(q > 0 for q in made[-1].quantized_tokens())  # the image tokens really were quantized
    two = torch.tensor(answer_loss(default, samples, cache_for(2)))
    assert (eight - dense).abs().mean() < (two - dense).abs().mean()
    bytes_ = [evaluate(default, samples[:32], make_cache=make, with_loss=False).kv_bytes
              for make in (cache_for(2), cache_for(8), None)]
    assert bytes_[0] < bytes_[1] < bytes_[2]


@pytest.mark.parametrize("make, message", [
    (lambda: KVCache([4, 5]), "kv bit-width 5 not supported; allowed: 2, 3, 4, 6, 8, 16"),
    (lambda: KVCache([4], group_size=0), "kv group size must be a positive integer"),
    (lambda: KVCache([4], group_size=32, residual_length=48), "positive multiple of the kv group size 32"),
    (lambda: KVCache([]), "at least one layer"),
    (lambda: CompressionPlan([0.5], [4], kv_group_size=16, kv_residual=8), "positive multiple"),
    (lambda: CompressionPlan([0.5], [7]), "kv bit-width 7 not supported"),
])
def test_invalid_widths_and_groups_fail_clearly(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_group_size_must_divide_the_head_dimension(default):
    plan = CompressionPlan.uniform(default.num_layers, kv_bits=4, kv_group_size=64, kv_residual=128)
    with pytest.raises(ValueError, match=f"group size 64 must divide the head dimension {default.head_dim}"):
        kv_cache_for(plan, default)
    with pytest.raises(ValueError, match="plan has 2 layers"):
        kv_cache_for(CompressionPlan([0.0, 0.0]), default)


def _filled(bits, context, *, heads=3, head_dim=32, batch=1, group_size=8, residual_length=16, chunks=(), seed=0):
    """A KVCache filled with fp16 random states: a prefill of `context` − sum(chunks) tokens, then the chunks."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(bits, group_size=group_size, residual_length=residual_length)
    sizes = [context - sum(chunks), *chunks]
    for size in sizes:
        for i in range(len(bits)):
            k, v = (torch.randn(batch, heads, size, head_dim, generator=g).half() for _ in range(2))
            cache.update(k, v, i)
    return cache


def _closed_form(bits, T, D, G, R):
    """Bytes per batch row and head, written out: q_k = T − T mod R keys, q_v = max(0, T − R) values quantized."""
    if bits == 16:
        return 2 * T * D * 2
    q_k, q_v = T - T % R, max(0, T - R)
    return ((q_k + q_v) * math.ceil(D * bits / 8) + (q_k // G * D + q_v * D // G) * 2 * 2
            + (2 * T - q_k - q_v) * D * 2)


@pytest.mark.parametrize("context, chunks", [(1, ()), (5, ()), (16, ()), (17, ()), (45, ()), (64, ()),
                                             (45, (1,) * 9), (40, (3, 3, 1, 5))])
def test_kv_nbytes_counts_what_a_filled_cache_holds(context, chunks):
    bits = [2, 3, 4, 6, 8, 16]
    cache = _filled(bits, context, batch=2, chunks=chunks)  # however the tokens arrived
    assert kv_nbytes(bits, 3, 32, context, 8, 16, dtype_bytes=2, batch=2) == cache.nbytes()
    assert cache.nbytes_per_layer() == [2 * 3 * _closed_form(b, context, 32, 8, 16) for b in bits]
    for layer, nbytes in zip(cache.layers, cache.nbytes_per_layer()):
        assert nbytes == sum(t.numel() * t.element_size() for t in _stored_tensors(layer))


@pytest.mark.parametrize("context", [1000, 1024])
def test_bytes_and_effective_bits_at_kivi_defaults_match_the_stored_tensors(context):
    """KIVI's group 32 / window 128 at head dim 128: 1,000 tokens leave 104 keys and 128 values in fp16, 1,024 only
    the 128 values."""
    bits = [2, 3, 4, 6, 8, 16]
    B, H, D = 1, 2, 128
    cache = _filled(bits, context, heads=H, head_dim=D, batch=B, group_size=32, residual_length=128, chunks=(1, 1))
    layers = cache.layers[:-1]
    assert [(layer.residual_tokens, layer.residual_value_tokens) for layer in layers] == [(context % 128, 128)] * 5
    assert kv_nbytes(bits, H, D, context, 32, 128, dtype_bytes=2, batch=B) == cache.nbytes()
    for b, layer, nbytes in zip(bits, cache.layers, cache.nbytes_per_layer()):
        held = sum(t.numel() * t.element_size() for t in _stored_tensors(layer))
        assert nbytes == held == B * H * _closed_form(b, context, D, 32, 128)
        assert effective_bits(b, head_dim=D, context=context) == held * 8 / (2 * B * H * context * D)
    assert effective_bits(16, head_dim=D, context=context) == 16.0
    # at 1,024 tokens every key is quantized: b + 1 bits (two fp16 per 32 elements) over 1,024 keys and 896 values,
    # 16 bits over the 128 values in the window
    if context == 1024:
        assert effective_bits(2, head_dim=D, context=context) == ((1024 + 896) * 3 + 128 * 16) / 2048


def test_effective_bits_rejects_what_the_cache_cannot_store():
    with pytest.raises(ValueError, match="group size 32 must divide the head dimension 16"):
        effective_bits(4, head_dim=16, context=100)
    assert effective_bits(16, head_dim=16, context=100) == 16.0
    with pytest.raises(ValueError, match="kv bit-width 5"):
        effective_bits(5, head_dim=128, context=100)


@pytest.mark.parametrize("op", ["select", "repeat", "reorder"])
def test_batch_operations_act_as_if_the_rows_had_been_cached_alone(op):
    """Moving batch rows of a filled cache (packed stores and both windows) is exact: the next read equals that of a
    cache fed the moved rows from the start."""
    g = torch.Generator().manual_seed(5)
    states = torch.randn(3, 2, 23, 8, generator=g)
    rows = {"select": torch.tensor([2, 0]), "repeat": torch.tensor([0, 0, 1, 1, 2, 2]),
            "reorder": torch.tensor([1, 2, 0])}[op]

    def fed(x, layer):
        layer.update(x[:, :, :13], -x[:, :, :13])
        for t in range(13, 22):
            layer.update(x[:, :, t : t + 1], -x[:, :, t : t + 1])
        return layer

    moved = fed(states, KiviLayer(bits=3, group_size=4, residual_length=8))
    {"select": lambda: moved.batch_select_indices(rows), "repeat": lambda: moved.batch_repeat_interleave(2),
     "reorder": lambda: moved.reorder_cache(rows)}[op]()
    alone = fed(states[rows], KiviLayer(bits=3, group_size=4, residual_length=8))
    assert _counts(moved) == _counts(alone) == (16, 6, 14, 8)
    last = states[rows][:, :, 22:23]
    for got, expected in zip(moved.update(last, -last), alone.update(last, -last)):
        assert torch.equal(got, expected)
    assert moved.nbytes() == alone.nbytes()


def test_window_warning_names_layers_that_quantized_nothing():
    short = _filled([2, 16, 4], 15)  # residual 16: no key flushed, no value quantized
    assert "KV layers [0, 2] quantized nothing" in window_warning(short)
    exact = _filled([2, 16, 4], 16)  # the key window flushes at 16 tokens; values wait for the 17th
    assert window_warning(exact) is None
    assert exact.quantized_tokens() == [16, 0, 16] and exact.quantized_value_tokens() == [0, 0, 0]


def test_bench_ratio_by_context_is_what_filled_caches_hold():
    """`bench kv`'s `ratio_by_context` (closed form, at any shape) equals bytes held ÷ fp16 bytes of caches really
    filled with fp16 states, depends on the context and not on layers or heads, and is effective bits / 16."""
    from lmmlab.lab.bench import kv_ratio_by_context, kv_ratios

    by_context = kv_ratio_by_context(2, 2, 128)
    assert list(by_context) == ["1000", "1024", "4096"]
    assert all(list(ratios) == ["2", "3", "4", "6", "8"] for ratios in by_context.values())
    assert kv_ratio_by_context(32, 32, 128) == by_context
    for context in (1000, 1024):
        ratios = kv_ratios(2, 2, 128, context)
        for b in (2, 4, 8):
            cache = _filled([b] * 2, context, heads=2, head_dim=128, group_size=KIVI_GROUP_SIZE,
                            residual_length=KIVI_RESIDUAL)
            assert ratios[f"ratio_{b}bit"] == by_context[str(context)][str(b)] == cache.nbytes() / cache.fp16_nbytes()
        assert ratios["fp16_bytes"] == cache.fp16_nbytes()
    for context, ratios in by_context.items():
        for bits, ratio in ratios.items():
            assert ratio == pytest.approx(effective_bits(int(bits), head_dim=128, context=int(context)) / 16,
                                          rel=1e-12)
    # a context that is not a multiple of the window holds 104 fp16 keys more: the worst case is not 1,024
    assert all(by_context["1000"][b] > by_context["1024"][b] > by_context["4096"][b] for b in by_context["1000"])


def test_aligned_chunks_read_keys_exactly_as_token_by_token_and_values_only_fresher():
    """What tasks/text.py's chunked protocol relies on. A chunk of c tokens whose key flushes fall on chunk boundaries
    (c divides R and prefill mod R) reads, for each of its tokens p, exactly the keys token-by-token decoding reads at
    p; its values differ only in rows [s − R, p − R) (s = the chunk's first token), which the chunk reads in full
    precision where token by token they are already quantized: up to c − 1 rows per token, never the other way."""
    R, c, prefill = 8, 4, 12
    states = torch.randn(2, 1, 2, 36, 8, generator=torch.Generator().manual_seed(7))
    keys_in, values_in = states
    token, chunked = (KiviLayer(bits=2, group_size=4, residual_length=R) for _ in range(2))
    token.update(keys_in[:, :, :prefill], values_in[:, :, :prefill])
    reads = {p: token.update(keys_in[:, :, p:p + 1], values_in[:, :, p:p + 1]) for p in range(prefill, 36)}
    chunked.update(keys_in[:, :, :prefill], values_in[:, :, :prefill])
    quantized_values = dequantize(quantize(values_in, 2, 4, VALUE_AXIS), values_in.dtype)
    fresher = 0
    for s in range(prefill, 36, c):
        keys, values = chunked.update(keys_in[:, :, s:s + c], values_in[:, :, s:s + c])
        for p in range(s, s + c):
            token_keys, token_values = reads[p]
            assert torch.equal(keys[:, :, :p + 1], token_keys)
            full = range(max(0, s - R), max(0, p - R))  # full precision in the chunk, quantized token by token
            others = [i for i in range(p + 1) if i not in full]
            assert torch.equal(values[:, :, others], token_values[:, :, others])
            assert torch.equal(values[:, :, list(full)], values_in[:, :, list(full)])
            assert torch.equal(token_values[:, :, list(full)], quantized_values[:, :, list(full)])
            fresher += len(full)
    assert fresher == (36 - prefill) // c * sum(range(c))  # 0 + 1 + ... + (c − 1) rows per chunk
    assert token.nbytes() == chunked.nbytes() and _counts(token) == _counts(chunked)


# --- keys and values at their own widths ---------------------------------------------------------------------------

def _part_closed_form(bits, part, T, D, G, R):
    """One part's bytes per batch row and head, written out (fp16 states)."""
    if bits == 16:
        return T * D * 2
    q = T - T % R if part == "key" else max(0, T - R)
    groups = q // G * D if part == "key" else q * D // G
    return q * math.ceil(D * bits / 8) + groups * 2 * 2 + (T - q) * D * 2


PAIRS = [(16, 2), (2, 16), (4, 2), (2, 4), (3, 8), (8, 6), (16, 16), (4, 4)]


@pytest.mark.parametrize("context, chunks", [(5, ()), (17, ()), (45, (1,) * 9), (40, (3, 3, 1, 5))])
def test_separate_key_and_value_widths_hold_the_bytes_of_the_closed_form(context, chunks):
    keys, values = [k for k, _ in PAIRS], [v for _, v in PAIRS]
    g = torch.Generator().manual_seed(context)
    cache = KVCache(keys, group_size=8, residual_length=16, value_bits=values)
    for size in [context - sum(chunks), *chunks]:  # a prefill, then decode steps
        for i in range(len(PAIRS)):
            cache.update(*(torch.randn(2, 3, size, 32, generator=g).half() for _ in range(2)), i)
    assert kv_nbytes(keys, 3, 32, context, 8, 16, dtype_bytes=2, batch=2, value_bits=values) == cache.nbytes()
    expected = [2 * 3 * (_part_closed_form(k, "key", context, 32, 8, 16) + _part_closed_form(v, "value", context, 32,
                                                                                              8, 16)) for k, v in PAIRS]
    assert cache.nbytes_per_layer() == expected
    for layer, nbytes in zip(cache.layers, expected):
        assert nbytes == sum(t.numel() * t.element_size() for t in _stored_tensors(layer))
    assert [type(layer).__name__ for layer in cache.layers] == ["KiviLayer"] * 6 + ["DynamicLayer", "KiviLayer"]
    # a 16-bit part is never quantized; the other part is, as at its width alone
    R = 16
    assert cache.quantized_tokens() == [0 if k == 16 else context - context % R for k in keys]
    assert cache.quantized_value_tokens() == [0 if v == 16 else max(0, context - R) for v in values]
    for (k, v), nbytes in zip(PAIRS, expected):  # bits per element: 2 parts, 2 rows, 3 heads, 32 channels
        bits = effective_bits(k, value_bits=v, head_dim=32, context=context, group_size=8, residual_length=R)
        assert bits == nbytes * 8 / (2 * 2 * 3 * context * 32)


def test_equal_key_and_value_widths_give_exactly_the_single_width_numbers():
    bits = [2, 3, 4, 6, 8, 16]
    for context in (1, 17, 1000, 1024):
        assert kv_nbytes(bits, 4, 64, context, 32, 128, value_bits=bits) == kv_nbytes(bits, 4, 64, context, 32, 128)
        assert kv_nbytes(bits, 4, 64, context, 32, 128) == 4 * sum(_closed_form(b, context, 64, 32, 128) for b in bits)
        for b in bits:
            one = effective_bits(b, head_dim=64, context=context)
            assert effective_bits(b, head_dim=64, context=context, value_bits=b) == one
            assert one == pytest.approx((effective_key_bits(b, head_dim=64, context=context)
                                         + effective_value_bits(b, head_dim=64, context=context)) / 2, rel=1e-12)


@pytest.mark.parametrize("k, v", [(16, 2), (2, 16), (4, 2), (3, 8)])
def test_each_part_costs_its_own_effective_bits(k, v):
    layout = dict(head_dim=128, context=1000, group_size=32, residual_length=128)
    key, value = effective_key_bits(k, **layout), effective_value_bits(v, **layout)
    assert key == _part_closed_form(k, "key", 1000, 128, 32, 128) * 8 / (1000 * 128)
    assert value == _part_closed_form(v, "value", 1000, 128, 32, 128) * 8 / (1000 * 128)
    assert effective_bits(k, value_bits=v, **layout) == pytest.approx((key + value) / 2, rel=1e-12)
    assert effective_key_bits(16, **layout) == effective_value_bits(16, **layout) == 16.0


def _feed(layer, states, prefill=13, end=30):
    """A prefill, then one token at a time; every read, in order."""
    keys_in, values_in = states
    reads = [layer.update(keys_in[:, :, :prefill], values_in[:, :, :prefill])]
    for t in range(prefill, end):
        reads.append(layer.update(keys_in[:, :, t:t + 1], values_in[:, :, t:t + 1]))
    return reads


@pytest.mark.parametrize("k, v", [(16, 2), (2, 16), (4, 2), (2, 4)])
def test_each_part_reads_what_a_layer_at_its_width_alone_reads(k, v):
    """Keys at k and values at v: every key read is bit-for-bit that of a layer with both parts at k (a
    `DynamicLayer` at 16), every value read that of a layer at v."""
    states = torch.randn(2, 2, 3, 30, 8, generator=torch.Generator().manual_seed(k * 10 + v))

    def alone(bits):
        return DynamicLayer() if bits == 16 else KiviLayer(bits, group_size=4, residual_length=8)

    mixed = _feed(KiviLayer(k, group_size=4, residual_length=8, value_bits=v), states)
    for (keys, values), (ref_keys, _), (_, ref_values) in zip(mixed, _feed(alone(k), states), _feed(alone(v), states)):
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)


def test_separate_widths_run_in_generate_and_equal_widths_change_nothing(tiny_llama):
    n = tiny_llama.config.num_hidden_layers
    ids = _prompt(tiny_llama, n=37)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, output_logits=True, return_dict_in_generate=True)
    keys, values = [4, 2, 16][:n], [2, 16, 4][:n]
    mixed = KVCache(keys, group_size=8, residual_length=8, value_bits=values)
    out = _generate(tiny_llama, ids, cache=mixed, **kwargs)
    assert out.sequences.shape == (2, 49)
    assert mixed.quantized_tokens() == [48, 48, 0][:n] and mixed.quantized_value_tokens() == [40, 0, 40][:n]
    assert mixed.nbytes() == kv_nbytes(keys, tiny_llama.config.num_key_value_heads, 16, 48, 8, 8, dtype_bytes=4,
                                       batch=2, value_bits=values)
    bits = [4, 2, 8][:n]
    runs = [_generate(tiny_llama, ids, cache=KVCache(bits, 8, 8, **extra), **kwargs)
            for extra in ({}, {"value_bits": bits}, {"value_bits": values})]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].logits, runs[1].logits))
    # ...while other value widths under the same key widths do change what the model reads
    assert not all(torch.equal(a, b) for a, b in zip(runs[0].logits, runs[2].logits))


def test_kv_cache_for_gives_the_plan_its_value_widths(tiny_llama_dir):
    from lmmlab.models import load_model

    loaded = load_model(tiny_llama_dir, device="cpu")
    plan = CompressionPlan([0.0] * 3, [16, 2, 4], value_bits=[4, 16, 4], kv_group_size=8, kv_residual=8)
    cache = kv_cache_for(plan, loaded)
    assert cache.key_bits == [16, 2, 4] and cache.value_bits == [4, 16, 4]
    assert [(layer.key_bits, layer.value_bits) for layer in cache.layers] == [(16, 4), (2, 16), (4, 4)]
    # values are grouped along channels, keys along tokens: only quantized values need the group to divide D = 16
    keys_only = CompressionPlan([0.0] * 3, [2] * 3, value_bits=[16] * 3, kv_group_size=32, kv_residual=32)
    cache = kv_cache_for(keys_only, loaded)
    with torch.no_grad():
        loaded.model(torch.randint(3, loaded.model.config.vocab_size, (1, 40)), cache=cache, use_cache=True)
    assert cache.quantized_tokens() == [32] * 3 and cache.quantized_value_tokens() == [0] * 3
    assert effective_key_bits(2, head_dim=16, context=300) < 16
    with pytest.raises(ValueError, match="group size 32 must divide the head dimension 16"):
        kv_cache_for(CompressionPlan([0.0] * 3, [16] * 3, value_bits=[2] * 3, kv_group_size=32, kv_residual=32),
                     loaded)
    with pytest.raises(ValueError, match="group size 32 must divide the head dimension 16"):
        effective_value_bits(2, head_dim=16, context=100)


@pytest.mark.parametrize("make, message", [
    (lambda: KVCache([4, 4], value_bits=[4]), "value_bits has 1 entries but bits has 2"),
    (lambda: KVCache([4], value_bits=[5]), "value bit-width 5 not supported; allowed: 2, 3, 4, 6, 8, 16"),
    (lambda: KiviLayer(4, value_bits=7), "value bit-width 7 not supported"),
    (lambda: kv_nbytes([4, 4], 1, 32, 10, value_bits=[4]), "value_bits has 1 entries but bits has 2"),
    (lambda: effective_value_bits(5, head_dim=128, context=10), "value bit-width 5 not supported"),
    (lambda: effective_key_bits(4, head_dim=128, context=0), "context must be a positive number"),
])
def test_invalid_value_widths_fail_clearly(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_window_warning_counts_a_layer_idle_only_when_no_quantized_part_holds_anything():
    def filled(keys, values, context):
        cache = KVCache(keys, group_size=8, residual_length=16, value_bits=values)
        for i in range(len(keys)):
            cache.update(torch.randn(1, 2, context, 32).half(), torch.randn(1, 2, context, 32).half(), i)
        return cache

    # 16 tokens: keys flush, values wait for the 17th
    assert "KV layers [1] quantized nothing" in window_warning(filled([2, 16, 16], [16, 2, 16], 16))
    assert window_warning(filled([2, 16, 16], [16, 2, 16], 17)) is None
