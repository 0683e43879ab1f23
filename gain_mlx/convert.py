"""python -m gain_mlx.convert: a GGUF file -> an mlx-lm model folder."""

import argparse

from .errors import UsageError, UserError, cli
from .gguf.config import ARCHS
from .gguf.convert import DTYPES, FORMS, convert_gguf


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gain_mlx.convert",
        description=f"Convert a GGUF model ({', '.join(ARCHS)}) into an mlx-lm folder: "
        "config.json, safetensors weights, tokenizer.json and tokenizer_config.json.",
    )
    p.add_argument("--gguf", required=True, help="input .gguf file")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype of the float weights, and of the scales with --keep-quantization "
                   "(default: float32)")
    p.add_argument("--keep-quantization", action="store_true",
                   help="keep the GGUF's quantized matrices quantized (MLX affine, group 32): exact "
                   "for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K, 8-bit for other types; about the "
                   "file's size instead of 4 bytes a weight (--dtype float16 or float32 only)")
    p.add_argument("--quantize", action="store_true",
                   help="re-quantize float matrices with MLX affine quantization (lossy)")
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=4, help="bits with --quantize")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64,
                   help="group size with --quantize")
    return p


@cli
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.keep_quantization and args.quantize:
        raise UsageError("--keep-quantization and --quantize exclude each other: choose one")
    form = f"quantized-{args.dtype}" if args.keep_quantization else args.dtype
    if form not in FORMS:
        raise UsageError(f"--keep-quantization takes --dtype float16 or float32, not {args.dtype}")
    try:
        out = convert_gguf(
            args.gguf,
            args.out,
            form=form,
            q_bits=args.q_bits if args.quantize else None,
            q_group_size=args.q_group_size,
        )
    except FileExistsError as e:
        raise UserError(str(e)) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
