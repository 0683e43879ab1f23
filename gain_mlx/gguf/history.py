"""The fold history an export writes into a GGUF (``gain_mlx.*`` keys): which tensor
took which factor, along which axis, by which route, and its type in the base; read
back so that a later export divides the earlier gains out (a domain switch).
"""

import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType

from . import ExportError
from .header import GGUFFile, n_cols, raw_rows
from .writer import encode_kv

META_PREFIX = "gain_mlx."
HISTORY_VERSION = 1
INVERTIBLE = ("scales", "f16")  # routes whose gains a later export can divide out


def axis_len(tensor, axis: str) -> tuple:
    """(G, n): the shape of a full factor of ``tensor`` along ``axis``."""
    groups, rows, _ = raw_rows(tensor).shape
    return (groups, rows) if axis == "rows" else (groups if axis == "columns" else 1, n_cols(tensor))


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
        elif r.factor.shape != axis_len(t, r.axis):
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
