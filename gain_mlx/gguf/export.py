"""Fold an adapter's gains into an existing GGUF file, keeping its quant types.

``gain_mlx.fold.plan_folds`` decides where each gain goes; here every fold step
becomes the edit of one GGUF tensor:

- ``scales``: exact. The float scale fields of the affected rows change (or the
  elements of a float tensor); nothing else does.
- ``requant``: dequantize, scale the columns, quantize back to the same type (same
  size, in place). Only where gguf-py can quantize that type.
- ``f16`` / ``q8_0``: dequantize, scale, store the tensor in that type. The file is
  rewritten: tensor offsets are recomputed, every other byte is kept.

The output is a copy of the input (or a streamed rewrite), patched through a
read-write memmap one tensor at a time, written to a temp file next to the output
and renamed at the end.
"""

import hashlib
import mmap
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType as T, GGUFValueType, TensorNameMap

from ..adapter import (
    MIN_FINGERPRINT_COSINE,
    PROBE_ROWS,
    AdapterError,
    fingerprint_similarity,
    probe,
    read_adapter,
    targets_from_config,
)
from ..arch import HeadLayout
from ..files import temp_path
from ..fold import FoldStep, plan_folds
from . import quants as Q
from .config import ARCHS, GGUF_ARCH
from .header import GGUFFile
from .weights import spellings

FALLBACKS = ("requant", "f16", "q8_0", "refuse")
CONVERT_TYPES = {"f16": T.F16, "q8_0": T.Q8_0}
# adapter size key -> GGUF "<arch>.<key>"
SIZE_KEYS = {
    "num_layers": "block_count",
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
}
# Row layouts of a producer that llama.cpp's converter keeps in HF order (V rows of a
# fused qkv, up half of a fused gate|up). gpt_neox's per-head qkv is not among them.
GGUF_ROW_LAYOUTS = ("all", "v", "up")
META_PREFIX = "gain_mlx."
CHECK_ROWS = 64  # rows per tensor compared against s * dequantize(original)


class ExportError(ValueError):
    """A one-line problem with the inputs of an export."""


@dataclass(frozen=True)
class Edit:
    """One change to one GGUF tensor."""

    tensor: str  # GGUF tensor name
    step: FoldStep
    how: str  # "scales", "requant", "f16", "q8_0"


# --- reading the GGUF ---------------------------------------------------------------

def _field(reader: GGUFFile, key: str, default=None):
    value = reader.value(key, default)
    if isinstance(value, list):  # per-layer values: usable only when uniform
        return value[0] if len(set(value)) == 1 else None
    return value


def tensor_name_map(reader: GGUFFile) -> TensorNameMap:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise ExportError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}")
    by_name = {v: k for k, v in MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise ExportError(f"GGUF architecture {arch!r} is unknown to the installed gguf-py; upgrade gguf")
    return TensorNameMap(by_name[arch], int(_field(reader, f"{arch}.block_count", 0)))


def _candidates(path: str):
    """Spellings of an mlx-lm module path that gguf-py's name map may know (the import's)."""
    yield from spellings(path)


def gguf_tensor(reader: GGUFFile, table: TensorNameMap, path: str, suffix: str = ".weight"):
    """The GGUF tensor of an mlx-lm module path (``model.layers.3.self_attn.v_proj`` ->
    ``blk.3.attn_v.weight``), or None when the module has no such tensor."""
    for c in _candidates(path):
        name = table.get_name(c)
        if name is not None:
            return reader.by_name.get(name + suffix)
    return None


def _raw(t) -> np.ndarray:
    """Raw bytes of a tensor as ``(G, rows, row_bytes)``; G = experts (1 if none)."""
    dims = [int(d) for d in t.shape]
    rows = dims[1] if len(dims) > 1 else 1
    groups = int(np.prod(dims[2:])) if len(dims) > 2 else 1
    return t.data.view(np.uint8).reshape(groups, rows, -1)


def _cols(t) -> int:
    return int(t.shape[0])


# --- the adapter against the GGUF ---------------------------------------------------

def _layout(reader: GGUFFile, table, targets) -> Optional[HeadLayout]:
    arch = _field(reader, "general.architecture")
    n_heads = _field(reader, f"{arch}.attention.head_count")
    attn = [t for t in targets if t.kind == "attn"]
    if not n_heads or not attn:
        return None
    n_kv = _field(reader, f"{arch}.attention.head_count_kv") or n_heads
    out = gguf_tensor(reader, table, attn[0].path)
    if out is None:
        return None
    return HeadLayout(int(n_heads), int(n_kv), _cols(out) // int(n_heads))


def _fingerprint(reader, table, targets) -> list:
    """``gain_mlx.adapter.fingerprint`` computed from the GGUF's own target weights."""
    probes = []
    for t in targets:
        tensor = gguf_tensor(reader, table, t.path)
        head = _raw(tensor).reshape(-1, _raw(tensor).shape[-1])[:PROBE_ROWS]
        probes.extend(probe(Q.dequantize(head, tensor.tensor_type)))
    return probes


def check_fit(reader, table, config: dict, targets, adapter_path) -> None:
    """Raise ExportError unless the adapter was trained on the model in this GGUF."""
    arch = _field(reader, "general.architecture")
    mt = config.get("model_type")
    if GGUF_ARCH.get(mt, mt) != arch:
        raise ExportError(
            f"adapter {adapter_path} was trained on a '{mt}' model, the GGUF is '{arch}': "
            "pass the GGUF of the base it was trained on"
        )
    for key, gguf_key in SIZE_KEYS.items():
        mine, theirs = config.get(key), _field(reader, f"{arch}.{gguf_key}")
        if mine is not None and theirs is not None and int(mine) != int(theirs):
            raise ExportError(
                f"adapter {adapter_path} expects {key}={mine}, the GGUF has {arch}.{gguf_key}={theirs}: "
                "pass the GGUF of the base it was trained on"
            )
    missing = [t.path for t in targets if gguf_tensor(reader, table, t.path) is None]
    if missing:
        raise ExportError(f"the GGUF has no tensor for {missing[0]} (and {len(missing) - 1} more)")
    if config.get("fingerprint"):
        cos = fingerprint_similarity(_fingerprint(reader, table, targets), config["fingerprint"])
        if cos < MIN_FINGERPRINT_COSINE:
            raise ExportError(
                f"adapter {adapter_path} was trained on different base weights (fingerprint "
                f"similarity {cos:.2f} < {MIN_FINGERPRINT_COSINE}): pass the GGUF of its base"
            )


def full_gains(config_targets, stored: dict, layout: Optional[HeadLayout]) -> dict:
    """Stored gains -> gains as applied to the target inputs (KV-tied ones expanded)."""
    gains = {}
    for t in config_targets:
        if t.path not in stored:
            raise ExportError(f"the adapter has no gain for {t.path}: re-save the adapter")
        g = np.asarray(stored[t.path], dtype=np.float32)
        if t.tied:
            g = np.repeat(g, layout.n_heads // layout.n_kv_heads, axis=0).reshape(-1)
        gains[t.path] = g
    return gains


# --- planning -----------------------------------------------------------------------

def _gguf_step(step: FoldStep, target, gain) -> FoldStep:
    """Keep row folds whose layout llama.cpp preserves; others go to the target's columns."""
    if step.axis == "rows" and target.producer_rows == "v_per_head":
        # llama.cpp's converter stores GPT-NeoX's per-head qkv as q | k | v: V is the last third
        n = step.factor.shape[-1]
        return FoldStep(step.target, step.dest, "rows", np.arange(2 * n, 3 * n), step.factor)
    if step.axis == "rows" and target.producer_rows not in GGUF_ROW_LAYOUTS:
        return FoldStep(step.target, step.target, "columns", None, gain)
    return step


def _fused_v(reader, table, step: FoldStep) -> FoldStep:
    """V rows of a fused ``attn_qkv`` (q | k | v) where mlx-lm has a separate v_proj
    (Phi-2 GGUFs converted from the original ``mixer.Wqkv``)."""
    block, _, leaf = step.dest.rpartition(".")
    qkv = gguf_tensor(reader, table, block + ".qkv_proj")
    if step.axis != "rows" or leaf != "v_proj" or step.rows is not None or qkv is None \
            or gguf_tensor(reader, table, step.dest) is not None:
        return step
    rows = int(qkv.shape[1])
    n = step.factor.shape[-1]
    return FoldStep(step.target, block + ".qkv_proj", "rows", np.arange(rows - n, rows), step.factor)


def _how(step: FoldStep, tensor, fallback: str) -> str:
    qtype = tensor.tensor_type
    if step.axis == "rows" and Q.rows_scalable(qtype, step.factor):
        return "scales"
    if step.axis == "columns" and qtype in Q.FLOAT_TYPES:
        return "scales"
    why = f"{tensor.name} ({qtype.name}): the gain of {step.target} has no exact fold"
    if fallback == "refuse":
        raise ExportError(
            f"{why} (untied attention gains with grouped KV heads, or a non-gated FFN); "
            "retrain with --tie-kv, or pass --fallback requant|f16|q8_0"
        )
    if fallback == "requant" and not Q.can_quantize(qtype):
        raise ExportError(
            f"{why} and gguf-py cannot quantize {qtype.name} to requantize it; "
            "pass --fallback f16 or --fallback q8_0, or retrain with --tie-kv"
        )
    if fallback == "q8_0" and _cols(tensor) % GGML_QUANT_SIZES[T.Q8_0][0]:
        raise ExportError(f"{tensor.name}: {_cols(tensor)} columns do not fit Q8_0 blocks; pass --fallback f16")
    return fallback


def plan_edits(reader, table, targets, gains, layout, fallback: str) -> list:
    """The fold plan as GGUF tensor edits (producer biases included)."""
    def is_quantized(path):
        return gguf_tensor(reader, table, path).tensor_type not in Q.FLOAT_TYPES

    by_path = {t.path: t for t in targets}
    edits = []
    for step in plan_folds(targets, gains, is_quantized, layout):
        step = _gguf_step(step, by_path[step.target], gains[step.target])
        step = _fused_v(reader, table, step)
        tensor = gguf_tensor(reader, table, step.dest)
        if tensor is None:
            raise ExportError(f"the GGUF has no tensor for {step.dest}")
        edits.append(Edit(tensor.name, step, _how(step, tensor, fallback)))
        bias = gguf_tensor(reader, table, step.dest, ".bias") if step.axis == "rows" else None
        if bias is not None:
            edits.append(Edit(bias.name, step, "scales"))
    return edits


# --- executing edits ----------------------------------------------------------------

def _factors(edit: Edit, tensor):
    """(row factor (G, rows) or None, column factor (G, cols) or None) of an edit."""
    groups, rows, _ = _raw(tensor).shape
    f = np.asarray(edit.step.factor, dtype=np.float64)
    f = f if f.ndim == 2 else f[None]
    is_bias = tensor.name.endswith(".bias")
    n_rows = _cols(tensor) if is_bias else rows
    if edit.step.axis == "columns":
        if f.shape[-1] != _cols(tensor) or f.shape[0] not in (1, groups):
            raise ExportError(f"gain of {edit.step.target} has {f.shape[-1]} inputs, {tensor.name} has {_cols(tensor)} columns")
        return None, np.broadcast_to(f, (groups, f.shape[-1]))
    idx = np.arange(n_rows) if edit.step.rows is None else np.asarray(edit.step.rows)
    if f.shape[-1] != len(idx) or idx.max() >= n_rows or f.shape[0] not in (1, groups):
        raise ExportError(f"gain of {edit.step.target} ({f.shape[-1]}) does not fit the rows of {tensor.name} ({n_rows})")
    full = np.ones((groups, n_rows))
    full[:, idx] = f
    return full, None


def _scaled(values: np.ndarray, groups_idx, rows_idx, row_f, col_f) -> np.ndarray:
    """values (k, cols) of rows (groups_idx, rows_idx), times the edit's factors."""
    if row_f is not None:
        return values * row_f[groups_idx, rows_idx][:, None]
    return values * col_f[groups_idx]


def apply_edit(edit: Edit, tensor) -> None:
    """Apply an in-place edit ("scales" or "requant") to a writable tensor view."""
    raw = _raw(tensor)
    qtype = tensor.tensor_type
    row_f, col_f = _factors(edit, tensor)
    if tensor.name.endswith(".bias"):
        Q.scale_columns_exact(raw, qtype, row_f)
    elif edit.how == "scales" and row_f is not None:
        Q.scale_rows(raw, qtype, row_f)
    elif edit.how == "scales":
        Q.scale_columns_exact(raw, qtype, col_f)
    elif edit.how == "requant":
        raw[...] = _rescaled_bytes(raw, qtype, row_f, col_f, qtype).reshape(raw.shape)
    else:
        raise AssertionError(edit.how)


def _rescaled_bytes(raw, qtype, row_f, col_f, new_type) -> np.ndarray:
    groups, rows, _ = raw.shape
    values = Q.dequantize(raw.reshape(groups * rows, -1), qtype)
    g, r = np.divmod(np.arange(groups * rows), rows)
    return Q.quantize(_scaled(values, g, r, row_f, col_f), new_type)


def converted_bytes(edit: Edit, tensor) -> np.ndarray:
    """The tensor's new bytes for an "f16"/"q8_0" edit."""
    row_f, col_f = _factors(edit, tensor)
    return _rescaled_bytes(_raw(tensor), tensor.tensor_type, row_f, col_f, CONVERT_TYPES[edit.how])


def _release(reader: GGUFFile, tensor) -> None:
    """Unmap a tensor's pages from this process (keeps RSS small on big files). On a
    shared file mapping, modified pages stay in the page cache and are written back."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)


def _norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.square(x, dtype=np.float64).sum()))  # no BLAS threads


def measure(src: GGUFFile, out: GGUFFile, edits, check_rows: int = CHECK_ROWS) -> list:
    """Per edited tensor: relative error of its new values against ``s * dequantize(old)``
    on up to ``check_rows`` evenly spaced rows (gguf-py's dequantizer, independently)."""
    old, new = src.by_name, out.by_name
    report = []
    for name in dict.fromkeys(e.tensor for e in edits):
        mine = [e for e in edits if e.tensor == name]
        a, b = old[name], new[name]
        ra, rb = _raw(a), _raw(b)
        groups, rows, _ = ra.shape
        is_bias = name.endswith(".bias")
        if is_bias:
            values = Q.dequantize(ra.reshape(groups, -1), a.tensor_type)
            got = Q.dequantize(rb.reshape(groups, -1), b.tensor_type)
            expected = values
            for e in mine:
                expected = expected * _factors(e, a)[0]
        else:
            flat = np.unique(np.linspace(0, groups * rows - 1, min(check_rows, groups * rows)).astype(int))
            g, r = np.divmod(flat, rows)
            expected = Q.dequantize(ra.reshape(groups * rows, -1)[flat], a.tensor_type)
            for e in mine:
                expected = _scaled(expected, g, r, *_factors(e, a))
            got = Q.dequantize(rb.reshape(groups * rows, -1)[flat], b.tensor_type)
        err = _norm(got - expected) / (_norm(expected) + 1e-30)
        _release(src, a)
        _release(out, b)
        report.append({
            "tensor": name,
            "type": a.tensor_type.name if a.tensor_type == b.tensor_type else f"{a.tensor_type.name}->{b.tensor_type.name}",
            "axis": mine[0].step.axis,
            "how": mine[0].how,
            "targets": [e.step.target for e in mine],
            "rel_err": err,
        })
    return report


# --- rewriting the file (type changes, metadata) ------------------------------------

def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return _u64(len(b)) + b


def encode_kv(key: str, value) -> bytes:
    """One GGUF key/value record (string, bool, or list of strings)."""
    if isinstance(value, bool):
        body = _u32(GGUFValueType.BOOL) + struct.pack("<?", value)
    elif isinstance(value, str):
        body = _u32(GGUFValueType.STRING) + _gguf_str(value)
    else:
        body = _u32(GGUFValueType.ARRAY) + _u32(GGUFValueType.STRING) + _u64(len(value))
        body += b"".join(_gguf_str(v) for v in value)
    return _gguf_str(key) + body


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def rewrite(reader: GGUFFile, path, replace: dict, drop=lambda key: False, add_kv=()) -> None:
    """Write ``reader``'s file to ``path`` with some tensors replaced and some metadata
    dropped / added; everything else is copied byte for byte.

    replace: ``{tensor name: (new ggml type, function returning the new bytes)}``, each
    called once, in file order (one tensor in memory at a time).
    """
    kept = [f for f in reader.fields.values() if not drop(f.name)]
    mem = reader.data
    types = {t.name: replace[t.name][0] if t.name in replace else t.tensor_type for t in reader.tensors}
    offsets, off = {}, 0
    for t in reader.tensors:
        block, size = GGML_QUANT_SIZES[types[t.name]]
        offsets[t.name] = off
        off = _align(off + t.n_elements // block * size, reader.alignment)
    with open(path, "wb") as f:
        f.write(bytes(mem[:8]))  # magic, version
        f.write(_u64(len(reader.tensors)) + _u64(len(kept) + len(add_kv)))
        for field in kept:
            f.write(bytes(mem[field.offset:field.end]))
        for record in add_kv:
            f.write(record)
        for t in reader.tensors:
            f.write(_gguf_str(t.name) + _u32(len(t.shape)) + b"".join(_u64(d) for d in t.shape))
            f.write(_u32(types[t.name]) + _u64(offsets[t.name]))
        start = _align(f.tell(), reader.alignment)
        for t in reader.tensors:
            f.write(b"\0" * (start + offsets[t.name] - f.tell()))
            if t.name in replace:
                f.write(np.ascontiguousarray(replace[t.name][1]()).tobytes())
            else:
                f.write(memoryview(mem[t.data_offset:t.data_offset + t.n_bytes]))
                _release(reader, t)
        f.write(b"\0" * (_align(f.tell() - start, reader.alignment) + start - f.tell()))


def provenance(config: dict, stored: dict, edits, fallback: str) -> list:
    """The ``gain_mlx.*`` metadata records that ``--metadata`` adds."""
    h = hashlib.sha256()
    for k in sorted(stored):
        h.update(k.encode() + np.ascontiguousarray(stored[k], dtype="<f4").tobytes())
    return [
        encode_kv(META_PREFIX + "variant", str(config.get("variant"))),
        encode_kv(META_PREFIX + "tie_kv", bool(config.get("tie_kv"))),
        encode_kv(META_PREFIX + "targets", [t["path"] for t in config["targets"]]),
        encode_kv(META_PREFIX + "gains_sha256", h.hexdigest()),
        encode_kv(META_PREFIX + "fallback", fallback),
        encode_kv(META_PREFIX + "fold", [f"{e.tensor} {e.step.axis} {e.how}" for e in edits]),
    ]


# --- the export ---------------------------------------------------------------------

def _open(path) -> GGUFFile:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"GGUF file not found: {path}")
    try:
        reader = GGUFFile(path, "r")
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not a readable GGUF file ({e})") from None
    if not reader.tensors:
        raise ExportError(f"{path} holds no tensors")
    return reader


def _check_paths(gguf_path: Path, out_path: Path, force: bool) -> None:
    if not gguf_path.is_file():
        raise ExportError(f"GGUF file not found: {gguf_path}")
    if out_path.exists() and os.path.samefile(gguf_path, out_path):
        raise ExportError(f"--out {out_path} is the input GGUF; the input is never modified, pick another path")
    if out_path.exists() and not force:
        raise ExportError(f"{out_path} already exists; pass --force to overwrite it")
    if not out_path.parent.is_dir():
        raise ExportError(f"output folder {out_path.parent} does not exist")


def format_report(report: list) -> str:
    """The plan as executed: one line per edited tensor, then a summary."""
    lines = [f"{'tensor':28s} {'type':10s} {'axis':8s} {'how':8s} {'rel.err':>8s}  gain of"]
    for r in report:
        lines.append(
            f"{r['tensor']:28s} {r['type']:10s} {r['axis']:8s} {r['how']:8s} {r['rel_err']:8.1e}  "
            + ", ".join(r["targets"])
        )
    counts = {}
    for r in report:
        counts[r["how"]] = counts.get(r["how"], 0) + 1
    worst = max((r["rel_err"] for r in report), default=0.0)
    lines.append(
        f"{len(report)} tensors edited ("
        + ", ".join(f"{n} {HOW_WORDS[h]}" for h, n in counts.items())
        + f"); largest relative error vs s * dequantize(original): {worst:.1e}"
    )
    if "requant" in counts:
        lines.append("requantizing adds fresh quantization error: --fallback f16 / q8_0, or "
                     "training with --tie-kv (exact V-row folds), avoid it")
    return "\n".join(lines)


HOW_WORDS = {"scales": "exact (scale fields)", "requant": "requantized", "f16": "rewritten as F16",
             "q8_0": "rewritten as Q8_0"}


def export_gguf(
    gguf_path,
    adapter_path,
    out_path,
    fallback: str = "requant",
    metadata: bool = False,
    force: bool = False,
    check_rows: int = CHECK_ROWS,
    log: Callable[[str], None] = print,
) -> list:
    """Write ``out_path``: the GGUF at ``gguf_path`` with the adapter's gains folded in.

    Returns the per-tensor report (``measure``). Raises ExportError (one line) on bad
    input, leaving nothing behind.
    """
    gguf_path, out_path = Path(gguf_path), Path(out_path)
    if fallback not in FALLBACKS:
        raise ExportError(f"unknown --fallback {fallback!r} (choose from {', '.join(FALLBACKS)})")
    _check_paths(gguf_path, out_path, force)
    try:
        config, stored = read_adapter(adapter_path)
    except AdapterError as e:
        raise ExportError(str(e)) from None
    src = _open(gguf_path)
    if any(k.startswith(META_PREFIX) for k in src.fields):
        log(f"note: {gguf_path} already has {META_PREFIX}* keys: gains were folded into it before; "
            "they are applied again on top")
    table = tensor_name_map(src)
    targets = targets_from_config(config)
    check_fit(src, table, config, targets, adapter_path)
    layout = _layout(src, table, targets)
    edits = plan_edits(src, table, targets, full_gains(targets, stored, layout), layout, fallback)
    tensors = src.by_name
    converted = {e.tensor: e for e in edits if e.how in CONVERT_TYPES}
    add_kv = provenance(config, stored, edits, fallback) if metadata else ()

    tmp = temp_path(out_path)  # .tmp-<pid>-<name>; ones left by killed runs are removed
    try:
        if converted or metadata:
            replace = {
                name: (CONVERT_TYPES[e.how], lambda e=e: converted_bytes(e, tensors[e.tensor]))
                for name, e in converted.items()
            }
            drop = (lambda k: k.startswith(META_PREFIX)) if metadata else (lambda k: False)
            rewrite(src, tmp, replace, drop=drop, add_kv=add_kv)
        else:
            shutil.copyfile(gguf_path, tmp)
        out = GGUFFile(tmp, "r+")
        patched = out.by_name
        for e in edits:
            if e.how not in CONVERT_TYPES:
                apply_edit(e, patched[e.tensor])
                _release(out, patched[e.tensor])
        out.data.flush()
        report = measure(src, out, edits, check_rows)
        del out, patched
        os.replace(tmp, out_path)
    except Q.NotExact as e:
        raise ExportError(f"{e}; pass --fallback requant|f16|q8_0") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    log(format_report(report))
    return report
