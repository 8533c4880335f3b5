"""A terminal run shows none of Beam's import-time noise, and a job's log lines print once, cleanly."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

from streamrnn.cli.logs import quiet_job_logging

ROOT = Path(__file__).resolve().parents[1]


def test_beam_imported_during_a_cli_run_prints_no_import_time_noise():
    """``streamrnn bench beam`` (and other commands) import Beam inside the run, after the CLI set up its
    logging: Beam's root-logger warning at import (``apitools not found``) reached the terminal."""
    run = ("from streamrnn import cli; cli.main(['bench', 'beam', '--help']); "
           "import apache_beam.io.gcp.internal.clients.bigquery; import logging; logging.warning('kept')")
    r = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "apitools" not in r.stderr, r.stderr[-2000:]
    # other warnings still show, once, as the caller's logging prints them (the command left it as it was)
    assert r.stderr.splitlines()[-1:] == ["WARNING:root:kept"]


def test_an_implicit_handler_on_a_closed_stream_is_replaced_not_left_to_print_tracebacks(capsys):
    """logging.basicConfig() ran while sys.stderr was a stream that is closed now (an earlier test's capture,
    a replaced stderr): the job's logging replaces that handler, so its lines print no "Logging error"."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    old = io.StringIO()
    stale = logging.StreamHandler(old)
    stale.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    old.close()
    try:
        root.handlers = [stale]
        quiet_job_logging("job")
        logging.getLogger("streamrnn.metrics").info("streamrnn metrics: serving http://127.0.0.1:1/metrics")
        logging.getLogger("streamrnn").warning("a warning")
        err = capsys.readouterr().err
        assert stale not in root.handlers
        assert "Logging error" not in err and "Traceback" not in err, err
        assert err.splitlines() == ["job: INFO streamrnn metrics: serving http://127.0.0.1:1/metrics",
                                    "job: WARNING a warning"], err
    finally:
        root.handlers, root.level = saved, level


def test_the_cli_leaves_no_handler_on_the_stream_it_ran_with(capsys):
    """``streamrnn ...`` called in-process while sys.stderr was another stream (closed since): later log lines
    go to the stderr of their moment, with no "Logging error" traceback."""
    import contextlib

    from streamrnn.cli import main

    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    first = io.StringIO()
    try:
        root.handlers = []  # a process starting the command (an earlier test's job may have left its own)
        with contextlib.redirect_stderr(first), contextlib.redirect_stdout(io.StringIO()):
            assert main(["info"]) == 0
        first.close()
        root.handlers.append(logging.StreamHandler(sys.stderr))  # the caller's own, after the command
        logging.getLogger("streamrnn").warning("after the command")
        err = capsys.readouterr().err
        assert "Logging error" not in err and "Traceback" not in err, err
        assert err.splitlines() == ["after the command"], err
        assert not [h for h in root.handlers if getattr(h, "_streamrnn_job", False)]
    finally:
        root.handlers, root.level = saved, level


def test_importing_a_job_module_leaves_the_programs_logging_to_it():
    """A program that imports a job (to build on its pipeline) and then calls basicConfig sees its warnings."""
    run = ("import logging, beam_jobs.next_token, beam_jobs.market_forecast; "
           "logging.basicConfig(format='APP %(message)s'); "
           "logging.getLogger('x').warning('hi')")
    r = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["APP hi"], r.stderr


def test_a_command_run_in_process_leaves_the_callers_logging_as_it_was(capsys):
    import contextlib

    from streamrnn.cli import main

    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    mine = logging.StreamHandler(io.StringIO())
    try:
        root.handlers = [mine]
        root.setLevel(logging.INFO)
        before = (list(root.handlers), root.level, logging.getLogger("streamrnn").level)
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["info"]) == 0
            assert main(["info", "--no-such-flag"]) == 2
        assert (list(root.handlers), root.level, logging.getLogger("streamrnn").level) == before
    finally:
        root.handlers, root.level = saved, level
