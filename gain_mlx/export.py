"""python -m gain_mlx.export: fold trained gains into an existing GGUF for llama.cpp.

The GGUF keeps its size, quant types and metadata; only the scale fields of the
affected blocks change (see gain_mlx.gguf.export).
"""

import argparse

from . import cpu
from .errors import UserError, cli
from .gguf.export import FALLBACKS, ExportError, export_gguf


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gain_mlx.export",
        description="Fold an adapter's gains into a copy of a (quantized) GGUF file.",
    )
    p.add_argument("--gguf", required=True, help="the base model's GGUF (never modified)")
    p.add_argument("--adapter-path", required=True, help="adapter folder (gains.safetensors + gain_config.json)")
    p.add_argument("--out", required=True, help="the GGUF to write")
    p.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default="requant",
        help="for gains with no exact fold (untied GQA attention gains, non-gated FFNs on a "
        "quantized tensor): requantize to the same type (default; types gguf-py can quantize), "
        "store that tensor as f16 or q8_0, or refuse",
    )
    p.add_argument("--metadata", action="store_true", help="add gain_mlx.* provenance keys (rewrites the header)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    cpu.add_fast_blas_argument(p)
    return p


@cli
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    cpu.ensure_fast_blas(args.fast_blas)
    try:
        export_gguf(args.gguf, args.adapter_path, args.out, args.fallback, args.metadata, args.force)
    except (ExportError, ValueError) as e:  # AdapterError, a corrupt GGUF
        raise UserError(str(e)) from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
