"""Run several jobs one after another in one process: ``python tests/run_jobs.py SPEC.json``.

SPEC is a JSON list of ``{"module": "beam_jobs.market_forecast", "argv": [...], "out": PATH}``; each job's
``main(argv)`` runs as a test would call it, and its exit code and what it printed (stdout, stderr; a
traceback if it raised) are written to ``out`` as JSON before the next one starts. An item may name another
function of the module (``"function"``, e.g. one that writes a job's input or model first); its return value
is then the exit code written. Background jobs
(tests/background.py) run a test module's job runs this way: one interpreter and one Beam import for all
of them, in a process of their own beside the other tests. See :func:`background.run_jobs`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import traceback
from pathlib import Path


def main(spec: str) -> int:
    for run in json.loads(Path(spec).read_text()):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = getattr(importlib.import_module(run["module"]), run.get("function", "main"))(run["argv"])
            except SystemExit as e:
                rc = e.code
            except Exception:
                traceback.print_exc()
                rc = None
        Path(run["out"]).write_text(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
