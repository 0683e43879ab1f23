"""ggml blocks -> MLX affine quantization, exactly where the mathematics allows.

MLX's affine layout stores ``w = scale * q + bias`` for each group of ``group_size``
consecutive inputs of a row, ``q`` packed LSB-first into uint32 words. Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0 (blocks of 32) and Q4_K, Q5_K (sub-blocks of 32: scale ``d * sc``,
bias ``-dmin * m``) are that layout with group size 32 once the bits are repacked
(``EXACT``). ``d * sc`` is exact in float32; float16 scales round it (2-3e-4 relative).

Other types (Q6_K, Q3_K, Q2_K with 16-element sub-blocks, the codebook IQ* and TQ*
types) have no affine form at group 32: they become 8-bit affine of their dequantized
values (``NEAREST_BITS``), an error measured per type in docs/import_errors.md.

Each exact type's integers are read straight from its bits (the ``_q*`` functions, after gguf-py's
dequantizers, which are bit-identical to ggml's and are the reference of the tests).
"""

from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import Q4_K, dequantize

GROUP_SIZE = 32
NEAREST_BITS = 8  # the MLX form of a type that is not affine at group 32
CHUNK_VALUES = 1 << 22  # weights converted at once (bounds the scratch memory)


def _f16(blocks, offset):
    return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float32)


def _d_only(zero_point):
    """One group a block, ``w = d * (q - zero_point)``."""

    def fields(blocks):
        d = _f16(blocks, 0)
        return d, -zero_point * d

    return fields


def _d_m(blocks):
    """One group a block, ``w = d * q + m``."""
    return _f16(blocks, 0), _f16(blocks, 2)


def _k_quant(blocks):
    """Eight groups of 32 a super-block: scale ``d * sc``, bias ``-dmin * m``."""
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    return _f16(blocks, 0) * sc.astype(np.float32), -_f16(blocks, 2) * m.astype(np.float32)


def _nibbles(qs, run: int):
    """ggml's nibble order: each run of ``run`` bytes holds ``run`` values in its low
    halves, then the next ``run`` in its high halves."""
    qs = qs.reshape(len(qs), -1, 1, run)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(len(qs), -1)


def _fifth_bits(qh, n: int):
    """Bit ``i`` of a little-endian 32-bit word per block, for values 0..n-1."""
    words = np.ascontiguousarray(qh).view("<u4")
    return ((words >> np.arange(n, dtype=np.uint32)) & 1).astype(np.uint8) << 4


def _q4(offset):
    return lambda b: _nibbles(b[:, offset:offset + 16], 16)


def _q5(offset):
    return lambda b: _nibbles(b[:, offset + 4:offset + 20], 16) | _fifth_bits(b[:, offset:offset + 4], 32)


def _q8_0(b):
    return b[:, 2:34] ^ 0x80  # int8 q + 128 as unsigned


def _q4_k(b):
    return _nibbles(b[:, 16:144], 32)


def _q5_k(b):
    high = (b[:, 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # (n, 32 values, 8 sub-blocks)
    return _nibbles(b[:, 48:176], 32) | (high.transpose(0, 2, 1).reshape(len(b), -1) << 4)


@dataclass(frozen=True)
class Affine:
    bits: int
    fields: Callable  # uint8 blocks (n, block bytes) -> (scales, biases), (n, groups) float32
    q: Callable  # uint8 blocks -> unsigned integers (n, block values), in value order


EXACT = {
    T.Q4_0: Affine(4, _d_only(8), _q4(2)),
    T.Q4_1: Affine(4, _d_m, _q4(4)),
    T.Q5_0: Affine(5, _d_only(16), _q5(2)),
    T.Q5_1: Affine(5, _d_m, _q5(4)),
    T.Q8_0: Affine(8, _d_only(128), _q8_0),
    T.Q4_K: Affine(4, _k_quant, _q4_k),
    T.Q5_K: Affine(5, _k_quant, _q5_k),
}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)


def mlx_bits(qtype) -> int:
    """Bits of the MLX affine form of a quantized ggml type."""
    return EXACT[qtype].bits if qtype in EXACT else NEAREST_BITS


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers ``(..., n)`` -> MLX's uint32 words ``(..., n * bits / 32)``."""
    q = q.astype(np.uint8)
    if bits == 8:
        packed = q
    elif bits == 4:
        packed = q[..., 0::2] | (q[..., 1::2] << 4)
    else:
        stream = (q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
        packed = np.packbits(stream.reshape(*q.shape[:-1], -1), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4")


def to_affine(raw: np.ndarray, qtype, n_in: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One tensor's raw ggml rows ``(..., bytes)`` -> MLX ``(wq, scales, biases)``,
    scales and biases in float32 (cast them to the model's dtype afterwards).

    Exact types keep their integers; others are quantized to ``NEAREST_BITS`` affine
    at group 32 from their dequantized values."""
    lead = raw.shape[:-1]
    rows = raw.reshape(-1, raw.shape[-1])
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    per_row = n_in // block_size
    blocks = rows.reshape(-1, type_size)
    bits = mlx_bits(qtype)
    wq = np.empty((len(rows), n_in * bits // 32), np.uint32)
    scales = np.empty((len(rows), n_in // GROUP_SIZE), np.float32)
    biases = np.empty_like(scales)
    step = max(1, CHUNK_VALUES // n_in) * per_row  # whole rows per chunk
    for start in range(0, len(blocks), step):
        chunk = blocks[start : start + step]
        r0, r1 = start // per_row, (start + len(chunk)) // per_row
        if qtype in EXACT:
            q, (s, b) = EXACT[qtype].q(chunk), EXACT[qtype].fields(chunk)
        else:
            q, s, b = _nearest(dequantize(chunk, qtype).reshape(r1 - r0, n_in))
        wq[r0:r1] = pack(q.reshape(r1 - r0, n_in), bits)
        scales[r0:r1] = s.reshape(r1 - r0, -1)
        biases[r0:r1] = b.reshape(r1 - r0, -1)
    return (wq.reshape(*lead, -1), scales.reshape(*lead, -1), biases.reshape(*lead, -1))


def _nearest(w: np.ndarray):
    """``NEAREST_BITS`` affine of float32 values: the group's min as bias, (max - min) /
    levels as scale, nearest level. Not ``mx.quantize``: its rounding measured ~2x the
    error on the 16-element-block and codebook types (7.6e-3 against 3.8e-3 on Q6_K)."""
    g = w.reshape(len(w), -1, GROUP_SIZE)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    levels = (1 << NEAREST_BITS) - 1
    scale = (hi - lo) / levels
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale > 0, np.rint((g - lo) / scale), 0).clip(0, levels)
    return q, scale[..., 0], lo[..., 0]
