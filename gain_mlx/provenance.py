"""Provenance of what gain_mlx writes: the gains hash, the lineage table and the model
cards (README.md) of an adapter folder and of a fused model folder.

``gains_sha256`` is the SHA-256 of the adapter's ``gains.safetensors`` file, recorded by
fuse (``fold_plan.json``) and export (``gain_mlx.gains_sha256`` in the GGUF). The fused
folder has one card, written by fuse and rendered again with the repo id by upload.
"""

import hashlib
import json
from pathlib import Path

from .adapter import GAINS_FILE, read_adapter

PLAN_FILE = "fold_plan.json"


def gains_sha256(adapter_path) -> str:
    """SHA-256 of the adapter folder's gains file, in 1 MiB reads."""
    h = hashlib.sha256()
    with open(Path(adapter_path) / GAINS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def lineage_lines(config: dict) -> list:
    """A markdown table of the adapter's training stages (for model cards); [] if none."""
    from .monitor import Monitor

    lineage = config.get("lineage") or []
    lines = ["| stage | data | data sha256 | steps | learning rate | final metrics (vs the stage's step 0) |",
             "|---|---|---|---|---|---|"]
    for i, stage in enumerate(lineage, 1):
        data = Path(stage["data"]).name if stage.get("data") else "not recorded"
        final = Monitor.describe(stage.get("final") or {}).replace(" | ", "; ") or "-"  # no | in a cell
        lines.append(f"| {i} | `{data}` | `{stage.get('data_fingerprint') or '-'}` | {stage.get('steps', '-')} "
                     f"| {stage.get('learning_rate', '-')} | {final} |")
    return lines if lineage else []


def _metrics(path: Path) -> list:
    """Card lines from ``history.json``: base, first and kept evaluation."""
    record = _read_json(path / "history.json")
    if not isinstance(record, dict) or not record.get("history"):
        return []
    rows = record["history"]
    kept = next((r for r in rows if r.get("step") == record.get("kept_step")), rows[-1])
    base = record.get("base") or {}
    sets = record.get("retain_sets") or ["retain"]
    keys = ["val_ppl"] + [f"{name}_ppl" for name in sets]
    head = " | ".join(["validation ppl"] + [f"{name} ppl" for name in sets])
    lines = [f"| | step | {head} |", "|---|---|" + "---|" * len(keys)]

    def cell(row, key):
        v = row.get(key)
        change = row.get(key.replace("_ppl", "_change"))
        return "-" if v is None else f"{v:.2f}" + (f" ({change:+.1%})" if change is not None else "")

    continued = len((_read_json(path / "gain_config.json") or {}).get("lineage") or []) > 1
    start = "start (the adapter it continued)" if continued else "base"
    lines.append(f"| {start} | 0 | " + " | ".join(cell(base, k) for k in keys) + " |")
    label = "kept (best within the retain budget)" if record.get("keep") == "best" else "final"
    lines.append(f"| {label} | {kept.get('step', '?')} | " + " | ".join(cell(kept, k) for k in keys) + " |")
    budget = record.get("retain_budget_pct")
    if isinstance(budget, dict) and budget:
        budget = ", ".join(f"{name} {pct:g}%" for name, pct in budget.items())
        lines.append(f"\nRetain budgets (perplexity change against step 0): {budget}.")
    elif budget is not None:
        lines.append(f"\nRetain budget: {budget}% perplexity change on general text.")
    return lines


def _lineage(lineage, min_stages: int = 2) -> str:
    """The card's lineage section: the training stages the adapter went through (none
    below ``min_stages``: for one stage the metrics say it all)."""
    lines = lineage_lines({"lineage": lineage})
    if len(lines) < 2 + min_stages:
        return ""
    return ("\n## Lineage\n\nThe adapter's training stages (domain after domain with `--resume-adapter-file`, "
            "each from the gains of the one before):\n\n" + "\n".join(lines) + "\n")


def _fold_plan_adapter(config: dict) -> list:
    kinds = {}
    for t in config.get("targets", []):
        leaf = t["path"].split(".", 3)[-1] if t["path"].startswith("model.layers.") else t["path"]
        producer = t.get("producer")
        producer = producer.split(".", 3)[-1] if producer and producer.startswith("model.layers.") else producer
        kinds.setdefault((t["kind"], leaf, producer, t.get("producer_rows", "all")), 0)
        kinds[(t["kind"], leaf, producer, t.get("producer_rows", "all"))] += 1
    lines = ["| gained projection | layers | float base | quantized base |", "|---|---|---|---|"]
    for (kind, leaf, producer, rows), n in kinds.items():
        if producer is None:
            q = "columns, requantized (reported error)"
        elif kind == "attn":
            q = f"rows of `{producer}` (V rows; exact when gains are tied per KV group{', as here' if config.get('tie_kv') else ''})"
        else:
            q = f"rows of `{producer}`" + (" (the up half)" if rows == "up" else "") + " (exact)"
        lines.append(f"| `{leaf}` ({kind}) | {n} | columns of `{leaf}` (exact) | {q} |")
    return lines


def adapter_card(path: Path, repo_id: str, base_model=None) -> str:
    config, gains = read_adapter(path)
    base = base_model or config.get("base_model") or "<base model>"
    n_params = sum(int(v.size) for v in gains.values())
    state = _read_json(path / "trainer_state.json") or {}
    data = config.get("data") or state.get("data")
    metrics = _metrics(path)
    base_tag = f"base_model: {base}\n" if base_model or "/" in str(base) and not Path(str(base)).exists() else ""
    return f"""---
library_name: mlx
pipeline_tag: text-generation
tags: [mlx, gain-mlx, gain, adapter]
{base_tag}---
# {repo_id.split('/')[-1]}: a GAIN adapter for {base}

Learned diagonal gains on the inputs of the {"attention output" if config['variant'] == 'gain' else "attention output and FFN down"}
projections (GAIN, arXiv 2604.04516), trained with gain_mlx on a frozen base.
The base weights are untouched: the adapter is {n_params:,} numbers
({path.joinpath('gains.safetensors').stat().st_size / 1024:.0f} KB) and is folded into the weights for zero-cost inference.

| | |
|---|---|
| base model | `{base}` ({config.get('model_type')}, {config.get('num_layers')} layers, hidden {config.get('hidden_size')}) |
| variant | `{config['variant']}`{' (attention gains tied per KV head)' if config.get('tie_kv') else ''} |
| gained projections | {len(config.get('targets', []))} |
| trainable parameters | {n_params:,} |
| training data | {data or 'not recorded'} |
| base fingerprint | checked on load: an adapter applied to another base is refused |

## Metrics

{chr(10).join(metrics) if metrics else 'No history.json was saved with this adapter.'}
{_lineage(config.get('lineage'))}
## Fold plan

Where each gain goes when it is merged (`gain_mlx.fuse`, `gain_mlx.export`):

{chr(10).join(_fold_plan_adapter(config))}

## Use it

Without fusing (gain_mlx applies the gains on the loaded base):

```bash
pip install gain-mlx
python -m gain_mlx.generate --model {base} --adapter-path {repo_id} --prompt "hello"
python -m gain_mlx.serve --model {base} --adapters mine={repo_id}   # OpenAI-compatible, many adapters in one batch
```

In mlx-lm, fused into a copy of the base (no gain_mlx needed at run time):

```bash
hf download {repo_id} --local-dir {repo_id.split('/')[-1]}
python -m gain_mlx.fuse --model {base} --adapter-path {repo_id.split('/')[-1]} --save-path fused
mlx_lm.generate --model fused --prompt "hello"
```

In llama.cpp, folded into the base's GGUF (quantized blocks kept where exact):

```bash
python -m gain_mlx.export --gguf base.gguf --adapter-path {repo_id.split('/')[-1]} --out adapted.gguf
llama-cli -m adapted.gguf -p "hello"
```
"""


def fused_card(path: Path, repo_id=None, base_model=None) -> str:
    """The card of a fused model folder, from its ``fold_plan.json`` and ``config.json``;
    ``repo_id``: the Hub repo it is uploaded to (None: the folder as fuse writes it)."""
    plan = _read_json(path / PLAN_FILE) or {}
    config = _read_json(path / "config.json") or {}
    base = base_model or plan.get("base") or "<base model>"
    summary = plan.get("summary") or {}
    rows = "\n".join(f"| {m} | {s['count']} | {s['max_rel_error']:.2e} |" for m, s in summary.items())
    adapter = plan.get("adapter")
    metrics = _metrics(Path(adapter)) if adapter and Path(adapter).is_dir() else []
    base_tag = f"base_model: {base}\n" if base_model or "/" in str(base) and not Path(str(base)).exists() else ""
    quant = config.get("quantization") or config.get("quantization_config")
    metrics_text = "\n".join(metrics) if metrics else "See the adapter's card for training metrics."
    verb = "divided out of" if plan.get("operation") == "de-fold" else "merged into"
    where = repo_id or "<this folder>"
    title = f"{repo_id.split('/')[-1]}: " if repo_id else ""
    sha = plan.get("gains_sha256")
    return f"""---
library_name: mlx
pipeline_tag: text-generation
tags: [mlx, gain-mlx, gain]
{base_tag}---
# {title}{base} with GAIN gains {"divided out" if plan.get("operation") == "de-fold" else "folded in"}

`{base}` with the GAIN gains of adapter `{adapter or '?'}` (variant `{plan.get('variant', '?')}`{
f", gains file sha256 `{sha[:16]}…`" if sha else ""}) {verb} its
weights by `gain_mlx.fuse`: the same architecture{' and quantization (' + str(quant.get('bits')) + '-bit)' if isinstance(quant, dict) else ''}
as the base and no extra compute; no gain_mlx code is needed to run it.

## Metrics

{metrics_text}
{_lineage(plan.get('lineage'), min_stages=1)}
## Fold plan

How each tensor absorbed its gain, and the relative error against `dequantize(W) * gain` (float32);
scales of folded quantized layers are stored {plan.get('scales', 'as stored')}; the per-tensor plan is
in `{PLAN_FILE}`:

| method | tensors | max relative error |
|---|---|---|
{rows or f'| (no {PLAN_FILE}) | | |'}

Methods: `scales` multiplies a producer's rows via their quantization scales and biases
(integers untouched); `exponent` shifts E8M0 scale exponents; `float` scales a float
weight; `requantize` dequantizes, scales and requantizes with the same settings.

## Use it

```bash
mlx_lm.generate --model {where} --prompt "hello"
mlx_lm.server --model {where}
```

Undo with `python -m gain_mlx.fuse --model {where} --adapter-path {adapter or 'ADAPTER'} --save-path OUT --de-fold`.
llama.cpp: fold the same adapter into the base's GGUF with
`python -m gain_mlx.export --gguf base.gguf --adapter-path ADAPTER --out adapted.gguf`, then
`llama-cli -m adapted.gguf -p "hello"`.
"""
