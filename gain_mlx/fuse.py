"""``python -m gain_mlx.fuse``: merge trained gains into an MLX model folder.

The fold plan (``gain_mlx.fold``) says where each gain goes; this module executes it on
mlx layers and measures each step against the reference ``dequantize(W) * gain``:

- float weight: multiply its rows or columns (exact in float32);
- affine-quantized rows: multiply the rows' scales and biases (packed integers untouched;
  exact in float32 storage, rounded in bf16/fp16 storage unless ``fp32_scales``);
- mxfp4/mxfp8 rows: shift the E8M0 scale exponents when every factor is a power of two;
- anything else (quantized columns, nvfp4, other mx factors): dequantize, scale and
  requantize with the same bits, group size and mode — only the rows that change.

The output folder loads with plain ``mlx_lm.load``: same architecture and quantization
config, tokenizer files copied, a model card (README.md, ``provenance.fused_card``) and ``fold_plan.json``.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from . import cpu, policy
from .adapter import gain_parameters, load_adapter, read_adapter, resolve_adapter, targets_from_config
from .arch import get_module, head_layout
from .errors import UserError, cli
from .files import atomic_dir, remove_stale
from .fold import invert, is_power_of_two, plan_folds
from .provenance import PLAN_FILE, fused_card, gains_sha256

# Non-weight files of a model folder carried over to the fused folder (tokenizer,
# generation config, custom code); config.json and the weights are written anew.
COPY_PATTERNS = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py")
NOT_COPIED = {"config.json", "model.safetensors.index.json", PLAN_FILE}
_MODE_KIND = {"affine": "affine", "mxfp4": "mx", "mxfp8": "mx", "nvfp4": "nvfp4"}
_E8M0_MAX = 254  # 255 encodes NaN


class FuseError(UserError, ValueError):
    """Bad input to fuse (existing output, wrong adapter, ...)."""


# ---------------------------------------------------------------- executing one step


def _kind(layer) -> str:
    return _MODE_KIND[layer.mode] if "scales" in layer else "float"


def _dequantized(layer) -> mx.array:
    """The layer's weight in float32, ``(out, in)`` or ``(E, out, in)``, computed in float32."""
    if "scales" not in layer:
        return layer.weight.astype(mx.float32)
    return cpu.dequantized_weight(layer, mx.float32)


def _quantize(w: mx.array, layer) -> tuple:
    """``(weight, scales, biases or None)`` with the layer's bits, group size and mode."""
    gs = layer.get("global_scale")
    if gs is None:
        q, s, *b = mx.quantize(w, layer.group_size, layer.bits, mode=layer.mode)
        return q, s, b[0] if b else None
    parts = [
        mx.quantize(w[e], layer.group_size, layer.bits, mode=layer.mode, global_scale=gs[e])
        for e in range(w.shape[0])
    ]
    return mx.stack([p[0] for p in parts]), mx.stack([p[1] for p in parts]), None


def _multiplier(step, weight_shape) -> tuple:
    """``(mult, rows)``: float32 multiplier broadcastable to the weight, and for row
    steps the per-row multiplier ``(..., out)`` (None for column steps)."""
    if step.axis == "columns":
        return mx.array(step.factor)[..., None, :], None
    rows = np.ones(weight_shape[:-1], dtype=np.float32)
    if step.rows is None:
        rows[...] = step.factor
    else:
        rows[..., step.rows] = step.factor
    return mx.array(rows)[..., None], mx.array(rows)


def _storage(array: mx.array, fp32: bool):
    return mx.float32 if fp32 else array.dtype


def _scale_float(layer, mult, fp32_scales):
    layer.weight = (layer.weight.astype(mx.float32) * mult).astype(layer.weight.dtype)
    return "float"


def _scale_affine_rows(layer, mult, fp32_scales):
    for name in ("scales", "biases"):
        a = layer[name]
        setattr(layer, name, (a.astype(mx.float32) * mult).astype(_storage(a, fp32_scales)))
    return "scales"


def _requantize(layer, mult, fp32_scales):
    """Dequantize, scale, requantize; rows whose multiplier is 1 keep their exact codes."""
    old = {"weight": layer["weight"], "scales": layer["scales"], "biases": layer.get("biases")}
    new = dict(zip(old, _quantize(_dequantized(layer) * mult, layer)))
    changed = mx.any(mult != 1, axis=-1, keepdims=True)
    for name, value in new.items():
        if value is None:
            continue
        if layer.mode == "affine":
            value = value.astype(_storage(old[name], fp32_scales) if name != "weight" else value.dtype)
        setattr(layer, name, mx.where(changed, value, old[name].astype(value.dtype)))
    return "requantize"


def _shift_exponents(layer, mult, fp32_scales):
    """E8M0 scales: a power-of-two row factor is an exponent shift (exact)."""
    if not is_power_of_two(np.array(mult)):
        return _requantize(layer, mult, fp32_scales)
    shifted = layer.scales.astype(mx.int32) + mx.log2(mult).round().astype(mx.int32)
    if mx.min(shifted).item() < 0 or mx.max(shifted).item() > _E8M0_MAX:
        return _requantize(layer, mult, fp32_scales)
    layer.scales = shifted.astype(mx.uint8)
    return "exponent"


# (axis, weight kind) -> how the multiplier is absorbed
EXECUTORS = {
    ("columns", "float"): _scale_float,
    ("rows", "float"): _scale_float,
    ("rows", "affine"): _scale_affine_rows,
    ("rows", "mx"): _shift_exponents,
    ("rows", "nvfp4"): _requantize,
    ("columns", "affine"): _requantize,
    ("columns", "mx"): _requantize,
    ("columns", "nvfp4"): _requantize,
}


def _relative_error(a: mx.array, ref: mx.array) -> float:
    return (mx.linalg.norm((a - ref).reshape(-1)) / mx.linalg.norm(ref.reshape(-1))).item()


def execute_step(layer, step, fp32_scales: bool = False) -> dict:
    """Apply one ``FoldStep`` to ``layer`` (its parameters are replaced, not edited);
    returns the step's report row, with the relative error of the new weight against
    ``dequantize(old weight) * factor`` computed in float32."""
    mult, row_mult = _multiplier(step, _dequantized(layer).shape)
    reference = _dequantized(layer) * mult
    method = EXECUTORS[(step.axis, _kind(layer))](layer, mult, fp32_scales)
    if row_mult is not None and "bias" in layer:
        layer.bias = (layer.bias.astype(mx.float32) * row_mult).astype(
            _storage(layer.bias, fp32_scales and method == "scales")
        )
    mx.eval(layer.parameters())
    storage = layer["scales"] if "scales" in layer else layer["weight"]
    return {
        "target": step.target,
        "dest": step.dest,
        "axis": step.axis,
        "method": method,
        "dtype": str(storage.dtype).replace("mlx.core.", ""),
        "rel_error": _relative_error(_dequantized(layer), reference),
    }


# ---------------------------------------------------------------- a whole model


def fuse_model(model, targets: list, fp32_scales: bool = False, de_fold: bool = False) -> list:
    """Fold the gains of ``model``'s gain layers into its weights and remove those layers.

    ``model`` carries gains from ``apply_gains``/``load_adapter``; ``targets`` is the
    ``Target`` list they returned (``adapter.targets_from_config`` for a saved adapter).
    ``de_fold`` divides the gains out instead (undoes an earlier fuse). Returns one
    report row per target (see ``execute_step``).
    """
    gains = {path: np.array(g, dtype=np.float32) for path, g in gain_parameters(model).items()}
    missing = [t.path for t in targets if t.path not in gains]
    if missing:
        raise FuseError(f"no gain layer at {', '.join(missing[:3])}: apply the adapter first")
    model.update_modules(tree_unflatten([(t.path, get_module(model, t.path).base) for t in targets]))
    layout = head_layout(model) if any(t.kind == "attn" for t in targets) else None
    steps = plan_folds(targets, gains, lambda p: "scales" in get_module(model, p), layout)
    if de_fold:
        steps = [invert(s) for s in steps]
    return [execute_step(get_module(model, s.dest), s, fp32_scales) for s in steps]


def summarize(report: list) -> dict:
    """``{method: {"count", "max_rel_error"}}``."""
    out = {}
    for row in report:
        entry = out.setdefault(row["method"], {"count": 0, "max_rel_error": 0.0})
        entry["count"] += 1
        entry["max_rel_error"] = max(entry["max_rel_error"], row["rel_error"])
    return out


def format_plan(report: list) -> str:
    lines = [f"{'target':<44} {'-> dest (axis)':<52} {'method':<10} {'dtype':<8} rel.error"]
    for r in report:
        dest = f"{r['dest']} ({r['axis']})"
        lines.append(
            f"{r['target']:<44} {dest:<52} {r['method']:<10} {r['dtype']:<8} {r['rel_error']:.2e}"
        )
    for method, s in summarize(report).items():
        lines.append(f"{method}: {s['count']} tensors, max relative error {s['max_rel_error']:.2e}")
    return "\n".join(lines)


# ---------------------------------------------------------------- model folders


def _folded_count(history: list, sha: str) -> int:
    return sum({"fold": 1, "de-fold": -1}[h["operation"]] for h in history if h["gains_sha256"] == sha)


def _load_history(model_dir: Path) -> list:
    plan = model_dir / PLAN_FILE
    return json.loads(plan.read_text())["history"] if plan.is_file() else []


def _apply_adapter(model, adapter_path: Path, de_fold: bool, history: list, sha: str):
    """Put the adapter's gains on ``model``. Fusing checks the base fingerprint; de-folding
    checks the model's fold history instead (its weights carry the gains)."""
    if de_fold and _folded_count(history, sha) < 1:
        raise FuseError(
            f"the model's {PLAN_FILE} records no fold of these gains ({adapter_path}): "
            "--de-fold only a model fused with this adapter"
        )
    load_adapter(model, adapter_path, check=not de_fold)


def _check_output(save_path: Path, force: bool, *inputs):
    """Never write over an input; replace an existing output only with ``force``."""
    for name, p in inputs:
        if save_path.resolve() == p.resolve():
            raise FuseError(f"--save-path {save_path} is the {name} folder: choose another folder")
    if save_path.exists() and not save_path.is_dir():
        raise FuseError(f"--save-path {save_path} is a file: choose a folder")
    if save_path.exists() and not force:
        raise FuseError(f"--save-path {save_path} already exists: choose another or pass --force")


def _write_folder(tmp: Path, model, config: dict, model_dir: Path, info: dict, report: list):
    from mlx_lm.utils import save_config, save_model

    try:
        save_model(tmp, model)
    except RuntimeError as e:  # MLX's failed write: a full disk
        raise UserError(f"cannot write the fused model ({e}): is the disk full? free space or write elsewhere") from None
    save_config(dict(config), tmp / "config.json")
    for pattern in COPY_PATTERNS:
        for f in model_dir.glob(pattern):
            if f.is_file() and f.name not in NOT_COPIED:
                shutil.copy2(f, tmp / f.name)
    (tmp / PLAN_FILE).write_text(json.dumps({**info, "steps": report}, indent=2) + "\n")
    (tmp / "README.md").write_text(fused_card(tmp))


def _local_dir(model_path: str) -> Path:
    if Path(model_path).is_dir():
        return Path(model_path)
    from mlx_lm.utils import hf_repo_to_path

    return hf_repo_to_path(model_path)


def fuse(
    model=None,
    adapter_path="adapters",
    save_path="fused_model",
    dequantize: bool = False,
    de_fold: bool = False,
    fp32_scales: bool = False,
    force: bool = False,
    verbose: bool = True,
) -> dict:
    """Write ``save_path``: ``model`` with the adapter's gains merged (or divided out with
    ``de_fold``). Returns the plan written to ``fold_plan.json``."""
    from .loading import load_model

    adapter_path, save_path = resolve_adapter(adapter_path), Path(save_path)
    remove_stale(save_path)  # a --force killed mid-swap: its previous output goes back first
    config_a, _ = read_adapter(adapter_path)
    sha = gains_sha256(adapter_path)
    _check_output(save_path, force, ("--adapter-path", adapter_path))
    mlx_model, _, model_path = load_model(model, verbose=verbose)
    model_dir = _local_dir(model_path)
    _check_output(save_path, force, ("--model", model_dir))
    history = _load_history(model_dir)
    _apply_adapter(mlx_model, adapter_path, de_fold, history, sha)
    config = json.loads((model_dir / "config.json").read_text())
    if dequantize:
        from .cpu import dequantize_model

        mlx_model = dequantize_model(mlx_model, dtype=_float_dtype(mlx_model))
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    report = fuse_model(mlx_model, targets_from_config(config_a), fp32_scales, de_fold)
    operation = "de-fold" if de_fold else "fold"
    record = {"operation": operation, "adapter": str(adapter_path), "gains_sha256": sha}
    info = {
        **record,
        "base": str(model if model is not None else model_path),
        "variant": config_a["variant"],
        "scales": "float32" if fp32_scales else "as stored",
        "dequantized": dequantize,
        "summary": summarize(report),
        "history": history + [record],
        "lineage": config_a.get("lineage"),
    }
    if verbose:
        print(format_plan(report))
        rounded = [r["rel_error"] for r in report if r["method"] == "scales" and r["dtype"] != "float32"]
        if rounded:
            print(f"note: up to {max(rounded):.1e} relative error is the rounding of folded scales to their "
                  "stored dtype; --fp32-scales makes the merge exact")
    save_path.parent.mkdir(parents=True, exist_ok=True)
    # Built in a temporary folder and moved into place complete; an existing --save-path
    # (--force) is swapped out only then, so a failure or kill leaves it as it was.
    with atomic_dir(save_path, replace=force) as tmp:
        _write_folder(tmp, mlx_model, config, model_dir, info, report)
    if verbose:
        print(f"Wrote {save_path} ({operation}, plan in {save_path / PLAN_FILE})")
    return info


def _float_dtype(model):
    """The float dtype the quantized layers' scales use (bfloat16 for mx/nv modes)."""
    for _, layer in model.named_modules():
        if "scales" in layer and layer["scales"].dtype != mx.uint8:
            return layer["scales"].dtype
    return mx.bfloat16


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--model", help="base model: MLX folder, HF repo or .gguf (default: SmolLM2)")
    parser.add_argument("--adapter-path", default="adapters", help="gain_mlx adapter folder or Hugging Face Hub repo id")
    parser.add_argument("--save-path", default="fused_model", help="output model folder")
    parser.add_argument("--dequantize", action="store_true", help="write a float model")
    parser.add_argument(
        "--de-fold", action="store_true", help="divide the adapter's gains out of a fused model"
    )
    parser.add_argument(
        "--fp32-scales",
        action="store_true",
        help="store the scales/biases of folded quantized layers in float32 (exact merge)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --save-path")
    cpu.add_fast_blas_argument(parser)
    args = parser.parse_args(argv)
    policy.start(args.fast_blas)
    fuse(
        args.model,
        args.adapter_path,
        args.save_path,
        dequantize=args.dequantize,
        de_fold=args.de_fold,
        fp32_scales=args.fp32_scales,
        force=args.force,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
