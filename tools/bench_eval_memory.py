"""Peak memory of one evaluation batch at a large vocabulary, under one device policy.

The cpu policy takes the whole batch's float32 logits into numpy; the gpu policy computes
the loss over chunks of positions (gain_mlx.policy.LOGITS_BYTES at a time). A tiny
2-layer model with Gemma 3's vocabulary, so the logits dominate. Run each policy in its
own process (the policy is read from the environment, peak RSS is per process):

    python tools/bench_eval_memory.py --policy cpu --tokens 512
    python tools/bench_eval_memory.py --policy gpu --tokens 2048
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gain_mlx import cpu, policy  # noqa: E402
from gain_mlx.loss import evaluation_loss  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", choices=sorted(policy.POLICIES), required=True)
    p.add_argument("--dtype", default="float32", choices=sorted(policy.DTYPES), help="compute dtype")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512, help="positions per sequence")
    p.add_argument("--vocab", type=int, default=262144, help="vocabulary (default: Gemma 3's)")
    cpu.add_fast_blas_argument(p)
    args = p.parse_args()
    os.environ[policy.ENV_POLICY], os.environ[policy.ENV_DTYPE] = args.policy, args.dtype
    policy.start(args.fast_blas)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=args.vocab, tie_word_embeddings=False)))
    model.set_dtype(policy.current().compute_dtype)
    batch = mx.random.randint(0, args.vocab, (args.batch, args.tokens + 1), key=mx.random.key(1))
    lengths = mx.array([[0, args.tokens]] * args.batch)
    mx.eval(model.parameters(), batch, lengths)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tic = time.perf_counter()
    micro_batches, _ = policy.step_parallelism(args.batch)
    total, count = evaluation_loss(model, batch, lengths, cpu.streams(micro_batches))
    full = args.batch * args.tokens * args.vocab * 4
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"policy {args.policy}, {args.dtype}: {args.batch} x {args.tokens} tokens, vocabulary {args.vocab}: "
          f"loss {total / count:.5f}, {time.perf_counter() - tic:.1f} s, MLX peak above the weights "
          f"{(mx.get_peak_memory() - base) / 1e9:.2f} GB (the batch's float32 logits: {full / 1e9:.2f} GB), "
          f"process peak RSS {rss / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
