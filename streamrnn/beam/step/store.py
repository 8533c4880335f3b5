"""The shard state store: per-key recurrent state, stream metadata, applied ids and held rows.

One rule governs this module: **the store a worker holds in memory is exactly the store it
would rebuild from Beam state.** :meth:`ShardStore.from_log` of the log after any flush
equals the warm store field by field (:meth:`ShardStore.lasting`), so results never depend
on whether a worker's cache was warm, dropped, or rebuilt after a failed bundle.

A flush reads and writes in proportion to the keys it advances, not the keys a shard holds:

* Beam state keeps an append-only **log** of deltas (``BagState``): each flush that changed
  something appends the keys it touched (their state rows and metadata), the ids it applied,
  the rows it holds back, and the store's scalars (the applied-id floor and the tombstone
  sweep mark). When the log's bytes pass twice those of the last full snapshot (plus
  64 KiB), it is compacted into one full snapshot. :class:`StoreLog` keeps that bookkeeping.
* Each worker keeps decoded stores in memory (:class:`ShardCache`, least recently used
  first, bounded by bytes; it outlives ``DoFn.teardown``), tagged with a random **token**
  that is also written to Beam state with every flush. A cached store is used only when the
  token in state matches it; a failed bundle leaves the old token in state, so a retry (here
  or on another worker) rebuilds the store from the log. Exactly-once holds under retries
  because Beam commits the log, the token and the outputs together.

Everything is Arrow IPC (no pickle). Event-time quantities are integer micros.
"""

from __future__ import annotations

import heapq
import io
import json
import os
import struct
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ...keyed import snapshot
from ...keyed.health import HealthConfig
from ...keyed.operator import KeyedOperator
from ...model.loaded import Model
from ..records import KEY, SEQ
from .clock import EARLIEST, NEVER, to_micros

_MAX_KEYS = 2**31 - 1


@dataclass
class KeyMeta:
    """A key's stream: last applied event time (s), when its state may be dropped (micros),
    why its next event starts fresh (``reason``), and whether state is held (``live``)."""

    last_ts: float
    expiry: int
    reason: str = ""
    live: bool = True


@dataclass(frozen=True)
class ModelChange:
    """What :meth:`ShardStore.from_log` found when the file at the state's model path no longer holds the
    model that wrote the state: same state shapes (``"carried"``: state goes on under the new weights) or
    other shapes (``"reset"``: every live key's stream ended, ``reset_keys``)."""

    kind: str
    reset_keys: tuple[str, ...] = ()


@dataclass
class StoreLog:
    """Log bookkeeping of one store: what changed since the last write, and the log's size."""

    seq: int = 0  # the last delta written
    rows: int = 0
    bytes: int = 0
    full_bytes: int = 0
    full: bool = False  # the next write is a full snapshot (after a model switch)
    touched: set[str] = field(default_factory=set)
    held_touched: set[str] = field(default_factory=set)
    new_ids: list[tuple[str, int, int]] = field(default_factory=list)
    scalars: dict[str, int] = field(default_factory=dict)  # the store's scalars as last written

    def clear_changes(self) -> None:
        self.touched.clear()
        self.held_touched.clear()
        self.new_ids = []
        self.full = False


class ShardStore:
    """The lasting state of one shard, plus indexes derived from it (expiry and id heaps) and its log."""

    def __init__(self, op: KeyedOperator, model_path: str, health: str | HealthConfig = "off"):
        self.op = op
        self.model_path = model_path
        #: the effective time (micros) of the model update the store serves; EARLIEST: the pipeline's own model;
        #: None: not recorded (a log written before it was), so ``apply.switch_model`` infers it from the path
        self.model_eff: int | None = EARLIEST
        #: the carried-state health policy (``StatefulInference(health=...)``); its columns are part of each key's
        #: state rows (``health_*``, and the shadow's state under ``heal``), so the log carries them
        self.health = health
        self.meta: dict[str, KeyMeta] = {}
        self.ids: dict[tuple[str, int], int] = {}  # (key, seq) -> the applied row's event time (micros)
        self.held: dict[str, pa.Table] = {}  # key -> its one held-back output row
        #: applied ids older than this (micros) are forgotten; moves when a prune forgets one
        self.ids_floor = EARLIEST
        #: when tombstones were last swept (micros): a scan at most once per dedupe horizon
        self.swept = EARLIEST
        self.token = ""
        self.log = StoreLog()
        self._expiry_heap: list[tuple[int, str]] = []
        self._id_heap: list[tuple[int, str, int]] = []

    # -- changes -------------------------------------------------------------------------
    def set_meta(self, key: str, m: KeyMeta) -> None:
        self.meta[key] = m
        self.log.touched.add(key)
        if m.live and m.expiry < NEVER:
            heapq.heappush(self._expiry_heap, (m.expiry, key))

    def end_streams(self, keys: Iterable[str], reason: str) -> list[str]:
        """Mark each key's stream ended for ``reason`` (TTL, a model change; the caller drops the state).
        Returns the keys."""
        keys = list(keys)
        for k in keys:
            mk = self.meta[k]
            self.meta[k] = KeyMeta(mk.last_ts, mk.expiry, reason, False)
            self.log.touched.add(k)
        return keys

    def expire(self, keys: Iterable[str]) -> None:
        """Drop the state of keys idle past the TTL; their next event starts fresh (``expired``)."""
        for k in keys:
            self.op.evict(k)
            mk = self.meta[k]
            self.set_meta(k, KeyMeta(mk.last_ts, mk.expiry, "expired", False))

    def switch_model(self, model: Model, path: str, eff: int, *, end: bool) -> list[str]:
        """Serve the key streams with ``model``, the update effective at ``eff`` (micros), from now on. ``end``
        (an update on the way changed the state shapes): every live key's stream ends (``model_update``); else
        every key's state goes on. Returns the keys whose stream ended."""
        ended: list[str] = []
        fresh = ShardStore.new(model, path, keep_last_output=self.op.keep_last_output, health=self.health)
        if end:
            ended = self.end_streams(list(self.op.keys()), "model_update")
        else:
            fresh.op.restore(self.op.snapshot(), allow_other_model=True)
        self.op, self.model_path, self.model_eff, self.log.full = fresh.op, path, eff, True
        return ended

    def forget(self, key: str) -> None:
        """Drop a key's record entirely (its tombstone aged out)."""
        if self.meta.pop(key, None) is not None:
            self.log.touched.add(key)

    def add_ids(self, keys: list[str], seqs: np.ndarray, ats: np.ndarray) -> None:
        """Record applied rows: ``(key, seq)`` -> the row's event time (micros); a reused name takes the later."""
        ids = self.ids
        # a row's events share its name and time: each name once, in first-seen order
        rows = dict.fromkeys(zip(keys, seqs.tolist(), ats.tolist(), strict=True))
        new = []
        for k, s, at in rows:  # (rows come in key / stream order: a name's times never go back)
            if ids.get((k, s)) != at:
                ids[(k, s)] = at
                new.append((k, s, at))
        if not new:
            return
        self.log.new_ids.extend(new)
        h = self._id_heap
        if len(new) > len(h) // 8:  # many at once: one heapify beats a push each
            h.extend((at, k, s) for k, s, at in new)
            heapq.heapify(h)
        else:
            for k, s, at in new:
                heapq.heappush(h, (at, k, s))

    def set_held(self, key: str, row: pa.Table | None) -> None:
        if row is None:
            if self.held.pop(key, None) is not None:
                self.log.held_touched.add(key)
        else:
            self.held[key] = row
            self.log.held_touched.add(key)

    def forget_old(self, T: int, horizon: int, reach: int = 0) -> None:
        """Bound memory by event time, without changing any result.

        Ids and tombstones (ended streams with nothing held) are remembered for ``horizon`` of
        event time after their row's (stream's last) ``ts``: a rule the apply checks against the
        event's own time (:meth:`reason_for`, ``apply.duplicates``). So they go once no event that
        can still be applied could be within the horizon of them: older than ``T - horizon - reach``
        (``reach``: window plus lateness, how far before ``T`` a later flush's events may lie).
        Tombstones are swept at most once per horizon.
        """
        floor = max(T - horizon - reach, self.ids_floor)
        h, forgot = self._id_heap, False
        while h and h[0][0] < floor:
            at, k, s = heapq.heappop(h)
            if self.ids.get((k, s)) == at:
                del self.ids[(k, s)]
                forgot = True
        if forgot:
            self.ids_floor = floor  # written with the next delta: a rebuild forgets the same ids
        if len(self.meta) > len(self.op) and T - self.swept > horizon:
            self.swept = T
            for k in [k for k, m in self.meta.items() if not m.live and to_micros(m.last_ts) < floor
                      and k not in self.held]:
                self.forget(k)

    def reason_for(self, key: str, ts: float, horizon: float) -> str:
        """Why ``key``'s stream starts fresh at an event at ``ts`` (s): its ended stream's reason while that
        is within ``horizon`` (s) of event time, else ``new``."""
        mk = self.meta.get(key)
        if mk is None or mk.live or not mk.reason or ts - mk.last_ts > horizon:
            return "new"
        return mk.reason

    def due_expiries(self, t: int) -> list[str]:
        """Live keys whose expiry is at or before ``t``, each once, in expiry order."""
        out: dict[str, None] = {}
        h = self._expiry_heap
        while h and h[0][0] <= t:
            e, k = heapq.heappop(h)
            m = self.meta.get(k)
            if m is not None and m.live and m.expiry == e:
                out[k] = None
        return list(out)

    def next_expiry(self) -> int | None:
        h = self._expiry_heap
        while h:
            e, k = h[0]
            m = self.meta.get(k)
            if m is not None and m.live and m.expiry == e:
                return e
            heapq.heappop(h)
        return None

    @property
    def size_rows(self) -> int:
        return len(self.meta) + len(self.ids) + len(self.held)

    def nbytes(self) -> int:
        """About how many bytes the store holds in memory (what the shard cache budgets)."""
        from ...metrics.catalogue import state_bytes_per_key

        held = 0
        if self.held:
            held = len(self.held) * next(iter(self.held.values())).nbytes
        return len(self.op) * state_bytes_per_key(self.op.model) + held + 128 * (len(self.meta) + len(self.ids))

    def _scalars(self) -> dict[str, int]:
        return {"ids_floor": self.ids_floor, "swept": self.swept, "model_eff": self.model_eff}

    # -- what a rebuild must reproduce -------------------------------------------------------
    def lasting(self) -> dict[str, Any]:
        """The store's lasting state in plain values: what :meth:`from_log` must reproduce, field by field."""
        t = self.op.snapshot()
        names = [c for c in t.column_names if c != "key"]
        rows = {k.decode(): _canon(tuple(t.column(c)[i].as_py() for c in names))
                for i, k in enumerate(t.column("key").to_pylist())}
        return {"model_path": self.model_path, "state": rows, "meta": dict(self.meta), "ids": dict(self.ids),
                "held": {k: _canon(v.to_pylist()) for k, v in self.held.items()},
                "expiries": sorted((m.expiry, k) for k, m in self.meta.items() if m.live and m.expiry < NEVER),
                "next_expiry": self.next_expiry(), **self._scalars()}

    # -- the log -------------------------------------------------------------------------
    @property
    def changed(self) -> bool:
        """Anything to write since the last delta."""
        lg = self.log
        return bool(lg.full or lg.touched or lg.held_touched or lg.new_ids or lg.scalars != self._scalars())

    def should_compact(self) -> bool:
        """The log holds more than twice a full snapshot (bytes), plus slack: rewrite it as one."""
        lg = self.log
        return lg.bytes > 2 * lg.full_bytes + (1 << 16) or lg.rows > 2 * self.size_rows + 1024

    def delta(self, *, compact: bool) -> tuple[bytes, bool]:
        """Encode what changed since the last write (or everything). Returns (blob, is_full)."""
        lg = self.log
        full = compact or lg.full or lg.seq == 0  # a shard's first write is its base snapshot
        if full:
            parts, keys, ids = self._parts_full()
        else:
            keys = sorted(lg.touched)
            ids = lg.new_ids
            parts = {"state": self.op.snapshot(keys=[k for k in keys if k in self.op]),
                     "meta": _meta_table(keys, self.meta), "ids": _ids_table(ids),
                     "held": _held_table(self.held, lg.held_touched)}
        lg.seq += 1
        head = {"seq": lg.seq, "full": full, "model": self.model_path, "scalars": self._scalars(),
                "health": _policy(self.health),
                "held_cleared": [] if full else sorted(k for k in lg.held_touched if k not in self.held)}
        blob = _pack(head, {k: _ipc(v) for k, v in parts.items()})
        n = len(keys) + len(ids) + (len(self.held) if full else len(lg.held_touched))
        lg.rows = n if full else lg.rows + n
        if full:
            lg.full_bytes = lg.bytes = len(blob)
        else:
            lg.bytes += len(blob)
        lg.scalars = self._scalars()
        lg.clear_changes()
        return blob, full

    def _parts_full(self) -> tuple[dict[str, pa.Table], list[str], list]:
        # sorted, not in dict order: a warm store keeps the order it applied keys in, a rebuilt one the log's,
        # and a full snapshot must be the same bytes either way
        keys = sorted(self.meta)
        ids = sorted(_all_ids(self.ids))
        parts = {"state": self.op.snapshot(keys=[k for k in keys if k in self.op]),
                 "meta": _meta_table(keys, self.meta), "ids": _ids_table(ids), "held": _held_table(self.held, None)}
        return parts, keys, ids

    def full_blob(self, extra: dict | None = None) -> bytes:
        """The whole store as one full blob (a snapshot to keep; the log is not touched)."""
        return pack_full(self._parts_full()[0], model=self.model_path, scalars=self._scalars(), extra=extra,
                         health=_policy(self.health))

    # -- building a store ------------------------------------------------------------------
    @classmethod
    def new(cls, model: Model, path: str, *, keep_last_output: bool, health: str | HealthConfig = "off") -> ShardStore:
        # event time rules here (the TTL is the store's, in event time): no wall clock in the state. Health
        # 'heal' keeps its shadows beside the host state: the state stays on the host there.
        return cls(KeyedOperator(model, max_keys=_MAX_KEYS, ttl=None, keep_last_output=keep_last_output,
                                 initial_capacity=16, clock=_no_wall_clock, health=health,
                                 state_on_device=False if _policy(health) == "heal" else None), path, health)

    @classmethod
    def from_log(cls, blobs: list[bytes], load_model: Callable[[str], Model], *, keep_last_output: bool,
                 default_path: str, health: str | HealthConfig | None = None) -> tuple[ShardStore, ModelChange | None]:
        """Replay the log (in delta order, from the last full snapshot) into a fresh store.

        ``health``: the policy to serve with (None: the one the log was written with; its columns are restored
        exactly either way, as far as the policy keeps them). Returns the store and, when the file at the state's
        model path now holds another model, the :class:`ModelChange` that the next flush must report (the store
        already reflects it).
        """
        deltas = sorted((_unpack(b) for b in blobs), key=lambda d: d[0]["seq"])
        fulls = [i for i, (h, _) in enumerate(deltas) if h["full"]]
        if fulls:
            deltas = deltas[fulls[-1]:]
        path = deltas[-1][0]["model"] if deltas else default_path
        if health is None:
            health = deltas[-1][0].get("health", "off") if deltas else "off"
        store = cls.new(load_model(path), path, keep_last_output=keep_last_output, health=health)
        states: list[pa.Table] = []
        schema_meta = None
        for head, parts in deltas:
            m = parts["meta"]
            for k, present, last, exp, reason, live in zip(*(m.column(c).to_pylist() for c in (
                    KEY, "present", "last_ts", "expiry", "reason", "live")), strict=True):
                if present:
                    store.meta[k] = KeyMeta(last, exp, reason, live)
                else:
                    store.meta.pop(k, None)
            if parts["state"].num_rows:
                states.append(parts["state"].replace_schema_metadata(None))
                schema_meta = parts["state"].schema.metadata
            ids = parts["ids"]
            for k, s, at in zip(*(ids.column(c).to_pylist() for c in (KEY, SEQ, "at")), strict=True):
                store.ids[(k, s)] = at
            for k in head["held_cleared"]:
                store.held.pop(k, None)
            h = parts["held"].combine_chunks()  # one chunk: slicing a row stays O(1)
            if h.num_rows:
                for i, k in enumerate(h.column(KEY).to_pylist()):
                    store.held[k] = h.slice(i, 1)
            scalars = head.get("scalars", {})
            store.ids_floor = scalars.get("ids_floor", store.ids_floor)
            store.swept = scalars.get("swept", store.swept)
            store.model_eff = scalars.get("model_eff")
        # ids that a prune forgot after they were logged: the floor says which (see forget_old)
        store.ids = {i: at for i, at in store.ids.items() if at >= store.ids_floor}
        change = None
        if states:
            t = pa.concat_tables(states, promote_options="permissive")
            keys = [k.decode() for k in t.column("key").to_pylist()]
            last = {k: i for i, k in enumerate(keys)}  # the last write of each key wins
            keep = [i for k, i in last.items() if k in store.meta and store.meta[k].live]
            t = t.take(pa.array(sorted(keep), pa.int64())).replace_schema_metadata(schema_meta)
            written = json.loads((schema_meta or {}).get(snapshot.SNAPSHOT_KEY, b"{}"))
            spec = store.op.model.spec
            if written.get("state") != snapshot.signature(spec):
                # The file at this path now holds a model of other state shapes (a retrained shipped:NAME, an
                # overwritten file): every live key's stream ends here, as on a model update to such a model.
                ended = store.end_streams([keys[i] for i in sorted(keep)], "model_update")
                change = ModelChange("reset", tuple(ended))
            else:
                if written.get("fingerprint") != spec.fingerprint:
                    change = ModelChange("carried")  # same shapes: state goes on, new weights
                store.op.restore(t, allow_other_model=True)
        store._id_heap = [(at, k, s) for (k, s), at in store.ids.items()]
        heapq.heapify(store._id_heap)
        store._expiry_heap = [(m.expiry, k) for k, m in store.meta.items() if m.live and m.expiry < NEVER]
        heapq.heapify(store._expiry_heap)
        lg = store.log
        lg.touched.clear()
        lg.seq = deltas[-1][0]["seq"] if deltas else 0
        lg.rows = sum(p["meta"].num_rows + p["ids"].num_rows + p["held"].num_rows for _, p in deltas)
        sizes = {h["seq"]: len(b) for b in blobs for h in [_unpack_head(b)]}
        lg.bytes = sum(sizes.get(h["seq"], 0) for h, _ in deltas)
        lg.full_bytes = sizes.get(deltas[0][0]["seq"], 0) if deltas and deltas[0][0]["full"] else 0
        lg.scalars = store._scalars() if deltas else {}
        lg.full = change is not None  # the next write records the new model's state in full
        return store, change


def _policy(health: str | HealthConfig | None) -> str:
    """The policy name of a ``health`` argument."""
    return health.policy if isinstance(health, HealthConfig) else (health or "off")


def _canon(v: Any) -> Any:
    """Plain values that compare equal when equal (NaN as a string)."""
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, (list, tuple)):
        return type(v)(_canon(x) for x in v)
    if isinstance(v, dict):
        return {k: _canon(x) for k, x in v.items()}
    return v


def _no_wall_clock() -> float:
    return 0.0


def _all_ids(ids: dict[tuple[str, int], int]):
    for (k, s), at in ids.items():
        yield k, s, at


def _ipc(t: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue()


def _pack(head: dict, parts: dict[str, bytes]) -> bytes:
    h = json.dumps({**head, "parts": {k: len(v) for k, v in parts.items()}}).encode()
    return struct.pack("<I", len(h)) + h + b"".join(parts.values())


#: The tables of a blob: key state rows, stream metadata, applied ids, held-back rows.
PARTS = ("state", "meta", "ids", "held")


def pack_full(parts: dict[str, pa.Table], *, model: str, scalars: dict[str, int], extra: dict | None = None,
              health: str = "off") -> bytes:
    """A full blob (what a compaction writes) from its tables; ``from_log([blob])`` is that store."""
    head = {"seq": 1, "full": True, "model": model, "scalars": scalars, "held_cleared": [], "extra": extra or {},
            "health": health}
    return _pack(head, {k: _ipc(parts[k]) for k in PARTS})


def unpack(blob: bytes) -> tuple[dict, dict[str, pa.Table]]:
    """A blob's head and tables."""
    return _unpack(blob)


def _unpack_head(blob: bytes) -> dict:
    (n,) = struct.unpack_from("<I", blob, 0)
    return json.loads(blob[4:4 + n])


def _unpack(blob: bytes) -> tuple[dict, dict[str, pa.Table]]:
    (n,) = struct.unpack_from("<I", blob, 0)
    head = json.loads(blob[4:4 + n])
    off, parts = 4 + n, {}
    for k, size in head["parts"].items():
        parts[k] = pa.ipc.open_stream(blob[off:off + size]).read_all()
        off += size
    return head, parts


def _meta_table(keys: list[str], meta: dict[str, KeyMeta]) -> pa.Table:
    ms = [meta.get(k) for k in keys]
    return pa.table({KEY: pa.array(keys, pa.string()),
                     "present": pa.array([m is not None for m in ms]),
                     "last_ts": pa.array([m.last_ts if m else 0.0 for m in ms], pa.float64()),
                     "expiry": pa.array([m.expiry if m else 0 for m in ms], pa.int64()),
                     "reason": pa.array([m.reason if m else "" for m in ms], pa.string()),
                     "live": pa.array([bool(m and m.live) for m in ms])})


def _ids_table(rows) -> pa.Table:
    rows = list(rows)
    return pa.table({KEY: pa.array([r[0] for r in rows], pa.string()),
                     SEQ: pa.array([r[1] for r in rows], pa.int64()),
                     "at": pa.array([r[2] for r in rows], pa.int64())})


def _held_table(held: dict[str, pa.Table], only: set[str] | None) -> pa.Table:
    rows = [held[k] for k in sorted(held if only is None else only) if k in held]
    if not rows:
        return pa.table({KEY: pa.array([], pa.string())})
    t = pa.concat_tables(rows, promote_options="permissive").combine_chunks()
    # a copy: a held row rebuilt from the log is a one-row slice of its logged block, which would write the
    # block's whole buffers (the same rows, other bytes than a warm store writes)
    return t.take(pa.array(np.arange(t.num_rows)))


# -- the per-process cache ----------------------------------------------------------------------
#: Bytes of decoded shard stores one worker process keeps (``StatefulInference(shard_cache_bytes=...)``
#: overrides it per transform; the environment variable sets the process default).
DEFAULT_CACHE_BYTES = int(os.environ.get("STREAMRNN_SHARD_CACHE_BYTES", 1 << 30))


class ShardCache:
    """Decoded shard stores of this process, least recently used first, bounded by bytes.

    It outlives ``DoFn.teardown`` (the legacy streaming DirectRunner tears a DoFn down after
    every bundle): the token check keeps it correct, since a store is used only when the token
    in Beam state is the one it was saved with. Taking a store removes it (one flush owns it).
    """

    def __init__(self) -> None:
        self._d: OrderedDict[tuple[str, int], tuple[ShardStore, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def take(self, transform_id: str, shard: int, token: str | None) -> ShardStore | None:
        with self._lock:
            hit = self._d.pop((transform_id, shard), None)
            if hit is None:
                return None
            self.bytes -= hit[1]
        s = hit[0]
        return s if token and s.token == token else None

    def put(self, transform_id: str, shard: int, store: ShardStore, budget: int) -> None:
        if budget <= 0:
            return
        n = store.nbytes()
        with self._lock:
            old = self._d.pop((transform_id, shard), None)
            if old is not None:
                self.bytes -= old[1]
            self._d[(transform_id, shard)] = (store, n)
            self.bytes += n
            while self.bytes > budget and len(self._d) > 1:
                _, (_, m) = self._d.popitem(last=False)
                self.bytes -= m

    def drop(self, transform_id: str | None = None) -> None:
        """Forget every cached shard of one transform (or all)."""
        with self._lock:
            for k in [k for k in self._d if transform_id is None or k[0] == transform_id]:
                self.bytes -= self._d.pop(k)[1]

    def __len__(self) -> int:
        return len(self._d)


CACHE = ShardCache()


def new_token() -> str:
    return uuid.uuid4().hex
