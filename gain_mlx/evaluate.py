"""python -m gain_mlx.evaluate: lm-evaluation-harness on a base model and its gain adapters.

The base and every adapter are evaluated in one run with one model in memory: each
adapter is a row of per-sequence gains (``gain_mlx.multi``), and the requests of all of
them share batches (``gain_mlx.lmeval``). Prints a table task x (base, each adapter and
its change against the base); ``--output-dir`` also writes lm-eval's JSON per model.
Needs the ``eval`` extra: ``pip install 'gain-mlx[eval]'``.
"""

import argparse
import json
import re
import time
from pathlib import Path

from . import cpu, policy
from .errors import UsageError, UserError, cli

BASE = "base"
INSTALL = "lm-eval is not installed: pip install 'gain-mlx[eval]' (lm-eval==0.4.13; it needs no torch)"
DEFAULT_SEED = 1234


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(INSTALL) from None


def adapter_list(adapter_path=None, adapters=None) -> list:
    """``[(name, path)]`` from ``--adapter-path`` (named after its folder) and ``--adapters``."""
    from .serve import parse_adapters

    out = ([(Path(adapter_path).name or "adapter", adapter_path)] if adapter_path else []) + parse_adapters(adapters)
    names = [n for n, _ in out]
    for name in names:
        if name == BASE or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise UsageError(f"adapter name {name!r}: use letters, digits, '_', '.', '-' and not '{BASE}'")
    if len(set(names)) != len(names):
        raise UsageError(f"adapter names must differ: {', '.join(names)}")
    return out


def _unknown(task_manager, tasks) -> list:
    known = set(task_manager.all_tasks)
    return [t for t in tasks if t not in known and not task_manager.match_tasks([t])]


def task_manager(tasks, include_path=None):
    """lm-eval's ``TaskManager``; only ``include_path`` is indexed when it holds every task
    (indexing lm-eval's own task YAMLs took 19-35 s here)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        tm = TaskManager(include_path=str(include_path), include_defaults=False)
        if not _unknown(tm, tasks):
            return tm
    tm = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = _unknown(tm, tasks)
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}: see `lm-eval ls tasks`, or pass --include-path with your task YAMLs")
    return tm


def evaluate(model=None, adapters=(), tasks=(), *, include_path=None, num_fewshot=None, limit=None, batch_size=8,
             apply_chat_template=False, seed=DEFAULT_SEED, max_length=None, max_gen_tokens=None, include_base=True,
             log_samples=False) -> dict:
    """Evaluate ``tasks`` on the base ``model`` and each ``(name, adapter path)``.

    Returns ``{"models": {name: lm-eval's output}, "stats": batching counters, "seconds": total,
    "setup_seconds": task index and model load}``;
    ``"base"`` comes first unless ``include_base`` is False.
    """
    require_lm_eval()
    import lm_eval

    from .adapter import AdapterError, read_adapter, resolve_adapter
    from .loading import load
    from .lmeval import GainLM, Runner
    from .multi import AdapterSet

    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    start = time.perf_counter()
    paths = {name: resolve_adapter(path) for name, path in adapters}
    for path in paths.values():
        read_adapter(path)  # a missing or broken folder fails before tasks and model load
    manager = task_manager(tasks, include_path)
    model_, tokenizer = load(model, None)
    aset = AdapterSet(model_)
    for name, path in adapters:
        try:
            aset.add(name, paths[name], source=f"adapter '{name}' ({path})")
        except (AdapterError, ValueError) as e:
            raise UserError(str(e)) from None
    names = ([BASE] if include_base else []) + [n for n, _ in adapters]
    rows = [aset.row(None if n == BASE else n) for n in names]
    runner = Runner(model_, tokenizer, aset, rows, batch_size, max_length, max_gen_tokens)
    setup = time.perf_counter() - start
    out = {}
    for name, row in zip(names, rows):
        try:
            out[name] = lm_eval.simple_evaluate(
                model=GainLM(runner, row, name), tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                task_manager=manager, apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=bool(apply_chat_template), log_samples=log_samples, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
        except (ValueError, KeyError) as e:  # lm-eval's errors for a bad task or data
            raise UserError(f"lm-eval: {type(e).__name__}: {e}") from None
    return {"models": out, "stats": runner.stats, "seconds": time.perf_counter() - start, "setup_seconds": setup}


def _metrics(task_results: dict) -> dict:
    """``{metric (filter): value}`` of one task's lm-eval results, stderr left out."""
    out = {}
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if "_stderr" in metric or metric == "sample_len" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        out[metric if filt in ("", "none") else f"{metric} ({filt})"] = value
    return out


def table(models: dict) -> str:
    """Markdown table: one row per task and metric; base, then each adapter and its change."""
    names = list(models)
    base = names[0] if names and names[0] == BASE else None
    head = ["task", "metric"]
    for n in names:
        head += [n] + ([f"{n} change"] if base and n != base else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tasks = list(dict.fromkeys(t for m in models.values() for t in m["results"]))
    for task in tasks:
        metrics = {n: _metrics(models[n]["results"].get(task, {})) for n in names}
        for metric in dict.fromkeys(k for m in metrics.values() for k in m):
            cells = [task, metric]
            for n in names:
                v = metrics[n].get(metric)
                cells.append("" if v is None else f"{v:.4g}")
                if base and n != base:
                    b = metrics[base].get(metric)
                    if v is None or b is None:
                        cells.append("")
                    else:
                        rel = f" ({(v - b) / abs(b):+.1%})" if b else ""
                        cells.append(f"{v - b:+.4g}{rel}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(output_dir, result: dict, text: str):
    """``<name>.json`` (lm-eval's output) per model and ``table.md``, each written atomically."""
    from lm_eval.utils import handle_non_serializable

    from .files import atomic_write

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, res in result["models"].items():
        body = json.dumps(res, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
        atomic_write(output_dir / f"{name}.json", lambda tmp, b=body: tmp.write_text(b))
    atomic_write(output_dir / "table.md", lambda tmp: tmp.write_text(text))


def _limit(value: str):
    x = float(value)
    if x <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return int(x) if x >= 1 and x.is_integer() else x


def make_parser():
    p = argparse.ArgumentParser(prog="python -m gain_mlx.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="base model (folder, repo or .gguf; default: packaged SmolLM2)")
    p.add_argument("--adapter-path", help="one gain adapter folder (named after the folder)")
    p.add_argument("--adapters", action="append", help="name=PATH[,name=PATH...]: adapters to evaluate with the base")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="folder of extra task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=_limit, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass, all adapters mixed")
    p.add_argument("--max-length", type=int, default=None, help="context length (default: the model's, else 2048)")
    p.add_argument("--max-tokens", type=int, default=None, help="generated tokens, overriding the tasks' max_gen_toks")
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument("--log-samples", action="store_true", help="keep each document's requests and answers in the JSON")
    p.add_argument("--output-dir", help="write <model>.json (lm-eval's output) per model and table.md here")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    cpu.add_fast_blas_argument(p)
    return p


@cli
def main(argv=None):
    args = make_parser().parse_args(argv)
    require_lm_eval()
    policy.start(args.fast_blas)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks: give at least one task name")
    if args.include_path and not Path(args.include_path).is_dir():
        raise UsageError(f"--include-path {args.include_path}: not a folder")
    result = evaluate(
        args.model, adapter_list(args.adapter_path, args.adapters), tasks, include_path=args.include_path,
        num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
        apply_chat_template=args.apply_chat_template, seed=args.seed, max_length=args.max_length,
        max_gen_tokens=args.max_tokens, log_samples=args.log_samples,
    )
    text = table(result["models"])
    print(text, end="")
    s = result["stats"]
    print(f"{len(result['models'])} models in {result['seconds']:.1f} s: {s['forward_passes']} forward passes "
          f"({s['mixed_passes']} mixed several adapters, up to {s['max_batch']} sequences)")
    if args.output_dir:
        write_outputs(args.output_dir, result, text)
        files = ", ".join(f"{n}.json" for n in result["models"])
        print(f"Wrote {files} and table.md in {args.output_dir}")


if __name__ == "__main__":
    main()
