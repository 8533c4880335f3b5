"""Plain progress lines on stderr for long forecast commands (``eval forecast``, ``train forecast``).

The CLI's one heartbeat (:class:`~streamrnn.cli.args.Heartbeat`: quiet for the first ``after``
seconds, then a line at most every ``every`` seconds), with a status of counted steps, e.g.
``eval forecast: 120/505 symbols (AAPL), 31 s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO

from ..cli.args import Heartbeat


class Progress(Heartbeat):
    """``tick(done, total, unit, what)`` prints a line when due; ``clock`` is injectable for tests."""

    def __init__(self, name: str, *, after: float = 10.0, every: float = 10.0, out: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True):
        super().__init__(name, "starting", after=after, every=every, out=out, clock=clock, enabled=enabled)

    def tick(self, done: int, total: int, unit: str, what: str = "") -> bool:
        """Print ``NAME: done/total unit (what), N s`` if a line is due; True if one was printed."""
        self.status = f"{done}/{total} {unit}" + (f" ({what})" if what else "")
        return self.check()
