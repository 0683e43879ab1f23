"""Fold an adapter's gains into an existing GGUF file, keeping its quant types.

``gain_mlx.fold.plan_folds`` decides where each gain goes; here every fold step
becomes the edit of one GGUF tensor, by one of these routes:

- ``scales``: exact. The float scale fields of the affected rows change (or the
  elements of a float tensor); nothing else does.
- ``requant``: dequantize, scale the columns, quantize back to the same type (same
  size, in place). Only where gguf-py can quantize that type.
- ``f16`` / ``q8_0``: dequantize, scale, store the tensor in that type. Tensor
  offsets after it are recomputed, every other byte is kept.

``--fallback`` picks the route of a gain that has no exact fold: ``auto`` (default)
takes the least lossy one per tensor (``auto_route``), ``refuse`` stops.

The fold history (``gain_mlx.*`` keys: which tensor took which factor, by which
route, and its type in the base) is written by default. Exporting onto such a file
divides the earlier gains out before folding the new ones in: a deployed GGUF
switches domains without its original base file, exact up to the rounding of the
scale fields (``quants.scale_blocks(undo=...)`` recovers the base fields bit for
bit where the earlier fold was invertible).

The output is the input copied by the kernel (``copy_file_range``, reflink where the
file system has it; the header is rewritten when keys change), patched in place
through a read-write memmap one tensor at a time, checked on a sample of rows against
gguf-py's dequantizer, and renamed over ``--out`` at the end.
"""

import errno
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType, TensorNameMap

from ..adapter import (
    PROBE_ROWS,
    SIZE_KEYS,
    check_fit,
    probe,
    read_adapter,
    resolve_adapter,
    targets_from_config,
)
from ..errors import UserError
from ..arch import HeadLayout
from ..files import temp_path
from ..layers import expand_tied
from ..provenance import gains_sha256
from ..fold import FoldStep, plan_folds
from . import quants as Q
from .config import ARCHS, GGUF_ARCH
from .header import GGUFFile
from .names import gguf_name, name_table

FALLBACKS = ("auto", "requant", "f16", "q8_0", "refuse")
DEFAULT_FALLBACK = "auto"
CONVERT_TYPES = {"f16": T.F16, "q8_0": T.Q8_0}
INVERTIBLE = ("scales", "f16")  # routes whose gains a later export can divide out
# Row layouts of a producer that llama.cpp's converter keeps in HF order (V rows of a
# fused qkv, up half of a fused gate|up). gpt_neox's per-head qkv is not among them.
GGUF_ROW_LAYOUTS = ("all", "v", "up")
META_PREFIX = "gain_mlx."
HISTORY_VERSION = 1
PAD_KEY = META_PREFIX + "pad"
CHECK_ROWS = 64  # rows per tensor compared against s * dequantize(original)
MAX_EXACT_ERROR = 0.05  # a "scales" edit further off than this is a bug, not rounding
PAGE = 4096  # data keep their offset modulo this: page-aligned copies, reflinks


class ExportError(UserError, ValueError):
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
    return name_table(arch, int(_field(reader, f"{arch}.block_count", 0)))


def gguf_tensor(reader: GGUFFile, table: TensorNameMap, path: str, suffix: str = ".weight"):
    """The GGUF tensor of an mlx-lm module path (``model.layers.3.self_attn.v_proj`` ->
    ``blk.3.attn_v.weight``), or None when the module has no such tensor."""
    name = gguf_name(table, path)
    return None if name is None else reader.by_name.get(name + suffix)


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


def _fingerprint(reader, table, targets, history=None) -> list:
    """``gain_mlx.adapter.fingerprint`` computed from the GGUF's own target weights
    (with gains an earlier export put on a target's columns divided back out)."""
    probes = []
    for t in targets:
        tensor = gguf_tensor(reader, table, t.path)
        raw = _raw(tensor)
        head = Q.dequantize(raw.reshape(-1, raw.shape[-1])[:PROBE_ROWS], tensor.tensor_type)
        record = (history or {}).get(tensor.name)
        if record is not None:
            g, r = np.divmod(np.arange(len(head)), raw.shape[1])
            head = head / _spread(record.axis, record.factor, g, r)
        probes.extend(probe(head))
    return probes


def check_gguf_fit(reader, table, config: dict, targets, adapter_path, history=None) -> None:
    """Raise ExportError unless the adapter was trained on the model in this GGUF
    (``adapter.check_fit`` with the GGUF's type, sizes, tensors and weights)."""
    arch = _field(reader, "general.architecture")
    mt = config.get("model_type")
    sizes = {key: (_field(reader, f"{arch}.{name}"), f"{arch}.{name}") for key, (_, name) in SIZE_KEYS.items()}
    check_fit({**config, "model_type": GGUF_ARCH.get(mt, mt)}, f"adapter {adapter_path}", "the GGUF", arch, sizes,
              [t.path for t in targets if gguf_tensor(reader, table, t.path) is None],
              lambda: _fingerprint(reader, table, targets, history),
              "pass the GGUF of the base it was trained on", error=ExportError)


def full_gains(config_targets, stored: dict, layout: Optional[HeadLayout]) -> dict:
    """Stored gains -> gains as applied to the target inputs (KV-tied ones expanded)."""
    gains = {}
    for t in config_targets:
        if t.path not in stored:
            raise ExportError(f"the adapter has no gain for {t.path}: re-save the adapter")
        g = np.asarray(stored[t.path], dtype=np.float32)
        gains[t.path] = expand_tied(g, layout.n_heads // layout.n_kv_heads) if t.tied else g
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


def auto_route(tensor) -> str:
    """``--fallback auto``: the route of a gain with no exact fold into this tensor.

    Requantizing a 2-6 bit type after scaling its columns re-rounds every weight:
    it adds about as much error again as the original quantization (Q4_0/Q4_1 8e-2,
    Q5_x 4e-2 relative with U(0.6, 1.4) gains, 2-3e-2 even with gains within 3% of
    one), against 5e-3 for storing that one tensor as Q8_0. So Q8_0 tensors are
    requantized (same size, same error as converting), every other type is rewritten
    as Q8_0, and F16 where the rows do not split into Q8_0's 32-column blocks.
    """
    if tensor.tensor_type == T.Q8_0:
        return "requant"
    if _cols(tensor) % GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return "q8_0"
    return "f16"


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
            "retrain with --tie-kv, or pass --fallback auto|requant|f16|q8_0"
        )
    if fallback == "auto":
        return auto_route(tensor)
    if fallback == "requant" and not Q.can_quantize(qtype):
        raise ExportError(
            f"{why} and gguf-py cannot quantize {qtype.name} to requantize it; "
            "pass --fallback auto, f16 or q8_0, or retrain with --tie-kv"
        )
    if fallback == "q8_0" and _cols(tensor) % GGML_QUANT_SIZES[T.Q8_0][0]:
        raise ExportError(f"{tensor.name}: {_cols(tensor)} columns do not fit Q8_0 blocks; pass --fallback f16")
    return fallback


def plan_edits(reader, table, targets, gains, layout, fallback: str, base_types=None) -> list:
    """The fold plan as GGUF tensor edits (producer biases included).

    ``base_types``: ``{tensor name: ggml type in the original base}`` for tensors an
    earlier export converted; the plan is made as for the base (where a gain goes must
    not depend on the history), the route on the tensor as it is now.
    """
    base_types = base_types or {}

    def is_quantized(path):
        tensor = gguf_tensor(reader, table, path)
        return base_types.get(tensor.name, tensor.tensor_type) not in Q.FLOAT_TYPES

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


# --- per-tensor operations: the new gains, the old ones divided out ------------------

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


def _axis_len(tensor, axis: str) -> tuple:
    """(G, n): the shape of a full factor of ``tensor`` along ``axis``."""
    groups, rows, _ = _raw(tensor).shape
    return (groups, rows) if axis == "rows" else (groups if axis == "columns" else 1, _cols(tensor))


@dataclass
class Op:
    """Everything this export does to one tensor.

    ``new``: the factor folded in now, ``old``: the factor an earlier export folded in,
    divided out first (both full ``(G, n)`` along ``axis``, or None). ``axis``: "rows",
    "columns", or "elements" (a 1-D bias). ``base_type``: the tensor's type in the
    original base (the file's history), kept across switches.
    """

    tensor: str
    axis: str
    how: str
    new: Optional[np.ndarray] = None
    old: Optional[np.ndarray] = None
    targets: tuple = ()
    base_type: str = ""

    def ratio(self) -> np.ndarray:
        new = self.new if self.new is not None else np.ones_like(self.old)
        return new if self.old is None else new / self.old


def build_ops(edits, tensors, history: Optional[dict] = None) -> dict:
    """``{tensor name: Op}`` from the fold plan's edits and the file's fold history."""
    ops = {}
    for e in edits:
        t = tensors[e.tensor]
        row_f, col_f = _factors(e, t)
        axis = "elements" if t.name.endswith(".bias") else e.step.axis
        f = row_f if row_f is not None else col_f
        op = ops.get(e.tensor)
        if op is None:
            ops[e.tensor] = Op(e.tensor, axis, e.how, np.array(f, dtype=np.float64), None, (e.step.target,),
                               t.tensor_type.name)
        elif op.axis == axis and op.how == e.how:
            op.new = op.new * f
            op.targets += (e.step.target,)
        else:
            raise ExportError(f"{e.tensor}: two gains fold into it along different axes or routes")
    for name, record in (history or {}).items():
        op = ops.get(name)
        if op is None:
            ops[name] = Op(name, record.axis, "scales", None, record.factor, (), record.base_type)
        elif op.axis != record.axis:
            raise ExportError(
                f"{name}: the earlier export folded gains into its {record.axis}, this one needs its "
                f"{op.axis}; export from the original base GGUF"
            )
        else:
            op.old, op.base_type = record.factor, record.base_type
    return ops


def _spread(axis: str, factor: np.ndarray, groups_idx, rows_idx) -> np.ndarray:
    """A full factor as a multiplier of values ``(k, cols)`` of rows ``(groups_idx, rows_idx)``."""
    if axis == "rows":
        return factor[groups_idx, rows_idx][:, None]
    return factor[groups_idx if factor.shape[0] > 1 else np.zeros_like(groups_idx)]


def apply_op(op: Op, tensor) -> None:
    """Apply an in-place op ("scales" or "requant") to a writable tensor view."""
    raw = _raw(tensor)
    qtype = tensor.tensor_type
    new = op.new if op.new is not None else np.ones_like(op.old)
    if op.how == "scales" and op.axis == "rows":
        Q.scale_rows(raw, qtype, new, op.old)
    elif op.how == "scales":
        Q.scale_columns_exact(raw, qtype, new, op.old)
    elif op.how == "requant":
        raw[...] = _rescaled_bytes(raw, qtype, op, qtype).reshape(raw.shape)
    else:
        raise AssertionError(op.how)


def _rescaled_bytes(raw, qtype, op: Op, new_type) -> np.ndarray:
    groups, rows, _ = raw.shape
    values = Q.dequantize(raw.reshape(groups * rows, -1), qtype)
    g, r = np.divmod(np.arange(groups * rows), rows)
    values = values * _spread(op.axis, op.ratio().astype(np.float32), g, r)  # never in place: may be a view
    return Q.quantize(values, new_type)


def converted_bytes(op: Op, tensor) -> np.ndarray:
    """The tensor's new bytes for an "f16"/"q8_0" op."""
    return _rescaled_bytes(_raw(tensor), tensor.tensor_type, op, CONVERT_TYPES[op.how])


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


def measure(src: GGUFFile, out: GGUFFile, ops: dict, check_rows: int = CHECK_ROWS) -> list:
    """Per edited tensor: relative error of its new values against ``ratio *
    dequantize(old)`` (ratio = new gains / gains divided out) on up to ``check_rows``
    evenly spaced rows, with gguf-py's dequantizer, independently of the edit code.
    ``check_rows=0``: no check (``rel_err`` None)."""
    report = []
    for name, op in ops.items():
        a, b = src.by_name[name], out.by_name[name]
        err = None
        if check_rows > 0:
            ra, rb = _raw(a), _raw(b)
            groups, rows, _ = ra.shape
            if op.axis == "elements":
                flat = np.arange(groups * rows)
            else:
                flat = np.unique(np.linspace(0, groups * rows - 1, min(check_rows, groups * rows)).astype(int))
            g, r = np.divmod(flat, rows)
            expected = Q.dequantize(ra.reshape(groups * rows, -1)[flat], a.tensor_type)
            expected = expected * _spread(op.axis, op.ratio(), g, r)
            got = Q.dequantize(rb.reshape(groups * rows, -1)[flat], b.tensor_type)
            err = _norm(got - expected) / (_norm(expected) + 1e-30)
            _release(src, a)
            _release(out, b)
        report.append({
            "tensor": name,
            "type": a.tensor_type.name if a.tensor_type == b.tensor_type else f"{a.tensor_type.name}->{b.tensor_type.name}",
            "axis": op.axis,
            "how": op.how,
            "targets": list(op.targets),
            "undo": op.old is not None,
            "rel_err": err,
            "bytes": b.n_bytes - a.n_bytes,
        })
    return report


# --- GGUF key/value records ---------------------------------------------------------

def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return _u64(len(b)) + b


def encode_kv(key: str, value) -> bytes:
    """One GGUF key/value record: string, bool, uint32, list of strings, or a float32
    numpy array."""
    if isinstance(value, bool):
        body = _u32(GGUFValueType.BOOL) + struct.pack("<?", value)
    elif isinstance(value, int):
        body = _u32(GGUFValueType.UINT32) + _u32(value)
    elif isinstance(value, str):
        body = _u32(GGUFValueType.STRING) + _gguf_str(value)
    elif isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value, dtype="<f4").reshape(-1)
        body = _u32(GGUFValueType.ARRAY) + _u32(GGUFValueType.FLOAT32) + _u64(len(data)) + data.tobytes()
    else:
        body = _u32(GGUFValueType.ARRAY) + _u32(GGUFValueType.STRING) + _u64(len(value))
        body += b"".join(_gguf_str(v) for v in value)
    return _gguf_str(key) + body


def _array_field(reader: GGUFFile, key: str, item_type):
    """(count, payload offset into the record's bytes, record bytes) of an array key of
    ``item_type``; the fast header parser keeps neither string arrays nor numpy views."""
    f = reader.fields.get(key)
    if f is None:
        return None
    buf = bytes(reader.data[f.offset:f.end])
    (n,) = struct.unpack_from("<Q", buf, 0)
    vtype, itype, count = struct.unpack_from("<IIQ", buf, 8 + n)
    if vtype != GGUFValueType.ARRAY or itype != item_type:
        raise ExportError(f"GGUF key {key} has an unexpected type")
    return count, 8 + n + 16, buf


def string_array(reader: GGUFFile, key: str) -> Optional[list]:
    found = _array_field(reader, key, GGUFValueType.STRING)
    if found is None:
        return None
    count, off, buf = found
    out = []
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", buf, off)
        out.append(buf[off + 8:off + 8 + n].decode("utf-8"))
        off += 8 + n
    return out


def f32_array(reader: GGUFFile, key: str) -> Optional[np.ndarray]:
    found = _array_field(reader, key, GGUFValueType.FLOAT32)
    if found is None:
        return None
    count, off, buf = found
    return np.frombuffer(buf, "<f4", count, off)


# --- the fold history ---------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """What an earlier export did to one tensor: ``factor`` (G, n) along ``axis``, by
    ``how``; ``base_type``: the tensor's ggml type in the original base."""

    tensor: str
    axis: str
    how: str
    base_type: str
    factor: np.ndarray


def read_history(reader: GGUFFile, path) -> Optional[dict]:
    """``{tensor: Record}`` of a file exported earlier, None for a file without
    ``gain_mlx.*`` keys (a base). Raises ExportError when the history is unknown or
    does not fit the file, and when an earlier route cannot be undone."""
    if not any(k.startswith(META_PREFIX) for k in reader.fields):
        return None
    version = reader.value(META_PREFIX + "history_version")
    if version is None:
        raise ExportError(
            f"{path} has {META_PREFIX}* keys but no fold history (written by an older gain_mlx or "
            "edited by hand): its gains cannot be divided out; export from the original base GGUF"
        )
    if version != HISTORY_VERSION:
        raise ExportError(
            f"{path}: fold history version {version} is unknown to this gain_mlx "
            f"(reads {HISTORY_VERSION}); upgrade gain_mlx, or export from the original base GGUF"
        )
    lines, factors = string_array(reader, META_PREFIX + "edits"), f32_array(reader, META_PREFIX + "factors")
    if lines is None or factors is None:
        raise ExportError(f"{path}: the fold history is incomplete; export from the original base GGUF")
    history, off = {}, 0
    for line in lines:
        try:
            name, axis, how, base_type, g, n = line.split()
            g, n = int(g), int(n)
        except ValueError:
            raise ExportError(f"{path}: unreadable fold history entry {line!r}; export from the original base GGUF") from None
        factor = np.asarray(factors[off:off + g * n], dtype=np.float64).reshape(g, n)
        off += g * n
        history[name] = Record(name, axis, how, base_type, factor)
    if off != len(factors):
        raise ExportError(f"{path}: the fold history does not add up; export from the original base GGUF")
    _check_history(reader, path, history)
    return history


def _check_history(reader, path, history: dict) -> None:
    for r in history.values():
        t = reader.by_name.get(r.tensor)
        why = None
        if t is None:
            why = "is not in the file"
        elif r.how not in INVERTIBLE:
            what = {"q8_0": "rewritten as Q8_0", "requant": f"requantized to {r.base_type}"}.get(r.how, r.how)
            raise ExportError(
                f"{path}: {r.tensor} was {what} when its gains were folded in (--fallback {r.how}); that "
                "cannot be divided back out: export from the original base GGUF (with --fallback f16, or an "
                "adapter trained with --tie-kv, the result can switch domains later)"
            )
        elif r.base_type not in T.__members__ or r.axis not in ("rows", "columns", "elements"):
            why = f"has an unknown type or axis ({r.base_type} {r.axis})"
        elif (r.how == "scales" and t.tensor_type.name != r.base_type) or (r.how == "f16" and t.tensor_type != T.F16):
            why = f"is {t.tensor_type.name}, its history says {r.base_type} ({r.how})"
        elif r.factor.shape != _axis_len(t, r.axis):
            why = f"does not fit its recorded factor {r.factor.shape}"
        elif not (np.all(np.isfinite(r.factor)) and np.all(r.factor != 0)):
            why = "has a recorded factor that is zero or not finite"
        if why:
            raise ExportError(
                f"{path}: fold history does not match the file: {r.tensor} {why} "
                "(changed after its export?); export from the original base GGUF"
            )


def new_history(ops: dict, src_tensors) -> list:
    """Records of the output: per op, the factor folded in now and the route by which
    the tensor differs from the base. A tensor back to its base state is dropped."""
    out = []
    for name, op in ops.items():
        how = op.how
        if how == "scales" and src_tensors[name].tensor_type.name != op.base_type:
            how = "f16"  # converted by an earlier export and still F16
        if how == "scales" and op.new is None:
            continue
        factor = op.new if op.new is not None else np.ones_like(op.old)
        out.append(Record(name, op.axis, how, op.base_type, factor))
    return out


def provenance(config: dict, sha: str, ops: dict, src_tensors, fallback: str,
               adapter_name: str = "", folds: int = 1) -> list:
    """The ``gain_mlx.*`` records an export writes (unless ``--no-metadata``): what was
    folded in (``sha``: ``provenance.gains_sha256`` of the adapter, as fuse records it),
    and the fold history that lets a later export divide it out."""
    records = new_history(ops, src_tensors)
    factors = np.concatenate([r.factor.reshape(-1) for r in records]) if records else np.zeros(0)
    return [
        encode_kv(META_PREFIX + "variant", str(config.get("variant"))),
        encode_kv(META_PREFIX + "tie_kv", bool(config.get("tie_kv"))),
        encode_kv(META_PREFIX + "targets", [t["path"] for t in config["targets"]]),
        encode_kv(META_PREFIX + "gains_sha256", sha),
        encode_kv(META_PREFIX + "adapter", adapter_name),
        encode_kv(META_PREFIX + "fallback", fallback),
        encode_kv(META_PREFIX + "folds", int(folds)),
        encode_kv(META_PREFIX + "fold", [f"{op.tensor} {op.axis} {op.how}" for op in ops.values() if op.new is not None]),
        encode_kv(META_PREFIX + "history_version", HISTORY_VERSION),
        encode_kv(META_PREFIX + "edits", [
            f"{r.tensor} {r.axis} {r.how} {r.base_type} {r.factor.shape[0]} {r.factor.shape[1]}" for r in records
        ]),
        encode_kv(META_PREFIX + "factors", factors),
    ]


# --- writing the file ---------------------------------------------------------------

_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP,
                   errno.EPERM, errno.EBADF, errno.ETXTBSY}


def _copy_chunk(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int) -> None:
    """Copy bytes between files without passing them through Python where the kernel
    can: copy_file_range (a reflink on btrfs/XFS when block-aligned), then sendfile,
    then plain reads and writes."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < count:
                n = os.copy_file_range(src_fd, dst_fd, count - done, src_off + done, dst_off + done)
                if n == 0:
                    raise ExportError("the input GGUF ended while copying it (truncated while read?)")
                done += n
            return
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
    if hasattr(os, "sendfile") and os.uname().sysname == "Linux":
        try:
            os.lseek(dst_fd, dst_off + done, os.SEEK_SET)
            while done < count:
                n = os.sendfile(dst_fd, src_fd, src_off + done, count - done)
                if n == 0:
                    raise ExportError("the input GGUF ended while copying it (truncated while read?)")
                done += n
            return
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
    while done < count:
        chunk = os.pread(src_fd, min(count - done, 16 << 20), src_off + done)
        if not chunk:
            raise ExportError("the input GGUF ended while copying it (truncated while read?)")
        _pwrite_all(dst_fd, chunk, dst_off + done)
        done += len(chunk)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int) -> None:
    """``_copy_chunk``, split at the first page boundary when source and destination are
    congruent modulo the page size, so that the rest is block-aligned (reflinkable)."""
    head = min(count, (-src_off) % PAGE) if (src_off - dst_off) % PAGE == 0 else 0
    if head:
        _copy_chunk(src_fd, dst_fd, src_off, dst_off, head)
    if count - head:
        _copy_chunk(src_fd, dst_fd, src_off + head, dst_off + head, count - head)


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _pad_record(header_len: int, want_mod: int, alignment: int) -> bytes:
    """A ``gain_mlx.pad`` string record that makes the data section start at an offset
    congruent to ``want_mod`` modulo PAGE (empty when the alignment does not allow it)."""
    if PAGE % alignment or want_mod % alignment:
        return b""
    empty = len(encode_kv(PAD_KEY, ""))
    start = header_len + empty
    target = start + (want_mod - start) % PAGE
    return encode_kv(PAD_KEY, " " * (target - start))


def rewrite(reader: GGUFFile, path, replace: dict, drop=lambda key: False, add_kv=()) -> None:
    """Write ``reader``'s file to ``path`` with some tensors replaced and some metadata
    dropped / added; everything else is copied byte for byte (by the kernel).

    replace: ``{tensor name: (new ggml type, function returning the new bytes)}``, each
    called once, in file order (one tensor in memory at a time). With ``add_kv``, a
    padding key keeps the data section's offset modulo the page size.
    """
    src_path = reader.data.filename
    kept = [f for f in reader.fields.values() if not drop(f.name) and f.name != PAD_KEY]
    unchanged = not replace and not add_kv and len(kept) == len(reader.fields)
    mem = reader.data
    types = {t.name: replace[t.name][0] if t.name in replace else t.tensor_type for t in reader.tensors}
    offsets, off = {}, 0
    for t in reader.tensors:
        block, size = GGML_QUANT_SIZES[types[t.name]]
        offsets[t.name] = off
        off = _align(off + t.n_elements // block * size, reader.alignment)
    data_len = off
    records = [bytes(mem[f.offset:f.end]) for f in kept] + list(add_kv)
    infos = b"".join(
        _gguf_str(t.name) + _u32(len(t.shape)) + b"".join(_u64(d) for d in t.shape)
        + _u32(types[t.name]) + _u64(offsets[t.name])
        for t in reader.tensors
    )

    def header(records):
        return bytes(mem[:8]) + _u64(len(reader.tensors)) + _u64(len(records)) + b"".join(records) + infos

    if add_kv:
        pad = _pad_record(len(header(records)), reader.data_start % PAGE, reader.alignment)
        if pad:
            records.append(pad)
    head = header(records)
    start = _align(len(head), reader.alignment)
    src_size = len(mem)
    with open(src_path, "rb") as fin, open(path, "wb") as fout:
        src_fd, dst_fd = fin.fileno(), fout.fileno()
        if unchanged:  # the whole file, header included
            copy_range(src_fd, dst_fd, 0, 0, src_size)
            return
        os.pwrite(dst_fd, head + b"\0" * (start - len(head)), 0)
        if not replace:  # one shift for the whole data section, to the end of the file
            copy_range(src_fd, dst_fd, reader.data_start, start, src_size - reader.data_start)
            return
        # runs of tensors that keep their relative place are copied in one call each
        run = None  # (source offset, destination offset, length)
        for t in reader.tensors:
            dst = start + offsets[t.name]
            if t.name in replace:
                if run:
                    copy_range(src_fd, dst_fd, *run)
                    run = None
                _pwrite_all(dst_fd, np.ascontiguousarray(replace[t.name][1]()).reshape(-1), dst)
                continue
            if run and t.data_offset - run[0] == dst - run[1]:  # same shift: one copy
                run = (run[0], run[1], t.data_offset + t.n_bytes - run[0])
            else:
                if run:
                    copy_range(src_fd, dst_fd, *run)
                run = (t.data_offset, dst, t.n_bytes)
        if run:
            copy_range(src_fd, dst_fd, *run)
        fout.truncate(start + data_len)


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


HOW_WORDS = {"scales": "exact (scale fields)", "requant": "requantized", "f16": "rewritten as F16",
             "q8_0": "rewritten as Q8_0"}


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB" if abs(n) >= 2**10 else f"{n} B"


def format_report(report: list, sizes: Optional[tuple] = None) -> str:
    """The plan as executed: one line per edited tensor, then a summary of the routes,
    the largest error and (``sizes`` = input, output bytes) the file-size change."""
    lines = [f"{'tensor':28s} {'type':12s} {'axis':8s} {'how':8s} {'rel.err':>8s}  gain of"]
    for r in report:
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:8.1e}"
        gains = ", ".join(r["targets"]) or "(earlier gains divided out)"
        lines.append(f"{r['tensor']:28s} {r['type']:12s} {r['axis']:8s} {r['how']:8s} {err:>8s}  {gains}")
    counts = {}
    for r in report:
        counts[r["how"]] = counts.get(r["how"], 0) + 1
    checked = [r["rel_err"] for r in report if r["rel_err"] is not None]
    summary = f"{len(report)} tensors edited (" + ", ".join(f"{n} {HOW_WORDS[h]}" for h, n in counts.items()) + ")"
    if checked:
        summary += f"; largest relative error vs s * dequantize(original): {max(checked):.1e}"
    lines.append(summary)
    for how in ("requant", "q8_0", "f16"):
        rows = [r for r in report if r["how"] == how]
        if rows:
            worst = max((r["rel_err"] for r in rows if r["rel_err"] is not None), default=float("nan"))
            lines.append(
                f"{HOW_WORDS[how]}: {len(rows)} tensors with no exact fold, up to {worst:.1e} relative error, "
                f"{_size(sum(r['bytes'] for r in rows)):s} more; an adapter trained with --tie-kv "
                "(the default on GQA GGUF / quantized bases) folds exactly"
            )
    if sizes:
        before, after = sizes
        tensors = sum(r["bytes"] for r in report)
        lines.append(
            f"file size {_size(before)} -> {_size(after)} ({after - before:+,d} bytes: tensors {tensors:+,d}, "
            f"header {after - before - tensors:+,d})"
        )
    return "\n".join(lines)


class _Reroute(Exception):
    """A scale field would overflow: under --fallback auto, send this tensor another way."""

    def __init__(self, tensor: str, why: str):
        super().__init__(why)
        self.tensor = tensor


def export_gguf(
    gguf_path,
    adapter_path,
    out_path,
    fallback: str = DEFAULT_FALLBACK,
    metadata: bool = True,
    force: bool = False,
    check_rows: int = CHECK_ROWS,
    log: Callable[[str], None] = print,
    fsync: bool = False,
) -> list:
    """Write ``out_path``: the GGUF at ``gguf_path`` with the adapter's gains folded in.

    A ``gguf_path`` exported earlier (with its fold history) is switched: its gains are
    divided out first. ``metadata``: write the fold history (needed to switch again).
    ``check_rows``: rows per tensor verified after patching (0: none). ``fsync``: flush
    the output to disk before the rename. Returns the per-tensor report (``measure``).
    Raises ExportError (one line) on bad input, leaving nothing behind and an existing
    ``out_path`` untouched.
    """
    gguf_path, out_path = Path(gguf_path), Path(out_path)
    if fallback not in FALLBACKS:
        raise ExportError(f"unknown --fallback {fallback!r} (choose from {', '.join(FALLBACKS)})")
    if check_rows < 0:
        raise ExportError(f"--check-rows must be >= 0, not {check_rows}")
    _check_paths(gguf_path, out_path, force)
    adapter_path = resolve_adapter(adapter_path)
    config, stored = read_adapter(adapter_path)
    src = _open(gguf_path)
    history = read_history(src, gguf_path)
    table = tensor_name_map(src)
    targets = targets_from_config(config)
    check_gguf_fit(src, table, config, targets, adapter_path, history)
    layout = _layout(src, table, targets)
    gains = full_gains(targets, stored, layout)
    adapter_name = Path(adapter_path).resolve().name
    if history is not None:
        before = src.value(META_PREFIX + "adapter") or "?"
        folds = int(src.value(META_PREFIX + "folds") or 1)
        log(f"{gguf_path.name} holds the gains of '{before}' (fold {folds} since the base): dividing them out "
            f"and folding in '{adapter_name}'")
    else:
        folds = 0
    base_types = {n: T[r.base_type] for n, r in (history or {}).items()}
    forced = {}
    while True:
        edits = plan_edits(src, table, targets, gains, layout, fallback, base_types)
        edits = [Edit(e.tensor, e.step, forced.get(e.tensor, e.how)) for e in edits]
        ops = build_ops(edits, src.by_name, history)
        try:
            report = _write(src, gguf_path, out_path, ops, config, gains_sha256(adapter_path), fallback, metadata, adapter_name,
                            folds + 1, check_rows, fsync)
            break
        except _Reroute as r:
            if fallback != "auto" or r.tensor in forced:
                raise ExportError(f"{r.tensor}: {r}; pass --fallback auto|f16|q8_0") from None
            forced[r.tensor] = auto_route(src.by_name[r.tensor])
            log(f"note: {r.tensor}: {r}; it is {HOW_WORDS[forced[r.tensor]]} instead")
    if history is not None and not metadata:
        log("note: --no-metadata: the output has no fold history, so it cannot switch domains again")
    log(format_report(report, (gguf_path.stat().st_size, out_path.stat().st_size)))
    return report


def _write(src, gguf_path, out_path, ops, config, sha, fallback, metadata, adapter_name, folds,
           check_rows, fsync) -> list:
    """Write the output to a temp file beside ``out_path``, patch, verify, rename."""
    tensors = src.by_name
    converted = {name: op for name, op in ops.items() if op.how in CONVERT_TYPES}
    add_kv = provenance(config, sha, ops, tensors, fallback, adapter_name, folds) if metadata else ()
    tmp = temp_path(out_path)  # .tmp-<pid>-<name>; ones left by killed runs are removed
    try:
        replace = {
            name: (CONVERT_TYPES[op.how], lambda op=op: converted_bytes(op, tensors[op.tensor]))
            for name, op in converted.items()
        }
        rewrite(src, tmp, replace, drop=lambda k: k.startswith(META_PREFIX), add_kv=add_kv)
        out = GGUFFile(tmp, "r+")
        patched = out.by_name
        for name, op in ops.items():
            if op.how in CONVERT_TYPES:
                continue
            try:
                apply_op(op, patched[name])
            except Q.NotExact as e:
                raise _Reroute(name, str(e)) from None
            _release(out, patched[name])
        report = measure(src, out, ops, check_rows)
        bad = [r for r in report if r["rel_err"] is not None
               and (not np.isfinite(r["rel_err"]) or (r["how"] == "scales" and r["rel_err"] > MAX_EXACT_ERROR))]
        if bad:
            raise ExportError(f"verification failed: {bad[0]['tensor']} is {bad[0]['rel_err']:.1e} off the "
                              "expected values after an exact edit (please report this)")
        if fsync:
            out.data.flush()
        del out, patched
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, out_path)
        if fsync:
            dir_fd = os.open(out_path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as e:
        if e.filename is None:  # the kernel copy names no file: name the output the user asked for
            raise OSError(e.errno, e.strerror, str(out_path)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return report
