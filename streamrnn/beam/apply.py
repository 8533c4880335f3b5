"""The batched apply: due events of one shard, deduplicated and ordered, through as few ORT calls as fit.

Rules, each in one place here:

* **Duplicates.** ``(key, seq)`` names an input row, whose events share its ``ts``
  (:func:`duplicates` has the rule).
* **Order.** Each key's events apply in ``(ts, seq, sub)`` order.
* **TTL.** An event more than ``ttl`` seconds (event time) after its key's previous event
  starts the key fresh (``reset="expired"``).
* **Model epochs.** An event at or after an update's effective time uses that model.
* **Batching.** A key's run is cut into segments of at most ``max_steps`` steps; segments
  of similar length (powers of two) go into one call of at most ``max_batch`` keys, so a
  busy key never pads the others (a 1 MB text record is a few thousand long-T calls).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .clock import NEVER, release_micros, to_micros
from .counters import Counters
from .intake import REL, TSU
from .postprocess import Postprocess
from .records import EVENT, KEY, SEQ, SUB, TS, event_json
from .store import KeyMeta, ShardStore


@dataclass
class Config:
    ttl: float | None
    size: int  # window size, micros
    lateness: int  # micros
    max_steps: int
    max_batch: int
    tokens: bool
    n_features: int
    postprocess: Postprocess | None


@dataclass
class Applied:
    """The rows one flush applied, in key / stream order, plus the rows it could not apply."""

    rows: pa.Table | None
    dead: list[tuple[pa.Table, int, str, str]] = field(default_factory=list)  # (table, row, kind, reason)


def duplicates(due: pa.Table, store: ShardStore) -> np.ndarray:
    """Mask of ``due`` rows that are duplicates (the one identity rule of the Beam layer).

    ``(key, seq)`` names an input row; its events (``sub``) share the row's ``ts``. A row
    already applied is a duplicate. Among copies released together, the copy with the
    smallest ``ts`` wins (then the smallest payload, compared value by value), the same on
    every worker whatever the arrival order; events carrying the row's id at another ``ts``
    are duplicates too.
    """
    n = due.num_rows
    keys = due.column(KEY)
    kc = pc.index_in(keys, pc.unique(keys)).to_numpy(zero_copy_only=False)
    seq = due.column(SEQ).to_numpy()
    sub = due.column(SUB).to_numpy()
    ts = due.column(TS).to_numpy()
    order = np.lexsort((*_payload_keys(due.column("x")), sub, ts, seq, kc))
    k, q, t, b = kc[order], seq[order], ts[order], sub[order]
    same_row = np.zeros(n, bool)
    same_row[1:] = (k[1:] == k[:-1]) & (q[1:] == q[:-1])
    row_start = np.flatnonzero(~same_row)
    winner_ts = np.repeat(t[row_start], np.diff(np.append(row_start, n)))
    again = np.zeros(n, bool)
    again[1:] = same_row[1:] & (b[1:] == b[:-1]) & (t[1:] == t[:-1])
    dup = np.zeros(n, bool)
    dup[order[(t != winner_ts) | again]] = True
    if store.ids:
        dup |= np.fromiter(((kk, ss) in store.ids for kk, ss in zip(keys.to_pylist(), seq.tolist(), strict=True)),
                           bool, n)
    return dup


def _payload_keys(x: pa.ChunkedArray) -> list[np.ndarray]:
    """Sort keys that order payloads value by value (last key most significant, as ``np.lexsort`` wants)."""
    if pa.types.is_integer(x.type):
        return [x.to_numpy()]
    flat = pc.list_flatten(x).to_numpy(zero_copy_only=False).reshape(len(x), -1)
    return [flat[:, j] for j in range(flat.shape[1] - 1, -1, -1)]


def apply_due(due: pa.Table, store: ShardStore, cfg: Config, *, epoch_models: Callable[[np.ndarray], tuple],
              switch: Callable[[ShardStore, str], None], version: Callable[[ShardStore], str],
              m: Counters) -> Applied:
    """Apply deduplicated due events to ``store`` (see the module rules). Mutates ``store``."""
    out = Applied(None)
    dup = duplicates(due, store)
    for i in np.flatnonzero(dup):
        out.dead.append((due, int(i), "duplicate", "duplicate"))
    keep = np.flatnonzero(~dup)
    if not len(keep):
        return out
    t = due.take(pa.array(keep))
    keys = t.column(KEY)
    kc = pc.index_in(keys, pc.unique(keys)).to_numpy(zero_copy_only=False)
    ts, seq, sub = t.column(TS).to_numpy(), t.column(SEQ).to_numpy(), t.column(SUB).to_numpy()
    order = np.lexsort((sub, seq, ts, kc))
    t = t.take(pa.array(order))
    kc, ts = kc[order], ts[order]
    ok = t.column(KEY).to_pylist()
    tsu = t.column(TSU).to_numpy()
    x = t.column("x")
    xv = (x.to_numpy().astype(np.int64) if cfg.tokens
          else pc.list_flatten(x).to_numpy(zero_copy_only=False).reshape(-1, cfg.n_features).astype(np.float32))
    N = t.num_rows
    epoch, paths = epoch_models(tsu)
    first = np.ones(N, bool)
    first[1:] = kc[1:] != kc[:-1]
    gap = np.zeros(N, bool)
    if cfg.ttl is not None:
        gap[1:] = ~first[1:] & (ts[1:] - ts[:-1] > cfg.ttl)
        for i in np.flatnonzero(first):
            mk = store.meta.get(ok[i])
            if mk is not None and mk.live and ts[i] - mk.last_ts > cfg.ttl:
                gap[i] = True
    new_seg = first | gap
    new_seg[1:] |= epoch[1:] != epoch[:-1]
    seg_start = _chunk(new_seg, cfg.max_steps)
    seg_end = np.append(seg_start[1:], N)
    seg_len = seg_end - seg_start
    seg_kc = kc[seg_start]
    rank = np.zeros(len(seg_start), np.int64)  # the segment's position within its key
    same_key = np.zeros(len(seg_start), bool)
    same_key[1:] = seg_kc[1:] == seg_kc[:-1]
    for j in np.flatnonzero(same_key):
        rank[j] = rank[j - 1] + 1
    results: dict[str, np.ndarray] = {}
    pos = np.zeros(N, np.int64)
    fresh = np.zeros(N, bool)
    reset = np.full(N, "", dtype=object)
    ver = np.full(N, "", dtype=object)
    applied = np.zeros(N, bool)
    failed_keys: dict[int, str] = {}
    seg_epoch = epoch[seg_start]
    bucket = np.ceil(np.log2(np.maximum(seg_len, 1))).astype(np.int64)
    for e in np.unique(seg_epoch):
        if paths[e] != store.model_path:
            switch(store, paths[e])
        v = version(store)
        in_e = np.flatnonzero(seg_epoch == e)
        for r in np.unique(rank[in_e]):
            in_r = in_e[rank[in_e] == r]
            for b in np.unique(bucket[in_r]):
                segs = in_r[bucket[in_r] == b]
                for c0 in range(0, len(segs), cfg.max_batch):
                    _call(segs[c0:c0 + cfg.max_batch], seg_start, seg_end, seg_kc, ok, ts, gap, xv, store,
                          cfg, m, failed_keys, results, pos, fresh, reset, ver, v, applied)
    for i in np.flatnonzero(~applied):
        out.dead.append((t, int(i), "error", failed_keys.get(int(kc[i]), "error")))
    idx = np.flatnonzero(applied)
    if len(idx):
        store.add_ids([ok[i] for i in idx], t.column(SEQ).to_numpy()[idx], int(tsu[idx].max()))
        cols: dict[str, pa.Array] = {
            KEY: pa.array([ok[i] for i in idx], pa.string()), TS: pa.array(ts[idx]),
            SEQ: pa.array(t.column(SEQ).to_numpy()[idx]), SUB: pa.array(t.column(SUB).to_numpy()[idx]),
            "pos": pa.array(pos[idx]), "fresh": pa.array(fresh[idx]),
            "reset": pa.array(reset[idx].tolist(), pa.string()),
            "model_version": pa.array(ver[idx].tolist(), pa.string()),
            REL: pa.array(t.column(REL).to_numpy()[idx])}
        for name, val in results.items():
            cols[name] = to_arrow(val[idx])
        out.rows = pa.table(cols)
    m.applied(store.op.model, len(idx))
    return out


def _chunk(new_seg: np.ndarray, max_steps: int) -> np.ndarray:
    """Segment starts: ``new_seg`` plus a cut every ``max_steps`` events of a segment."""
    starts = np.flatnonzero(new_seg)
    ends = np.append(starts[1:], len(new_seg))
    long = (ends - starts) > max_steps
    if not long.any():
        return starts
    extra = [np.arange(s + max_steps, e, max_steps) for s, e in zip(starts[long], ends[long], strict=True)]
    return np.sort(np.concatenate([starts, *extra]))


def _call(segs, seg_start, seg_end, seg_kc, ok, ts, gap, xv, store: ShardStore, cfg: Config, m: Counters,
          failed_keys, results, pos, fresh, reset, ver, v, applied) -> None:
    segs = [s for s in segs if int(seg_kc[s]) not in failed_keys]  # a key whose earlier batch failed stops
    if not segs:
        return
    rows = np.concatenate([np.arange(seg_start[s], seg_end[s]) for s in segs])
    reasons = {}
    for s in segs:
        i0 = seg_start[s]
        k = ok[i0]
        mk = store.meta.get(k)
        if gap[i0] and k in store.op:
            store.op.evict(k)
            m.expired.inc()
            reasons[k] = "expired"
        elif k not in store.op:
            reasons[k] = (mk.reason if mk is not None and mk.reason else "new")
    rkeys = [ok[i] for i in rows]
    t0 = time.perf_counter()
    try:
        res = store.op.process(rkeys, xv[rows])
    except Exception as ex:  # an ORT failure: these events go to dead letters, state unchanged
        for s in segs:
            failed_keys[int(seg_kc[s])] = f"error: {type(ex).__name__}: {ex}"
        return
    m.batch(store.op.model, time.perf_counter() - t0, len(rows))
    post = cfg.postprocess(xv[rows], res.outputs, res.prev_outputs) if cfg.postprocess is not None else res.outputs
    m.scored(store.op.model, post)
    for name, val in post.items():
        if name not in results:
            results[name] = np.zeros((len(pos), *val.shape[1:]), val.dtype)
        results[name][rows] = val
    pos[rows] = res.pos
    fresh[rows] = res.fresh
    for j in np.flatnonzero(res.fresh):
        reset[rows[j]] = reasons.get(ok[rows[j]], "")
    ver[rows] = v
    applied[rows] = True
    for s in segs:
        end = seg_end[s] - 1
        last = float(ts[end])
        exp = NEVER if cfg.ttl is None else int(release_micros(np.array([to_micros(last + cfg.ttl)]),
                                                                size=cfg.size, lateness=cfg.lateness)[0])
        store.set_meta(ok[end], KeyMeta(last, exp, "", True))


def to_arrow(v: np.ndarray) -> pa.Array:
    if v.ndim == 1:
        return pa.array(v)
    width = int(np.prod(v.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(v).reshape(-1)), width)


def dead_event_json(t: pa.Table, i: int) -> str:
    ev = t.column(EVENT)[i].as_py() if EVENT in t.column_names else None
    return ev if ev is not None else event_json({c: t.column(c)[i].as_py() for c in (KEY, TS, SEQ, SUB, "x")})
