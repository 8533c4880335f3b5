"""ReplayBars' watermark schedule: never more than a window at a time, and a drain after the last bar.

The DirectRunner holds no watermark for a timer's output, so what the features step releases reaches the next
windowed step as late as the watermark moved past it: a step longer than the window made bars late (dead
letters, or silently dropped past the dedupe horizon), and a jump to the end after the last step lost the last
window's forecasts. test_market_job's replay parity run checks the forecasts end to end; this checks the rule
on the stream itself, for any step, window and lateness.
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_stream import ElementEvent, WatermarkEvent
from hypothesis import given, settings
from hypothesis import strategies as st

import streamrnn.forecast.beam as fb
from streamrnn.errors import InputError
from streamrnn.forecast.synthetic import simulate, write_sp500_layout

DAY = 86400.0


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    bars = simulate(["AAA", "BB.B"], start="2017-01-01", end="2017-04-01", seed=5)
    return [str(p) for p in write_sp500_layout(bars, tmp_path_factory.mktemp("bars"))]


def _schedule(files, **kw) -> tuple[list[float], list[float]]:
    """(bar times in stream order, the watermarks in s before the final jump to the end of the input); each bar
    is added while the watermark is still at or before its time (none is late on input)."""
    got = {}

    def play(pbegin, stream, main):
        got["events"] = stream._events
        return pbegin | beam.Create([]), pbegin | "D" >> beam.Create([])

    orig = fb.play
    fb.play = play
    try:
        fb.ReplayBars(files, **kw).expand(beam.pvalue.PBegin(beam.Pipeline()))
    finally:
        fb.play = orig
    times, marks, wm = [], [], -math.inf
    for e in got["events"]:
        if isinstance(e, ElementEvent):
            ts = [float(tv.timestamp) for tv in e.timestamped_values]
            assert min(ts) >= wm, (min(ts), wm)
            times += ts
        elif isinstance(e, WatermarkEvent):
            wm = float(e.new_watermark)
            marks.append(wm)
    finite = [m for m in marks if m < 1e11]
    return times, finite


@settings(max_examples=25, deadline=None)
@given(window=st.sampled_from([DAY, 7 * DAY, 28 * DAY]), ratio=st.sampled_from([0.25, 1.0, 1.25, 2.0, 7.0]),
       lateness=st.sampled_from([0.0, DAY, 3 * DAY]))
def test_the_watermark_moves_at_most_a_window_and_drains_past_the_last_bar(files, window, ratio, lateness):
    times, marks = _schedule(files, step=window * ratio, window=window, lateness=lateness)
    assert len(times) == sum(1 for f in files for line in open(f) if line[:1].isdigit())  # every bar played
    assert times == sorted(times)
    assert np.all(np.diff(marks) > 0)
    assert np.max(np.diff(marks)) <= window + 1e-3  # never more than one window at a time
    assert marks[0] - times[0] <= window + 1e-3
    assert marks[-1] >= max(times) + 2 * window + lateness - 1e-3  # the drain covers the features step and then some


def test_without_a_window_the_step_is_kept_and_there_is_no_drain(files):
    times, marks = _schedule(files, step=10 * DAY)
    assert np.allclose(np.diff(marks), 10 * DAY)
    assert marks[-1] - max(times) <= 10 * DAY + 1e-3


@pytest.mark.parametrize("kw,what", [({"window": 0.0}, "window"), ({"window": math.inf}, "window"),
                                     ({"window": DAY, "lateness": -1.0}, "lateness"), ({"step": 0.0}, "step")])
def test_bad_settings_are_one_line_errors(files, kw, what):
    with pytest.raises(InputError, match=f"ReplayBars: {what}: expected"):
        fb.ReplayBars(files, **kw)


def test_a_small_step_plays_no_more_steps_than_bars_plus_gaps(files):
    """A 60 s step under a week's window: a step per bar at most, plus a window at a time across gaps and the
    drain (it was a step per 60 s of the drain: 20,160 of them)."""
    times, marks = _schedule(files, step=60.0, window=7 * DAY)
    span = max(times) - min(times)
    assert len(marks) <= len(set(times)) + math.ceil(span / (7 * DAY)) + 3, len(marks)
    assert np.max(np.diff(marks)) <= 7 * DAY + 1e-3
