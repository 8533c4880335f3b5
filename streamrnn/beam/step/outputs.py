"""Output rows to Beam elements: typed ``Prediction`` records or Arrow record batches.

Every output is timestamped when its result became final: its window's release time
(window end + allowed lateness) rounded up to a whole millisecond (when the timer that
releases it fires, on every runner), or later if it was held back for its next event;
never before the timer that emits it. So outputs are on time for any downstream windowing;
the event's own time is the ``ts`` field.

``output="arrow"`` yields one ``RecordBatch`` per (flush, output timestamp): the block
form. :func:`explode` turns such a block into the per-event :class:`Prediction` records
that ``output="records"`` yields (which uses it: one conversion rule, here), so a user who
wants elements after block-wise processing writes ``blocks | beam.FlatMap(explode)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from apache_beam.transforms.window import TimestampedValue

from ..records import KEY, SEQ, SUB, TS, Prediction
from .clock import ceil_millis_array, timestamp
from .intake import REL

__all__ = ["BASE", "emit", "explode"]

#: The columns of every output row, in :class:`Prediction` field order; the other columns are its ``outputs``.
BASE = (KEY, TS, SEQ, SUB, "pos", "fresh", "reset", "model_version")


def _dense(col: pa.Array) -> np.ndarray:
    """A column without nulls as numpy: ``[n, k]`` for a fixed-size list column, else ``[n]`` in its own dtype."""
    if pa.types.is_fixed_size_list(col.type):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return col.to_numpy(zero_copy_only=False)


def _values(col: pa.Array | pa.ChunkedArray) -> Any:
    """An output column as a per-row sequence: each row's value by :func:`explode`'s rule."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not col.null_count:
        return _dense(col)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    out: list[Any] = [None] * len(col)
    for i, v in zip(np.flatnonzero(valid).tolist(), _dense(col.filter(pa.array(valid))), strict=True):
        out[i] = v
    return out


def explode(batch: pa.RecordBatch | pa.Table) -> Iterator[Prediction]:
    """Per-event :class:`Prediction` records of an output block (``StatefulInference(output="arrow")``).

    The same records, field by field and in the same order, that ``output="records"`` yields:
    ``key, ts, seq, sub, pos, fresh, reset, model_version`` as Python values; ``outputs`` maps
    every other column to the row's value: a numpy row (``[k]``) for a fixed-size list column,
    else a numpy scalar of the column's dtype; ``None`` where the value is null (``<name>_next``
    where the stream ended). Each row's value depends on that row alone, never on how rows were
    split into blocks. Use it as ``blocks | beam.FlatMap(explode)``: the records keep the
    block's timestamp and windows.
    """
    names = [c for c in batch.column_names if c not in BASE and c != REL]
    cols = [batch.column(c).to_pylist() for c in BASE] + [_values(batch.column(c)) for c in names]
    nb = len(BASE)
    for row in zip(*cols, strict=True):
        yield Prediction(*row[:nb], dict(zip(names, row[nb:], strict=True)))


def emit(t: pa.Table | None, output: str, *, floor: int) -> Iterator:
    """A flush's output rows (with their release time ``_rel``, micros) as timestamped Beam elements.

    ``floor``: the flush's own time (micros); nothing goes out before the timer that emits it.
    """
    if t is None or not t.num_rows:
        return
    at = np.maximum(ceil_millis_array(t.column(REL).to_numpy()), floor)
    t = t.drop_columns([REL])
    if output == "arrow":  # one block per timestamp, rows in flush order (a stable sort, then slices)
        uniq = np.unique(at)
        if len(uniq) > 1:
            order = np.argsort(at, kind="stable")
            t, at = t.take(pa.array(order)), at[order]
        bounds = [*np.searchsorted(at, uniq).tolist(), len(at)]
        for u, a, b in zip(uniq.tolist(), bounds[:-1], bounds[1:], strict=True):
            for batch in t.slice(a, b - a).combine_chunks().to_batches():
                yield TimestampedValue(batch, timestamp(u))
        return
    stamps = {u: timestamp(u) for u in np.unique(at).tolist()}
    for p, u in zip(explode(t), at.tolist(), strict=True):
        yield TimestampedValue(p, stamps[u])
