"""Dead letters: inputs that were not used, with why. One record for every layer.

A :class:`DeadLetter` is what the bar features (online and offline), the Beam transform and both
jobs make of an input they cannot use: it names the input's key (the event's key, a bar's
symbol), its time, and the reason (the field, what was expected, what was got). The record and
its Parquet schema live here, outside the Beam layer, so the core (``streamrnn`` without Beam)
makes the same dead letters the jobs write.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa


class DeadLetter(NamedTuple):
    """An input that was not used, with why.

    ``kind`` is ``"invalid"`` (bad input), ``"late"``, ``"duplicate"`` or ``"error"``;
    ``reason`` is ``"late"`` / ``"duplicate"``, or names the field with what was
    expected and what was got (``"x: expected a token in [0, 256), got 300"``), or
    the error. ``event`` is the original input as JSON (:func:`event_json`). A bar's
    dead letter has its symbol as ``key`` (None when it has no usable one) and no
    ``seq`` or ``sub``.
    """

    key: str | None
    ts: float | None
    seq: int | None
    sub: int | None
    kind: str
    reason: str
    event: str


#: The columns of every dead-letter Parquet file the jobs write.
DEAD_LETTER_SCHEMA = pa.schema([("key", pa.string()), ("ts", pa.float64()), ("seq", pa.int64()),
                                ("sub", pa.int64()), ("kind", pa.string()), ("reason", pa.string()),
                                ("event", pa.string())])


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return [_jsonable(i) for i in v]
    return v


def event_json(d: dict[str, Any]) -> str:
    """The JSON of an original event (numpy values and non-finite floats made readable)."""
    return json.dumps({k: _jsonable(v) for k, v in d.items()}, sort_keys=True, default=repr)


def dead_letters_table(rows: list[DeadLetter]) -> pa.Table:
    """Dead letters as an Arrow table (``DEAD_LETTER_SCHEMA``)."""
    return pa.Table.from_pylist([r._asdict() for r in rows], schema=DEAD_LETTER_SCHEMA)
