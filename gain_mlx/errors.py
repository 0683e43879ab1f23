"""One way for every CLI to fail: a user-error type and the wrapper that prints it.

Code raises :class:`UserError` (or :class:`UsageError`) where it finds the problem, with a
message naming the file or flag and the fix; :func:`cli` wraps each ``main`` so that the
user sees that one line (``error: ...``) and an exit code, never a traceback.
"""

import errno
import functools
import signal
import sys
import threading


class UserError(Exception):
    """An expected failure caused by the input or the environment: exit code 1."""

    exit_code = 1


class UsageError(UserError):
    """A wrong flag or flag value: exit code 2, as argparse uses."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A model or adapter that names what gain_mlx does not know (architecture, variant,
    target path, row layout)."""


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


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt so that
    the same ``finally`` blocks remove temporary files."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


TERMINATING_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _install_signal_handlers() -> dict:
    """Turn SIGTERM/SIGHUP (where still at their default) into :class:`Interrupted`;
    returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in TERMINATING_SIGNALS:
        if signal.getsignal(sig) == signal.SIG_DFL:
            previous[sig] = signal.signal(sig, _raise_interrupted)
    return previous


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
    one ``error: ...`` line on stderr and an exit code (2 usage, 1 otherwise, 130 Ctrl-C,
    128 + the signal number for SIGTERM/SIGHUP, as shells report them)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        previous = _install_signal_handlers()
        try:
            return main(*args, **kwargs)
        except UserError as e:
            _fail(f"error: {e}", e.exit_code)
        except Interrupted as e:
            name = signal.Signals(e.signum).name
            _fail(f"error: interrupted ({name}); temporary files were removed, earlier outputs are unchanged",
                  128 + e.signum)
        except KeyboardInterrupt:
            _fail("error: interrupted (Ctrl-C); temporary files were removed, earlier outputs are unchanged", 130)
        except MemoryError:
            _fail("error: out of memory: try a smaller --batch-size or --max-seq-length")
        except OSError as e:
            _fail(f"error: {describe_os_error(e)}")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapped
