"""Progress for long work: a tqdm bar on a terminal, plain periodic lines otherwise.

CI logs and files get no carriage returns: when stderr is not a TTY, :func:`progress`
prints ``desc: i/total (rate, ETA)`` at most every ``PLAIN_EVERY_S`` seconds and at the end.
"""

import sys
import time

PLAIN_EVERY_S = 15.0


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class PlainProgress:
    """tqdm's small API (update, set_postfix_str, close, iteration) as plain lines."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", file=None, every_s=PLAIN_EVERY_S, initial=0):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.file = file or sys.stderr
        self.every_s, self.n, self.initial, self.postfix, self.printed = every_s, initial, initial, "", -1
        self.start = self.last = time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def set_postfix_str(self, text: str, refresh: bool = True):
        self.postfix = text

    def update(self, n: int = 1):
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._line()

    def _line(self):
        self.printed = self.n
        elapsed = time.perf_counter() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total}" if self.total else f"{self.desc}: {self.n}"]
        parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 0.1 or not rate else f"{1 / rate:.1f} s/{self.unit}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_fmt_time((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_fmt_time(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.file, flush=True)

    def close(self):
        """Print the final count once."""
        if self.n > self.initial and self.printed != self.n:
            self._line()


def progress(iterable=None, total=None, desc="", unit="it", leave=True, initial=0):
    """A progress bar over ``iterable`` (or a manual one with ``update``) on stderr.

    ``initial``: units already done (a resumed run); rate and ETA count only the new ones.
    """
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, initial=initial)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)


def say(message: str) -> None:
    """A status line on stderr, flushed at once (what is happening now)."""
    print(message, file=sys.stderr, flush=True)
