"""Event-time arithmetic in Beam's own unit: integer microseconds.

Every quantity that feeds a timer (window ends, release times, expiry times) is an
``int`` of microseconds, like :class:`apache_beam.utils.timestamp.Timestamp`; floats never
reach a timer. Timers are set on the first whole millisecond at or after their time, since
several runners keep timers in milliseconds.

>>> to_micros(12.3456)
12345600
>>> int(release_micros(np.array([to_micros(0.25)]), size=to_micros(0.1), lateness=0)[0])  # window [0.2, 0.3)
299999
"""

from __future__ import annotations

import numpy as np
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

MICROS = 1_000_000
#: Event times the transform accepts, in seconds (about ±3,000 years around 1970). Epoch
#: milliseconds or nanoseconds are out of this range and get a dead letter that says so.
TS_LIMIT = 1e11


#: Before / after any event time (sentinels for "from the start" and "never"); inside Beam's range.
EARLIEST = -(2**53)
NEVER = 2**62


def _end_of_input_micros() -> int:
    # whole milliseconds (TestStream watermarks must be), just before the global window's end
    return (GlobalWindow().max_timestamp().micros // 1000 - 1) * 1000


#: The event time (micros) at which the stateful step releases what it still holds back.
END_OF_INPUT_MICROS = _end_of_input_micros()


def to_micros(seconds: float) -> int:
    """Seconds (float) to integer micros, rounded to the nearest microsecond."""
    return int(np.rint(seconds * MICROS))


def to_micros_array(seconds: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(seconds, np.float64) * MICROS).astype(np.int64)


def release_micros(ts_micros: np.ndarray, *, size: int, lateness: int) -> np.ndarray:
    """When an event's window may be applied: the window's last microsecond plus the allowed lateness.

    Windows are fixed, ``[k * size, (k + 1) * size)`` in micros; the result is
    ``window.max_timestamp() + allowed_lateness`` in Beam's terms: the watermark passing it
    makes every later arrival of that window late.
    """
    start = (np.asarray(ts_micros, np.int64) // size) * size
    return start + (size - 1) + lateness


def ceil_millis(micros: int) -> int:
    """The first whole millisecond at or after ``micros`` (what timers are set to)."""
    return -(-int(micros) // 1000) * 1000


def ceil_millis_array(micros: np.ndarray) -> np.ndarray:
    return -(-np.asarray(micros, np.int64) // 1000) * 1000


def timestamp(micros: int) -> Timestamp:
    return Timestamp(micros=int(micros))
