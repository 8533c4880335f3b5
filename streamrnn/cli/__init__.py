"""The ``streamrnn`` command line (``commands``), its argument checks (``args``), the forecast commands
(``forecast``) and a job's terminal logging (``logs``)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The ``streamrnn`` console script (imports the commands only when run)."""
    from .commands import main as run

    return run(argv)
