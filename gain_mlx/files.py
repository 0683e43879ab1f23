"""Atomic writes: build a temporary beside the target, then rename it into place.

A temporary is named ``.tmp-<pid>-<name>`` beside its target ``<name>``. Errors, Ctrl-C
and SIGTERM (see :mod:`gain_mlx.errors`) remove it; a process killed outright (SIGKILL,
power loss) leaves it behind, and the next write of the same target removes it once
that process is gone. The target itself is always either the previous version or the
complete new one.
"""

import ctypes
import errno
import os
import shutil
from contextlib import contextmanager
from glob import escape
from pathlib import Path

from .errors import UserError

STALE_PREFIXES = (".tmp-", ".old-")


def save_safetensors(path, arrays: dict, metadata=None) -> None:
    """``mx.save_safetensors``, with a failed write (a full disk) as one user error."""
    import mlx.core as mx

    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata)
    except RuntimeError as e:
        raise UserError(f"cannot write {path} ({e}): is the disk full? free space or write elsewhere") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path) -> None:
    """Remove a file or a folder tree; nothing if it is not there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(path) -> None:
    """Clean up after killed (dead) processes that were writing ``path``.

    ``.tmp-<pid>-<name>`` temporaries are removed. ``.old-<pid>-<name>`` is a previous
    output moved aside by a replacement that was killed before its new output arrived:
    it goes back to ``path`` when ``path`` is missing, and is removed otherwise.
    """
    path = Path(path)
    for prefix in STALE_PREFIXES:
        for tmp in path.parent.glob(f"{prefix}*-{escape(path.name)}"):
            pid = tmp.name[len(prefix): -len(path.name) - 1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if prefix == ".old-" and not os.path.lexists(path):
                os.rename(tmp, path)
            else:
                remove(tmp)


def temp_path(path) -> Path:
    """This process's temporary name for ``path`` (after removing dead processes' ones)."""
    path = Path(path)
    remove_stale(path)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path`` in one step.

    An error or interrupt leaves ``path`` as it was and no temporary file behind.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        remove(tmp)


def _libc_swap():
    """The C function that swaps two paths in one step, as ``swap(a, b) -> 0``, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if hasattr(libc, "renameat2"):  # Linux (glibc >= 2.28): RENAME_EXCHANGE
        return lambda a, b: libc.renameat2(-100, a, -100, b, 2)
    if hasattr(libc, "renamex_np"):  # macOS: RENAME_SWAP
        return lambda a, b: libc.renamex_np(a, b, 2)
    return None


def exchange(a, b) -> bool:
    """Swap two existing paths atomically; False where the system cannot."""
    swap = _libc_swap()
    if swap is None:
        return False
    if swap(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: Path, path: Path, replace: bool = False) -> None:
    """Move the finished folder ``tmp`` to ``path``. An existing ``path`` is replaced only
    with ``replace``, in one step where the system can swap folders (``tmp`` then holds the
    previous output); otherwise it is moved aside as ``.old-<pid>-<name>`` first, which
    :func:`remove_stale` puts back if this process is killed in between."""
    tmp, path = Path(tmp), Path(path)
    try:
        os.rename(tmp, path)  # path missing, or an empty folder
        return
    except OSError as e:
        if not replace or e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if exchange(tmp, path):
        return
    old = path.with_name(f".old-{os.getpid()}-{path.name}")
    os.rename(path, old)
    os.rename(tmp, path)
    remove(old)


@contextmanager
def atomic_dir(path, replace: bool = False):
    """Yield an empty temporary folder beside ``path``; when the block ends without an
    error it becomes ``path`` (see :func:`publish_dir`). An error or interrupt removes
    it and leaves ``path`` as it was."""
    path = Path(path)
    tmp = temp_path(path)
    remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, path, replace)
    finally:
        remove(tmp)
