"""Command-line helpers: a parser whose errors are one line, and value checkers that name the flag.

``argparse`` reports a bad value as ``argument --steps: expected an int >= 1, got '0'``;
:class:`OneLineParser` prints just that (no usage block) and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, NoReturn

from ..errors import InputError

if TYPE_CHECKING:
    from ..keyed.health import HealthConfig


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(s: str, integer: bool) -> float:
    try:
        v = int(s) if integer else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an int' if integer else 'a number'}, got {s!r}") from None
    if not integer and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def at_least(lo: float, *, open_: bool = False, below: float | None = None) -> Callable[[str], float]:
    """An argparse ``type``: an int (if ``lo`` is an int) or a number ``>= lo`` (``> lo`` if ``open_``), and
    ``< below`` when given."""
    integer = isinstance(lo, int)

    def parse(s: str) -> float:
        v = _number(s, integer)
        if v < lo or (open_ and v == lo) or (below is not None and not v < below):
            kind = "an int" if integer else "a number"
            bound = f"{'>' if open_ else '>='} {lo}" + (f" and < {below:g}" if below is not None else "")
            raise argparse.ArgumentTypeError(f"expected {kind} {bound}, got {s!r}")
        return v

    parse.__name__ = f"at_least_{lo}"
    return parse


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type``: an int in ``lo..hi`` (a seed: numpy and torch refuse negative or huge ones)."""
    def parse(s: str) -> int:
        v = int(_number(s, True))
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an int in {lo}..{hi}, got {s!r}")
        return v

    parse.__name__ = f"int_range_{lo}_{hi}"
    return parse


#: ``--seed``: what both numpy's and torch's generators accept
seed = int_range(0, 2**32 - 1)


def utf8(s: str) -> str:
    """An argparse ``type``: text that is valid UTF-8 (the OS hands Python undecodable argv bytes as surrogates)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"expected UTF-8 text, got bytes that are not UTF-8: "
                                         f"{os.fsencode(s)[:40]!r}") from None
    return s


def out_file(s: str) -> str:
    """An argparse ``type``: a file to write (a name: not '', '.', '/' or a path ending in a separator)."""
    if not os.path.basename(s) or os.path.basename(s) in (".", ".."):
        raise argparse.ArgumentTypeError(f"expected a file path to write, got {s!r}")
    return s


def fraction(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a number in the interval from ``lo`` to ``hi``."""
    def parse(s: str) -> float:
        v = _number(s, False)
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"expected a fraction in {interval}, got {s!r}")
        return v

    parse.__name__ = "fraction"
    return parse


def fractions(lo: float, hi: float, what: str) -> Callable[[str], list[float]]:
    """An argparse ``type``: comma-separated numbers, each in ``(lo, hi)``, at least one, no repeats (``what``
    names them in the error)."""
    def parse(s: str) -> list[float]:
        try:
            out = [float(x) for x in s.split(",") if x.strip()]
        except ValueError:
            out = []
        if not out or any(not lo < x < hi for x in out) or len(set(out)) != len(out):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} in ({lo:g}, {hi:g}), got {s!r}")
        return out

    parse.__name__ = "fractions"
    return parse


def finite(s: str) -> float:
    """An argparse ``type``: a finite number of any sign."""
    return _number(s, False)


#: ``--health``'s choices (:data:`streamrnn.keyed.health.POLICIES`; not imported here: a job's flags parse without
#: numpy)
HEALTH_POLICIES = ("off", "flag", "heal")
#: the ``--health-*`` flags that tune ``heal``: flag suffix -> :class:`~streamrnn.keyed.health.HealthConfig` field
HEAL_FLAGS = {"reset-window": "reset_window", "stay-margin": "stay_margin", "max-watch": "max_watch"}


def add_health_args(ap: argparse.ArgumentParser, what: str, default: str) -> None:
    """A job's carried-state health flags (docs/operator.md): ``--health`` (None: the model's default policy,
    :func:`streamrnn.keyed.health.default_policy`) and the ``heal`` tuning flags of :data:`HEAL_FLAGS`. ``what``
    names the job's keys (``keys``, ``symbols``); ``default`` says what ``--health``'s default is for its models."""
    ap.add_argument("--health", choices=HEALTH_POLICIES, default=None,
                    help=f"carried-state health (docs/operator.md): 'flag' adds state_health to the outputs and counts "
                         f"{what} in bad health, 'heal' also watches {what} with a fresh shadow state and resets a "
                         f"{what[:-1]}'s state while a fresh one does better, reset 'health' (default: {default})")
    ap.add_argument("--health-reset-window", type=at_least(1), default=None, metavar="N",
                    help=f"heal: events per verdict of a healing {what[:-1]}: reset again, or stop (default: 32)")
    ap.add_argument("--health-stay-margin", type=finite, default=None, metavar="NATS",
                    help=f"heal: nats/event by which the reset state must beat not resetting for a healing "
                         f"{what[:-1]} to reset again (default: 0)")
    ap.add_argument("--health-max-watch", type=at_least(1), default=None, metavar="N",
                    help=f"heal: most {what} watched or healing at once per shard, each one more row per model call "
                         f"(default: no bound; the watch rule keeps them few while {what} are in domain). A bound "
                         f"that binds makes which {what} are healed depend on how the input is cut into flushes "
                         f"(docs/beam.md)")


def health_arg(ap: argparse.ArgumentParser, args: argparse.Namespace) -> str | HealthConfig | None:
    """``health=`` for ``StatefulInference`` from :func:`add_health_args`' flags: the policy name (None: the
    model's default), or a ``HealthConfig`` when a ``heal`` tuning flag is given. A tuning flag without
    ``--health heal`` is a usage error naming it (``ap.error``: one line)."""
    given = {field: getattr(args, "health_" + field) for field in HEAL_FLAGS.values()}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return args.health
    if args.health != "heal":
        flag = next(f for f, field in HEAL_FLAGS.items() if field in given)
        got = f"--health {args.health}" if args.health else "no --health (the default policy)"
        ap.error(f"--health-{flag}: expected --health heal (it tunes heal), got {got}")
    from ..keyed.health import HealthConfig

    return HealthConfig("heal", **given)


def read_file(flag: str, path: str | os.PathLike) -> bytes:
    """The bytes of a file named on the command line; InputError naming ``flag`` if unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{flag}: expected a readable file, got {os.fspath(path)!r} ({e.strerror or e})") from e


class HeldLog(logging.Filter):
    """Holds the ``streamrnn`` logger's own records (the provider line) until :meth:`release`.

    A command that fails on its inputs then prints its one error line alone; :func:`inputs_checked`
    (called by a command once its inputs passed) or the command's success sends the held lines out.
    """

    active: HeldLog | None = None

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.holding = True
        self.logger = logging.getLogger("streamrnn")

    def filter(self, record: logging.LogRecord) -> bool:
        if self.holding:
            self.records.append(record)
        return not self.holding

    def __enter__(self) -> HeldLog:
        self.logger.addFilter(self)
        HeldLog.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)
        HeldLog.active = None

    def release(self) -> None:
        self.holding = False
        records, self.records = self.records, []
        for r in records:
            self.logger.handle(r)

    def drop(self) -> None:
        self.records = []


def inputs_checked() -> None:
    """A command's inputs passed its checks: log lines held until now (the provider line) go out."""
    if HeldLog.active is not None:
        HeldLog.active.release()


def parse_with_quick(ap: argparse.ArgumentParser, argv: list[str] | None,
                     quick: dict) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv`` (default: the command line); with ``--quick``, ``quick`` holds the defaults (flags given
    still win). Returns the arguments and the argv list, which benchmarks pass on to their child runs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--quick" in argv:
        ap.set_defaults(**quick)
    return ap.parse_args(argv), argv


#: the clock of :class:`Heartbeat` (tests replace it)
_clock = time.monotonic


class Heartbeat:
    """Plain progress lines on stderr for a command that can run long (issue 16): nothing during the first
    ``after`` seconds, then ``NAME: STATUS, N s`` at most every ``every`` seconds.

    The command sets its status with :meth:`update` at each step (a line goes out then if one is due); while
    it runs (a ``with`` block), a daemon thread also writes the line when due, so one long step is not silent.
    Lines only (no ``\\r``, no bar), so a log file reads as a terminal does; never stdout, where JSON goes.
    """

    def __init__(self, name: str, status: str = "running", *, after: float = 10.0, every: float = 10.0,
                 out: IO[str] | None = None, poll: float = 1.0, clock: Callable[[], float] | None = None,
                 enabled: bool = True) -> None:
        self.name, self.status, self.after, self.every, self.out, self.poll = name, status, after, every, out, poll
        self.enabled = enabled
        self._clock = clock  # injectable (tests); else the module's monotonic clock
        self.t0 = self._now()
        self.next = self.t0 + after
        self.lines = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, status: str) -> None:
        self.status = status
        self.check()

    def check(self) -> bool:
        """Write the line if one is due; True if written."""
        if not self.enabled:
            return False
        with self._lock:
            now = self._now()
            if now < self.next:
                return False
            self.next = now + self.every
            self.lines += 1
            print(f"{self.name}: {self.status}, {now - self.t0:.0f} s", file=self.out or sys.stderr, flush=True)
            return True

    def _now(self) -> float:
        return (self._clock or _clock)()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.check()

    def __enter__(self) -> Heartbeat:
        if not self.enabled:
            return self
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {self.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
