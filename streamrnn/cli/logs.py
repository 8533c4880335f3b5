"""A job's terminal: quiet defaults for Beam's logging, streamrnn's own lines kept.

Import and call :func:`quiet_job_logging` before ``apache_beam`` is imported. Beam logs
through the root logger at import (``WARNING:root:apitools not found`` when the GCP extras
are absent); with no handler on the root, Python's ``logging.warning`` installs one on
stderr, and from then on every Beam INFO/WARNING line of a run reaches the user. A handler
installed first keeps those at WARNING and above, drops known import-time noise, and
formats what remains as ``prog: LEVEL message``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

#: Messages that are noise on every run (also when a worker process forwards them).
NOISE = ("apitools not found", "No semi_persistent_directory found", "Discarding unparseable args")


class DropNoise(logging.Filter):
    """Drops the log lines in :data:`NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record: let logging report it as usual
            return True
        return not any(n in msg for n in NOISE)


class _DropDeployErrors(logging.Filter):
    """A worker's DeployError, as the runner logs it (with tracebacks): the launcher reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += logging.Formatter().formatException(record.exc_info)
        except Exception:
            return True
        return "DeployError: " not in text


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced after the handler is made)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _implicit(h: logging.Handler) -> bool:
    """The handler ``logging.basicConfig()`` puts on the root when a module logs before any is set (Beam does at
    import): with the job's own, every line would print twice. It holds the ``sys.stderr`` of that moment, which
    may since have been replaced and closed (a test's captured stream: each later line would then print a
    "Logging error" traceback). A handler anyone configured is kept."""
    stream = getattr(h, "stream", None)
    return (type(h) is logging.StreamHandler and h.formatter is not None
            and h.formatter._fmt == logging.BASIC_FORMAT
            and (stream in (sys.stderr, sys.__stderr__) or bool(getattr(stream, "closed", False))))


def _drop_noise_on_root() -> logging.Logger:
    """The root logger, with one :class:`DropNoise` filter (Beam's root-logger lines at import)."""
    root = logging.getLogger()
    if not any(isinstance(f, DropNoise) for f in root.filters):
        root.addFilter(DropNoise())
    return root


def _terminal_handler(fmt: str) -> logging.Handler:
    """The root's one stderr handler (replacing an earlier one of ours and the implicit one): it writes to whatever
    ``sys.stderr`` is when a line is logged, so it never holds a stream that was replaced and closed since."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_streamrnn_job", False) or _implicit(h):
            root.removeHandler(h)
    handler = _Stderr()
    handler._streamrnn_job = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(DropNoise())
    root.addHandler(handler)
    return handler


def cli_logging(*, verbose: bool = False) -> logging.Handler:
    """The ``streamrnn`` command's terminal: plain messages, WARNING and up (INFO with ``verbose``); Beam's
    import-time noise dropped."""
    handler = _terminal_handler("%(message)s")
    _drop_noise_on_root()  # also when Beam is imported after the command (in-process callers)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    return handler


def quiet_job_logging(prog: str, *, verbose: bool = False) -> logging.Handler:
    """One stderr handler on the root: WARNING and up (INFO with ``verbose``); the exporter's address always."""
    root = logging.getLogger()
    handler = _terminal_handler(f"{prog}: %(levelname)s %(message)s")
    if not verbose:
        handler.addFilter(_DropDeployErrors())
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in ("apache_beam", "root"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("streamrnn").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("streamrnn.metrics").setLevel(logging.INFO)  # where /metrics is served
    return handler


def guard_imports() -> None:
    """Before ``import apache_beam``: its import-time root warnings are dropped, no stderr handler appears.

    Adds the noise filter to the root logger and, if the root has no handler, a silent
    placeholder (so ``logging.warning`` does not install one on stderr); :func:`quiet_job_logging`
    replaces the placeholder when the job runs.
    """
    root = _drop_noise_on_root()
    if not root.handlers:
        h = logging.NullHandler()
        h._streamrnn_job = True  # type: ignore[attr-defined]
        root.addHandler(h)


def imports_done() -> None:
    """After a job module's imports: the placeholder :func:`guard_imports` set is removed again, so a program
    that imports the job (to build on its pipeline) configures logging as if it had not."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if type(h) is logging.NullHandler and getattr(h, "_streamrnn_job", False):
            root.removeHandler(h)


@contextmanager
def kept_logging() -> Iterator[None]:
    """The root logger's handlers, filters and level, and the levels of streamrnn's and Beam's loggers, restored
    on exit: a command run in-process (``streamrnn.cli.main([...])``) leaves its caller's logging as it was.
    The :class:`DropNoise` filter stays on the root (Beam's import-time lines, if Beam is imported later)."""
    root = logging.getLogger()
    names = ("streamrnn", "streamrnn.metrics", "apache_beam", "root")
    handlers, filters, level = list(root.handlers), list(root.filters), root.level
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.filters[:] = filters + [f for f in root.filters if isinstance(f, DropNoise) and f not in filters]
        root.setLevel(level)
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


# -- worker processes (a multi_processing DirectRunner's SDK harnesses) -----------------------------
_WORKER_SITE = """# streamrnn: a silent root handler, so the SDK harness prints nothing itself on the job's stderr;
# its warnings and errors still reach the job through Beam's log forwarding.
import logging
_root = logging.getLogger()
if not _root.handlers:
    _root.addHandler(logging.NullHandler())
"""


def worker_log_args(beam_args: Sequence[str], *, verbose: bool) -> list[str]:
    """``beam_args`` with the SDK harness log level at WARNING unless set (or ``verbose``)."""
    args = list(beam_args)
    if not verbose and not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        args.append("--default_sdk_harness_log_level=WARNING")
    return args


def quiet_worker_processes(env: dict[str, str] | None = None) -> str | None:
    """Worker processes started from here print no INFO lines of their own; the folder to remove after, or None.

    A ``sitecustomize`` on ``PYTHONPATH`` gives each new Python process a silent root handler
    before Beam's import-time ``logging.warning`` installs one on stderr. Skipped (None) when the
    environment already has a ``sitecustomize``, which this would hide.
    """
    env = os.environ if env is None else env
    if importlib.util.find_spec("sitecustomize") is not None:
        return None
    d = tempfile.mkdtemp(prefix="streamrnn-site-")
    with open(os.path.join(d, "sitecustomize.py"), "w") as f:
        f.write(_WORKER_SITE)
    env["PYTHONPATH"] = d + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return d
