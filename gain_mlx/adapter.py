"""Apply gains to a loaded mlx-lm model; save and load adapter folders.

An adapter folder holds ``gains.safetensors`` (``<module path>.gain``) and
``gain_config.json`` (variant, targets, base shape and a fingerprint of the base
weights, so an adapter applied to the wrong base fails clearly, and the ``lineage``:
each training stage's data, steps, learning rate and final metrics).
"""

import json
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import UserError
from .files import atomic_write, save_safetensors
from .arch import Target, find_targets, get_module, head_layout, input_dims
from .layers import GAIN_LAYERS, GainLinear, GainSwitchLinear

FORMAT_VERSION = 1
GAINS_FILE = "gains.safetensors"
CONFIG_FILE = "gain_config.json"
ORIENTATION = "input"  # y = W (gain * x) + b, i.e. W_new = W diag(gain)
PROBE_ROWS = 8  # rows of each gained weight that the fingerprint projects
MIN_FINGERPRINT_COSINE = 0.95

# adapter size key -> (its names in mlx-lm's ModelArgs, its GGUF key "<arch>.<name>");
# num_layers is len(model.layers)
SIZE_KEYS = {
    "num_layers": ((), "block_count"),
    "hidden_size": (("hidden_size", "n_embd", "d_model"), "embedding_length"),
    "intermediate_size": (("intermediate_size", "moe_intermediate_size", "n_inner"), "feed_forward_length"),
}


class AdapterError(UserError, ValueError):
    """An adapter that cannot be used with this model (wrong base, missing files)."""


def _wrap(layer, target: Target, model) -> nn.Module:
    if isinstance(layer, GAIN_LAYERS):
        raise ValueError(f"{target.path} already has a gain; load the base model afresh")
    if hasattr(layer, "num_experts"):
        return GainSwitchLinear(layer)
    if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
        raise ValueError(f"{target.path} is a {type(layer).__name__}, not a linear layer")
    if target.tied:
        lay = head_layout(model)
        return GainLinear(layer, (lay.n_kv_heads, lay.head_dim), lay.n_heads // lay.n_kv_heads)
    return GainLinear(layer, (input_dims(layer),))


def _replace_module(model, path: str, new):
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path)
    if isinstance(parent, list):
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def apply_gains(model, variant: str = "gain-ffn", tie_kv: bool = False, targets=None) -> list:
    """Freeze ``model`` and wrap its targets in gain layers (gains = 1).

    ``targets``: explicit module paths (for architectures outside the table).
    Returns the list of ``Target``.
    """
    model.freeze()
    found = find_targets(model, variant, tie_kv, targets)
    for t in found:
        _replace_module(model, t.path, _wrap(get_module(model, t.path), t, model))
    return found


def gain_parameters(model) -> dict:
    """``{target path: gain as applied to its inputs}`` for every gain layer."""
    return {
        path: layer.full_gain() for path, layer in model.named_modules() if isinstance(layer, GAIN_LAYERS)
    }


def _base_layer(model, path):
    layer = get_module(model, path)
    return layer.base if isinstance(layer, GAIN_LAYERS) else layer


def _probe_rows(layer) -> mx.array:
    """The first rows of a (possibly quantized, possibly per-expert) weight, in float32."""

    def rows(a):
        return a.reshape(-1, a.shape[-1])[:PROBE_ROWS]

    if not hasattr(layer, "scales"):
        return rows(layer.weight).astype(mx.float32)
    biases = getattr(layer, "biases", None)
    return mx.dequantize(
        rows(layer.weight),
        rows(layer.scales),
        rows(biases) if biases is not None else None,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=getattr(layer, "mode", "affine"),
    ).astype(mx.float32)


def probe(rows) -> list:
    """Projections of float weight rows ``(n, in)`` on a fixed random vector of size ``in``."""
    rows = mx.array(rows, dtype=mx.float32)
    v = mx.random.normal((rows.shape[-1],), key=mx.random.key(rows.shape[-1]))
    return (rows @ v).tolist()


def fingerprint(model, targets: list) -> list:
    """``probe`` of the first rows of each target's base weight.

    Stable across dtypes and quantization of the same weights (compared by cosine),
    unrelated for different weights.
    """
    return [p for t in targets for p in probe(_probe_rows(_base_layer(model, t.path)))]


def fingerprint_similarity(a, b) -> float:
    """Cosine of two fingerprints (-1 when their shapes differ)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return -1.0
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _model_sizes(model) -> dict:
    args = model.args
    sizes = {"num_layers": len(model.layers)}
    for name, (keys, _) in SIZE_KEYS.items():
        if keys:
            sizes[name] = next((getattr(args, k) for k in keys if getattr(args, k, None)), None)
    return sizes


def adapter_config(model, targets: list, variant: str, tie_kv: bool, **extra) -> dict:
    """The ``gain_config.json`` content for gains applied by ``apply_gains``."""
    return {
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "orientation": ORIENTATION,
        "tie_kv": tie_kv,
        "model_type": model.model_type,
        **_model_sizes(model),
        "targets": [asdict(t) for t in targets],
        "custom_targets": [t.path for t in targets] if targets and targets[0].kind == "custom" else None,
        "fingerprint": fingerprint(model, targets),
        **extra,
    }


def save_gains(model, path) -> None:
    weights = dict(tree_flatten(model.trainable_parameters()))
    atomic_write(Path(path), lambda tmp: save_safetensors(tmp, weights))


def save_adapter(model, adapter_path, config: dict) -> Path:
    """Write ``gains.safetensors`` and ``gain_config.json`` (each atomically)."""
    adapter_path = Path(adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    save_gains(model, adapter_path / GAINS_FILE)
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(adapter_path / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return adapter_path


def load_gains_file(gains_file) -> dict:
    """``mx.load`` of a gains file; a truncated or corrupt file is an ``AdapterError``."""
    try:
        return mx.load(str(gains_file))
    except (RuntimeError, ValueError) as e:
        raise AdapterError(
            f"{gains_file} is truncated or corrupt ({e}): re-train or restore the adapter"
        ) from None


def read_adapter(adapter_path) -> tuple:
    """``(config, {target path: np.ndarray gain as stored})`` without a model.

    Refuses a missing, truncated or corrupt file and gains that are not finite.
    """
    adapter_path = Path(adapter_path)
    if adapter_path.exists() and not adapter_path.is_dir():
        raise AdapterError(f"{adapter_path} is a file: the adapter path must be a folder")
    cfg_file, gains_file = adapter_path / CONFIG_FILE, adapter_path / GAINS_FILE
    for f in (cfg_file, gains_file):
        if not f.is_file():
            raise AdapterError(f"{f} not found: is {adapter_path} a gain_mlx adapter folder?")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file} is not valid JSON ({e}): re-save or restore the adapter") from None
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        version = config.get("format_version") if isinstance(config, dict) else None
        raise AdapterError(f"{cfg_file}: format_version {version} is not {FORMAT_VERSION}")
    raw = load_gains_file(gains_file)
    gains = {k[: -len(".gain")]: np.array(v.astype(mx.float32)) for k, v in raw.items() if k.endswith(".gain")}
    bad = [k for k, v in gains.items() if not np.isfinite(v).all()]
    if bad:
        raise AdapterError(
            f"{gains_file}: gains of {bad[0]} (and {len(bad) - 1} more) are not finite (NaN/inf): "
            "the training diverged; re-train with a lower --learning-rate"
        )
    return config, gains


def targets_from_config(config: dict) -> list:
    return [Target(**t) for t in config["targets"]]


def check_base(model, config: dict, source: str = "adapter") -> None:
    """Raise ``AdapterError`` if ``model`` is not the base the adapter was trained on."""
    missing = [k for k in ("model_type", "targets", "fingerprint") if k not in config]
    if missing:
        raise AdapterError(f"{source}: its {CONFIG_FILE} has no '{missing[0]}': re-save the adapter")
    try:
        targets = targets_from_config(config)
    except (TypeError, ValueError):
        raise AdapterError(f"{source}: its {CONFIG_FILE} lists malformed targets: re-save the adapter") from None
    sizes = {key: (value, "") for key, value in _model_sizes(model).items()}
    check_fit(config, source, "this base", model.model_type, sizes,
              [t.path for t in targets if get_module(model, t.path) is None],
              lambda: fingerprint(model, targets), "pass the --model it was trained on")


def check_fit(config: dict, source: str, base: str, model_type: str, sizes: dict, missing: list,
              base_fingerprint, fix: str, error=AdapterError) -> None:
    """The one base-fit check (of a loaded model, of a GGUF): raise ``error`` unless the
    adapter's ``config`` was trained on this base: same ``model_type``, sizes
    (``{size key: (value, name in the base)}``, a None value is not compared), no target
    ``missing`` and base weights whose fingerprint (``base_fingerprint()``) matches.
    ``base`` names the base in messages, ``fix`` says what to do."""
    if config.get("model_type") != model_type:
        raise error(f"{source} was trained on a '{config.get('model_type')}' model, {base} is '{model_type}': {fix}")
    for key, (value, name) in sizes.items():
        if value is not None and config.get(key) is not None and int(config[key]) != int(value):
            raise error(f"{source} expects {key}={config[key]}, {base} has {name + '=' if name else ''}{value}: {fix}")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise error(f"{source}: {base} has no layer for {missing[0]}{more}: {fix}")
    if config.get("fingerprint"):
        cos = fingerprint_similarity(base_fingerprint(), config["fingerprint"])
        if cos < MIN_FINGERPRINT_COSINE:
            raise error(f"{source} was trained on different base weights (fingerprint similarity "
                        f"{cos:.2f} < {MIN_FINGERPRINT_COSINE}): {fix}")


def resolve_adapter(spec) -> Path:
    """A local adapter folder for ``spec``: a folder, or a Hugging Face Hub repo id
    (``owner/name``, fetched into the Hub cache; ``HF_HUB_OFFLINE=1`` uses the cache only)."""
    path = Path(spec)
    if path.exists() or str(spec).count("/") != 1 or str(spec).startswith((".", "/")):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(spec), allow_patterns=[CONFIG_FILE, GAINS_FILE, "*.md"]))
    except ImportError:
        raise UserError(f"{spec} is not a local folder and huggingface_hub is not installed") from None
    except Exception as e:  # huggingface_hub raises many types for a missing repo/offline cache
        raise UserError(f"adapter {spec}: not a local folder and not found on the Hub or in its cache ({type(e).__name__})") from None


def attach(model, config: dict, weights: dict, source: str, check: bool = True) -> dict:
    """Check the base (unless ``check``: a fused model carries the gains already), apply
    gains as ``config`` describes and load ``weights`` (``{<path>.gain: array}``)."""
    if check:
        check_base(model, config, source=source)
    apply_gains(model, config["variant"], config["tie_kv"], config.get("custom_targets"))
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise AdapterError(
            f"{source} does not hold the gains its {CONFIG_FILE} describes "
            f"({len(weights)} tensors, expected {len(expected)}): re-save the adapter"
        )
    model.load_weights(list(weights.items()), strict=False)
    return config


def load_adapter(model, adapter_path, source=None, gains_file=None, check: bool = True) -> dict:
    """The one adapter loader: resolve ``adapter_path`` (folder or Hub id), check the base,
    apply gains as configured and load their trained values (from ``gains_file``,
    default the folder's ``gains.safetensors``). Returns the adapter's config."""
    folder = resolve_adapter(adapter_path)
    config, _ = read_adapter(folder)
    gains_file = Path(gains_file) if gains_file else folder / GAINS_FILE
    return attach(model, config, load_gains_file(gains_file), source or f"adapter {adapter_path}", check)
