"""Training step time and peak memory: GAIN against the frozen-model floor and LoRA.

One model, one batch shape, one process; configurations are timed interleaved (round
robin, the order rotated each round, so use --steps a multiple of the number of configs)
so that load from other processes and a config's place in the round hit them alike.
Each step is one mlx-lm style compiled training step (loss, gradients, Adam update). The floor is the frozen model's
forward and backward with a single trainable scalar on the embedding output: the least
any adapter that trains through the whole network can cost.

    python tools/bench_train.py --preset tiny
    python tools/bench_train.py --preset smollm2 --json bench.json
"""

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import linear_to_lora_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gain_mlx import cpu  # noqa: E402
from gain_mlx.adapter import apply_gains  # noqa: E402
from gain_mlx.arch import find_targets, get_module  # noqa: E402

CONFIGS = ("floor", "gain", "gain-ffn", "lora-r8", "lora-default")
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}  # mlx-lm's defaults
LORA_DEFAULT_LAYERS = 16  # mlx-lm lora --num-layers default

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "intermediate_size": 704,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5,
    "vocab_size": 4096,
    "tie_word_embeddings": True,
}

# preset -> (loader, default batch size, default sequence length)
PRESETS = {
    "tiny": ("tiny", 4, 128),
    "smollm2": ("smollm2", 2, 256),
}


def load_preset(name):
    if name == "tiny":
        from mlx_lm.models import llama

        mx.random.seed(0)
        model = llama.Model(llama.ModelArgs.from_dict(TINY_LLAMA))
        mx.eval(model.parameters())
        return model
    from gain_mlx.loading import load_model

    return load_model(None)[0]


class ScaledEmbedding(nn.Module):
    """The floor's only trainable parameter: one scalar on the embedding output."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding
        self.scale = mx.ones((1,))

    def __call__(self, x):
        h = self.embedding(x)
        return h * self.scale.astype(h.dtype)

    def as_linear(self, x):
        return self.embedding.as_linear(x)


def _set_module(model, path, module):
    model.update_modules(tree_unflatten([(path, module)]))


def add_floor(model):
    model.freeze()
    path, emb = next(
        (p, m) for p, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))
    )
    _set_module(model, path, ScaledEmbedding(emb))


def add_lora_r8(model):
    model.freeze()
    for t in find_targets(model, "gain-ffn"):
        layer = get_module(model, t.path)
        _set_module(model, t.path, LoRALinear.from_base(layer, r=LORA["rank"], scale=LORA["scale"]))


def add_lora_default(model):
    model.freeze()
    linear_to_lora_layers(model, LORA_DEFAULT_LAYERS, LORA)


# config name -> how to make the base copy trainable
ADAPTERS = {
    "floor": add_floor,
    "gain": partial(apply_gains, variant="gain"),
    "gain-ffn": partial(apply_gains, variant="gain-ffn"),
    "lora-r8": add_lora_r8,
    "lora-default": add_lora_default,
}


def loss_fn(model, inputs, targets):
    logits = model(inputs)
    return nn.losses.cross_entropy(logits, targets).astype(mx.float32).mean()


def make_step(model, compile_step=True):
    """An mlx-lm style training step: value_and_grad, Adam update, compiled over state."""
    opt = optim.Adam(learning_rate=1e-5)
    opt.init(model.trainable_parameters())
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    def step(inputs, targets):
        loss, grads = value_and_grad(model, inputs, targets)
        opt.update(model, grads)
        return loss

    if compile_step:
        step = mx.compile(step, inputs=state, outputs=state)
    return step, state


def build(base, names, dequantize, compile_step):
    """{label: (step, state, n_trainable)} on structure copies sharing base's weights."""
    bases = {"": base}
    if dequantize in ("yes", "both"):
        bases["+deq"] = cpu.dequantize_model(base)
        if dequantize == "yes":
            del bases[""]
    runs = {}
    for suffix, b in bases.items():
        for name in names:
            model = cpu.copy_model(b)
            ADAPTERS[name](model)
            step, state = make_step(model, compile_step)
            n = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
            runs[name + suffix] = (step, state, n)
    return runs


def run_bench(runs, batch, steps, warmup):
    """Median step seconds and peak memory per config, timed round robin (rotated)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    for step, state, _ in runs.values():
        for _ in range(warmup):
            mx.eval(step(inputs, targets), state)
    times = {k: [] for k in runs}
    cpu_times = {k: [] for k in runs}
    peaks = {k: 0 for k in runs}
    names = list(runs)
    for i in range(steps):
        print(f"round {i + 1}/{steps}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        # rotate the order each round: a config's place in the round biases its time
        for name in names[i % len(names) :] + names[: i % len(names)]:
            step, state, _ = runs[name]
            mx.reset_peak_memory()
            tic, cpu_tic = time.perf_counter(), time.process_time()
            mx.eval(step(inputs, targets), state)
            times[name].append(time.perf_counter() - tic)
            cpu_times[name].append(time.process_time() - cpu_tic)
            peaks[name] = max(peaks[name], mx.get_peak_memory())
    ntok = inputs.size
    return {
        name: {
            "step_s": statistics.median(times[name]),
            "peak_mem_gb": peaks[name] / 1e9,
            "tokens_per_s": ntok / statistics.median(times[name]),
            "cpu_s": statistics.median(cpu_times[name]),
            "trainable": runs[name][2],
            "step_s_all": times[name],
        }
        for name in runs
    }


def report(results):
    """Table of step time and memory, with ratios to the floor and to LoRA rank 8
    (for '+deq' configs, to the '+deq' floor and LoRA)."""
    head = f"{'config':<18}{'params':>10}{'step ms':>10}{'x floor':>9}{'x lora-r8':>10}"
    print(head + f"{'peak GB':>9}{'mem x lora':>11}{'tok/s':>9}{'cpu x floor':>12}")

    def ratio(r, ref, key):
        return f"{r[key] / ref[key]:.3f}" if ref else "-"

    for name, r in results.items():
        suffix = "+deq" if name.endswith("+deq") else ""
        floor, lora = results.get("floor" + suffix), results.get("lora-r8" + suffix)
        print(
            f"{name:<18}{r['trainable']:>10,}{r['step_s'] * 1e3:>10.1f}{ratio(r, floor, 'step_s'):>9}"
            f"{ratio(r, lora, 'step_s'):>10}{r['peak_mem_gb']:>9.3f}{ratio(r, lora, 'peak_mem_gb'):>11}"
            f"{r['tokens_per_s']:>9.1f}{ratio(r, floor, 'cpu_s'):>12}"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--steps", type=int, default=5, help="timed steps per config")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--dequantize",
        choices=("no", "yes", "both"),
        default="no",
        help="train on a float32 copy of a quantized base (both: also time '+deq' configs)",
    )
    p.add_argument("--quantize", type=int, metavar="BITS", help="quantize the base first (affine, group 64)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--grad-checkpoint", action="store_true", help="checkpoint every block")
    p.add_argument("--json", help="write {config: {step_s, peak_mem_gb, tokens_per_s}}")
    cpu.add_fast_blas_argument(p)
    args = p.parse_args(argv)
    cpu.ensure_fast_blas(args.fast_blas)

    names = [n for n in args.configs.split(",") if n]
    if unknown := [n for n in names if n not in ADAPTERS]:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)} (choose from {', '.join(CONFIGS)})")
    _, batch_size, seq_len = PRESETS[args.preset]
    batch_size, seq_len = args.batch_size or batch_size, args.seq_len or seq_len

    base = load_preset(args.preset)
    if args.quantize:
        nn.quantize(
            base,
            group_size=64,
            bits=args.quantize,
            class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0,
        )
    if args.grad_checkpoint:
        grad_checkpoint(base.layers[0])
    mx.random.seed(0)
    vocab = base.args.vocab_size
    batch = mx.random.randint(0, vocab, (batch_size, seq_len + 1))
    runs = build(base, names, args.dequantize, args.compile)

    print(
        f"preset {args.preset}, batch {batch_size} x {seq_len}, {args.steps} timed steps "
        f"(median) after {args.warmup} warm-up, device {mx.default_device()}, "
        f"BLAS {cpu.preloaded_blas() or cpu.stock_blas() or 'platform'}"
    )
    load = os.getloadavg()[0]
    results = run_bench(runs, batch, args.steps, args.warmup)
    report(results)
    print(f"load average (2 cores here): {load:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    if args.json:
        out = {k: {f: v[f] for f in ("step_s", "peak_mem_gb", "tokens_per_s", "cpu_s")} for k, v in results.items()}
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        tmp.replace(args.json)
    return results


if __name__ == "__main__":
    main()
