"""Where each ggml type keeps its float scales, and how to scale raw blocks.

Every ggml block dequantizes to ``scale_field * f(quant bits)`` (plus ``min_field *
g(bits)`` for the affine types), so multiplying all float scale fields of a block by
``s`` multiplies the whole block by ``s``. A block runs along the input dimension of
one row, so a factor per ROW (output channel) is exact up to the rounding of the
field; a factor per COLUMN is only exact for the float types (one element a block).
Offsets were read off gguf-py's dequantizers (``gguf/quants.py``, bit-identical to
ggml's) and are checked against them in ``tests/test_gguf_quants.py``.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq


@dataclass(frozen=True)
class Scales:
    """The float scale fields of one block: byte offsets and their encoding."""

    offsets: tuple
    kind: str  # "f16", "f32", "bf16", "e8m0" (powers of two), "f16_nibbles" (IQ1_M)


SCALES = {
    T.F32: Scales((0,), "f32"),
    T.F16: Scales((0,), "f16"),
    T.BF16: Scales((0,), "bf16"),
    T.Q4_0: Scales((0,), "f16"),
    T.Q4_1: Scales((0, 2), "f16"),  # d, m
    T.Q5_0: Scales((0,), "f16"),
    T.Q5_1: Scales((0, 2), "f16"),  # d, m
    T.Q8_0: Scales((0,), "f16"),
    T.Q2_K: Scales((80, 82), "f16"),  # after scales[16] and qs[64]: d, dmin
    T.Q3_K: Scales((108,), "f16"),  # after hmask[32], qs[64], scales[12]
    T.Q4_K: Scales((0, 2), "f16"),  # d, dmin
    T.Q5_K: Scales((0, 2), "f16"),  # d, dmin
    T.Q6_K: Scales((208,), "f16"),  # after ql[128], qh[64], scales[16]
    T.IQ1_S: Scales((0,), "f16"),
    T.IQ1_M: Scales((48,), "f16_nibbles"),  # top nibbles of the 4 scale words after qs[32], qh[16]
    T.IQ2_XXS: Scales((0,), "f16"),
    T.IQ2_XS: Scales((0,), "f16"),
    T.IQ2_S: Scales((0,), "f16"),
    T.IQ3_XXS: Scales((0,), "f16"),
    T.IQ3_S: Scales((0,), "f16"),
    T.IQ4_NL: Scales((0,), "f16"),
    T.IQ4_XS: Scales((0,), "f16"),
    T.TQ1_0: Scales((52,), "f16"),  # after qs[48], qh[4]
    T.TQ2_0: Scales((64,), "f16"),  # after qs[64]
    T.MXFP4: Scales((0,), "e8m0"),
}

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
F16_MAX = 65504.0


class NotExact(ValueError):
    """The factor cannot be stored exactly in this type's scale fields (E8M0, overflow)."""


# --- field codecs: (get(blocks, off) -> float64, put(blocks, off, values)) ---------

def _get_f16(b, o):
    return b[..., o : o + 2].view("<f2")[..., 0].astype(np.float64)


def _put_f16(b, o, v):
    b[..., o : o + 2].view("<f2")[..., 0] = v.astype(np.float16)


def _get_f32(b, o):
    return b[..., o : o + 4].view("<f4")[..., 0].astype(np.float64)


def _put_f32(b, o, v):
    b[..., o : o + 4].view("<f4")[..., 0] = v.astype(np.float32)


def _get_bf16(b, o):
    w = b[..., o : o + 2].view("<u2")[..., 0].astype(np.uint32) << 16
    return w.view(np.float32).astype(np.float64)


def _put_bf16(b, o, v):
    v = np.ascontiguousarray(v, dtype=np.float32)
    b[..., o : o + 2] = gq.BF16.quantize_blocks(v.reshape(-1, 1)).reshape(*v.shape, 2)


def _get_e8m0(b, o):
    return np.exp2(b[..., o].astype(np.float64) - 128)  # ggml_e8m0_to_fp32_half


def _put_e8m0(b, o, v):
    b[..., o] = (np.log2(v) + 128).astype(np.uint8)


def _nibble_words(b, o):
    return b[..., o : o + 8].view("<u2")


def _get_f16_nibbles(b, o):
    w = _nibble_words(b, o) >> np.array([12, 8, 4, 0], dtype=np.uint16)
    bits = (w[..., 0] & 0x000F) | (w[..., 1] & 0x00F0) | (w[..., 2] & 0x0F00) | (w[..., 3] & 0xF000)
    return bits.view(np.float16).astype(np.float64)


def _put_f16_nibbles(b, o, v):
    bits = v.astype(np.float16).view(np.uint16)[..., None]
    top = ((bits >> np.array([0, 4, 8, 12], dtype=np.uint16)) & 0xF) << 12
    w = _nibble_words(b, o)
    w[...] = (w & 0x0FFF) | top.astype(np.uint16)


CODECS = {
    "f16": (_get_f16, _put_f16),
    "f32": (_get_f32, _put_f32),
    "bf16": (_get_bf16, _put_bf16),
    "e8m0": (_get_e8m0, _put_e8m0),
    "f16_nibbles": (_get_f16_nibbles, _put_f16_nibbles),
}
FIELD_BYTES = {"f16": 2, "f32": 4, "bf16": 2, "e8m0": 1, "f16_nibbles": 8}


def _check(kind: str, v: np.ndarray) -> None:
    if kind in ("f16", "f16_nibbles") and np.any(np.abs(v) > F16_MAX):
        raise NotExact("a scaled fp16 scale overflows (|d * s| > 65504)")
    if kind == "e8m0":
        e = np.log2(v) + 128
        if not np.all(np.isfinite(e) & (e == np.round(e)) & (e >= 0) & (e <= 254)):
            raise NotExact("MXFP4 (E8M0) scales take only powers of two")


# --- public helpers ------------------------------------------------------------------

def check_type(qtype) -> Scales:
    if qtype not in SCALES:
        names = ", ".join(t.name for t in SCALES)
        raise ValueError(f"ggml type {qtype.name} has no foldable scale fields (supported: {names})")
    return SCALES[qtype]


def blocks_of(raw: np.ndarray, qtype) -> np.ndarray:
    """View raw tensor bytes ``(..., row_bytes)`` as blocks ``(..., n_blocks, type_size)``."""
    raw = raw.view(np.uint8)
    type_size = GGML_QUANT_SIZES[qtype][1]
    return raw.reshape(*raw.shape[:-1], raw.shape[-1] // type_size, type_size)


def round_field(kind: str, values: np.ndarray) -> np.ndarray:
    """``values`` rounded to what a scale field of this encoding stores (float64)."""
    values = np.asarray(values, dtype=np.float64)
    get, put = CODECS[kind]
    scratch = np.zeros((*values.shape, FIELD_BYTES[kind]), dtype=np.uint8)
    put(scratch, 0, values)
    return get(scratch, 0)


def scale_blocks(blocks: np.ndarray, qtype, factor, undo=None) -> None:
    """Multiply every scale field of ``blocks`` (..., n_blocks, type_size) in place by
    ``factor`` (broadcast to blocks.shape[:-1]). Raises NotExact, leaving blocks untouched.

    ``undo``: a factor folded in earlier, divided out first. The quotient is rounded to
    the field's storage before ``factor`` is applied: where the earlier fold was
    invertible that recovers the original field bit for bit (a domain switch then
    writes exactly what a fresh export from the base would), elsewhere it is off by
    at most one unit in the last place.
    """
    layout = check_type(qtype)
    get, put = CODECS[layout.kind]
    factor = np.asarray(factor, dtype=np.float64)
    fields = [get(blocks, o) for o in layout.offsets]
    if undo is not None:
        undo = np.asarray(undo, dtype=np.float64)
        fields = [round_field(layout.kind, v / undo) for v in fields]
    new = [v * factor for v in fields]
    for v in new:
        _check(layout.kind, v)
    for o, v in zip(layout.offsets, new):
        put(blocks, o, v)


def scale_rows(raw: np.ndarray, qtype, factor, undo=None) -> None:
    """Exactly multiply rows of raw tensor bytes ``(..., rows, row_bytes)`` in place by
    ``factor`` (..., rows): only the scale fields change (``undo``: see scale_blocks)."""
    undo = None if undo is None else np.asarray(undo)[..., None]
    scale_blocks(blocks_of(raw, qtype), qtype, np.asarray(factor)[..., None], undo)


def scale_columns_exact(raw: np.ndarray, qtype, factor, undo=None) -> None:
    """Multiply the columns of a float tensor (F32/F16/BF16) in place by ``factor`` (..., cols)."""
    if qtype not in FLOAT_TYPES:
        raise NotExact(f"{qtype.name} blocks span columns: a column factor needs requantizing")

    def spread(f):
        f = np.asarray(f)
        return f[..., None, :] if f.ndim > 1 else f

    scale_blocks(blocks_of(raw, qtype), qtype, spread(factor), None if undo is None else spread(undo))


def rows_scalable(qtype, factor) -> bool:
    """Whether a row factor is stored exactly in this type's scale fields."""
    if qtype not in SCALES:
        return False
    if SCALES[qtype].kind != "e8m0":
        return True
    m, _ = np.frexp(np.asarray(factor, dtype=np.float64))
    return bool(np.all(m == 0.5))


@lru_cache(maxsize=None)
def can_quantize(qtype) -> bool:
    """Whether gguf-py can quantize this type (needed to requantize)."""
    block = GGML_QUANT_SIZES[qtype][0]
    try:
        gq.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except (NotImplementedError, gq.QuantError):
        return False
    return True


def dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    """float32 values ``(..., cols)`` of raw tensor bytes (gguf-py's dequantizer)."""
    if qtype in (T.F32, T.F16):
        return gq.dequantize(np.ascontiguousarray(raw).view(np.uint8).view(
            np.float32 if qtype == T.F32 else np.float16), qtype)
    return gq.dequantize(np.ascontiguousarray(raw).view(np.uint8), qtype)


def quantize(values: np.ndarray, qtype) -> np.ndarray:
    """Raw bytes ``(..., row_bytes)`` of float values in ``qtype``."""
    if not can_quantize(qtype):
        raise NotImplementedError(f"gguf-py cannot quantize {qtype.name}")
    return np.ascontiguousarray(gq.quantize(values.astype(np.float32), qtype)).view(np.uint8)
