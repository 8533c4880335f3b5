"""Output rows to Beam elements: typed ``Prediction`` records or Arrow record batches.

Every output is timestamped when its result became final: its window's release time
(window end + allowed lateness) rounded up to a whole millisecond (when the timer that
releases it fires, on every runner), or later if it was held back for its next event;
never before the timer that emits it. So outputs are on time for any downstream windowing;
the event's own time is the ``ts`` field.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from apache_beam.transforms.window import TimestampedValue

from .clock import ceil_millis_array, timestamp
from .intake import REL
from .records import KEY, SEQ, SUB, TS, Prediction

BASE = (KEY, TS, SEQ, SUB, "pos", "fresh", "reset", "model_version")


def emit(t: pa.Table | None, output: str, *, floor: int) -> Iterator:
    if t is None or not t.num_rows:
        return
    at = np.maximum(ceil_millis_array(t.column(REL).to_numpy()), floor)
    t = t.drop_columns([REL])
    if output == "arrow":
        for u in np.unique(at):
            part = t.filter(pa.array(at == u)).combine_chunks()
            for b in part.to_batches():
                yield TimestampedValue(b, timestamp(int(u)))
        return
    names = [c for c in t.column_names if c not in BASE]
    vals = {}
    for name in names:
        col = t.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            vals[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        elif col.null_count:
            vals[name] = col.to_pylist()
        else:
            vals[name] = col.to_numpy(zero_copy_only=False)
    cols = {c: t.column(c).to_pylist() for c in BASE}
    for i in range(t.num_rows):
        yield TimestampedValue(Prediction(*(cols[c][i] for c in BASE), {n: v[i] for n, v in vals.items()}),
                               timestamp(int(at[i])))
