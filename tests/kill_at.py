"""Run a module or code and SIGKILL it at a chosen point, for the kill -9 tests.

    python tests/kill_at.py EVENT PATTERN NTH [--truncate] [--no-swap] [--signal=INT|TERM] (-m MODULE | -c CODE) ARGS...

The process kills itself (SIGKILL: no handler, no ``finally``, as ``kill -9``) at the
NTH time Python raises the audit EVENT on a path whose name matches PATTERN (fnmatch):

- ``rename``: ``os.rename``/``os.replace`` (source or destination name matches), so just
  before a finished temporary is moved into place;
- ``open``: ``open()`` for writing; ``rmtree``: ``shutil.rmtree``; ``mkdir``: ``os.mkdir``.

``--signal=INT`` / ``--signal=TERM`` sends that signal instead (it is handled once the
operation has started, e.g. with the file open). ``--truncate`` first cuts the matching file (or a folder's largest file) to half its
size: the state of a process killed in the middle of writing it. ``--no-swap`` hides the
system's folder swap so that ``gain_mlx.files.publish_dir`` takes its two-rename path.
No production code is involved: the hook is Python's own audit mechanism.
"""

import fnmatch
import os
import runpy
import signal
import sys
from pathlib import Path

EVENTS = {"rename": "os.rename", "open": "open", "rmtree": "shutil.rmtree", "mkdir": "os.mkdir"}


def _truncate(path: Path) -> None:
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        if not files:
            return
        path = max(files, key=lambda p: p.stat().st_size)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def main():
    event, pattern, nth, *rest = sys.argv[1:]
    truncate = "--truncate" in rest
    no_swap = "--no-swap" in rest
    sig = next((getattr(signal, "SIG" + a.split("=")[1]) for a in rest if a.startswith("--signal=")), signal.SIGKILL)
    rest = [a for a in rest if a not in ("--truncate", "--no-swap") and not a.startswith("--signal=")]
    mode, target, *args = rest
    state = {"seen": 0, "armed": True}

    def paths(args_):
        if event == "rename":
            return [a for a in args_[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if event == "open":
            path, how = args_[0], args_[1] or "r"
            if not isinstance(path, (str, bytes, os.PathLike)) or not any(c in str(how) for c in "wax+"):
                return []
            return [path]
        return [args_[0]] if isinstance(args_[0], (str, bytes, os.PathLike)) else []

    def hook(name, args_):
        if name != EVENTS[event] or not state["armed"]:
            return
        for p in paths(args_):
            p = Path(os.fsdecode(p))
            if fnmatch.fnmatch(p.name, pattern):
                state["seen"] += 1
                if state["seen"] == int(nth):
                    state["armed"] = False
                    if truncate:
                        src = Path(os.fsdecode(args_[0])) if event == "rename" else p
                        if src.exists():
                            _truncate(src)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os.kill(os.getpid(), sig)
                return

    sys.audit  # noqa: B018  (3.8+)
    sys.addaudithook(hook)
    sys.path.insert(0, os.getcwd())
    if no_swap:
        import gain_mlx.files

        gain_mlx.files._libc_swap = lambda: None
    if mode == "-m":
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *args]
        exec(compile(target, "<kill_at>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main()
