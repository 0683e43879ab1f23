"""python -m gain_mlx.export: fold trained gains into an existing GGUF for llama.cpp.

The GGUF keeps its quant types and metadata; only the scale fields of the affected
blocks change (see gain_mlx.gguf.export). The fold history is stored in ``gain_mlx.*``
keys, so a file exported earlier can be given as ``--gguf`` to switch it to another
adapter's domain without the original base.
"""

import argparse

from .errors import cli
from .gguf.export import CHECK_ROWS, DEFAULT_FALLBACK, FALLBACKS, export_gguf


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gain_mlx.export",
        description="Fold an adapter's gains into a copy of a (quantized) GGUF file, or switch a GGUF "
        "exported earlier to another adapter.",
    )
    p.add_argument("--gguf", required=True,
                   help="the base model's GGUF, or a GGUF exported earlier (its gains are divided out "
                   "first: a domain switch); never modified")
    p.add_argument("--adapter-path", required=True, help="adapter folder (gains.safetensors + gain_config.json) or Hugging Face Hub repo id")
    p.add_argument("--out", required=True, help="the GGUF to write")
    p.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default=DEFAULT_FALLBACK,
        help="for gains with no exact fold (untied GQA attention gains, non-gated FFNs on a quantized "
        "tensor): auto (default) stores that one tensor as Q8_0 (F16 if its rows do not split into "
        "32-column blocks; a Q8_0 tensor is requantized); requant: quantize back to the same type "
        "(types gguf-py can quantize; adds about the original quantization error again); f16 / q8_0: "
        "store it in that type; refuse: stop. Every route taken is printed with its error",
    )
    p.add_argument("--metadata", action=argparse.BooleanOptionalAction, default=True,
                   help="write the gain_mlx.* fold history (default: on; needed to switch the output to "
                   "another adapter later). --no-metadata keeps the header byte-identical")
    p.add_argument("--check-rows", type=int, default=CHECK_ROWS,
                   help=f"rows per edited tensor verified against gguf-py's dequantizer (default "
                   f"{CHECK_ROWS}; 0: no check)")
    p.add_argument("--fsync", action="store_true",
                   help="flush the output to disk before renaming it into place (survives a power cut; "
                   "costs the time to write the file to disk)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


@cli
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    # No policy.start: nothing here multiplies matrices, and re-executing the process to
    # preload a BLAS would cost more than the whole copy of a small file.
    export_gguf(args.gguf, args.adapter_path, args.out, args.fallback, args.metadata, args.force,
                check_rows=args.check_rows, fsync=args.fsync)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
