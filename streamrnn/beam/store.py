"""The shard state store: per-key recurrent state, stream metadata, applied ids and held rows.

A flush reads and writes in proportion to the keys it advances, not the keys a shard holds:

* Beam state keeps an append-only **log** of deltas (``BagState``): each flush that changed
  something appends the keys it touched (their state rows and metadata), the ids it applied
  and the rows it holds back. When the log's bytes pass twice those of the last full
  snapshot (plus 64 KiB), it is compacted into one full snapshot.
* Each worker keeps the decoded store of a shard in memory (:data:`_CACHE`), tagged with a
  random **token** that is also written to Beam state with every flush. The cache is used
  only when the token in state matches it; a failed bundle leaves the old token in state,
  so a retry (here or on another worker) rebuilds the store from the log. Exactly-once
  holds under retries because Beam commits the log, the token and the outputs together.

Everything is Arrow IPC (no pickle). Event-time quantities are integer micros.
"""

from __future__ import annotations

import heapq
import io
import json
import struct
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .. import snapshot
from ..keyed import KeyedOperator
from ..model import Model
from .clock import EARLIEST, NEVER
from .records import KEY, SEQ

_MAX_KEYS = 2**31 - 1


@dataclass
class KeyMeta:
    """A key's stream: last applied event time (s), when its state may be dropped (micros),
    why its next event starts fresh (``reason``), and whether state is held (``live``)."""

    last_ts: float
    expiry: int
    reason: str = ""
    live: bool = True


@dataclass
class ShardStore:
    op: KeyedOperator
    model_path: str
    meta: dict[str, KeyMeta] = field(default_factory=dict)
    ids: dict[tuple[str, int], int] = field(default_factory=dict)  # (key, seq) -> applied at (micros)
    held: dict[str, pa.Table] = field(default_factory=dict)  # key -> its one held-back output row
    token: str = ""
    log_rows: int = 0
    log_seq: int = 0
    _expiry_heap: list[tuple[int, str]] = field(default_factory=list)
    _id_times: deque[tuple[int, tuple[str, int]]] = field(default_factory=deque)
    _touched: set[str] = field(default_factory=set)
    _held_touched: set[str] = field(default_factory=set)
    _new_ids: list[tuple[str, int, int]] = field(default_factory=list)
    tombstones_swept: int = EARLIEST
    log_bytes: int = 0
    full_bytes: int = 0
    full: bool = False  # the next write is a full snapshot (after a model switch)
    # set by rebuild() when the file at the state's model path is no longer the model that wrote it
    # (same path, other weights: "carried"; other state shapes: "reset", with the keys whose stream ended)
    model_changed: str = ""
    reset_keys: list[str] = field(default_factory=list)

    # -- changes -------------------------------------------------------------------------
    def set_meta(self, key: str, m: KeyMeta) -> None:
        self.meta[key] = m
        self._touched.add(key)
        if m.live and m.expiry < NEVER:
            heapq.heappush(self._expiry_heap, (m.expiry, key))

    def end_streams(self, keys: list[str], reason: str) -> list[str]:
        """Mark each key's stream ended for ``reason`` (a model change; the caller drops the state and writes
        the store in full next). Returns ``keys``."""
        for k in keys:
            mk = self.meta[k]
            self.meta[k] = KeyMeta(mk.last_ts, mk.expiry, reason, False)
        return keys

    def forget(self, key: str) -> None:
        """Drop a key's record entirely (its tombstone aged out)."""
        if self.meta.pop(key, None) is not None:
            self._touched.add(key)

    def add_ids(self, keys: list[str], seqs: np.ndarray, at: int) -> None:
        for k, s in zip(keys, seqs.tolist(), strict=True):
            if (k, s) not in self.ids:
                self.ids[(k, s)] = at
                self._id_times.append((at, (k, s)))
                self._new_ids.append((k, s, at))

    def set_held(self, key: str, row: pa.Table | None) -> None:
        if row is None:
            if self.held.pop(key, None) is not None:
                self._held_touched.add(key)
        else:
            self.held[key] = row
            self._held_touched.add(key)

    def prune_ids(self, floor: int) -> None:
        """Forget applied ids older than ``floor`` (micros): bounded by event time."""
        q = self._id_times
        while q and q[0][0] < floor:
            at, i = q.popleft()
            if self.ids.get(i) == at:
                del self.ids[i]

    def due_expiries(self, t: int) -> list[str]:
        """Live keys whose expiry is at or before ``t``."""
        out = []
        h = self._expiry_heap
        while h and h[0][0] <= t:
            e, k = heapq.heappop(h)
            m = self.meta.get(k)
            if m is not None and m.live and m.expiry == e:
                out.append(k)
        return out

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

    # -- the log -------------------------------------------------------------------------
    def delta(self, *, compact: bool) -> tuple[bytes, bool]:
        """Encode what changed since the last write (or everything). Returns (blob, is_full)."""
        full = compact or self.full or self.log_seq == 0  # a shard's first write is its base snapshot
        keys = list(self.meta) if full else sorted(self._touched)
        live = [k for k in keys if k in self.op]
        parts = {
            "state": _ipc(self.op.snapshot(keys=live)),
            "meta": _ipc(_meta_table(keys, self.meta)),
            "ids": _ipc(_ids_table(list(_all_ids(self.ids)) if full else self._new_ids)),
            "held": _ipc(_held_table(self.held, None if full else self._held_touched)),
        }
        self.log_seq += 1
        head = {"seq": self.log_seq, "full": full, "model": self.model_path,
                "held_cleared": [] if full else sorted(k for k in self._held_touched if k not in self.held)}
        blob = _pack(head, parts)
        n = len(keys) + (len(self.ids) if full else len(self._new_ids)) + len(self.held if full else
                                                                               self._held_touched)
        self.log_rows = n if full else self.log_rows + n
        if full:
            self.full_bytes = self.log_bytes = len(blob)
        else:
            self.log_bytes += len(blob)
        self._touched.clear()
        self._held_touched.clear()
        self._new_ids = []
        self.full = False
        return blob, full

    @property
    def changed(self) -> bool:
        """Anything to write since the last delta."""
        return bool(self.full or self._touched or self._held_touched or self._new_ids)

    def should_compact(self) -> bool:
        """The log holds more than twice a full snapshot (bytes), plus slack: rewrite it as one."""
        return self.log_bytes > 2 * self.full_bytes + (1 << 16) or self.log_rows > 2 * self.size_rows + 1024


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
    rows = list(held.values()) if only is None else [held[k] for k in only if k in held]
    if not rows:
        return pa.table({KEY: pa.array([], pa.string())})
    return pa.concat_tables(rows, promote_options="permissive").combine_chunks()


# -- building a store -------------------------------------------------------------------------
def new_store(model: Model, path: str, *, keep_last_output: bool) -> ShardStore:
    return ShardStore(KeyedOperator(model, max_keys=_MAX_KEYS, ttl=None, keep_last_output=keep_last_output,
                                    initial_capacity=16), path)


def rebuild(blobs: list[bytes], load_model, *, keep_last_output: bool, default_path: str) -> ShardStore:
    """Replay the log (in delta order, from the last full snapshot) into a fresh store."""
    deltas = sorted((_unpack(b) for b in blobs), key=lambda d: d[0]["seq"])
    fulls = [i for i, (h, _) in enumerate(deltas) if h["full"]]
    if fulls:
        deltas = deltas[fulls[-1]:]
    path = deltas[-1][0]["model"] if deltas else default_path
    store = new_store(load_model(path), path, keep_last_output=keep_last_output)
    states: list[pa.Table] = []
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
            store.reset_keys = store.end_streams([keys[i] for i in sorted(keep)], "model_update")
            store.model_changed, store.full = "reset", True
        else:
            if written.get("fingerprint") != spec.fingerprint:
                store.model_changed, store.full = "carried", True  # same shapes: state goes on, new weights
            store.op.restore(t, allow_other_model=True)
    for at, i in sorted((at, i) for i, at in store.ids.items()):
        store._id_times.append((at, i))
    for k, m in store.meta.items():
        if m.live and m.expiry < NEVER:
            store._expiry_heap.append((m.expiry, k))
    heapq.heapify(store._expiry_heap)
    store.log_seq = deltas[-1][0]["seq"] if deltas else 0
    store.log_rows = sum(p["meta"].num_rows + p["ids"].num_rows + p["held"].num_rows for _, p in deltas)
    sizes = {h["seq"]: len(b) for b in blobs for h in [_unpack_head(b)]}
    store.log_bytes = sum(sizes.get(h["seq"], 0) for h, _ in deltas)
    store.full_bytes = sizes.get(deltas[0][0]["seq"], 0) if deltas and deltas[0][0]["full"] else 0
    return store


# -- the per-process cache ----------------------------------------------------------------------
_CACHE: dict[tuple[str, int], ShardStore] = {}
_CACHE_LOCK = threading.Lock()


def take_cached(transform_id: str, shard: int, token: str | None) -> ShardStore | None:
    """The cached store of a shard if its token matches the one in Beam state (then owned by the caller)."""
    with _CACHE_LOCK:
        s = _CACHE.pop((transform_id, shard), None)
    if s is not None and token and s.token == token:
        return s
    return None


def put_cached(transform_id: str, shard: int, store: ShardStore) -> None:
    with _CACHE_LOCK:
        _CACHE[(transform_id, shard)] = store


def drop_cached(transform_id: str) -> None:
    """Forget every cached shard of one transform (its DoFn is torn down)."""
    with _CACHE_LOCK:
        for k in [k for k in _CACHE if k[0] == transform_id]:
            del _CACHE[k]


def new_token() -> str:
    return uuid.uuid4().hex
