"""GGUF tensors -> mlx-lm weights, streamed one tensor at a time."""

from typing import Any, Callable, Dict, Iterator, Tuple

import numpy as np
from gguf import GGUFReader, MODEL_ARCH_NAMES, TensorNameMap
from gguf.quants import dequantize
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from . import GGUFImportError
from .config import ArchSpec, Metadata

_SUFFIXES = (".weight", ".bias")
CHUNK_VALUES = 1 << 22


def model_parameter_shapes(config: dict) -> Dict[str, Tuple[int, ...]]:
    """Parameter names and shapes of the mlx-lm model for ``config`` (nothing is allocated)."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def name_map(arch: str, n_layers: int, mlx_names) -> Dict[str, str]:
    """GGUF tensor name -> mlx-lm parameter name, from gguf-py's own name table."""
    by_value = {v: k for k, v in MODEL_ARCH_NAMES.items()}
    table = TensorNameMap(by_value[arch], n_layers)
    mlx_names = set(mlx_names)
    mapping = {}
    for hf_name, (_, gguf_name) in table.mapping.items():
        for suffix in _SUFFIXES:
            if hf_name + suffix in mlx_names:
                mapping[gguf_name + suffix] = hf_name + suffix
    return mapping


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (interleaved -> half-split RoPE)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def check_types(reader: GGUFReader) -> None:
    """Fail before any work if a tensor's ggml type cannot be dequantized by gguf-py."""
    seen = {}
    for t in reader.tensors:
        seen.setdefault(t.tensor_type, t)
    for qtype, t in seen.items():
        try:
            dequantize(t.data[:1], qtype)
        except NotImplementedError:
            raise GGUFImportError(
                f"tensor {t.name!r} has ggml type {qtype.name}, which gguf-py cannot "
                "dequantize; requantize the GGUF to a supported type (e.g. Q8_0) first"
            ) from None


def _dequantize(t, shape) -> np.ndarray:
    """float32 values of one tensor, dequantized a few MB at a time (gguf-py's
    dequantizers need several times their output in scratch arrays)."""
    raw = t.data.reshape(-1, t.data.shape[-1])
    out = np.empty((raw.shape[0], shape[-1]), np.float32)
    step = max(1, CHUNK_VALUES // shape[-1])
    for i in range(0, raw.shape[0], step):
        out[i : i + step] = dequantize(raw[i : i + step], t.tensor_type)
    return out.reshape(shape)


def gguf_weights(
    reader: GGUFReader, config: dict, spec: ArchSpec, cast: Callable = np.asarray
) -> Iterator[Tuple[str, Any]]:
    """Yield ``(mlx-lm name, cast(float32 array))`` one tensor at a time, in mlx-lm layout.

    ``cast`` runs inside the stream, so each float32 copy is freed before the
    consumer sees the result.

    Raises GGUFImportError for tensors that have no place in the mlx-lm model,
    shape mismatches and missing parameters.
    """
    check_types(reader)
    shapes = model_parameter_shapes(config)
    if "output.weight" not in {t.name for t in reader.tensors}:
        shapes.pop("lm_head.weight", None)  # tied: mlx-lm drops lm_head on load
    names = name_map(Metadata(reader).arch, config["num_hidden_layers"], shapes)
    heads = {
        "attn_q": config["num_attention_heads"],
        "attn_k": config["num_key_value_heads"],
    }
    plan = []  # checked from the header alone, before any tensor is read
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # folded into config["rope_scaling"]
            continue
        name = names.get(t.name)
        if name is None:
            raise GGUFImportError(
                f"GGUF tensor {t.name!r} has no counterpart in mlx-lm's "
                f"{config['model_type']} model; this variant is not supported"
            )
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if shape != shapes[name]:
            raise GGUFImportError(
                f"GGUF tensor {t.name!r} has shape {shape} but mlx-lm's "
                f"{name} expects {shapes[name]}: metadata and tensors disagree"
            )
        plan.append((t, name, shape))
    missing = sorted(set(shapes) - {name for _, name, _ in plan})
    if missing:
        raise GGUFImportError(f"GGUF file has no tensors for {', '.join(missing[:4])}")
    for t, name, shape in plan:
        w = _dequantize(t, shape)
        kind = t.name.split(".")[-2]
        if spec.permute_qk and kind in heads:
            w = unpermute_qk(w, heads[kind])
        if spec.norm_shift and t.name.endswith("norm.weight"):
            w = w - np.float32(spec.norm_shift)
        w = cast(w)
        yield name, w
