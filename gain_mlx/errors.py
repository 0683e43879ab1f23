"""One way for every CLI to fail: a user-error type and the wrapper that prints it.

Code raises :class:`UserError` (or :class:`UsageError`) where it finds the problem, with a
message naming the file or flag and the fix; :func:`cli` wraps each ``main`` so that the
user sees that one line (``error: ...``) and an exit code, never a traceback.
"""

import errno
import functools
import sys


class UserError(Exception):
    """An expected failure caused by the input or the environment: exit code 1."""

    exit_code = 1


class UsageError(UserError):
    """A wrong flag or flag value: exit code 2, as argparse uses."""

    exit_code = 2


def describe_os_error(e: OSError) -> str:
    """One line for an OSError, naming the file and what to do."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC or e.errno == errno.EFBIG:
        return f"no space left writing{where}: free disk space or write elsewhere"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied:{where}: choose a location you can write/read"
    if e.errno == errno.ENOENT:
        return f"not found:{where}"
    if e.errno == errno.EISDIR:
        return f"{where.strip()} is a folder where a file is expected"
    if e.errno == errno.ENOTDIR:
        return f"{where.strip()} is a file where a folder is expected"
    return f"{e.strerror or e}{':' + where if where else ''}"


class Exit(SystemExit):
    """The exit a CLI takes after printing its error line: ``code`` is the exit status,
    ``str()`` the line (so callers and tests can read what the user saw)."""

    def __init__(self, code: int, line: str):
        super().__init__(code)
        self.line = line

    def __str__(self):
        return self.line


def _fail(line: str, code: int = 1):
    print(line, file=sys.stderr)
    raise Exit(code, line) from None


def cli(main):
    """Wrap a CLI ``main(argv=None)``: user errors, OS errors, memory and Ctrl-C become
    one ``error: ...`` line on stderr and an exit code (2 usage, 1 otherwise, 130 Ctrl-C)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            _fail(f"error: {e}", e.exit_code)
        except KeyboardInterrupt:
            _fail("error: interrupted (Ctrl-C); nothing half-written was left", 130)
        except MemoryError:
            _fail("error: out of memory: try a smaller --batch-size or --max-seq-length")
        except OSError as e:
            _fail(f"error: {describe_os_error(e)}")

    return wrapped
