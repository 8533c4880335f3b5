"""Work that is mostly other processes, started with the run and done beside the other tests.

A benchmark, a demo job in a subprocess, a venv build, the Beam runner matrices: the test process mostly
waits for them. A test module registers such work with :func:`job` when it is imported; once pytest has
collected the run, :func:`start` (called by conftest) runs every registered job whose test file is in the
run, in registration order, on two threads of their own (:data:`LANES`), while this process runs the other
tests: on a two-core machine the jobs keep the second core busy and share the first. conftest runs the files
that registered jobs after all the others, so that their jobs are done by then. The tests that need a job's result call
:func:`result`, which waits for it; a job not started yet (its file run alone, or the lane behind) runs
then, in the caller's thread. An exception in a job is raised by :func:`result`.

A job runs in a thread of the test process, beside tests that patch the environment and the working
folder: it starts its processes with :data:`ENV` (the test process's when this module was imported) in a
folder it names, and it never runs Beam or the jobs in this process. A run stopped early (``-x``, Ctrl-C)
starts no further job; one already running finishes on its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: the test process's environment at its start, for a job's subprocesses
ENV: dict[str, str] = dict(os.environ)
#: the checkout under test (a job's ``python -m`` runs there, so that it imports this checkout)
ROOT = Path(__file__).resolve().parent.parent


class _Job:
    def __init__(self, name: str, fn: Callable[[Path], Any], file: str, start_with: str | None):
        self.name, self.fn, self.file = name, fn, os.path.abspath(file)
        self.start_with = os.path.abspath(start_with) if start_with else None
        self.started = False
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.folder: Path | None = None
        self.ran: tuple[float, float] | None = None  # (start, end), time.monotonic()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            slug = re.sub(r"[^A-Za-z0-9._]+", "-", self.name).strip("-")  # (a venv refuses ':' in its path)
            self.folder = Path(tempfile.mkdtemp(prefix=f"streamrnn-{slug}-"))
            self.value = self.fn(self.folder)
        except BaseException as e:  # raised again by result(), in the test that needs it
            self.error = e
        finally:
            self.ran = (t0, time.monotonic())
            self.done.set()


#: lanes: threads that run the jobs, each taking the next one not taken yet, in registration order. Two: the jobs
#: are mostly processes of one busy thread each, and on a two-core machine the test process and one lane left a
#: core idle for a third of the run (measured: 1.6 cores busy on average, the lane the run's longest part)
LANES = int(os.environ.get("STREAMRNN_TEST_LANES", "2"))

_JOBS: dict[str, _Job] = {}
_LOCK = threading.Lock()
_STOP = threading.Event()


def job(name: str, *, file: str, start_with: str | None = None) -> Callable[[Callable[[Path], Any]],
                                                                          Callable[[Path], Any]]:
    """Register ``fn(folder)`` (a fresh temporary folder) as the job ``name`` of the test file ``file``.

    ``start_with``: a test file that runs shortly before ``file``; the job starts (on a thread of its own) when
    that file's first test starts, not with the run: for work whose result ages (an alert's state, which the
    tests read when they run)."""

    def register(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
        if name in _JOBS:
            raise ValueError(f"background job {name!r} registered twice")
        _JOBS[name] = _Job(name, fn, file, start_with)
        return fn

    return register


def files() -> set[str]:
    """The test files (absolute paths) that registered a job."""
    return {j.file for j in _JOBS.values()}


def _claim(j: _Job) -> bool:
    with _LOCK:
        if j.started:
            return False
        j.started = True
        return True


_SELECTED: set[str] = set()


def start(files: set[str]) -> None:
    """Run the jobs of these test files (absolute paths) on :data:`LANES` daemon threads, each taking the next job
    in registration order (those with ``start_with`` in the run: when that file starts, :func:`file_starts`)."""
    _SELECTED.update(os.path.abspath(f) for f in files)
    todo = [j for j in _JOBS.values() if j.file in _SELECTED and j.start_with not in _SELECTED]

    def lane() -> None:
        for j in todo:
            if _STOP.is_set():
                return
            if _claim(j):
                j.run()

    for i in range(min(LANES, len(todo))):
        threading.Thread(target=lane, name=f"background-jobs-{i}", daemon=True).start()


def file_starts(file: str) -> None:
    """The first test of ``file`` starts: the jobs to start with it start, each on a daemon thread."""
    for j in _JOBS.values():
        if j.start_with == os.path.abspath(file) and j.file in _SELECTED and not _STOP.is_set() and _claim(j):
            threading.Thread(target=j.run, name=f"background {j.name}", daemon=True).start()


def result(name: str) -> Any:
    """The job's return value: waits for it, or runs it here if it has not started."""
    j = _JOBS[name]
    if _claim(j):
        j.run()
    j.done.wait()
    if j.error is not None:
        raise j.error
    return j.value


def run_jobs(folder: Path, runs: dict[str, tuple[str, list[str]]], *, timeout: float = 900) -> dict[str, dict]:
    """Run the jobs ``{name: (module, argv)}`` (``module:function`` for a function other than ``main``), in this
    order, in one new process (tests/run_jobs.py: one interpreter and Beam start for all):
    ``{name: {"rc": exit code, "stdout": ..., "stderr": ...}}``. The process imports the checkout under test
    (PYTHONPATH), as a job started from it would, and can import the tests' modules."""
    spec = [{"module": target.partition(":")[0], "function": target.partition(":")[2] or "main", "argv": argv,
             "out": str(folder / f"run-{i}.json")} for i, (target, argv) in enumerate(runs.values())]
    (folder / "runs.json").write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("run_jobs.py")), str(folder / "runs.json")],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)})
    got = {}
    for name, s in zip(runs, spec, strict=True):
        out = Path(s["out"])  # (none when the process died before this run ended: its stderr is the reason)
        got[name] = json.loads(out.read_text()) if out.exists() else {"rc": None, "stdout": r.stdout,
                                                                        "stderr": r.stderr[-4000:]}
    return got


def summary(since: float) -> list[str]:
    """How the jobs ran, for the run's end: one line in all, then a line per job that ran (its start and end, in
    seconds after ``since``, a time.monotonic() reading)."""
    ran = [j for j in _JOBS.values() if j.ran is not None]
    if not ran:
        return []
    busy = sum(j.ran[1] - j.ran[0] for j in ran)
    last = max(j.ran[1] for j in ran) - since
    lines = [f"background jobs: {len(ran)} ran, {busy:.0f} s in all, the last done {last:.0f} s into the run"]
    for j in sorted(ran, key=lambda j: j.ran[0]):
        lines.append(f"  {j.ran[0] - since:6.0f} s to {j.ran[1] - since:4.0f} s  {j.name}"
                     f"{'  (failed)' if j.error is not None else ''}")
    return lines


def stop() -> None:
    """No job starts after this; the folders of the finished ones are removed."""
    _STOP.set()
    for j in _JOBS.values():
        if j.done.is_set() and j.folder is not None:
            shutil.rmtree(j.folder, ignore_errors=True)
