"""Triton packed decode products (lmmlab.triton_attention) equal the torch references (lmmlab.attention) for every
width, MHA and GQA rows, head sizes 16/64/128 (and odd ones), groups of 4/8/32, odd token counts, batch 2, and stores
that are views of larger buffers (the spare room `Quantized.append` leaves).

On a CUDA machine with Triton the kernels run compiled. Without one the module is skipped, unless
LMMLAB_TRITON_INTERPRET=1 (or TRITON_INTERPRET=1) is set: then Triton's interpreter runs the same kernels on CPU
tensors, e.g.
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/tsite OMP_NUM_THREADS=1 python -m pytest -q tests/test_triton_attention.py
"""
import os

import pytest
import torch

INTERPRET = "1" in (os.environ.get("LMMLAB_TRITON_INTERPRET"), os.environ.get("TRITON_INTERPRET"))
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when lmmlab.triton_attention defines its kernels

from lmmlab.kv import triton_attention  # noqa: E402
from lmmlab.kv.attention import packed_scores_reference, packed_values_reference  # noqa: E402
from lmmlab.kv.quant import KEY_AXIS, VALUE_AXIS, quantize  # noqa: E402
from lmmlab.kv.triton_attention import triton_scores, triton_values  # noqa: E402

if INTERPRET:
    if triton_attention.triton is None:
        pytest.skip("Triton is not importable", allow_module_level=True)
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton_attention._scores_kernel, InterpretedFunction):
        pytest.skip("lmmlab.triton_attention was imported before TRITON_INTERPRET was set", allow_module_level=True)
    DEVICE = "cpu"
elif triton_attention.available():
    DEVICE = "cuda"
else:
    pytest.skip("needs Triton and a CUDA device (or LMMLAB_TRITON_INTERPRET=1)", allow_module_level=True)

WIDTHS = (2, 3, 4, 6, 8)
# A score is a sum of terms of up to ~100 (q_c·s_gc·code_tc with codes up to 255, and the zero points) that cancel to
# a few units; summed in another order (the GPU's) it can differ by ~1e-4 from the reference: float rounding, 1e-5 of
# the terms' scale. Values are convex combinations of dequantized states and stay within 1e-5.
SCORES_ATOL = 1e-3
ROWS = (1, 3)  # query rows per KV head: MHA, and a GQA group of 3


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


def _store(x, bits, G, axis, parts):
    """x [B, H, T, D] quantized in `parts` token counts, appended one after another (reserve=16): with more than one
    part the codes, scales and zeros are views of buffers with spare tokens."""
    store, t0 = None, 0
    for n in parts:
        piece = quantize(x[:, :, t0 : t0 + n].contiguous(), bits, G, axis)
        store = piece if store is None else store.append(piece, reserve=16)
        t0 += n
    assert store.num_tokens == x.shape[2] == t0
    if len(parts) > 1:  # heads lie further apart than their tokens: the kernels must use the real strides
        assert store.codes.stride(1) > store.num_tokens * store.codes.shape[-1]
    return store


def _check(bits, B, H, R, D, G, parts, seed):
    T = sum(parts)
    x_k, x_v = _data((B, H, T, D), seed) * 3, _data((B, H, T, D), seed + 1) * 3
    q = _data((B, H, R, D), seed + 2)
    p = torch.softmax(_data((B, H, R, T), seed + 3), dim=-1)
    keys, values = _store(x_k, bits, G, KEY_AXIS, parts), _store(x_v, bits, G, VALUE_AXIS, parts)
    scores, out = triton_scores(q, keys), triton_values(p, values)
    assert scores.shape == (B, H, R, T) and out.shape == (B, H, R, D)
    assert scores.device.type == out.device.type == DEVICE
    torch.testing.assert_close(scores, packed_scores_reference(q, keys), rtol=1e-5, atol=SCORES_ATOL)
    torch.testing.assert_close(out, packed_values_reference(p, values), rtol=1e-5, atol=1e-5)


# (head dim, group size, token parts): one part = a plain store; several = a view of a larger buffer. Keys need
# whole groups in every part; token counts are not powers of two (40 = 24 + 16, 96, 128 = 96 + 32)
SHAPES = [(D, G, parts) for D in (16, 64, 128) for G in (4, 8, 32) if G <= D
          for parts in ([(40,), (24, 16)] if G < 32 else [(96,), (96, 32)])]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("R", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"D{s[0]}-G{s[1]}-T{'+'.join(map(str, s[2]))}")
def test_kernels_equal_the_references(bits, R, shape):
    D, G, parts = shape
    _check(bits, 2, 2, R, D, G, parts, seed=bits * 1000 + D * 10 + G + R)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("layout", [(24, 6, (42, 6)), (4, 2, (6,)), (8, 8, (8, 1)), (32, 32, (32, 32, 32))],
                         ids=["D24-G6", "D4-G2", "D8-G8-oneToken", "D32-G32-threeParts"])
def test_odd_head_sizes_groups_and_lengths(bits, layout):
    """Head size and group not powers of two, a 3-/6-bit chunk cut short by the row's end (D=4), a single token, and
    a store grown by two appends (its second append written into the spare room). Keys with a part that is not whole
    groups are left out (the cache never stores those)."""
    D, G, parts = layout
    B, H, R = 2, 3, 2
    T = sum(parts)
    x_v = _data((B, H, T, D), bits + D) * 3
    p = torch.softmax(_data((B, H, R, T), bits + D + 1), dim=-1)
    values = _store(x_v, bits, G, VALUE_AXIS, parts)
    torch.testing.assert_close(triton_values(p, values), packed_values_reference(p, values), rtol=1e-5, atol=1e-5)
    if all(n % G == 0 for n in parts):
        keys = _store(_data((B, H, T, D), bits + D + 2) * 3, bits, G, KEY_AXIS, parts)
        q = _data((B, H, R, D), bits + D + 3)
        torch.testing.assert_close(triton_scores(q, keys), packed_scores_reference(q, keys), rtol=1e-5,
                                   atol=SCORES_ATOL)


@pytest.mark.parametrize("bits", (3, 4))
def test_value_splits_agree_and_repeat_exactly(bits):
    """However the tokens are split across programs the result is the reference's; a given split is deterministic."""
    B, H, R, T, D, G = 1, 2, 3, 150, 16, 8
    values = quantize(_data((B, H, T, D), 7) * 3, bits, G, VALUE_AXIS)
    p = torch.softmax(_data((B, H, R, T), 8), dim=-1)
    expected = packed_values_reference(p, values)
    for splits in (1, 2, 3, 64, None):
        out = triton_values(p, values, num_splits=splits)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(out, triton_values(p, values, num_splits=splits))


def test_available_is_a_bool():
    assert triton_attention.available() in (True, False)
