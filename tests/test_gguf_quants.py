"""The ggml scale-field table against gguf-py's own dequantizers.

For every type in ``gain_mlx.gguf.quants.SCALES``: random raw blocks (quantized by
gguf-py where it can, random quant bits with sane scale fields otherwise — dequantize
is defined for any bytes) are row-scaled; gguf-py's dequantize of the result must be
``s * dequantize(original)``: bit-exact for powers of two (so every field that carries
the scale is found, and no other), within the scale field's rounding for other
factors; bytes outside the scale fields never change.
"""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from gain_mlx.gguf import quants as Q
from gguf_fixtures import field_mask

TYPES = list(Q.SCALES)
ROWS = 16
# relative rounding of one scale field, by encoding (fp16: 2^-11, bf16: 2^-8)
ROUNDING = {"f16": 2.0**-11, "f16_nibbles": 2.0**-11, "bf16": 2.0**-8, "f32": 2.0**-24, "e8m0": 0.0}


def random_raw(qtype, rows=ROWS, seed=0):
    """Raw bytes ``(rows, row_bytes)`` of ``qtype`` with normal-range fp16 scales."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    cols = 2 * max(block, 32)
    values = (0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
    if qtype in (T.F32, T.F16):
        return values.astype(np.float32 if qtype == T.F32 else np.float16).view(np.uint8)
    if Q.can_quantize(qtype):
        return gq.quantize(values, qtype).view(np.uint8)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    layout = Q.SCALES[qtype]
    put = Q.CODECS[layout.kind][1]
    for o in layout.offsets:
        put(raw, o, rng.uniform(1e-3, 5e-2, raw.shape[:-1]) * rng.choice([-1.0, 1.0], raw.shape[:-1]))
    return raw.reshape(rows, -1)


def gguf_dequantize(raw, qtype):
    """gguf-py's dequantize, called directly (the reference)."""
    if qtype in (T.F32, T.F16):
        return gq.dequantize(raw.view(np.float32 if qtype == T.F32 else np.float16), qtype)
    return gq.dequantize(raw, qtype)


def outside_fields(raw, qtype):
    mask = np.tile(~field_mask(qtype), raw.shape[-1] // GGML_QUANT_SIZES[qtype][1])
    return raw[:, mask]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_power_of_two_row_factors_are_exact(qtype):
    raw = random_raw(qtype)
    s = np.random.default_rng(1).choice([2.0, 4.0, 8.0, 16.0], ROWS)  # no halving: fp16 subnormals would round
    new = raw.copy()
    Q.scale_rows(new, qtype, s)
    np.testing.assert_array_equal(gguf_dequantize(new, qtype), gguf_dequantize(raw, qtype) * s[:, None])
    np.testing.assert_array_equal(outside_fields(new, qtype), outside_fields(raw, qtype))


@pytest.mark.parametrize("qtype", [t for t in TYPES if Q.SCALES[t].kind != "e8m0"], ids=lambda t: t.name)
def test_random_row_factors_within_scale_rounding(qtype):
    raw = random_raw(qtype)
    s = np.random.default_rng(2).uniform(0.6, 1.4, ROWS)
    new = raw.copy()
    Q.scale_rows(new, qtype, s)
    got, want = gguf_dequantize(new, qtype), gguf_dequantize(raw, qtype) * s[:, None]
    tol = ROUNDING[Q.SCALES[qtype].kind]
    # each field is rounded once, relative to its own magnitude
    layout = Q.SCALES[qtype]
    get = Q.CODECS[layout.kind][0]
    for o in layout.offsets:
        old_f = get(Q.blocks_of(raw, qtype), o) * s[:, None]
        new_f = get(Q.blocks_of(new, qtype), o)
        assert np.all(np.abs(new_f - old_f) <= tol * np.abs(old_f) * 1.0001)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= 4 * tol, err
    assert err > 0 or tol == 0 or qtype == T.F32  # the rounding is real: the check can fail
    np.testing.assert_array_equal(outside_fields(new, qtype), outside_fields(raw, qtype))


def test_iq1m_scale_is_split_across_nibbles():
    """IQ1_M's fp16 d lives in the top nibbles of its 4 scale words; the low 12 bits of
    each word (the block scales) must survive any change of d."""
    raw = random_raw(T.IQ1_M)
    words = Q.blocks_of(raw, T.IQ1_M)[..., 48:56].copy().view("<u2")
    new = raw.copy()
    Q.scale_rows(new, T.IQ1_M, np.full(ROWS, 3.0))
    new_words = Q.blocks_of(new, T.IQ1_M)[..., 48:56].copy().view("<u2")
    np.testing.assert_array_equal(new_words & 0x0FFF, words & 0x0FFF)
    assert np.any((new_words & 0xF000) != (words & 0xF000))
    np.testing.assert_allclose(
        gguf_dequantize(new, T.IQ1_M), 3.0 * gguf_dequantize(raw, T.IQ1_M), rtol=2.0**-10, atol=1e-9
    )


def test_mxfp4_takes_only_powers_of_two():
    raw = random_raw(T.MXFP4)
    assert Q.rows_scalable(T.MXFP4, np.array([0.5, 2.0, 1.0]))
    assert not Q.rows_scalable(T.MXFP4, np.array([0.5, 1.5]))
    assert not Q.rows_scalable(T.MXFP4, np.array([-2.0]))
    new = raw.copy()
    with pytest.raises(Q.NotExact, match="powers of two"):
        Q.scale_rows(new, T.MXFP4, np.full(ROWS, 1.5))
    np.testing.assert_array_equal(new, raw)  # nothing written


def test_fp16_overflow_is_refused_before_writing():
    raw = random_raw(T.Q4_0)
    Q.blocks_of(raw, T.Q4_0)[0, 0, 0:2].view("<f2")[0] = 60000.0
    new = raw.copy()
    with pytest.raises(Q.NotExact, match="overflows"):
        Q.scale_rows(new, T.Q4_0, np.full(ROWS, 2.0))
    np.testing.assert_array_equal(new, raw)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_columns_are_scaled_elementwise(qtype):
    raw = random_raw(qtype)
    cols = gguf_dequantize(raw, qtype).shape[-1]
    s = np.random.default_rng(3).choice([2.0, 4.0, 8.0], cols)
    new = raw.copy()
    Q.scale_columns_exact(new, qtype, s)
    np.testing.assert_array_equal(gguf_dequantize(new, qtype), gguf_dequantize(raw, qtype) * s)


def test_quantized_columns_are_not_exact():
    raw = random_raw(T.Q4_0)
    with pytest.raises(Q.NotExact, match="requantizing"):
        Q.scale_columns_exact(raw, T.Q4_0, np.ones(64))


def test_requantizable_types_follow_gguf_py():
    """Requantization is offered exactly where gguf-py has a quantizer."""
    for qtype in TYPES:
        try:
            gq.quantize(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), np.float32), qtype)
            expected = True
        except NotImplementedError:
            expected = False
        assert Q.can_quantize(qtype) == expected, qtype.name
    assert Q.can_quantize(T.Q4_0) and not Q.can_quantize(T.Q4_K)


def test_unknown_type_is_a_clear_error():
    with pytest.raises(ValueError, match="no foldable scale fields"):
        Q.check_type(T.Q8_1)
