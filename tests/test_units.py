"""One name per quantity on every surface (issue 16): a byte LM's loss in bits/char, the market job's in
nats/bar, state sizes in binary units (KiB), on the progress line as in the summary tables and the docs."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from streamrnn.beam.job import launcher
from streamrnn.beam.job.summary import live_line

ROOT = Path(__file__).resolve().parents[1]

#: 5 charlm keys (8 KiB of recurrent state each), 10 scored events at 2 bits (2 ln 2 nats) each
FIVE_KEYS = {"streamrnn_active_keys": 5, "streamrnn_state_bytes": 5 * 8192,
             "streamrnn_online_loss_nats_total": 10 * 2 * math.log(2), "streamrnn_online_scored_events_total": 10}


def test_a_byte_lms_online_loss_is_bits_per_char_as_in_its_summary_table():
    line = live_line(FIVE_KEYS, "lm")
    assert "2.000 bits/char online" in line and "bits/event" not in line


def test_a_forecast_models_online_loss_is_nats_per_bar_as_its_nll_h1():
    line = live_line(FIVE_KEYS, "forecast")
    assert f"{2 * math.log(2):.3f} nats/bar online" in line and "bits" not in line


@pytest.mark.parametrize(("keys", "state", "want"), [
    (5, 5 * 8192, "5 keys (40.0 KiB state)"), (1, 512, "1 key (512 B state)"),
    (1024, 1024 * 8192, "1,024 keys (8.0 MiB state)"), (2**20, 2**20 * 9216, "1,048,576 keys (9.0 GiB state)")])
def test_state_is_in_binary_units_and_one_key_is_singular(keys, state, want):
    assert want in live_line({"streamrnn_active_keys": keys, "streamrnn_state_bytes": state})


def test_counts_of_one_are_singular():
    line = live_line({"streamrnn_dead_letters_total": 1, "streamrnn_dead_letters_total{reason=late}": 1,
                      "streamrnn_batches_total": 1})
    assert "1 dead letter (late 1)" in line and "1 model call" in line and "1 keys" not in line


@pytest.mark.parametrize(("task", "unit"), [("lm", "bits/char"), ("forecast", "nats/bar")])
def test_the_jobs_progress_line_takes_the_unit_of_the_task_the_job_checked(monkeypatch, task, unit):
    """Both jobs call require_task on their model before they run; the launcher's progress line follows it."""
    monkeypatch.setattr(launcher, "_TASK", None)  # restored afterwards
    monkeypatch.setattr(launcher.metrics_export, "totals", lambda *a: dict(FIVE_KEYS))
    launcher.require_task("m.onnx", SimpleNamespace(task=task), task, "a model")
    args = argparse.Namespace(metrics_port=0, metrics_bind="127.0.0.1", metrics_job="j", metrics_linger=0.0,
                              pushgateway=None, verbose=True)
    with launcher.metrics(args, []) as figures:
        assert f" {unit} online" in figures()


def test_the_docs_use_the_same_names():
    """No other name for the LM loss, no decimal kB for state, the market NLL with its unit."""
    texts = {p: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    for path, text in texts.items():
        for other in ("bits/event", "bits/byte", "nats/byte", "bits per event"):
            assert other not in text, (path.name, other)
        assert not re.search(r"\d kB\b", text), path.name
    assert "nats per bar" in texts[ROOT / "docs" / "market.md"]
    assert "9.1 KiB" in texts[ROOT / "README.md"] and "9.1 KiB" in texts[ROOT / "docs" / "deploy.md"]
