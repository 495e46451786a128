"""Packed decode attention (lmmlab.attention): the folded products equal dequantize-then-attend, in C and in torch,
for every width, head layout, group size, odd length and batch; the cache hands attention a PackedStates; a model
switched to lmmlab's attention generates exactly what the dequantize path generates."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmmlab.kv import attention
from lmmlab.kv import native
from lmmlab.kv.attention import (decode_attention, kivi_attention_forward, packed_scores, packed_scores_reference, packed_values, reads_packed, use_packed_attention)
from lmmlab.kv.quant import KEY_AXIS, VALUE_AXIS, PackedStates, dequantize, quantize
from lmmlab.kv.cache import KiviLayer, KVCache, kv_cache_for
from lmmlab.kv.budget import kv_nbytes
from lmmlab.plan import CompressionPlan

WIDTHS = (2, 3, 4, 6, 8)
BACKENDS = ("c", "torch")
# (batch, KV heads, query rows per KV head, tokens, head dim, group size): MHA and GQA rows, the fast C path (head
# dim 64/128, groups of 32) and the general one (head dim 16 or 24, groups of 4 or 8, tokens not a power of two)
LAYOUTS = [(1, 2, 1, 64, 128, 32), (2, 3, 3, 96, 64, 32), (3, 2, 2, 40, 24, 8), (1, 4, 7, 12, 16, 4)]


def _store(x, bits, G, axis):
    return quantize(x, bits, G, axis)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_folded_products_equal_dequantize_then_multiply(bits, layout, backend):
    B, H, R, T, D, G = layout
    g = torch.Generator().manual_seed(bits * 100 + T)
    keys, values = (torch.randn(B, H, T, D, generator=g) * 3 for _ in range(2))
    q = torch.randn(B, H, R, D, generator=g)
    p = torch.softmax(torch.randn(B, H, R, T, generator=g), dim=-1)
    stored_k, stored_v = _store(keys, bits, G, KEY_AXIS), _store(values, bits, G, VALUE_AXIS)
    expected_scores = q @ dequantize(stored_k, torch.float32).transpose(-1, -2)
    expected_out = p @ dequantize(stored_v, torch.float32)
    scores, out = packed_scores(q, stored_k, backend), packed_values(p, stored_v, backend)
    assert scores.shape == (B, H, R, T) and out.shape == (B, H, R, D)
    if backend == "c":  # the kernels themselves ran (the values kernel needs whole chunks of codes per group)
        assert attention._c_product("kivi_scores", stored_k, q, torch.empty(B, H, R, T))
        runs_values = G % {2: 4, 3: 8, 4: 2, 6: 4, 8: 1}[bits] == 0
        assert attention._c_product("kivi_values", stored_v, p, torch.empty(B, H, R, D)) == runs_values
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)


def test_the_reference_is_the_formula_not_a_dequantized_copy():
    """Keys at 2 bits in groups of 2 tokens: a hand-computed fold (q·s per group, plus q·z)."""
    keys = torch.tensor([[[[0.0, 1.0], [3.0, -1.0], [1.0, 1.0], [2.0, 5.0]]]])  # [1, 1, 4, 2]
    stored = quantize(keys, 2, 2, KEY_AXIS)
    s, z = stored.scale.float().squeeze(3)[0, 0], stored.zero.float().squeeze(3)[0, 0]  # [2 groups, 2 channels]
    codes = torch.tensor([[0, 3], [3, 0], [0, 0], [3, 3]], dtype=torch.float32)  # each group's min -> 0, max -> 3
    q = torch.tensor([[[[0.5, -2.0]]]])
    by_hand = torch.stack([(q[0, 0, 0] * s[t // 2] * codes[t]).sum() + (q[0, 0, 0] * z[t // 2]).sum()
                           for t in range(4)])
    torch.testing.assert_close(packed_scores_reference(q, stored)[0, 0, 0], by_hand)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])  # (query heads, KV heads): MHA and grouped KV heads
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_attention_equals_sdpa_on_the_dequantized_store(bits, heads, backend):
    Hq, Hkv = heads
    B, T, w, D, G = 2, 69, 5, 32, 8  # 69 stored tokens (odd), a 5-token full-precision tail
    g = torch.Generator().manual_seed(bits + Hq)
    k_old, v_old = (torch.randn(B, Hkv, 64, D, generator=g) for _ in range(2))
    keys = PackedStates(quantize(k_old, bits, G, KEY_AXIS), torch.randn(B, Hkv, w + T - 64, D, generator=g))
    v_stored = torch.randn(B, Hkv, T, D, generator=g)
    values = PackedStates(quantize(v_stored, bits, G, VALUE_AXIS), torch.randn(B, Hkv, w, D, generator=g))
    query = torch.randn(B, Hq, 1, D, generator=g)
    mask = torch.ones(B, 1, 1, T + w, dtype=torch.bool)
    mask[1, :, :, :7] = False  # the second row is left-padded
    K, V = keys.materialize(), values.materialize()
    rep = Hq // Hkv
    expected = F.scaled_dot_product_attention(query, K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1),
                                              attn_mask=mask, scale=0.3).transpose(1, 2)
    got = decode_attention(query, keys, values, mask, 0.3, backend)
    assert got.shape == (B, 1, Hq, D)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # one part packed, the other a plain tensor (a layer whose values are at 16 bits)
    torch.testing.assert_close(decode_attention(query, keys, V, mask, 0.3, backend), expected, rtol=1e-5, atol=1e-5)


def test_a_cache_reads_packed_only_when_asked():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 2, 40, 8, generator=g)
    plain, packed = KiviLayer(4, 4, 8), KiviLayer(4, 4, 8, read="packed")
    for layer in (plain, packed):
        first = layer.update(k[:, :, :3], v[:, :, :3])
        assert all(isinstance(x, torch.Tensor) for x in first)  # nothing stored yet: the states as they came
    for t in range(3, 40):
        a, b = plain.update(k[:, :, t:t + 1], v[:, :, t:t + 1]), packed.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        for dense, lazy, stored in zip(a, b, (t - t % 8, t - 8)):  # keys / values quantized before this step
            assert isinstance(lazy, PackedStates) == (stored > 0) and lazy.shape == dense.shape
            assert torch.equal(lazy.materialize() if stored > 0 else lazy, dense)
    with pytest.raises(ValueError, match="unknown KV read 'fast'; allowed: dequantize, packed"):
        KVCache([4], read="fast")


def test_stores_grow_in_place_and_count_only_what_they_hold():
    """A decode step writes its token into the store's spare room (no copy of the store), `nbytes()` still equals the
    closed form, and the spare room is min(2·R, max(G, T/8)) tokens per part and head at most."""
    layer = KiviLayer(4, 4, 8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 200, 16, generator=g)
    layer.update(x[:, :, :20], x[:, :, :20])
    held, copies = None, 0
    for t in range(20, 200):
        layer.update(x[:, :, t:t + 1], x[:, :, t:t + 1])
        base = layer._quantized_values.base
        if base is not None and base[0] is not held:  # `held` keeps the last buffer alive: no id is reused
            held, copies = base[0], copies + 1
        assert layer.nbytes() == kv_nbytes([4], 2, 16, t + 1, 4, 8, dtype_bytes=4)
        spare = layer.allocated_nbytes() - layer.nbytes()
        # per part and head a spare token holds 8 code bytes + 16 bytes of fp16 scales and zeros
        assert 0 <= spare <= 2 * 2 * (8 + 16) * min(16, max(4, (t + 1) // 8))
    assert math.ceil(180 / 17) <= copies <= math.ceil(180 / 5)  # one move per 5 to 17 steps, not one per step


def test_appending_twice_to_one_store_leaves_the_first_result_alone():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 12, 16, generator=g)
    store = quantize(x[:, :, :8], 4, 4, VALUE_AXIS).append(quantize(x[:, :, 8:9], 4, 4, VALUE_AXIS), reserve=8)
    a = store.append(quantize(x[:, :, 9:10], 4, 4, VALUE_AXIS), reserve=8)
    before = a.codes.clone()
    b = store.append(quantize(x[:, :, 10:11], 4, 4, VALUE_AXIS), reserve=8)  # from the same store again
    assert torch.equal(a.codes, before) and a.base[0] is not b.base[0]
    assert torch.equal(b.codes[:, :, 9], quantize(x[:, :, 10:11], 4, 4, VALUE_AXIS).codes[:, :, 0])


def test_prefill_and_plain_tensors_keep_the_sdpa_path():
    """A query longer than one token over a PackedStates is SDPA on the materialized states, exactly."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(2)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    stored = quantize(torch.randn(1, 2, 16, 8, generator=g), 4, 4, KEY_AXIS)
    keys = PackedStates(stored, torch.randn(1, 2, 3, 8, generator=g))
    values = torch.randn(1, 2, 19, 8, generator=g)
    query = torch.randn(1, 2, 3, 8, generator=g)
    mask = torch.ones(1, 1, 3, 19, dtype=torch.bool).tril(16)
    got, _ = kivi_attention_forward(module, query, keys, values, mask, scaling=0.5)
    expected, _ = sdpa_attention_forward(module, query, keys.materialize(), values, mask, scaling=0.5)
    assert torch.equal(got, expected)


@pytest.mark.slow  # runs the C compiler: seconds, kept out of `make test-fast`
def test_the_kernels_are_built_once_into_the_cache(tmp_path, monkeypatch):
    lib = native.kernels()
    if lib is None:
        pytest.skip("no C compiler on this machine: the torch path is what runs (tested above)")
    compiler = native._compiler()
    assert native.library_path(compiler).exists()
    monkeypatch.setenv("LMMLAB_CACHE", str(tmp_path))
    path = native.library_path(compiler)
    assert path.parent == tmp_path / "kernels" and not path.exists()
    native.build(compiler, path)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    with pytest.raises(RuntimeError, match="failed on kivi_attention.c"):
        native.build("false", tmp_path / "kernels" / "broken.so")
    assert not (tmp_path / "kernels" / "broken.so").exists()


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown packed attention backend 'cuda'; allowed: auto, c, triton, torch"):
        packed_scores(torch.zeros(1, 1, 1, 8), quantize(torch.zeros(1, 1, 4, 8), 4, 4, KEY_AXIS), "cuda")


class _Counted:
    """Counts the calls of lmmlab.attention.decode_attention (the packed path) while in a `with` block."""

    def __enter__(self):
        self.calls, self.original = 0, attention.decode_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        attention.decode_attention = counted
        return self

    def __exit__(self, *exc):
        attention.decode_attention = self.original


@pytest.mark.parametrize("layout", [dict(group_size=8, residual_length=16), dict(group_size=32, residual_length=32)])
def test_smollm2_generates_the_same_tokens_from_the_packed_store(smollm2, layout):
    """Two prompts of different lengths (left-padded, so the decode steps carry a padding mask), keys and values at
    2 and 4 bits in alternate layers."""
    assert reads_packed(smollm2.model)
    prompts = ["Write a short story about a lighthouse keeper who finds a message in a bottle. " * 3,
               "The capital of France is"]
    ids = smollm2.tokenizer(prompts, return_tensors="pt", padding=True)
    assert smollm2.tokenizer.padding_side == "left"
    widths = [(2, 4)[i % 2] for i in range(smollm2.num_layers)]
    out = {}
    for read in ("dequantize", "packed"):
        with _Counted() as counted, torch.no_grad():
            cache = KVCache(widths, read=read, **layout)
            out[read] = smollm2.model.generate(**ids, cache=cache, max_new_tokens=24, do_sample=False)
        assert (counted.calls > 0) == (read == "packed")  # the packed path ran for the decode steps
    assert torch.equal(out["packed"], out["dequantize"])


def test_default_model_answers_the_same_from_the_packed_store(default):
    """The embedded LLaVA on the shapes quiz: image and question prefilled, answers decoded over the packed store."""
    from lmmlab.tasks import get_task

    task = get_task("shapes")
    widths = [(2, 3, 4)[i % 3] for i in range(default.num_layers)]
    plan = CompressionPlan([0.0] * default.num_layers, widths, kv_group_size=4, kv_residual=8)
    metrics = {}
    for read in ("dequantize", "packed"):
        with _Counted() as counted:
            metrics[read] = task.evaluate(default, n=24, make_cache=lambda: kv_cache_for(plan, default, read=read))
        assert (counted.calls > 0) == (read == "packed")
    assert metrics["packed"].predictions == metrics["dequantize"].predictions
    assert metrics["packed"].per_item == metrics["dequantize"].per_item


def test_default_model_generate_is_token_equal_on_the_packed_store(default):
    """`model.generate` itself on the embedded LLaVA: a left-padded batch of images and questions, 12 new tokens."""
    from lmmlab.tasks import get_task
    from lmmlab.tasks.shapes import model_inputs

    samples = get_task("shapes").items("test", 6)
    inputs = model_inputs(default, samples)
    widths = [(2, 4, 8)[i % 3] for i in range(default.num_layers)]
    out = {}
    for read in ("dequantize", "packed"):
        with _Counted() as counted, torch.no_grad():
            cache = KVCache(widths, group_size=4, residual_length=8, read=read)
            out[read] = default.model.generate(**inputs, cache=cache, max_new_tokens=12, min_new_tokens=12,
                                               do_sample=False)
        assert (counted.calls > 0) == (read == "packed")
    assert torch.equal(out["packed"], out["dequantize"])


def test_load_model_switches_attention_and_kv_cache_for_reads_packed(tiny_llama_dir, default):
    from lmmlab.models import load_model

    tiny = load_model(tiny_llama_dir, device="cpu")
    plan = CompressionPlan.uniform(tiny.num_layers, kv_bits=4, kv_group_size=4, kv_residual=8)
    assert native.kernels() is not None  # gcc is on every machine this project runs on
    assert reads_packed(tiny.model) and kv_cache_for(plan, tiny).read == "packed"
    assert kv_cache_for(plan, tiny, read="dequantize").read == "dequantize"
    assert default.model.config.text_config._attn_implementation == attention.ATTENTION
    assert default.model.config.vision_config._attn_implementation != attention.ATTENTION  # the vision tower's own
    tiny.model.set_attn_implementation("sdpa")
    assert not reads_packed(tiny.model) and kv_cache_for(plan, tiny).read == "dequantize"
    assert use_packed_attention(tiny.model) and reads_packed(tiny.model)
    tiny.model.set_attn_implementation("eager")  # a model on another attention is left as it is
    assert not use_packed_attention(tiny.model) and kv_cache_for(plan, tiny).read == "dequantize"
