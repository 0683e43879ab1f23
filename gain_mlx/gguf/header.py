"""A fast GGUF header parser over a numpy memmap (read-only or read-write).

gguf-py's ``GGUFReader`` builds a numpy view for every element of every metadata
array: opening SmolLM2-135M (a 49k-token vocabulary) takes ~10 s against 0.1 s to
copy the file. The export only needs a few scalar keys, the byte span of every
key/value record and the tensor table, so it parses those with ``struct`` and skips
array contents; tensor data are numpy views of the same memmap.
"""

import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from ..errors import UserError

MAX_DIMS = 8

_SCALARS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d", GGUFValueType.BOOL: "?",
}


@dataclass(frozen=True)
class Field:
    name: str
    offset: int  # start of the record (its key)
    end: int  # one past its last byte
    value: object  # scalar, str, list of numbers; None for arrays of strings


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple  # ggml order: shape[0] = ne0, the input dimension
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute
    data: np.ndarray  # raw bytes, a view of the memmap


class GGUFHeaderError(UserError, ValueError):
    """A GGUF file that cannot be parsed: truncated, corrupt or not a GGUF."""


_U64 = struct.Struct("<Q")


class GGUFFile:
    """``fields`` (name -> Field), ``tensors`` (file order of the tensor table),
    ``alignment``, ``tensor_info_offset``, ``data_start`` and ``data`` (the memmap)."""

    def __init__(self, path, mode: str = "r"):
        try:
            self.data = np.memmap(path, mode=mode, dtype=np.uint8)
            self._parse()
        except (struct.error, ValueError, UnicodeDecodeError, KeyError, OverflowError) as e:
            raise GGUFHeaderError(f"{path} is not a valid GGUF file, truncated or corrupt ({e}): "
                                  "re-download or re-create it") from None

    def _parse(self):
        self._buf = memoryview(self.data)
        self._off = 0
        magic, version = self._read("<II")
        if magic != GGUF_MAGIC:
            raise ValueError("GGUF magic invalid")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (little-endian v2/v3 only)")
        n_tensors, n_kv = self._read("<QQ")
        self.fields = {}
        for _ in range(n_kv):
            start = self._off
            name = self._str()
            value = self._value(self._read("<I")[0])
            self.fields[name] = Field(name, start, self._off, value)
        self.tensor_info_offset = self._off
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            (n_dims,) = self._read("<I")
            if n_dims > MAX_DIMS:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = self._read(f"<{n_dims}Q")
            qtype, rel = self._read("<IQ")
            infos.append((name, tuple(dims), GGMLQuantizationType(qtype), rel))
        self.alignment = int(self.value("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        self.data_start = -(-self._off // self.alignment) * self.alignment
        self.tensors = []
        for name, dims, qtype, rel in infos:
            n = int(np.prod(dims))
            block, size = GGML_QUANT_SIZES[qtype]
            start = self.data_start + rel
            if start + n // block * size > len(self.data):
                raise ValueError(f"tensor {name} ends past the end of the file")
            self.tensors.append(Tensor(name, qtype, dims, n, n // block * size, start,
                                       self.data[start:start + n // block * size]))
        self.by_name = {t.name: t for t in self.tensors}
        del self._buf

    def value(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.value

    def _read(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self._buf, self._off)
        self._off += struct.calcsize(fmt)
        return out

    def _str(self) -> str:
        (n,) = self._read("<Q")
        s = bytes(self._buf[self._off:self._off + n]).decode("utf-8")
        self._off += n
        return s

    def _value(self, vtype: int) -> Optional[object]:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self._str()
        if vtype in _SCALARS:
            return self._read("<" + _SCALARS[vtype])[0]
        if vtype != GGUFValueType.ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype}")
        itype, count = self._read("<IQ")
        itype = GGUFValueType(itype)
        if itype in _SCALARS:
            fmt = "<" + _SCALARS[itype]
            width = struct.calcsize(fmt)
            items = np.frombuffer(self._buf, np.dtype(fmt), count, self._off).tolist()
            self._off += width * count
            return items
        if itype == GGUFValueType.STRING:  # e.g. a 262K-token vocabulary: skipped by length alone
            off, end = self._off, len(self._buf)
            for _ in range(count):
                off += 8 + _U64.unpack_from(self._buf, off)[0]
                if off > end:
                    raise ValueError("a string array runs past the end of the header")
            self._off = off
            return None
        for _ in range(count):  # nested arrays: skipped, not kept
            self._value(itype)
        return None


def raw_rows(t) -> np.ndarray:
    """Raw bytes of a tensor as ``(G, rows, row_bytes)``; G = experts (1 if none)."""
    dims = [int(d) for d in t.shape]
    rows = dims[1] if len(dims) > 1 else 1
    groups = int(np.prod(dims[2:])) if len(dims) > 2 else 1
    return t.data.view(np.uint8).reshape(groups, rows, -1)


def n_cols(t) -> int:
    return int(t.shape[0])
