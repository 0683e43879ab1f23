"""Generation speed of a fused model: the base, the fused model and the un-fused model
with gain layers, timed interleaved (round robin) in one process.

The zero-cost claim: fused / base tokens/s is 1.0 within the noise (the base is also
timed twice per round; base / base shows the noise). Many short rounds, and the best
round per model, keep other load on the machine from deciding the ratio. Gains are an adapter's, or random
U(lo, hi) ones; the base can be quantized in memory first (like an mlx-community model).

    python tools/bench_fuse.py                                  # SmolLM2-135M, float32
    python tools/bench_fuse.py --bits 4 --dtype bfloat16 --json bench_fuse.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gain_mlx import cpu, policy  # noqa: E402
from gain_mlx.adapter import apply_gains, load_adapter, read_adapter, targets_from_config  # noqa: E402
from gain_mlx.fuse import fuse_model, summarize  # noqa: E402
from gain_mlx.layers import GAIN_LAYERS  # noqa: E402
from gain_mlx.loading import load_model  # noqa: E402

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def build(args, kind: str):
    """One of "base", "gained", "fused": a fresh copy of the model."""
    model, tokenizer, _ = load_model(args.model, verbose=False)
    model.set_dtype(DTYPES[args.dtype])
    if args.bits:
        model, _ = quantize_model(model, {}, args.group_size, args.bits)
    if kind == "base":
        return model, tokenizer, None
    if args.adapter_path:
        load_adapter(model, args.adapter_path)
        targets = targets_from_config(read_adapter(args.adapter_path)[0])
    else:
        targets = apply_gains(model, args.variant, tie_kv=args.tie_kv)
        key = mx.random.key(args.seed)
        for _, layer in model.named_modules():
            if isinstance(layer, GAIN_LAYERS):
                key, sub = mx.random.split(key)
                layer.gain = mx.random.uniform(args.low, args.high, layer.gain.shape, key=sub)
    if kind == "gained":
        return model, tokenizer, None
    report = fuse_model(model, targets, fp32_scales=args.fp32_scales)
    return model, tokenizer, summarize(report)


def tokens_per_second(model, tokenizer, max_tokens: int) -> float:
    """Greedy decoding speed after the first token (prompt processing excluded); EOS does
    not stop it, so every model decodes the same number of tokens."""
    steps = generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=max_tokens)
    next(steps)
    start = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="as gain_mlx.train --model (default: packaged SmolLM2)")
    p.add_argument("--adapter-path", help="gains to fuse (default: random U(--low, --high))")
    p.add_argument("--variant", default="gain-ffn", choices=("gain", "gain-ffn"))
    p.add_argument("--tie-kv", action="store_true", help="random gains tied per KV head")
    p.add_argument("--low", type=float, default=0.5)
    p.add_argument("--high", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--bits", type=int, help="quantize the base in memory (affine)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--fp32-scales", action="store_true")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json", help="write the results here")
    cpu.add_fast_blas_argument(p)
    args = p.parse_args(argv)
    policy.start(args.fast_blas)

    models = {kind: build(args, kind) for kind in ("base", "gained", "fused")}
    models["base2"] = models["base"]  # the same model timed twice: the noise floor
    tps = {kind: [] for kind in models}
    for kind, (model, tok, _) in models.items():  # warm-up (compilation, caches)
        tokens_per_second(model, tok, 8)
    for r in range(args.rounds):
        for kind, (model, tok, _) in models.items():
            tps[kind].append(tokens_per_second(model, tok, args.max_tokens))
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in tps.items()), flush=True)

    median = {k: statistics.median(v) for k, v in tps.items()}
    best = {k: max(v) for k, v in tps.items()}  # least disturbed by other load
    ratios = [f / b for f, b in zip(tps["fused"], tps["base"])]
    noise = [b2 / b for b2, b in zip(tps["base2"], tps["base"])]
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "tokens_per_s_median": median,
        "tokens_per_s_best": best,
        "tokens_per_s": tps,
        "fused_over_base_best": best["fused"] / best["base"],
        "fused_over_base_median_of_rounds": statistics.median(ratios),
        "base_over_base_median_of_rounds": statistics.median(noise),
        "fused_over_gained_best": best["fused"] / best["gained"],
        "fold": models["fused"][2],
    }
    print(f"tokens/s over {args.rounds} rounds of {args.max_tokens} tokens, best (median): "
          + ", ".join(f"{k} {best[k]:.1f} ({median[k]:.1f})" for k in tps))
    print(f"fused / base   = {result['fused_over_base_best']:.3f} best, "
          f"{result['fused_over_base_median_of_rounds']:.3f} median of rounds "
          f"(noise: base / base {result['base_over_base_median_of_rounds']:.3f}, "
          f"rounds {min(noise):.2f}..{max(noise):.2f})")
    print(f"fused / gained = {result['fused_over_gained_best']:.3f} best")
    print("fold: " + ", ".join(f"{m} x{s['count']} (max rel. error {s['max_rel_error']:.1e})"
                               for m, s in result["fold"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
