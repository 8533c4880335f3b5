"""Plain progress lines on stderr for long forecast commands (``eval forecast``, ``train forecast``).

Nothing is printed during the first ``after`` seconds (a short run stays quiet); after that, one
line at most every ``every`` seconds, e.g. ``eval forecast: 120/505 symbols (AAPL), 31 s``. Plain
lines (no carriage returns, no bar), so a log file or CI output reads as well as a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO


class Progress:
    """``tick(done, total, what)`` prints a line when due; ``clock`` is injectable for tests."""

    def __init__(self, name: str, *, after: float = 10.0, every: float = 10.0, out: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True):
        self.name, self.after, self.every, self.clock, self.enabled = name, after, every, clock, enabled
        self.out = out
        self.t0 = clock()
        self.next = self.t0 + after
        self.lines = 0

    def tick(self, done: int, total: int, unit: str, what: str = "") -> bool:
        """Print ``NAME: done/total unit (what), N s`` if a line is due; True if one was printed."""
        if not self.enabled:
            return False
        now = self.clock()
        if now < self.next:
            return False
        self.next = now + self.every
        self.lines += 1
        extra = f" ({what})" if what else ""
        print(f"{self.name}: {done}/{total} {unit}{extra}, {now - self.t0:.0f} s", file=self.out or sys.stderr,
              flush=True)
        return True
