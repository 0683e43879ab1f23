"""Seeing forgetting while training.

Every evaluation measures validation perplexity and, next to it, the perplexity of a
*retain* set of general text that training never sees, each against the base model
(step 0, gains at 1). A budget on the retain change can warn or stop training, and the
adapter kept at the end can be the best checkpoint within that budget. The history is
written beside the adapter as ``history.json`` (and ``history.png`` with matplotlib).
"""

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.trainer import iterate_batches

from . import cpu, policy
from .errors import UserError
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
    """The retain dataset for ``--retain-data``: a .jsonl file, or a data folder's
    valid.jsonl (or retain.jsonl); ``"none"`` -> None; ``None`` -> the shipped default."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    if isinstance(spec, str) and spec.lower() == "none":
        return None
    path = Path(spec) if spec else DEFAULT_RETAIN
    if path.is_dir():
        found = [path / n for n in ("valid.jsonl", "retain.jsonl") if (path / n).is_file()]
        if not found:
            raise UserError(f"--retain-data {path}: no valid.jsonl or retain.jsonl in that folder")
        path = found[0]
    if not path.is_file():
        raise UserError(f"--retain-data {path}: not found; pass a .jsonl file, a data folder, or none")
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


def _change(value, base):
    return value / base - 1.0


class Monitor:
    """Evaluations, the retain budget, the best checkpoint and the history of one run."""

    def __init__(self, valid_set, retain_set, batch_size, val_batches, max_seq_length,
                 adapter_path, budget_pct=None, stop_on_budget=False, keep="last", history=None):
        self.valid_set, self.retain_set = valid_set, retain_set
        self.batch_size, self.val_batches, self.max_seq_length = batch_size, val_batches, max_seq_length
        self.adapter_path = Path(adapter_path) if adapter_path else None
        self.budget_pct, self.stop_on_budget, self.keep = budget_pct, stop_on_budget, keep
        self.history = list(history or [])
        self.stop = False
        self.best = None  # (val_ppl, step, {name: array})

    @property
    def active(self) -> bool:
        return bool(self.valid_set) or self.retain_set is not None

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
        if self.retain_set is not None:
            row["retain_ppl"] = self._ppl(model, self.retain_set, "retain set", step)
        base = self.base or row
        for key in ("val_ppl", "retain_ppl"):
            if key in row and key in base:
                row[key.replace("_ppl", "_change")] = _change(row[key], base[key])
        within = (self.budget_pct is None or "retain_change" not in row
                  or row["retain_change"] * 100 <= self.budget_pct)
        row["within_budget"] = within
        self.history.append(row)
        if "val_ppl" in row and within and (self.best is None or row["val_ppl"] < self.best[0]):
            self.best = (row["val_ppl"], step, dict(tree_flatten(model.trainable_parameters())))
        if not within:
            action = "stopping (--stop-on-budget)" if self.stop_on_budget else "continuing; --stop-on-budget stops here"
            say(f"Warning: at step {step} retain perplexity is {row['retain_change']:+.1%} against the base, "
                f"over the --retain-budget of {self.budget_pct:g}%: {action}")
            self.stop = self.stop_on_budget
        return row

    @staticmethod
    def describe(row) -> str:
        """``val ppl 21.80 (-12.0%) | retain ppl 30.20 (+0.4%)``."""
        parts = []
        for name, key in (("val", "val_ppl"), ("retain", "retain_ppl")):
            if key in row:
                change = row.get(key.replace("_ppl", "_change"))
                parts.append(f"{name} ppl {row[key]:.2f}" + (f" ({change:+.1%})" if change is not None else ""))
        return " | ".join(parts)

    def restore_best(self, model):
        """With ``--keep best``: put the best checkpoint's gains back; returns its row or None."""
        if self.keep != "best" or self.best is None:
            return None
        model.update(tree_unflatten(list(self.best[2].items())))
        return next(r for r in self.history if r["step"] == self.best[1])

    def write(self, kept_step=None) -> None:
        """history.json (and history.png where matplotlib is installed), atomically."""
        record = {"base": {k: self.base.get(k) for k in ("val_ppl", "retain_ppl")},
                  "retain_budget_pct": self.budget_pct, "keep": self.keep,
                  "kept_step": kept_step, "history": self.history}
        self.adapter_path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.adapter_path / HISTORY_FILE,
                     lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
        plot_history(self.history, self.adapter_path / PLOT_FILE, self.budget_pct)


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
    """Validation and retain perplexity change against the base, per step (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("val_change", "validation"), ("retain_change", "retain set")):
        points = [(r["step"], 100 * r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    if budget_pct is not None:
        ax.axhline(budget_pct, color="red", linestyle="--", linewidth=1, label="retain budget")
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity change vs base (%)")
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
