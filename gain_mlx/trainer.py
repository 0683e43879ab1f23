"""The training loop and its checkpoints: ``train_gains`` trains a model's trainable
parameters (its gains) with mlx-lm's batching and gradient checkpointing; gains,
optimizer state, step and history are checkpointed in one atomic file, so a run killed
at any point resumes exactly (the data order is replayed)."""

import json
import math
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from mlx_lm.tuner.trainer import TrainingArgs, grad_checkpoint, iterate_batches

from . import adapter as gain_adapter
from . import cpu, policy
from .errors import UserError
from .files import atomic_write, save_safetensors
from .loss import across_streams, summed_loss
from .monitor import Monitor, isolated
from .progress import progress, say

CHECKPOINT_FILE = "checkpoint.safetensors"  # what --resume reads (one atomic file)
STATE_FILE = "trainer_state.json"


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
