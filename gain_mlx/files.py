"""Atomic file writes: write a temporary file beside the target, then rename."""

import os
from pathlib import Path

from .errors import UserError


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


def remove_stale(path) -> None:
    """Remove ``.tmp-<pid>-<name>`` files beside ``path`` left by killed (dead) processes."""
    path = Path(path)
    for tmp in path.parent.glob(f".tmp-*-{path.name}"):
        pid = tmp.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path`` in one step.

    A crash leaves ``path`` as it was and no temporary file behind.
    """
    path = Path(path)
    remove_stale(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
