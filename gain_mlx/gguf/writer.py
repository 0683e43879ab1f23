"""Writing GGUF files: key/value records, and a copy of a GGUF with some tensors
replaced and some metadata keys dropped or added, every other byte copied by the kernel
(``copy_file_range``, a reflink where the file system has it). Reading is
``gain_mlx.gguf.header``; what an export changes is decided in ``gain_mlx.gguf.export``.
"""

import errno
import os
import struct

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType

from . import ExportError
from .header import GGUFFile

PAD_KEY = "gain_mlx.pad"
PAGE = 4096  # data keep their offset modulo this: page-aligned copies, reflinks


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


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP,
                   errno.EPERM, errno.EBADF, errno.ETXTBSY}


def _copy_chunk(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int) -> None:
    """Copy bytes between files without passing them through Python where the kernel
    can: copy_file_range (a reflink on btrfs/XFS when block-aligned), then sendfile,
    then plain reads and writes. Each way takes over where the one before stopped."""

    def copy_file_range(done):
        return os.copy_file_range(src_fd, dst_fd, count - done, src_off + done, dst_off + done)

    def sendfile(done):
        os.lseek(dst_fd, dst_off + done, os.SEEK_SET)
        return os.sendfile(dst_fd, src_fd, src_off + done, count - done)

    def read_write(done):
        chunk = os.pread(src_fd, min(count - done, 16 << 20), src_off + done)
        _pwrite_all(dst_fd, chunk, dst_off + done)
        return len(chunk)

    ways = [copy_file_range] if hasattr(os, "copy_file_range") else []
    ways += [sendfile] if hasattr(os, "sendfile") and os.uname().sysname == "Linux" else []
    done = 0
    for copy in ways + [read_write]:
        try:
            while done < count:
                n = copy(done)
                if n == 0:
                    raise ExportError("the input GGUF ended while copying it (truncated while read?)")
                done += n
            return
        except OSError as e:
            if copy is read_write or e.errno not in _NO_KERNEL_COPY:
                raise


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
