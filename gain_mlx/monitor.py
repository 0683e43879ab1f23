"""Seeing forgetting while training.

Every evaluation measures validation perplexity and, next to it, the perplexity of
named *retain* sets that training never sees (general text, earlier domains), each
against step 0 (the base model, or the adapter a run continues). A budget on each retain
change can warn or stop training, and the adapter kept at the end can be the best
checkpoint within every budget. The history is written beside the adapter as
``history.json`` (and ``history.png`` with matplotlib, one curve per set).
"""

import json
import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.trainer import iterate_batches

from . import cpu, policy
from .errors import UsageError, UserError
from .files import atomic_write
from .loss import evaluation_loss
from .progress import progress, say

HISTORY_FILE = "history.json"
PLOT_FILE = "history.png"
DEFAULT_RETAIN = Path(__file__).resolve().parent.parent / "examples" / "retain" / "retain.jsonl"
KEEP = ("last", "best")


def isolated(batches):
    """Run a batch generator on its own numpy RNG state, so evaluation or other users of
    the global RNG never change the training data order (needed for exact resume)."""
    state = None
    while True:
        outer = np.random.get_state()
        if state is not None:
            np.random.set_state(state)
        try:
            item = next(batches)
        except StopIteration:
            return
        finally:
            state = np.random.get_state()
            np.random.set_state(outer)
        yield item


def fixed_batches(**kwargs):
    """The same evaluation batches every time."""
    return isolated(iterate_batches(seed=0, **kwargs))


def evaluate_loss(model, dataset, batch_size, num_batches, max_seq_length, desc=None) -> float:
    """Mean token loss over the same ``num_batches`` batches every time (-1: all).

    With ``desc``, shows a progress bar (plain lines when stderr is not a terminal).
    """
    n_batches = len(dataset) // batch_size
    if num_batches != -1:
        n_batches = min(n_batches, num_batches)
    if n_batches < 1:
        raise UserError(f"{desc or 'evaluation'}: {len(dataset)} examples, fewer than --batch-size {batch_size}")
    batches = fixed_batches(dataset=dataset, batch_size=batch_size, max_seq_length=max_seq_length)
    model.eval()
    micro_batches, threads = policy.step_parallelism(batch_size)  # the cores side by side, as in training
    streams = cpu.streams(micro_batches)
    total_loss, total_tokens = 0.0, 0
    bar = progress(total=n_batches, desc=desc, unit="batch", leave=False) if desc else None
    for _, (batch, lengths) in zip(range(n_batches), batches):
        with cpu.blas_threads(threads):
            loss, ntoks = evaluation_loss(model, batch, lengths, streams)
        total_loss += loss
        total_tokens += ntoks
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    totals = mx.distributed.all_sum(mx.array([total_loss, total_tokens]), stream=mx.cpu)
    return (totals[0] / totals[1]).item()


def load_retain_set(spec, tokenizer, config):
    """The retain dataset of one ``--retain-data`` path: a .jsonl file, or a data folder's
    valid.jsonl (or retain.jsonl); ``"none"`` -> None; ``None`` -> the shipped default."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    if isinstance(spec, str) and spec.lower() == "none":
        return None
    path = _retain_file(Path(spec) if spec else DEFAULT_RETAIN)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"--retain-data {path}: line {number} is not JSON ({e.msg}); fix or remove it")
    if not rows:
        raise UserError(f"--retain-data {path}: the file is empty; pass text or --retain-data none")
    try:
        return path, CacheDataset(create_dataset(rows, tokenizer, config))
    except (ValueError, KeyError) as e:
        raise UserError(f"--retain-data {path}: {str(e).splitlines()[0]}")


def _retain_file(path: Path) -> Path:
    if path.is_dir():
        found = [path / n for n in ("valid.jsonl", "retain.jsonl") if (path / n).is_file()]
        if not found:
            raise UserError(f"--retain-data {path}: no valid.jsonl or retain.jsonl in that folder")
        path = found[0]
    if not path.is_file():
        raise UserError(f"--retain-data {path}: not found; pass a .jsonl file, a data folder, or none")
    return path


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def set_name(path) -> str:
    """A retain set's default name: its file's stem, or its folder's name for a data folder
    or a data folder's split (``legal/valid.jsonl`` -> ``legal``)."""
    path = Path(path)
    if path.is_dir():
        return path.name
    return path.parent.name if path.stem in ("valid", "train", "test") else path.stem


def parse_retain_specs(spec) -> list:
    """``[(name, path)]`` of ``--retain-data``: ``name=PATH,name=PATH`` or bare paths (named
    after their file); a YAML list or ``{name: path}`` mapping; None: the shipped default;
    ``none``: no retain set."""
    if spec is None:
        return [(set_name(DEFAULT_RETAIN), DEFAULT_RETAIN)]
    if isinstance(spec, dict):
        items = [f"{k}={v}" for k, v in spec.items()]
    else:
        items = spec if isinstance(spec, list) else str(spec).split(",")
    items = [str(i).strip() for i in items if str(i).strip()]
    if [i.lower() for i in items] == ["none"]:
        return []
    specs = []
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or "/" in name:
            name, path = set_name(item), item
        if not _NAME.match(name) or name == "val":
            raise UsageError(f"--retain-data {item}: set name {name!r} must be letters, digits, _ . - and not 'val'")
        if name in dict(specs):
            raise UsageError(f"--retain-data: two sets named {name!r}: name them, e.g. legal=PATH,general=PATH")
        specs.append((name, Path(path)))
    return specs


def parse_budgets(spec, names) -> dict:
    """``{set name: PCT}`` of ``--retain-budget``: ``PCT`` for every set, ``name=PCT`` for one
    (comma-separated, e.g. ``1,legal=3``)."""
    if spec is None:
        return {}
    items = [f"{k}={v}" for k, v in spec.items()] if isinstance(spec, dict) else str(spec).split(",")
    named, default = {}, None
    for item in (str(i).strip() for i in items if str(i).strip()):
        name, eq, value = item.rpartition("=")
        try:
            pct = float(value)
        except ValueError:
            raise UsageError(f"--retain-budget {item}: expected PCT or name=PCT, e.g. 2 or legal=2") from None
        if eq and name not in names:
            raise UsageError(f"--retain-budget {item}: no retain set named {name!r} (sets: {', '.join(names) or 'none'})")
        if eq:
            named[name] = pct
        else:
            default = pct
    return {n: named.get(n, default) for n in names if named.get(n, default) is not None}


def _change(value, base):
    return value / base - 1.0


class Monitor:
    """Evaluations, the retain budgets, the best checkpoint and the history of one run.

    ``retain_sets``: ``{name: dataset}`` (a bare dataset is named ``retain``); ``budget_pct``:
    ``{name: PCT}`` (a number: the same for every set).
    """

    def __init__(self, valid_set, retain_sets, batch_size, val_batches, max_seq_length,
                 adapter_path, budget_pct=None, stop_on_budget=False, keep="last", history=None):
        if retain_sets is not None and not isinstance(retain_sets, dict):
            retain_sets = {"retain": retain_sets}
        self.valid_set, self.retain_sets = valid_set, dict(retain_sets or {})
        self.batch_size, self.val_batches, self.max_seq_length = batch_size, val_batches, max_seq_length
        self.adapter_path = Path(adapter_path) if adapter_path else None
        if budget_pct is not None and not isinstance(budget_pct, dict):
            budget_pct = {name: budget_pct for name in self.retain_sets}
        self.budgets = dict(budget_pct or {})
        self.stop_on_budget, self.keep = stop_on_budget, keep
        self.history = list(history or [])
        self.stop = False
        self.best = None  # (val_ppl, step, {name: array})

    @property
    def active(self) -> bool:
        return bool(self.valid_set) or bool(self.retain_sets)

    @property
    def base(self) -> dict:
        return self.history[0] if self.history else {}

    def _ppl(self, model, dataset, what, step):
        loss = evaluate_loss(model, dataset, self.batch_size, self.val_batches, self.max_seq_length,
                             desc=f"Evaluating {what} (step {step})")
        return math.exp(loss)

    def evaluate(self, model, step, train_loss=None, lr=None) -> dict:
        """Measure, record and judge one checkpoint; returns the history row."""
        row = {"step": step, "train_loss": train_loss, "lr": lr}
        if self.valid_set:
            row["val_ppl"] = self._ppl(model, self.valid_set, "validation", step)
        for name, dataset in self.retain_sets.items():
            row[f"{name}_ppl"] = self._ppl(model, dataset, f"{name} set", step)
        base = self.base or row
        for key in [k for k in row if k.endswith("_ppl")]:
            if key in base:
                row[key[:-4] + "_change"] = _change(row[key], base[key])
        over = [(name, row[f"{name}_change"], pct) for name, pct in self.budgets.items()
                if f"{name}_change" in row and row[f"{name}_change"] * 100 > pct]
        row["within_budget"] = not over
        self.history.append(row)
        if "val_ppl" in row and not over and (self.best is None or row["val_ppl"] < self.best[0]):
            self.best = (row["val_ppl"], step, dict(tree_flatten(model.trainable_parameters())))
        if over:
            action = "stopping (--stop-on-budget)" if self.stop_on_budget else "continuing; --stop-on-budget stops here"
            worse = ", ".join(f"{name} perplexity is {change:+.1%} (budget {pct:g}%)" for name, change, pct in over)
            say(f"Warning: at step {step} {worse} against step 0, over the --retain-budget: {action}")
            self.stop = self.stop_on_budget
        return row

    @staticmethod
    def describe(row) -> str:
        """``val ppl 21.80 (-12.0%) | legal ppl 12.30 (+0.8%) | general ppl 30.20 (+0.4%)``."""
        parts = []
        for key in [k for k in row if k.endswith("_ppl")]:
            change = row.get(key[:-4] + "_change")
            parts.append(f"{key[:-4]} ppl {row[key]:.2f}" + (f" ({change:+.1%})" if change is not None else ""))
        return " | ".join(parts)

    def restore_best(self, model):
        """With ``--keep best``: put the best checkpoint's gains back; returns its row or None."""
        if self.keep != "best" or self.best is None:
            return None
        model.update(tree_unflatten(list(self.best[2].items())))
        return next(r for r in self.history if r["step"] == self.best[1])

    def write(self, kept_step=None) -> None:
        """history.json (and history.png where matplotlib is installed), atomically."""
        keys = ["val_ppl"] * bool(self.valid_set) + [f"{name}_ppl" for name in self.retain_sets]
        record = {"base": {k: self.base.get(k) for k in keys}, "retain_sets": list(self.retain_sets),
                  "retain_budget_pct": self.budgets or None, "keep": self.keep,
                  "kept_step": kept_step, "history": self.history}
        self.adapter_path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.adapter_path / HISTORY_FILE,
                     lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
        plot_history(self.history, self.adapter_path / PLOT_FILE, self.budgets)


def read_history(adapter_path) -> list:
    """The history rows saved in an adapter folder ([] if none)."""
    path = Path(adapter_path) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["history"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt ({e}); delete it to start the history afresh")


def plot_history(history, out: Path, budget_pct=None) -> None:
    """Validation and every retain set's perplexity change against step 0, one curve each
    (needs matplotlib); ``budget_pct``: ``{set name: PCT}`` drawn as dashed lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = list(dict.fromkeys(k for r in history for k in r if k.endswith("_change")))
    for key in keys:
        points = [(r["step"], 100 * r[key]) for r in history if key in r]
        label = "validation" if key == "val_change" else f"{key[:-7]} set"
        line = ax.plot(*zip(*points), marker="o", label=label)[0]
        pct = (budget_pct or {}).get(key[:-7]) if isinstance(budget_pct, dict) else budget_pct
        if pct is not None and key != "val_change":
            ax.axhline(pct, color=line.get_color(), linestyle="--", linewidth=1, label=f"{key[:-7]} budget")
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity change vs step 0 (%)")
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
