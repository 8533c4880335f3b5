"""A job's terminal: quiet defaults for Beam's logging, streamrnn's own lines kept.

Import and call :func:`quiet_job_logging` before ``apache_beam`` is imported. Beam logs
through the root logger at import (``WARNING:root:apitools not found`` when the GCP extras
are absent); with no handler on the root, Python's ``logging.warning`` installs one on
stderr, and from then on every Beam INFO/WARNING line of a run reaches the user. A handler
installed first keeps those at WARNING and above, drops known import-time noise, and
formats what remains as ``prog: LEVEL message``.
"""

from __future__ import annotations

import logging
import sys

#: Messages that are noise on every run (start of the message).
NOISE = ("apitools not found",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record: let logging report it as usual
            return True
        return not msg.startswith(NOISE)


def quiet_job_logging(prog: str, *, verbose: bool = False) -> logging.Handler:
    """One stderr handler on the root: WARNING and up (INFO with ``verbose``); the exporter's address always."""
    root = logging.getLogger()
    for h in root.handlers:
        if getattr(h, "_streamrnn_job", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._streamrnn_job = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(f"{prog}: %(levelname)s %(message)s"))
    handler.addFilter(_DropNoise())
    root.addHandler(handler)
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
    root = logging.getLogger()
    if not any(isinstance(f, _DropNoise) for f in root.filters):
        root.addFilter(_DropNoise())
    if not root.handlers:
        h = logging.NullHandler()
        h._streamrnn_job = True  # type: ignore[attr-defined]
        root.addHandler(h)
