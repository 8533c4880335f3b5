"""A terminal run shows none of Beam's import-time noise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_beam_imported_during_a_cli_run_prints_no_import_time_noise():
    """``streamrnn bench beam`` (and other commands) import Beam inside the run, after the CLI set up its
    logging: Beam's root-logger warning at import (``apitools not found``) reached the terminal."""
    run = ("from streamrnn import cli; cli.main(['bench', 'beam', '--help']); "
           "import apache_beam.io.gcp.internal.clients.bigquery; import logging; logging.warning('kept')")
    r = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "apitools" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.splitlines()[-1:] == ["kept"]  # other warnings still show, once
