"""Training step time and peak memory: GAIN against the frozen-model floor and LoRA.

One model, one batch shape, one process; configurations are timed interleaved (round
robin, the order rotated each round, so use --steps a multiple of the number of configs)
so that load from other processes and a config's place in the round hit them alike.
Each step is one mlx-lm style compiled training step (loss, gradients, Adam update). The floor is the frozen model's
forward and backward with a single trainable scalar on the embedding output: the least
any adapter that trains through the whole network can cost.

Each config's counted FLOPs (:func:`count_flops`: 2 per frozen weight per token forward,
2 more for its activation gradient where the backward pass needs one, the causal part
of attention, the output layer, LoRA's own matmuls) give its achieved GFLOP/s. In every
round the same process also times fp32 matmuls at exactly the step's shapes (its
transposes included); the time those matmuls alone would take is the step's matmul
limit. ``x matmul`` is limit time / step time, per round, median over rounds: the
fraction of the machine's matmul rate that the step reaches (1.0 = nothing but matmuls).

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
from mlx_lm.tuner.trainer import default_loss, grad_checkpoint
from mlx_lm.tuner.utils import linear_to_lora_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gain_mlx import cpu, policy  # noqa: E402
from gain_mlx.adapter import apply_gains  # noqa: E402
from gain_mlx.arch import find_targets, get_arch, get_module, input_dims  # noqa: E402
from gain_mlx.layers import GainLinear  # noqa: E402
from gain_mlx.trainer import loss_and_grad  # noqa: E402

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


# Where each projection of a llama-style block sits in the data flow through the block:
# the attention core (scores and weighted sum) runs between stage 0 and stage 1.
STAGES = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}


class FlopCount:
    """Counted FLOPs of one training step, by part, and the matmuls that perform them.

    ``matmuls``: ``[(layout, batch, m, k, n, flops)]``, one entry per matmul of the step
    (``a @ b`` of ``(batch, m, k) @ (batch, k, n)``; layout ``nn``, ``nt`` (b transposed)
    or ``tn`` (a transposed), as the step calls it); ``flops`` is what is counted for it:
    ``2 * batch * m * k * n``, times the causal fraction for attention.
    """

    def __init__(self, tokens):
        self.tokens = tokens
        self.parts = {"projections": 0, "attention": 0, "output": 0, "adapter": 0}
        self.matmuls = []

    def add(self, part, layout, batch, m, k, n, fraction=1.0):
        flops = 2 * batch * m * k * n * fraction
        self.parts[part] += flops
        self.matmuls.append((layout, batch, m, k, n, flops))

    @property
    def total(self):
        return sum(self.parts.values())

    @property
    def per_token(self):
        return self.total / self.tokens


def _projections(block):
    """[(stage, in, out, kind, rank)] of a block's projections (kind: plain, gain or lora)."""
    found = []
    for path, m in block.named_modules():
        name = path.rsplit(".", 1)[-1]
        if name not in STAGES:
            if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and not path.endswith((".base", ".linear")):
                raise ValueError(f"count_flops: unknown projection {path} (llama-style blocks only)")
            continue
        kind, rank, base = "plain", 0, m
        if isinstance(m, GainLinear):
            kind, base = "gain", m.base
        elif isinstance(m, LoRALinear):
            kind, rank, base = "lora", m.lora_a.shape[1], m.linear
        found.append((STAGES[name], input_dims(base), base.weight.shape[0], kind, rank))
    return found


def count_flops(model, batch_size, seq_len):
    """The :class:`FlopCount` of one training step of ``model`` on ``batch_size x seq_len`` tokens.

    A frozen weight costs 2 FLOPs per token forward and 2 more for its activation gradient
    when the backward pass needs one: when a trainable parameter lies upstream of its
    input, or a gain scales its input (the gain's gradient is ``x * (dY @ W)``). No weight
    gradient of a frozen weight is ever formed. Attention counts its causal part (a
    token attends to ``(T + 1) / 2`` positions on average): ``QK^T`` and ``PV`` forward,
    four such products backward. The output layer (``lm_head`` or the tied embedding)
    counts forward and activation gradient. LoRA adds its two rank-r matmuls forward
    and their gradients. Elementwise work (norms, activations, softmax, the loss) is not
    counted. Llama-style blocks (``STAGES``) only.
    """
    M, T = batch_size * seq_len, seq_len
    count = FlopCount(M)
    blocks = get_arch(model.model_type).blocks
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    live = any(not k.startswith(blocks + ".") for k in trainable)  # e.g. the floor's scalar
    causal = (T + 1) / (2 * T)
    for block in get_module(model, blocks):
        projections = _projections(block)
        for stage in range(max(STAGES.values()) + 1):
            here = [p for p in projections if p[0] == stage]
            for _, d_in, d_out, kind, r in here:
                count.add("projections", "nt", 1, M, d_in, d_out)  # x @ W.T
                if live or kind == "gain":
                    count.add("projections", "nn", 1, M, d_out, d_in)  # dY @ W
                if kind == "lora":
                    count.add("adapter", "nn", 1, M, d_in, r)  # x @ A
                    count.add("adapter", "nn", 1, M, r, d_out)  # (xA) @ B
                    count.add("adapter", "nt", 1, M, d_out, r)  # d(xA) = dY @ B.T
                    count.add("adapter", "tn", 1, r, M, d_out)  # dB = (xA).T @ dY
                    count.add("adapter", "tn", 1, d_in, M, r)  # dA = x.T @ d(xA)
                    if live:
                        count.add("adapter", "nt", 1, M, r, d_in)  # d(xA) @ A.T
            live = live or any(p[3] != "plain" for p in here)
            if stage == 0:
                attn = block.self_attn
                bh, hd = batch_size * attn.n_heads, attn.head_dim
                count.add("attention", "nt", bh, T, hd, T, causal)  # S = Q @ K.T
                count.add("attention", "nn", bh, T, T, hd, causal)  # O = P @ V
                if live:
                    count.add("attention", "nt", bh, T, hd, T, causal)  # dP = dO @ V.T
                    count.add("attention", "tn", bh, T, T, hd, causal)  # dV = P.T @ dO
                    count.add("attention", "nn", bh, T, T, hd, causal)  # dQ = dS @ K
                    count.add("attention", "tn", bh, T, T, hd, causal)  # dK = dS.T @ Q
    head = getattr(model, "lm_head", None)
    vocab, hidden = head.weight.shape if head is not None else (model.args.vocab_size, model.args.hidden_size)
    count.add("output", "nt", 1, M, hidden, vocab)
    if live:
        count.add("output", "nn", 1, M, vocab, hidden)
    return count


def _operands(layout, batch, m, k, n):
    lead = (batch,) if batch > 1 else ()
    a = mx.random.normal(lead + ((k, m) if layout == "tn" else (m, k)))
    b = mx.random.normal(lead + ((n, k) if layout == "nt" else (k, n)))
    mx.eval(a, b)
    return a, b


def _product(layout, a, b):
    if layout == "tn":
        return mx.swapaxes(a, -1, -2) @ b
    if layout == "nt":
        return a @ mx.swapaxes(b, -1, -2)
    return a @ b


def _split(layout, batch, m, k, n, parts):
    """The shape of one of ``parts`` equal slices of a matmul (its batch, else its rows)."""
    if batch > 1:
        return layout, -(-batch // parts), m, k, n
    return layout, batch, -(-m // parts), k, n


class MatmulLimit:
    """Times fp32 matmuls at a step's shapes; :meth:`seconds` is the time its matmuls take alone.

    Each shape is timed on one stream with the BLAS's own threads, and, with
    ``parallel = (streams, threads)``, split into ``streams`` slices run side by side on
    their own CPU streams with ``threads`` BLAS threads each (how a split training step
    runs them); a shape's rate is the better of the two.
    """

    def __init__(self, shapes, parallel=None, min_time=0.02):
        self.min_time = min_time
        self.parallel = parallel if parallel and parallel[0] > 1 else None
        self.streams = list(cpu.streams(self.parallel[0])) if self.parallel else []
        self.shapes = sorted(set(shapes))
        parts = {_split(*s, len(self.streams)) for s in self.shapes} if self.parallel else set()
        self.operands = {s: _operands(*s) for s in sorted(set(self.shapes) | parts)}
        self.inner = {s: 1 for s in self.shapes}
        self.rates = {}
        self.measure()  # warm up, and size each timing to take about min_time
        for s, rate in self.rates.items():
            est = 2 * s[1] * s[2] * s[3] * s[4] / rate
            self.inner[s] = max(1, min(64, round(self.min_time / max(est, 1e-9))))

    def _time(self, shape, streams):
        layout, batch, m, k, n = shape
        part = _split(*shape, len(streams)) if streams else shape
        a, b = self.operands[part]
        inner = self.inner[shape]
        tic = time.perf_counter()
        if streams:
            out = []
            for st in streams:
                with mx.stream(st):
                    out += [_product(layout, a, b) for _ in range(inner)]
            mx.eval(out)
            flops = 2 * part[1] * part[2] * k * n * inner * len(streams)
        else:
            mx.eval([_product(layout, a, b) for _ in range(inner)])
            flops = 2 * batch * m * k * n * inner
        return flops / (time.perf_counter() - tic)

    def measure(self):
        """Time every shape once (in FLOP/s); returns ``{shape: rate}``."""
        for s in self.shapes:
            self.rates[s] = self._time(s, [])
            if self.parallel:
                with cpu.blas_threads(self.parallel[1]):
                    self.rates[s] = max(self.rates[s], self._time(s, self.streams))
        return dict(self.rates)

    @staticmethod
    def seconds(count, rates):
        """Seconds the matmuls of ``count`` take at ``rates``."""
        return sum(flops / rates[(layout, b, m, k, n)] for layout, b, m, k, n, flops in count.matmuls)


LOSSES = ("gain-mlx", "mlx-lm")  # train.loss_and_grad, or value_and_grad of mlx-lm's default_loss


def make_step(model, compile_step=True, loss="gain-mlx", micro_batches=1):
    """The training step of ``gain_mlx.train``: value_and_grad, Adam update, compiled over state.

    ``loss``: ``gain-mlx`` (train.py's loss and gradient, split into ``micro_batches``
    on their own CPU streams) or ``mlx-lm`` (``nn.value_and_grad`` of mlx-lm's
    ``default_loss``, one stream: the step before issue 11).
    """
    opt = optim.Adam(learning_rate=1e-5)
    opt.init(model.trainable_parameters())
    if loss == "mlx-lm":
        mlx_lm_value_and_grad = nn.value_and_grad(model, default_loss)

        def value_and_grad(batch, lengths):
            return mlx_lm_value_and_grad(model, batch, lengths)
    else:
        value_and_grad = loss_and_grad(model, micro_batches)
    state = [model.state, opt.state]

    def step(batch, lengths):
        (loss, _), grads = value_and_grad(batch, lengths)
        opt.update(model, grads)
        return loss

    if compile_step:
        step = mx.compile(step, inputs=state, outputs=state)
    return step, state


class Run:
    """One timed configuration: its step, state, trainable size, FLOP count and BLAS threads."""

    def __init__(self, step, state, trainable, count, threads):
        self.step, self.state, self.trainable, self.count, self.threads = step, state, trainable, count, threads


def parallelism(spec, batch_size):
    """``(micro_batches, blas_threads)`` for a ``--micro-batches`` value (``auto`` as training)."""
    if spec == "auto":
        return policy.step_parallelism(batch_size)
    n = int(spec)
    return (n, max(1, cpu.cpu_cores() // n)) if n > 1 else (1, None)


def build(base, names, dequantize, compile_step, batch_size, seq_len, losses=("gain-mlx",), splits=("auto",)):
    """{label: Run} on structure copies sharing base's weights: every config for every
    loss and micro-batch setting (labels say which when more than one is timed)."""
    bases = {"": base}
    if dequantize in ("yes", "both"):
        bases["+deq"] = cpu.dequantize_model(base)
        if dequantize == "yes":
            del bases[""]
    runs = {}
    for suffix, b in bases.items():
        for name in names:
            for loss in losses:
                for spec in splits if loss == "gain-mlx" else ("1",):
                    micro, threads = parallelism(spec, batch_size)
                    model = cpu.copy_model(b)
                    ADAPTERS[name](model)
                    step, state = make_step(model, compile_step, loss, micro)
                    n = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
                    label = name + suffix
                    label += f" {loss}" if len(losses) > 1 else ""
                    label += f" x{micro}" if len(splits) > 1 and loss == "gain-mlx" else ""
                    runs[label] = Run(step, state, n, count_flops(model, batch_size, seq_len), threads)
    return runs


def run_bench(runs, batch, steps, warmup, limit=True, parallel=None):
    """Median step seconds and peak memory per config, timed round robin (rotated).

    With ``limit``, each round also times the matmuls at every config's shapes
    (:class:`MatmulLimit`, ``parallel`` as there) right after the configs' steps, so step
    and limit see the same machine load; ``x_matmul`` is the median over rounds of
    limit / step time.
    """
    lengths = mx.array([[0, batch.shape[1] - 1]] * batch.shape[0])

    def timed(run):
        with cpu.blas_threads(run.threads):
            mx.eval(run.step(batch, lengths), run.state)

    for run in runs.values():
        for _ in range(warmup):
            timed(run)
    shapes = [s[:5] for r in runs.values() for s in r.count.matmuls]
    mm = MatmulLimit(shapes, parallel) if limit else None
    times = {k: [] for k in runs}
    cpu_times = {k: [] for k in runs}
    limits = {k: [] for k in runs}
    peaks = {k: 0 for k in runs}
    loads = []
    names = list(runs)
    for i in range(steps):
        loads.append(os.getloadavg()[0])
        print(f"round {i + 1}/{steps}, load average {loads[-1]:.1f}", file=sys.stderr, flush=True)
        # rotate the order each round: a config's place in the round biases its time
        for name in names[i % len(names) :] + names[: i % len(names)]:
            mx.reset_peak_memory()
            tic, cpu_tic = time.perf_counter(), time.process_time()
            timed(runs[name])
            times[name].append(time.perf_counter() - tic)
            cpu_times[name].append(time.process_time() - cpu_tic)
            peaks[name] = max(peaks[name], mx.get_peak_memory())
        if mm is not None:
            rates = mm.measure()
            for name in names:
                limits[name].append(MatmulLimit.seconds(runs[name].count, rates))
    ntok = batch[:, 1:].size
    results = {}
    for name, run in runs.items():
        step_s = statistics.median(times[name])
        r = {
            "step_s": step_s,
            "peak_mem_gb": peaks[name] / 1e9,
            "tokens_per_s": ntok / step_s,
            "cpu_s": statistics.median(cpu_times[name]),
            "trainable": run.trainable,
            "gflop_per_token": run.count.per_token / 1e9,
            "gflop_parts": {k: v / 1e9 for k, v in run.count.parts.items()},
            "gflops": run.count.total / step_s / 1e9,
            "step_s_all": times[name],
            "load_avg": loads,
        }
        if limits[name]:
            limit_s = statistics.median(limits[name])
            r["matmul_s"] = limit_s
            r["matmul_gflops"] = run.count.total / limit_s / 1e9
            r["x_matmul"] = statistics.median(lim / t for lim, t in zip(limits[name], times[name]))
        results[name] = r
    return results


def report(results):
    """Table of step time and memory, with ratios to the floor and to LoRA rank 8
    (for '+deq' configs, to the '+deq' floor and LoRA), and the step's GFLOP/s against
    the matmul limit measured in the same rounds."""
    head = f"{'config':<24}{'params':>10}{'step ms':>10}{'x floor':>9}{'x lora-r8':>10}"
    head += f"{'peak GB':>9}{'mem x lora':>11}{'tok/s':>9}{'cpu x floor':>12}"
    print(head + f"{'GFLOP/tok':>10}{'GFLOP/s':>9}{'mm GFLOP/s':>11}{'x matmul':>9}")

    def ratio(r, ref, key):
        return f"{r[key] / ref[key]:.3f}" if ref else "-"

    for name, r in results.items():
        suffix = "+deq" if name.endswith("+deq") else ""
        floor, lora = results.get("floor" + suffix), results.get("lora-r8" + suffix)
        mm = f"{r['matmul_gflops']:>11.1f}{r['x_matmul']:>9.3f}" if "x_matmul" in r else f"{'-':>11}{'-':>9}"
        print(
            f"{name:<24}{r['trainable']:>10,}{r['step_s'] * 1e3:>10.1f}{ratio(r, floor, 'step_s'):>9}"
            f"{ratio(r, lora, 'step_s'):>10}{r['peak_mem_gb']:>9.3f}{ratio(r, lora, 'peak_mem_gb'):>11}"
            f"{r['tokens_per_s']:>9.1f}{ratio(r, floor, 'cpu_s'):>12}"
            f"{r['gflop_per_token']:>10.4f}{r['gflops']:>9.1f}{mm}"
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
    p.add_argument("--loss", default="gain-mlx", help=f"comma-separated, from {', '.join(LOSSES)}")
    p.add_argument(
        "--micro-batches",
        default="auto",
        help="comma-separated: auto (as training: one per core on a CPU) or a count; 1 = no split",
    )
    p.add_argument("--no-matmul-limit", dest="matmul_limit", action="store_false", help="skip timing the matmuls")
    p.add_argument("--json", help="write {config: {step_s, peak_mem_gb, tokens_per_s, gflops, x_matmul, ...}}")
    cpu.add_fast_blas_argument(p)
    args = p.parse_args(argv)
    policy.start(args.fast_blas)

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
    losses, splits = args.loss.split(","), args.micro_batches.split(",")
    if unknown := [v for v in losses if v not in LOSSES]:
        raise SystemExit(f"--loss: unknown {', '.join(unknown)} (choose from {', '.join(LOSSES)})")
    runs = build(base, names, args.dequantize, args.compile, batch_size, seq_len, losses, splits)
    parallel = max((parallelism(v, batch_size) for v in splits), key=lambda p: p[0])

    print(
        f"preset {args.preset}, batch {batch_size} x {seq_len}, {args.steps} timed steps "
        f"(median) after {args.warmup} warm-up, device {mx.default_device()}, "
        f"BLAS {cpu.preloaded_blas() or cpu.stock_blas() or 'platform'}, {cpu.cpu_cores()} cores, "
        f"micro-batches {args.micro_batches} (auto: {policy.step_parallelism(batch_size)[0]}), "
        f"MLX_BFS_MAX_WIDTH={os.environ.get('MLX_BFS_MAX_WIDTH', 'unset (20)')}"
    )
    load = os.getloadavg()[0]
    results = run_bench(runs, batch, args.steps, args.warmup, limit=args.matmul_limit, parallel=parallel)
    report(results)
    print(f"load average (2 cores here): {load:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    if args.json:
        out = {k: {f: v for f, v in r.items() if f != "step_s_all"} for k, r in results.items()}
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        tmp.replace(args.json)
    return results


if __name__ == "__main__":
    main()
