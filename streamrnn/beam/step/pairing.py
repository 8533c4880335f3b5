"""Next-event pairing: each output row gets ``<field>_next``, that field on its key's next event.

A row's next is the following applied row of its key, unless that one started fresh (the
stream ended: TTL, a model-update reset). A key's latest row is held back in the shard
store until its next event is applied or its stream ends (expiry, end of input); then it
goes out with null.

Output timestamps: a row is final once its next event is known, so it goes out at the
later of its own release time and its next event's release time (``_rel`` column). A row
whose stream ended is final when it ended: at its TTL expiry, or at the end of the input
(``ends``); or, when a model update to other state shapes ended it, at the switch. A streaming
flush stamps those rows with its own time, which is that time; a bounded input applied at
once computes it, so both give every row the same timestamp. With ``save_state`` a stream
ends only at a flush that applied events past its end (a drain fires every timer), and
both paths stamp that flush.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..records import KEY
from .clock import END_OF_INPUT_MICROS
from .intake import REL
from .store import ShardStore


def pair(rows: pa.Table | None, store: ShardStore, fields: Sequence[str], *, final: bool,
         released: Sequence[str] = (), ends: Callable[[np.ndarray], np.ndarray] | None = None) -> pa.Table | None:
    """Rows ready to go out with their ``*_next`` columns; holds back each live key's last row.

    ``rows``: this flush's applied rows in key / stream order. ``released``: keys whose
    stream ended without a new row (expired): their held row goes out with null. ``ends(ts)``:
    when a stream whose last event is at ``ts`` ends if nothing follows (micros; given where the flush applies
    a bounded input at once, or releases everything at the end of the input).
    """
    keys = list(dict.fromkeys([*([] if rows is None else rows.column(KEY).to_pylist()), *released]))
    held = [store.held[k] for k in keys if k in store.held]
    parts = [*held, *([rows] if rows is not None and rows.num_rows else [])]
    if not parts:
        return None
    t = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
    n = t.num_rows
    grp = np.zeros(n, np.int64)
    nh = sum(h.num_rows for h in held)
    grp[nh:] = 1  # held rows precede this flush's rows of the same key
    kcol = t.column(KEY)
    kc = pc.index_in(kcol, pc.unique(kcol)).to_numpy(zero_copy_only=False)
    o = np.lexsort((np.arange(n), grp, kc))
    t, kc = t.take(pa.array(o)), kc[o]
    fresh = t.column("fresh").to_numpy(zero_copy_only=False).astype(bool)
    cont = np.zeros(n, bool)
    cont[:-1] = (kc[1:] == kc[:-1]) & ~fresh[1:]
    last = np.ones(n, bool)
    last[:-1] = kc[1:] != kc[:-1]
    klist = t.column(KEY).to_pylist()
    hold = np.zeros(n, bool)
    if not final:
        for i in np.flatnonzero(last):
            hold[i] = klist[i] in store.op
    nxt = pa.array(np.minimum(np.arange(1, n + 1), n - 1))
    rel = t.column(REL).to_numpy()
    rel_next = rel[np.minimum(np.arange(1, n + 1), n - 1)]
    known = np.where(cont, np.maximum(rel, rel_next), rel)
    if ends is not None:  # rows whose stream ended: when it ended (see the module doc)
        end = ends(t.column("ts").to_numpy())
        if not final:  # a key's last row goes out here only if its stream ended (else it is held)
            end = np.where(last & (end >= END_OF_INPUT_MICROS), rel, end)
        known = np.where(cont, known, np.where(last, end, np.minimum(end, np.maximum(rel, rel_next))))
    out = t.set_column(t.column_names.index(REL), REL, pa.array(known))
    for f in fields:
        col = t.column(f).combine_chunks()
        out = out.append_column(f + "_next", pc.if_else(pa.array(cont), col.take(nxt), pa.nulls(n, col.type)))
    for k in keys:
        store.set_held(k, None)
    for i in np.flatnonzero(hold):
        store.set_held(klist[i], t.slice(int(i), 1))
    out = out.filter(pa.array(~hold))
    return out if out.num_rows else None
