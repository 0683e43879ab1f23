"""ggml blocks -> MLX affine quantization, exactly where the mathematics allows.

MLX's affine layout stores ``w = scale * q + bias`` for each group of ``group_size``
consecutive inputs of a row, ``q`` packed LSB-first into uint32 words. Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0 (blocks of 32) and Q4_K, Q5_K (sub-blocks of 32: scale ``d * sc``,
bias ``-dmin * m``) are that layout with group size 32 once the bits are repacked
(``EXACT``). ``d * sc`` is exact in float32; float16 scales round it (~7e-4 relative).

Other types (Q6_K, Q3_K, Q2_K with 16-element sub-blocks, the codebook IQ* and TQ*
types) have no affine form at group 32: they become 8-bit affine of their dequantized
values (``NEAREST_BITS``), an error measured per type in docs/deploy.md.

``q`` is recovered from gguf-py's dequantization (bit-identical to ggml's) and the
block's own scale and bias fields: ``q = (w - bias) / scale`` must come out integral,
which checks the field parsing on every tensor converted.
"""

from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import Q4_K, dequantize

from . import GGUFImportError

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


@dataclass(frozen=True)
class Affine:
    bits: int
    fields: Callable  # uint8 blocks (n, block bytes) -> (scales, biases), (n, groups) float32


EXACT = {
    T.Q4_0: Affine(4, _d_only(8)),
    T.Q4_1: Affine(4, _d_m),
    T.Q5_0: Affine(5, _d_only(16)),
    T.Q5_1: Affine(5, _d_m),
    T.Q8_0: Affine(8, _d_only(128)),  # int8 q -> q + 128 unsigned
    T.Q4_K: Affine(4, _k_quant),
    T.Q5_K: Affine(5, _k_quant),
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


def _exact_blocks(blocks: np.ndarray, qtype) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales, biases = EXACT[qtype].fields(blocks)
    w = dequantize(blocks, qtype).reshape(len(blocks), scales.shape[1], GROUP_SIZE)
    s, b = scales[..., None], biases[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(s != 0, (w - b) / s, 0)
    q = np.rint(r)
    bits = EXACT[qtype].bits
    if np.abs(r - q).max(initial=0) > 1e-3 or q.min(initial=0) < 0 or q.max(initial=0) >= 1 << bits:
        raise GGUFImportError(f"{qtype.name} blocks are not affine as expected: converter bug")
    return q.reshape(len(blocks), -1), scales, biases


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
            q, s, b = _exact_blocks(chunk, qtype)
        else:
            q, s, b = _nearest(dequantize(chunk, qtype).reshape(r1 - r0, n_in))
        wq[r0:r1] = pack(q.reshape(r1 - r0, n_in), bits)
        scales[r0:r1] = s.reshape(r1 - r0, -1)
        biases[r0:r1] = b.reshape(r1 - r0, -1)
    return (wq.reshape(*lead, -1), scales.reshape(*lead, -1), biases.reshape(*lead, -1))


def _nearest(w: np.ndarray):
    """``NEAREST_BITS`` affine of float32 values, min/max per group (as mx.quantize)."""
    g = w.reshape(len(w), -1, GROUP_SIZE)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    levels = (1 << NEAREST_BITS) - 1
    scale = (hi - lo) / levels
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale > 0, np.rint((g - lo) / scale), 0).clip(0, levels)
    return q, scale[..., 0], lo[..., 0]
