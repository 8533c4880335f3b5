"""The batched apply: due events of one shard, deduplicated and ordered, through as few ORT calls as fit.

Rules, each in one place here:

* **Duplicates.** ``(key, seq)`` names an input row, whose events share its ``ts``, for the
  dedupe horizon of event time (:func:`duplicates` has the rule).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...keyed.health import HEALTH
from ...model.loaded import Model
from ..postprocess import Postprocess
from ..records import EVENT, KEY, SEQ, SUB, TS, event_json, original_text
from .clock import EARLIEST, NEVER, release_micros, to_micros
from .counters import Counters
from .intake import REL, TSU
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
    """What one flush's apply did: the rows it applied (key / stream order), the rows it could not apply,
    and the keys whose stream a model switch ended."""

    rows: pa.Table | None
    dead: list[tuple[pa.Table, int, str, str]] = field(default_factory=list)  # (table, row, kind, reason)
    ended: list[str] = field(default_factory=list)


def duplicates(due: pa.Table, store: ShardStore, horizon: int) -> np.ndarray:
    """Mask of ``due`` rows that are duplicates (the one identity rule of the Beam layer).

    ``(key, seq)`` names an input row, and its events (``sub``) share the row's ``ts``. The
    name holds for ``horizon`` (micros) of event time: a row is a duplicate of the last row
    applied under its name when its ``ts`` is within ``horizon`` of that row's, and a new row
    beyond it. Rows released together are taken in ``ts`` order under the same rule, so the
    result does not depend on how events were split into flushes (batch or streaming, warm or
    rebuilt). Copies at one ``ts`` that carry their original row (``event``: the row's text, or
    the copy id the jobs' readers set, :func:`~streamrnn.beam.records.copy_id`) compete as whole
    rows: the one whose payloads, in ``sub`` order, compare smallest value by value wins, then
    the one whose original row sorts first. Events
    without an original row are each their own copy of one ``(key, seq, sub)``: the smallest
    payload wins. The winner never mixes two copies, whatever the arrival order.
    """
    n = due.num_rows
    keys = due.column(KEY)
    kc = pc.index_in(keys, pc.unique(keys)).to_numpy(zero_copy_only=False)
    seq = due.column(SEQ).to_numpy()
    sub = due.column(SUB).to_numpy()
    tsu = due.column(TSU).to_numpy()
    if EVENT in due.column_names:
        ev = due.column(EVENT)
        ec = pc.fill_null(pc.index_in(ev, pc.unique(ev)), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        ec = np.full(n, -1, np.int64)
    order = np.lexsort((*_payload_keys(due.column("x")), sub, ec, tsu, seq, kc))
    k, q, t, e, b = kc[order], seq[order], tsu[order], ec[order], sub[order]
    same_row = np.zeros(n, bool)
    same_row[1:] = (k[1:] == k[:-1]) & (q[1:] == q[:-1])
    row_start = np.flatnonzero(~same_row)
    row_end = np.append(row_start[1:], n)
    lose = np.zeros(n, bool)
    # names seen before (applied) or at several times in this flush: the horizon rule, in ts order
    klist = keys.to_pylist()
    multi = t[row_end - 1] != t[row_start]
    known = (np.fromiter(((klist[i], int(seq[i])) in store.ids for i in order[row_start]), bool, len(row_start))
             if store.ids else np.zeros(len(row_start), bool))
    for r in np.flatnonzero(multi | known):
        lo, hi = int(row_start[r]), int(row_end[r])
        prev = store.ids.get((klist[order[lo]], int(q[lo])))
        for u in np.unique(t[lo:hi]):
            if prev is not None and abs(int(u) - prev) <= horizon:
                lose[lo:hi] |= t[lo:hi] == u
            else:
                prev = int(u)
    # copies of several original rows at one ts: the winning copy, whole
    other = np.zeros(n, bool)
    other[1:] = same_row[1:] & (t[1:] == t[:-1]) & (e[1:] != e[:-1]) & ~lose[1:]
    for i in np.flatnonzero(other):
        lo = i
        while lo > 0 and same_row[lo] and t[lo - 1] == t[i]:
            lo -= 1
        hi = i
        while hi < n - 1 and same_row[hi + 1] and t[hi + 1] == t[i]:
            hi += 1
        seg = slice(lo, hi + 1)
        if not lose[seg].all():
            lose[seg] |= e[seg] != _winning_copy(due, order[seg], e[seg])
    # within the winner, an event (key, seq, sub) seen twice: identical copies, or one event sent twice
    again = np.zeros(n, bool)
    again[1:] = same_row[1:] & (b[1:] == b[:-1]) & (e[1:] == e[:-1]) & (t[1:] == t[:-1])
    dup = np.zeros(n, bool)
    dup[order[lose | again]] = True
    return dup


def is_duplicate(store: ShardStore, key: str, seq: int, tsu: int, horizon: int) -> bool:
    """Whether a row ``(key, seq)`` at ``tsu`` is the last applied row of that name (within the horizon)."""
    prev = store.ids.get((key, seq))
    return prev is not None and abs(tsu - prev) <= horizon


def _winning_copy(due: pa.Table, rows: np.ndarray, ec: np.ndarray) -> int:
    """The ``event`` code of the winning copy among a row's copies at its smallest ts (``rows`` in (event,
    sub, payload) order): smallest payloads in ``sub`` order, then smallest original row."""
    x = due.column("x").take(pa.array(rows)).to_pylist()
    text = due.column(EVENT).take(pa.array(rows)).to_pylist()
    copies: dict[int, tuple[list, str]] = {}
    for j, c in enumerate(ec.tolist()):
        copies.setdefault(c, ([], text[j] or ""))[0].append(x[j])
    return min(copies, key=lambda c: copies[c])


def _payload_keys(x: pa.ChunkedArray) -> list[np.ndarray]:
    """Sort keys that order payloads value by value (last key most significant, as ``np.lexsort`` wants)."""
    if pa.types.is_integer(x.type):
        return [x.to_numpy()]
    flat = pc.list_flatten(x).to_numpy(zero_copy_only=False).reshape(len(x), -1)
    return [flat[:, j] for j in range(flat.shape[1] - 1, -1, -1)]


def apply_due(due: pa.Table, store: ShardStore, cfg: Config, *, horizon: int, epochs: Callable[[np.ndarray], tuple],
              load_model: Callable[[str], Model], version: Callable[[Model], str], m: Counters) -> Applied:
    """Apply deduplicated due events to ``store`` (see the module rules). Mutates ``store``.

    ``epochs(tsu)`` gives each event's model epoch and the epochs' model paths; a key's run
    switches model where its epoch changes (``load_model`` loads it).
    """
    out = Applied(None)
    dup = duplicates(due, store, horizon)
    for i in np.flatnonzero(dup):
        out.dead.append((due, int(i), "duplicate", "duplicate"))
    keep = np.flatnonzero(~dup)
    if not len(keep):
        return out
    plan = _Plan.of(due.take(pa.array(keep)), store, cfg, epochs)
    res = _Results(plan.n)
    plan.horizon = horizon / 1e6
    for e in np.unique(plan.seg_epoch):
        out.ended += switch_model(store, plan.paths, plan.effs, int(e), load_model, m, ttl=cfg.ttl)
        v = version(store.op.model)
        in_e = np.flatnonzero(plan.seg_epoch == e)
        for r in np.unique(plan.rank[in_e]):
            in_r = in_e[plan.rank[in_e] == r]
            for b in np.unique(plan.bucket[in_r]):
                segs = in_r[plan.bucket[in_r] == b]
                for c0 in range(0, len(segs), cfg.max_batch):
                    _call(plan, segs[c0:c0 + cfg.max_batch], store, cfg, m, res, v)
    t = plan.t
    for i in np.flatnonzero(~res.applied):
        out.dead.append((t, int(i), "error", res.failed_keys.get(int(plan.kc[i]), "error")))
    idx = np.flatnonzero(res.applied)
    if len(idx):
        seqs = t.column(SEQ).to_numpy()[idx]
        store.add_ids([plan.keys[i] for i in idx], seqs, plan.tsu[idx])
        cols: dict[str, pa.Array] = {
            KEY: pa.array([plan.keys[i] for i in idx], pa.string()), TS: pa.array(plan.ts[idx]),
            SEQ: pa.array(seqs), SUB: pa.array(t.column(SUB).to_numpy()[idx]),
            "pos": pa.array(res.pos[idx]), "fresh": pa.array(res.fresh[idx]),
            "reset": pa.array(res.reset[idx].tolist(), pa.string()),
            "model_version": pa.array(res.ver[idx].tolist(), pa.string()),
            REL: pa.array(t.column(REL).to_numpy()[idx])}
        for name, val in res.outputs.items():
            cols[name] = to_arrow(val[idx])
        out.rows = pa.table(cols)
    m.applied(store.op.model, len(idx))
    return out


def switch_model(store: ShardStore, paths: Sequence[str], effs: Sequence[int | None], e: int,
                 load_model: Callable[[str], Model], m: Counters, *, ttl: float | None = None) -> list[str]:
    """Serve ``store`` with epoch ``e``'s model (``paths[e]``; ``effs[e]``: its update's effective time, micros;
    epoch 0, the pipeline's own model, has None); the keys whose stream ended. Nothing when the store serves it.

    The store passes every update since its own (``store.model_eff``) up to ``e``, in order, so what ends a
    stream does not depend on which flushes a runner made: the first of them whose model has other state shapes
    than the model before it ends every live stream at its effective time (``model_update``), except those idle
    past ``ttl`` before it, which had ended already (``expired``), whether their expiry ran in an earlier flush
    (streaming) or not yet (a bounded input applied at once). Through same-shaped models only, state goes on.
    Each update passed counts as a switch. A store whose log did not record its update (``model_eff`` None:
    written by an earlier version) is taken to serve the latest update up to ``e`` with its model's path.
    """
    cur = store.model_eff
    if cur is None:
        cur = max((effs[k] for k in range(1, e + 1) if paths[k] == store.model_path), default=EARLIEST)
    passed = [k for k in range(1, e + 1) if effs[k] > cur]
    if not passed:
        if paths[e] == store.model_path:
            return []
        passed = [e]  # (back to an earlier epoch's model: an event before the store's update)
    sig, at = store.op.model.spec.state_signature, None
    for k in passed:
        s = load_model(paths[k]).spec.state_signature
        if s != sig and at is None:
            at = effs[k] if effs[k] is not None else cur
        sig = s
    expired: list[str] = []
    if at is not None and ttl is not None:
        expired = [k for k, mk in store.meta.items() if mk.live and k in store.op and at / 1e6 - mk.last_ts > ttl]
        store.expire(expired)
        m.expired.inc(len(expired))
    m.model_switches.inc(len(passed))
    ended = store.switch_model(load_model(paths[e]), paths[e], effs[e] if effs[e] is not None else EARLIEST,
                               end=at is not None)
    m.model_resets.inc(len(ended))
    return [*expired, *ended]


@dataclass
class _Plan:
    """One apply's events in key / stream order, cut into segments (a key's run within one model epoch and
    TTL span, at most ``max_steps`` long) and grouped for batched calls."""

    t: pa.Table
    keys: list[str]
    kc: np.ndarray
    ts: np.ndarray
    tsu: np.ndarray
    gap: np.ndarray  # the event starts its key afresh: idle past the TTL
    xv: np.ndarray
    paths: list[str]
    seg_start: np.ndarray
    seg_end: np.ndarray
    seg_kc: np.ndarray
    seg_epoch: np.ndarray
    rank: np.ndarray  # the segment's position within its key
    bucket: np.ndarray  # log2 of its length: similar lengths share a call
    horizon: float = 0.0  # s: how long an ended stream's reason is remembered

    @property
    def n(self) -> int:
        return self.t.num_rows

    @classmethod
    def of(cls, t: pa.Table, store: ShardStore, cfg: Config, epochs: Callable[[np.ndarray], tuple]) -> _Plan:
        keys = t.column(KEY)
        kc = pc.index_in(keys, pc.unique(keys)).to_numpy(zero_copy_only=False)
        ts, seq, sub = t.column(TS).to_numpy(), t.column(SEQ).to_numpy(), t.column(SUB).to_numpy()
        order = np.lexsort((sub, seq, ts, kc))
        t = t.take(pa.array(order))
        kc, ts = kc[order], ts[order]
        ok = t.column(KEY).to_pylist()
        tsu = t.column(TSU).to_numpy()
        x = t.column("x")
        xv = (x.to_numpy().astype(np.int64) if cfg.tokens else
              pc.list_flatten(x).to_numpy(zero_copy_only=False).reshape(-1, cfg.n_features).astype(np.float32))
        N = t.num_rows
        epoch, paths, *effs = epochs(tsu)
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
        seg_kc = kc[seg_start]
        rank = np.zeros(len(seg_start), np.int64)
        same_key = np.zeros(len(seg_start), bool)
        same_key[1:] = seg_kc[1:] == seg_kc[:-1]
        for j in np.flatnonzero(same_key):
            rank[j] = rank[j - 1] + 1
        bucket = np.ceil(np.log2(np.maximum(seg_end - seg_start, 1))).astype(np.int64)
        plan = cls(t, ok, kc, ts, tsu, gap, xv, paths, seg_start, seg_end, seg_kc, epoch[seg_start], rank, bucket)
        plan.effs = effs[0] if effs else [None] * len(paths)  # each epoch's effective time (micros; None: base)
        return plan


class _Results:
    """Per event of a plan: outputs, stream position, fresh start and why, model version, applied or not."""

    def __init__(self, n: int):
        self.outputs: dict[str, np.ndarray] = {}
        self.pos = np.zeros(n, np.int64)
        self.fresh = np.zeros(n, bool)
        self.reset = np.full(n, "", dtype=object)
        self.ver = np.full(n, "", dtype=object)
        self.applied = np.zeros(n, bool)
        self.failed_keys: dict[int, str] = {}  # key code -> why its batch failed (its later segments stop)


def _chunk(new_seg: np.ndarray, max_steps: int) -> np.ndarray:
    """Segment starts: ``new_seg`` plus a cut every ``max_steps`` events of a segment."""
    starts = np.flatnonzero(new_seg)
    ends = np.append(starts[1:], len(new_seg))
    long = (ends - starts) > max_steps
    if not long.any():
        return starts
    extra = [np.arange(s + max_steps, e, max_steps) for s, e in zip(starts[long], ends[long], strict=True)]
    return np.sort(np.concatenate([starts, *extra]))


def _call(plan: _Plan, segs: np.ndarray, store: ShardStore, cfg: Config, m: Counters, res: _Results,
          version: str) -> None:
    """One ORT call over ``segs`` (segments of distinct keys); records results and advances key metadata."""
    segs = [s for s in segs if int(plan.seg_kc[s]) not in res.failed_keys]  # a key whose earlier batch failed
    if not segs:
        return
    ok = plan.keys
    rows = np.concatenate([np.arange(plan.seg_start[s], plan.seg_end[s]) for s in segs])
    reasons = {}
    for s in segs:
        i0 = plan.seg_start[s]
        k = ok[i0]
        if plan.gap[i0] and k in store.op:  # idle past the TTL since its last event (in this flush or before)
            store.op.evict(k)
            m.expired.inc()
            store.end_streams([k], "expired")
            reasons[k] = store.reason_for(k, float(plan.ts[i0]), plan.horizon)
        elif k not in store.op:
            reasons[k] = store.reason_for(k, float(plan.ts[i0]), plan.horizon)
    rkeys = [ok[i] for i in rows]
    t0 = time.perf_counter()
    try:
        r = store.op.process(rkeys, plan.xv[rows])
    except Exception as ex:  # an ORT failure: these events go to dead letters, state unchanged
        for s in segs:
            res.failed_keys[int(plan.seg_kc[s])] = f"error: {type(ex).__name__}: {ex}"
        return
    m.batch(store.op.model, time.perf_counter() - t0, len(rows))
    post = cfg.postprocess(plan.xv[rows], r.outputs, r.prev_outputs) if cfg.postprocess is not None else r.outputs
    if r.state_health is not None:  # health on: each event's state health (streamrnn.keyed.health)
        post = {**post, "state_health": r.state_health}
    m.scored(store.op.model, post)
    for name, val in post.items():
        if name not in res.outputs:
            res.outputs[name] = np.zeros((plan.n, *val.shape[1:]), val.dtype)
        res.outputs[name][rows] = val
    res.pos[rows] = r.pos
    res.fresh[rows] = r.fresh
    for j in np.flatnonzero(r.fresh):
        res.reset[rows[j]] = reasons.get(ok[rows[j]], "")
    if r.state_health is not None:
        healed = rows[r.reset == HEALTH]  # the first event run from a state the rule reset (streamrnn.keyed.health)
        res.reset[healed] = HEALTH
        m.health_resets.inc(len(healed))
    res.ver[rows] = version
    res.applied[rows] = True
    for s in segs:
        end = plan.seg_end[s] - 1
        last = float(plan.ts[end])
        exp = NEVER if cfg.ttl is None else int(release_micros(np.array([to_micros(last + cfg.ttl)]),
                                                                size=cfg.size, lateness=cfg.lateness)[0])
        store.set_meta(ok[end], KeyMeta(last, exp, "", True))


def to_arrow(v: np.ndarray) -> pa.Array:
    if v.ndim == 1:
        return pa.array(v)
    width = int(np.prod(v.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(v).reshape(-1)), width)


def dead_event_json(t: pa.Table, i: int) -> str:
    ev = original_text(t.column(EVENT)[i].as_py()) if EVENT in t.column_names else None
    return ev if ev is not None else event_json({c: t.column(c)[i].as_py() for c in (KEY, TS, SEQ, SUB, "x")})
