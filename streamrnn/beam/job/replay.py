"""Recorded input played as an unbounded stream: one rule for ``--replay`` of events and of bars.

Items in event-time order are cut into steps of ``step`` event-time seconds from the first
(``t0``); each step is added to a TestStream, then the watermark advances to the step's end
(whole milliseconds, rounded down: never ahead of the step's end). Dead letters
go out in the first step, stamped ``t0``. After the last step the watermark goes on in steps
through ``drain`` event-time seconds (:func:`drain_marks`), then passes the end of the input, so
every timer fires. The drain is for pipelines with a stateful step before the one that windows:
the DirectRunner holds no watermark for a timer's output, so a step that releases held items at a
time the watermark jumped past hands them downstream after their window expired, where Beam drops
them. A TestStream holds its elements from the start: the files are read when the pipeline is
built. Runs on the DirectRunner with ``--streaming``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from ..records import DEAD, END_OF_INPUT, DeadLetter


class SplitDead(beam.DoFn):
    """Dead letters to the :data:`~streamrnn.beam.records.DEAD` output, everything else to the main one."""

    def process(self, item):
        yield beam.pvalue.TaggedOutput(DEAD, item) if isinstance(item, DeadLetter) else item


def step_bounds(ts: np.ndarray, t0: float, step: float) -> list[tuple[int, int, int]]:
    """``(start, end, k)`` of each non-empty step of sorted times ``ts``: rows ``start:end`` fall in step ``k``,
    ``[t0 + k * step, t0 + (k + 1) * step)``."""
    if not len(ts):
        return []
    k = np.floor((np.asarray(ts, np.float64) - t0) / step).astype(np.int64)
    cuts = np.flatnonzero(np.diff(k)) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(k)]])
    return [(int(a), int(b), int(k[a])) for a, b in zip(starts, ends, strict=True)]


def drain_marks(last: float, step: float, drain: float) -> list[float]:
    """The watermarks (s) after the last step's ``last``: every ``step`` through ``drain`` seconds past it."""
    if not drain > 0:
        return []
    n = math.ceil(drain / step)
    return [last + step * j for j in range(1, n + 1)]


def gap_marks(last: float, start: float, end: float, most: float) -> list[float]:
    """The watermarks (s) to play between a step that ended at ``last`` and the next non-empty step
    ``[start, end)``, so that the watermark never moves more than ``most`` at a time (``end - start <= most``):
    none if ``end - last <= most``, else marks at most ``most`` apart up to ``start``."""
    if end - last <= most or not start > last:
        return []
    n = math.ceil((start - last) / most)
    return [last + (start - last) * j / n for j in range(1, n + 1)]


def stepped_stream(steps: Sequence[tuple[list[TimestampedValue], float]], dead: Sequence[DeadLetter],
                   t0: float) -> TestStream:
    """A TestStream of ``steps`` (each: its timestamped items, then the watermark in s), ``dead`` in the first."""
    stream = TestStream()
    first = [TimestampedValue(d, t0) for d in dead]
    for items, wm in steps:
        if first or items:
            stream = stream.add_elements(first + list(items))
        first = []
        stream = stream.advance_watermark_to(Timestamp(micros=math.floor(wm * 1000) * 1000))
    if first:
        stream = stream.add_elements(first)
    return stream.advance_watermark_to(1e12).advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity()


def play(pbegin, stream: TestStream, main: str):
    """``(items, dead_letters)`` of a stepped stream."""
    out = pbegin | "Stream" >> stream | "Split" >> beam.ParDo(SplitDead()).with_outputs(DEAD, main=main)
    return out[main], out[DEAD]
