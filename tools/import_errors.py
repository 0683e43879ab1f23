"""Error of the quantization-preserving GGUF import, per ggml type, against gguf-py's
dequantization (bit-identical to ggml's).

For every type gguf-py dequantizes: random blocks with sane scales (``--rows`` x 4096),
converted by ``gain_mlx.gguf.affine.to_affine`` and dequantized by MLX with the scales
stored in float32, float16 and bfloat16. Types that are not affine at group 32 become
8-bit affine; for them a bfloat16 copy of the values is measured too. Errors are
``max |w - ref| / max |ref|`` per tensor, and bits per weight are the MLX form's
(packed integers plus one scale and one bias per 32 values) against the ggml type's.

    python tools/import_errors.py --markdown docs/import_errors.md
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gain_mlx.gguf.affine import EXACT, GROUP_SIZE, mlx_bits, to_affine  # noqa: E402
from gain_mlx.gguf.quants import SCALES, blocks_of, scale_blocks  # noqa: E402
from bench_export import random_blocks  # noqa: E402

COLS = 4096
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def sane_blocks(rows: int, qtype, rng) -> np.ndarray:
    """Random quant bits, the float scale fields set so that the values have std 0.02."""
    raw = random_blocks(rows, COLS, qtype, rng, 1.0)
    scale_blocks(blocks_of(raw, qtype), qtype, 0.02 / dequantize(raw, qtype).std())
    return raw


def error(w: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(w - ref).max() / np.abs(ref).max())


def measure(qtype, rows: int, rng) -> dict:
    raw = sane_blocks(rows, qtype, rng)
    ref = dequantize(raw, qtype)
    wq, scales, biases = to_affine(raw, qtype, COLS)
    bits = mlx_bits(qtype)
    row = {"type": qtype.name, "exact": qtype in EXACT, "mlx_bits": bits,
           "ggml_bpw": GGML_QUANT_SIZES[qtype][1] * 8 / GGML_QUANT_SIZES[qtype][0]}
    for name, dtype in DTYPES.items():
        s, b = (mx.array(a).astype(dtype).astype(mx.float32) for a in (scales, biases))
        w = np.array(mx.dequantize(mx.array(wq), s, b, group_size=GROUP_SIZE, bits=bits))
        row[name] = error(w, ref)
        row[f"bpw_{name}"] = bits + 2 * np.dtype(name if name != "bfloat16" else "float16").itemsize * 8 / GROUP_SIZE
    if qtype not in EXACT:
        row["bf16_copy"] = error(np.array(mx.array(ref).astype(mx.bfloat16).astype(mx.float32)), ref)
    return row


def markdown(rows) -> str:
    lines = [
        "| ggml type | MLX form | error, float32 scales | float16 scales | bfloat16 scales | bits/weight (ggml -> MLX, fp16 scales) | bf16 copy instead |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        form = f"{r['mlx_bits']}-bit affine /32" + ("" if r["exact"] else " (requantized)")
        lines.append(
            f"| {r['type']} | {form} | {r['float32']:.1e} | {r['float16']:.1e} | {r['bfloat16']:.1e} | "
            f"{r['ggml_bpw']:.2f} -> {r['bpw_float16']:.0f} | "
            + (f"{r['bf16_copy']:.1e}, 16 bits" if "bf16_copy" in r else "-") + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    types = sorted((q for q in SCALES if q not in (T.F32, T.F16, T.BF16, T.MXFP4)), key=lambda q: (q not in EXACT, q.value))
    rows = [measure(q, args.rows, rng) for q in types]
    table = markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
