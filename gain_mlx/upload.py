"""python -m gain_mlx.upload: push a gain adapter or a fused model to the Hugging Face Hub,
with a generated model card.

``--path`` is an adapter folder (``gain_config.json`` + ``gains.safetensors``) or a model
folder written by ``gain_mlx.fuse`` (``config.json`` + weights, ``fold_plan.json``). The
card (README.md) names the base model, the variant, the training data and metrics
(``history.json``, ``trainer_state.json`` when present), the fold plan, and how to run
it in mlx-lm and llama.cpp. ``--dry-run`` writes the folder as it would be uploaded
(card included) to ``--out`` and sends nothing. The folder given is never modified.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError, UserError, cli

ADAPTER_FILES = ("gain_config.json", "gains.safetensors", "history.json", "history.png", "trainer_state.json")
SKIPPED = (".tmp-", ".")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def detect(path: Path) -> str:
    """``"adapter"`` or ``"fused"`` (any mlx-lm model folder), else a ``UserError``."""
    if not path.is_dir():
        raise UserError(f"--path {path}: not a folder (an adapter folder or a fused model folder)")
    if (path / "gain_config.json").is_file():
        if not (path / "gains.safetensors").is_file():
            raise UserError(f"--path {path}: gain_config.json without gains.safetensors: re-save the adapter")
        return "adapter"
    if (path / "config.json").is_file() and (list(path.glob("*.safetensors")) or list(path.glob("*.gguf"))):
        return "fused"
    raise UserError(f"--path {path}: neither an adapter folder (gain_config.json) nor a model folder (config.json + weights)")


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


def _lineage(lineage) -> str:
    """The card's lineage section: the training stages the adapter went through."""
    from .adapter import lineage_lines

    lines = lineage_lines({"lineage": lineage})
    if len(lines) < 4:  # one stage: the metrics say it all
        return ""
    return ("\n## Lineage\n\nTrained domain after domain (`--resume-adapter-file`), each stage from the "
            "gains of the one before:\n\n" + "\n".join(lines) + "\n")


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
    from .adapter import read_adapter

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


def fused_card(path: Path, repo_id: str, base_model=None) -> str:
    plan = _read_json(path / "fold_plan.json") or {}
    config = _read_json(path / "config.json") or {}
    base = base_model or plan.get("base") or "<base model>"
    summary = plan.get("summary") or {}
    rows = "\n".join(f"| {m} | {s['count']} | {s['max_rel_error']:.2e} |" for m, s in summary.items())
    adapter = plan.get("adapter")
    metrics = _metrics(Path(adapter)) if adapter and Path(adapter).is_dir() else []
    base_tag = f"base_model: {base}\n" if base_model or "/" in str(base) and not Path(str(base)).exists() else ""
    quant = config.get("quantization") or config.get("quantization_config")
    metrics_text = "\n".join(metrics) if metrics else "See the adapter's card for training metrics."
    return f"""---
library_name: mlx
pipeline_tag: text-generation
tags: [mlx, gain-mlx, gain]
{base_tag}---
# {repo_id.split('/')[-1]}: {base} with GAIN gains folded in

`{base}` with the GAIN gains of adapter `{adapter or '?'}` (variant `{plan.get('variant', '?')}`) merged into its
weights by `gain_mlx.fuse`: the same architecture{' and quantization (' + str(quant.get('bits')) + '-bit)' if isinstance(quant, dict) else ''}
as the base and no extra compute; no gain_mlx code is needed to run it.

## Metrics

{metrics_text}
{_lineage(plan.get('lineage'))}
## Fold plan

How each tensor absorbed its gain, and the relative error against `dequantize(W) * gain` (float32);
the per-tensor plan is in `fold_plan.json`:

| method | tensors | max relative error |
|---|---|---|
{rows or '| (no fold_plan.json) | | |'}

## Use it

```bash
mlx_lm.generate --model {repo_id} --prompt "hello"
mlx_lm.server --model {repo_id}
```

llama.cpp: fold the same adapter into the base's GGUF with
`python -m gain_mlx.export --gguf base.gguf --adapter-path ADAPTER --out adapted.gguf`, then
`llama-cli -m adapted.gguf -p "hello"`.
"""


def stage(path: Path, kind: str, card: str, out: Path) -> Path:
    """The folder as uploaded: ``path``'s files (temporary files left out) and the card."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(path.iterdir()):
        if not f.is_file() or f.name.startswith(SKIPPED) or f.name == "README.md":
            continue
        if kind == "adapter" and f.name not in ADAPTER_FILES and f.suffix not in (".json", ".md", ".png"):
            continue
        shutil.copy2(f, out / f.name)
    (out / "README.md").write_text(card)
    return out


def upload(folder: Path, repo_id: str, private: bool = False, token=None, message=None) -> str:
    """Create ``repo_id`` if needed and upload ``folder``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=message or "Upload with gain_mlx.upload")
    return str(getattr(info, "commit_url", info))


def _saved_token():
    """HF_TOKEN or the saved login, read locally (no request)."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        raise UserError("huggingface_hub is not installed: pip install huggingface-hub") from None
    return get_token()


def make_parser():
    p = argparse.ArgumentParser(prog="python -m gain_mlx.upload", description=__doc__.splitlines()[0])
    p.add_argument("--path", required=True, help="adapter folder or fused model folder")
    p.add_argument("--repo-id", required=True, help="Hub repo to create or update: user/name")
    p.add_argument("--base-model", help="the base's Hub id for the card (default: from the adapter or fold plan)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--message", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="write the upload folder to --out; send nothing")
    p.add_argument("--out", help="with --dry-run: where to write it (default: a new temporary folder)")
    return p


@cli
def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        raise UsageError(f"--repo-id {args.repo_id}: expected user/name")
    if args.out and not args.dry_run:
        raise UsageError("--out goes with --dry-run")
    path = Path(args.path)
    kind = detect(path)
    card = (adapter_card if kind == "adapter" else fused_card)(path, args.repo_id, args.base_model)
    if args.dry_run:
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gain_upload-"))
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} is not empty: choose a new folder")
        stage(path, kind, card, out)
        print(f"dry run: {kind} folder for {args.repo_id} written to {out} (card: {out / 'README.md'}); nothing sent")
        return out
    token = args.token or _saved_token()
    if not token:
        raise UserError("no Hub token: pass --token, set HF_TOKEN or run 'hf auth login' (nothing was sent)")
    with tempfile.TemporaryDirectory(prefix="gain_upload-") as tmp:
        folder = stage(path, kind, card, Path(tmp))
        try:
            url = upload(folder, args.repo_id, args.private, token, args.message)
        except ImportError:
            raise UserError("huggingface_hub is not installed: pip install huggingface-hub") from None
        except Exception as e:  # huggingface_hub's HTTP/auth errors
            raise UserError(f"upload to {args.repo_id} failed: {type(e).__name__}: {e}") from None
    print(f"uploaded {kind} {path} to {args.repo_id}: {url}")
    return url


if __name__ == "__main__":
    main()
