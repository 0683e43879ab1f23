"""GGUF tensors -> mlx-lm weights, streamed one tensor at a time: float arrays, or
MLX affine quantized triples (``weight``, ``scales``, ``biases``) with ``quantized=True``."""

import sys
from typing import Any, Callable, Dict, Iterator, Tuple

import mlx.core as mx
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from . import GGUFImportError
from .affine import FLOAT_TYPES, GROUP_SIZE, mlx_bits, to_affine
from .config import ArchSpec, Metadata
from .names import name_map

CHUNK_VALUES = 1 << 22


def model_parameter_shapes(config: dict) -> Tuple[Dict[str, Tuple[int, ...]], set]:
    """Parameter names and shapes of the mlx-lm model for ``config``, and the paths of
    its modules that MLX can quantize (nothing is allocated)."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    return shapes, {path for path, m in model.named_modules() if hasattr(m, "to_quantized")}


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


class gguf_weights:
    """``(mlx-lm name, cast(float32 array))`` pairs, one tensor at a time, in mlx-lm layout.

    Planned from the header alone when constructed: raises GGUFImportError for
    tensors that have no place in the mlx-lm model, shape mismatches and missing
    parameters before any tensor is read. ``len()`` is the number of pairs.

    ``cast`` runs inside the stream, so each float32 copy is freed before the
    consumer sees the result. With ``quantized``, every quantized ggml matrix of a
    module MLX can quantize stays quantized (:mod:`.affine`): it yields its packed
    ``weight`` as is, and ``scales`` / ``biases`` through ``cast``; ``quantization``
    maps those module paths to their bits.
    """

    def __init__(self, reader: GGUFReader, config: dict, spec: ArchSpec, cast: Callable = np.asarray,
                 quantized: bool = False):
        check_types(reader)
        self.reader, self.config, self.spec, self.cast = reader, config, spec, cast
        shapes, quantizable = model_parameter_shapes(config)
        self.shapes = shapes
        if "output.weight" not in {t.name for t in reader.tensors}:
            shapes.pop("lm_head.weight", None)  # tied: mlx-lm drops lm_head on load
        n_layers = config.get("num_hidden_layers") or config["n_layer"]
        names = name_map(Metadata(reader).arch, n_layers, shapes)
        self.plan = []
        for t in reader.tensors:
            if t.name in SKIPPED:  # folded into the config (RoPE factors)
                continue
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            if spec.tied_only and t.name == "output.weight":
                self.plan.append((t, [], shape, False))  # checked against token_embd when read
                continue
            pieces = _pieces(t.name, shape, names, shapes, spec)
            if pieces is None:
                raise GGUFImportError(
                    f"GGUF tensor {t.name!r} has no counterpart in mlx-lm's "
                    f"{config['model_type']} model; this variant is not supported"
                )
            affine = quantized and _keeps_quantization(t, pieces, quantizable)
            self.plan.append((t, pieces, shape, affine))
        self.quantization = {
            name[: -len(".weight")]: mlx_bits(t.tensor_type)
            for t, pieces, _, affine in self.plan if affine for name, _ in pieces
        }
        missing = sorted(set(shapes) - {name for _, pieces, _, _ in self.plan for name, _ in pieces})
        if missing:
            raise GGUFImportError(f"GGUF file has no tensors for {', '.join(missing[:4])}")

    def __len__(self) -> int:
        return sum(len(pieces) * (3 if affine else 1) for _, pieces, _, affine in self.plan)

    def __iter__(self) -> Iterator[Tuple[str, Any]]:
        spec, config = self.spec, self.config
        heads = {"attn_q": config.get("num_attention_heads"), "attn_k": config.get("num_key_value_heads")}
        for t, pieces, shape, affine in self.plan:
            # One array, or (weight, scales, biases): every step below moves whole rows.
            arrays = to_affine(_raw_rows(t, shape), t.tensor_type, shape[-1]) if affine else (_dequantize(t, shape),)
            if not pieces:
                _check_tied(arrays[0], self.reader, shape)
                continue
            kind = t.name.split(".")[-2]
            if spec.permute_qk and kind in heads:
                arrays = [unpermute_qk(a, heads[kind]) for a in arrays]
            if spec.qkv_per_head and kind == "attn_qkv":
                arrays = [per_head_qkv(a, config["num_attention_heads"]) for a in arrays]
            if spec.norm_shift and t.name.endswith("norm.weight"):
                arrays = [arrays[0] - np.float32(spec.norm_shift)]
            for name, rows in pieces:
                parts = [a if rows is None else a[rows] for a in arrays]
                if not affine:
                    yield name, self.cast(parts[0].reshape(self.shapes[name]))
                    continue
                lead = self.shapes[name][:-1]
                prefix = name[: -len("weight")]
                yield name, mx.array(parts[0].reshape(*lead, -1))
                yield prefix + "scales", self.cast(parts[1].reshape(*lead, -1))
                yield prefix + "biases", self.cast(parts[2].reshape(*lead, -1))
            del arrays


def _keeps_quantization(t, pieces, quantizable) -> bool:
    """A quantized ggml matrix whose every piece is the weight of a quantizable module."""
    return (
        t.tensor_type not in FLOAT_TYPES
        and len(t.shape) >= 2
        and int(t.shape[0]) % GROUP_SIZE == 0
        and bool(pieces)
        and all(name.endswith(".weight") and name[: -len(".weight")] in quantizable for name, _ in pieces)
    )


def _raw_rows(t, shape) -> np.ndarray:
    """A quantized tensor's bytes, one row of blocks per output row: ``(*shape[:-1], bytes)``."""
    return t.data.reshape(*shape[:-1], -1)


SKIPPED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _pieces(gguf_name, shape, names, shapes, spec):
    """``[(mlx name, row slice or None)]`` that one GGUF tensor becomes, or None.

    A tensor maps to one parameter of the same shape (or the same values with unit
    axes dropped: a (1, n) gate stored as [n]); a fused ``attn_qkv`` may also stand
    for separate q/k/v projections (Phi-2 GGUFs converted from ``mixer.Wqkv``).
    """
    name = names.get(gguf_name)
    if name is not None:
        if shape != shapes[name] and _squeezed(shape) != _squeezed(shapes[name]):
            raise GGUFImportError(
                f"GGUF tensor {gguf_name!r} has shape {shape} but mlx-lm's "
                f"{name} expects {shapes[name]}: metadata and tensors disagree"
            )
        return [(name, None)]
    block, _, leaf = gguf_name.rpartition(".attn_qkv.")
    if not (spec.split_qkv and block):
        return None
    parts = [names.get(f"{block}.attn_{p}.{leaf}") for p in "qkv"]
    if None in parts:
        return None
    sizes = [shapes[p][0] for p in parts]
    if shape[0] != sum(sizes) or any(shapes[p][1:] != shape[1:] for p in parts):
        raise GGUFImportError(
            f"GGUF tensor {gguf_name!r} has shape {shape} but mlx-lm's q/k/v projections "
            f"need {sum(sizes)} rows: metadata and tensors disagree"
        )
    ends = np.cumsum([0] + sizes)
    return [(p, slice(a, b)) for p, a, b in zip(parts, ends[:-1], ends[1:])]


def _squeezed(shape) -> tuple:
    return tuple(n for n in shape if n != 1)


def per_head_qkv(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q | k | v rows (GPT-NeoX) -> mlx-lm's per-head ``[q_h k_h v_h]``."""
    qkv = w.reshape(3, n_head, w.shape[0] // n_head // 3, *w.shape[1:])
    return qkv.swapaxes(0, 1).reshape(w.shape)


TIED_TOLERANCE = 0.2  # relative difference of one matrix quantized in two types


def _check_tied(output: np.ndarray, reader: GGUFReader, shape) -> None:
    """An ``output.weight`` for a model that mlx-lm always ties: accepted when it is the
    embedding matrix (older GPT-2 converters wrote a copy), possibly in another type."""
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    values = _dequantize(embd, tuple(int(n) for n in reversed(embd.shape.tolist())))
    if values.shape != output.shape:
        raise GGUFImportError(f"output.weight has shape {shape}, token_embd.weight {values.shape}")
    diff = float(np.linalg.norm(values - output) / (np.linalg.norm(values) + 1e-30))
    if diff > TIED_TOLERANCE:
        raise GGUFImportError(
            f"output.weight differs from token_embd.weight (relative difference {diff:.2f}), "
            "but mlx-lm's model of this architecture always ties them; not supported"
        )
    if diff > 0:
        print(f"[gain_mlx] note: output.weight is token_embd.weight in another quantization "
              f"(relative difference {diff:.1e}); mlx-lm ties them, so the MLX model uses "
              "token_embd.weight for both", file=sys.stderr)
