"""Error of each fold path on a real model: weights and logits, against the un-fused model.

For each setting (storage dtype, bits, group size, KV-tied or untied attention gains,
float32 or stored scales) the base is quantized in memory, random gains U(lo, hi) are
put on it, and the model is fused. Reported per fold method: the largest relative
weight error against ``dequantize(W) * gain`` (float32); and for the whole model, the
KL divergence and top-1 agreement of the fused model's next-token distribution against
the un-fused model computed in float32, next to the un-fused model run in its own dtype
(the floor that dtype sets), and next to the fused model computed in float32 (its weight
error alone). The last column is what mlx-lm's way gives, computed in float32: each
gained matrix dequantized, its gain multiplied in, and requantized whole.

    python tools/fold_errors.py --json fold_errors.json
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.utils import quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gain_mlx import cpu, policy  # noqa: E402
from gain_mlx.adapter import apply_gains, gain_parameters  # noqa: E402
from gain_mlx.arch import get_module  # noqa: E402
from gain_mlx.fold import FoldStep  # noqa: E402
from gain_mlx.fuse import execute_step, fuse_model, summarize  # noqa: E402
from gain_mlx.layers import GAIN_LAYERS  # noqa: E402
from gain_mlx.loading import load_model  # noqa: E402

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
# (storage dtype, bits or None for float, group size, tie_kv, fp32 scales)
SETTINGS = (
    ("float32", None, None, False, False),
    ("bfloat16", None, None, False, False),
    ("float32", 4, 64, True, False),
    ("bfloat16", 4, 64, True, True),
    ("bfloat16", 4, 64, True, False),
    ("bfloat16", 8, 64, True, False),
    ("bfloat16", 4, 64, False, False),
    ("bfloat16", 8, 64, False, False),
)


def gained_model(args, dtype, bits, group_size, tie_kv):
    model, tokenizer, _ = load_model(args.model, verbose=False)
    model.set_dtype(DTYPES[dtype])
    if bits:
        model, _ = quantize_model(model, {}, group_size, bits)
    targets = apply_gains(model, "gain-ffn", tie_kv=tie_kv)
    key = mx.random.key(args.seed)
    for _, layer in model.named_modules():
        if isinstance(layer, GAIN_LAYERS):
            key, sub = mx.random.split(key)
            layer.gain = mx.random.uniform(args.low, args.high, layer.gain.shape, key=sub)
    return model, tokenizer, targets


def log_probs(model, ids, float32=False):
    """Next-token log-probabilities; ``float32``: cast the model's float parameters
    (scales included, exactly) to float32 first, so only weight errors remain."""
    if float32:
        model.set_dtype(mx.float32)
    logits = model(ids)[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def compare(ref, got) -> dict:
    kl = mx.sum(mx.exp(ref) * (ref - got), axis=-1)
    top1 = mx.mean(mx.argmax(ref, -1) == mx.argmax(got, -1))
    return {"kl_mean": kl.mean().item(), "top1": top1.item()}


def requantize_targets(model, targets):
    """mlx-lm's way on a quantized base: each gained matrix dequantized, its gain put on
    its columns, and requantized whole (same bits, group size, mode)."""
    gains = {p: np.array(g) for p, g in gain_parameters(model).items()}
    model.update_modules(tree_unflatten([(t.path, get_module(model, t.path).base) for t in targets]))
    for t in targets:
        execute_step(get_module(model, t.path), FoldStep(t.path, t.path, "columns", None, gains[t.path]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="as gain_mlx.train --model (default: packaged SmolLM2)")
    p.add_argument("--low", type=float, default=0.5)
    p.add_argument("--high", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--settings", help="comma-separated indices into SETTINGS (default: all)")
    p.add_argument("--json")
    cpu.add_fast_blas_argument(p)
    args = p.parse_args(argv)
    policy.start(args.fast_blas)

    text = Path(__file__).read_text()
    rows = []
    chosen = [SETTINGS[int(i)] for i in args.settings.split(",")] if args.settings else SETTINGS
    for dtype, bits, group_size, tie_kv, fp32_scales in chosen:
        model, tokenizer, targets = gained_model(args, dtype, bits, group_size, tie_kv)
        ids = mx.array(tokenizer.encode(text)[: args.tokens])[None]
        reference, _, _ = gained_model(args, dtype, bits, group_size, tie_kv)
        unfused = log_probs(reference, ids)  # gain layers, native dtype: the floor
        ref = log_probs(reference, ids, float32=True)
        report = fuse_model(model, targets, fp32_scales=fp32_scales)
        row = {
            "dtype": dtype, "bits": bits, "group_size": group_size, "tie_kv": tie_kv,
            "fp32_scales": fp32_scales, "fold": summarize(report), **compare(ref, log_probs(model, ids)),
            "unfused": compare(ref, unfused),
            "fused_in_float32": compare(ref, log_probs(model, ids, float32=True)),
        }
        if bits:
            mlx_lm_way, _, mlx_lm_targets = gained_model(args, dtype, bits, group_size, tie_kv)
            requantize_targets(mlx_lm_way, mlx_lm_targets)
            row["requantize_targets"] = compare(ref, log_probs(mlx_lm_way, ids, float32=True))
        rows.append(row)
        fold = ", ".join(f"{m} x{s['count']} <= {s['max_rel_error']:.1e}" for m, s in row["fold"].items())
        base = f"{dtype} {'float' if not bits else f'{bits}-bit g{group_size}'}"
        mlx_lm = row.get("requantize_targets")
        extra = f" | requantize-targets KL {mlx_lm['kl_mean']:.2e} top1 {mlx_lm['top1']:.3f}" if mlx_lm else ""
        print(f"{base:<22} tie_kv={tie_kv!s:<5} fp32_scales={fp32_scales!s:<5} | {fold} | "
              f"fused KL {row['kl_mean']:.2e} top1 {row['top1']:.3f} | un-fused KL "
              f"{row['unfused']['kl_mean']:.2e} top1 {row['unfused']['top1']:.3f} | fused in float32 KL "
              f"{row['fused_in_float32']['kl_mean']:.2e} top1 {row['fused_in_float32']['top1']:.3f}{extra}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
