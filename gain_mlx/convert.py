"""python -m gain_mlx.convert: a GGUF file -> an mlx-lm model folder."""

import argparse

from .errors import UserError, cli
from .gguf.config import ARCHS
from .gguf.convert import DTYPES, convert_gguf


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gain_mlx.convert",
        description=f"Convert a GGUF model ({', '.join(ARCHS)}) into an mlx-lm folder: "
        "config.json, safetensors weights, tokenizer.json and tokenizer_config.json.",
    )
    p.add_argument("--gguf", required=True, help="input .gguf file")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype of the dequantized weights (default: float32)")
    p.add_argument("--quantize", action="store_true",
                   help="re-quantize the matrices with MLX affine quantization")
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=4, help="bits with --quantize")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64,
                   help="group size with --quantize")
    return p


@cli
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        out = convert_gguf(
            args.gguf,
            args.out,
            dtype=args.dtype,
            q_bits=args.q_bits if args.quantize else None,
            q_group_size=args.q_group_size,
        )
    except FileExistsError as e:
        raise UserError(str(e)) from None
    except ValueError as e:  # GGUFImportError, tokenizer errors
        raise UserError(str(e)) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
