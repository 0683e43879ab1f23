"""Atomic file writes: write a temporary file beside the target, then rename."""

import os
from pathlib import Path


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path`` in one step.

    A crash leaves ``path`` as it was and no temporary file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
