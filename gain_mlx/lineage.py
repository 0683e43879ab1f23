"""An adapter's lineage: ``--resume-adapter-file`` continues a finished adapter on new
data, each stage recorded in ``gain_config.json`` (data fingerprint, steps, rate, final
metrics), and the earlier stages' validation data watched by name."""

from pathlib import Path

from . import adapter as gain_adapter
from .datasets import data_fingerprint, data_folder
from .errors import UserError
from .monitor import set_name


def stage_record(args, source=None) -> dict:
    """One stage of an adapter's lineage (``final``: filled in at each save)."""
    data = data_folder(args)
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
