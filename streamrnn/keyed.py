"""A keyed operator: per-key recurrent state, many keys advanced in one ONNX Runtime call.

>>> import numpy as np, streamrnn
>>> op = streamrnn.KeyedOperator(streamrnn.load(streamrnn.DEFAULT_MODEL), max_keys=1000, ttl=3600.0)
>>> r = op.process(["alice", "bob", "alice"], np.array([72, 84, 105]))  # 'H', 'T', 'i'
>>> r.outputs["logprobs"].shape, r.pos.tolist(), r.fresh.tolist()
((3, 256), [0, 0, 1], [True, True, False])
>>> len(op)
2
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError, SnapshotError
from .model import Model, State

Key = str | bytes
SNAPSHOT_KEY = b"streamrnn.snapshot"
SNAPSHOT_FORMAT = "streamrnn-snapshot/1"


@dataclass
class KeyedResult:
    """Per-event results of :meth:`KeyedOperator.process`, aligned with the input events.

    ``outputs[name]`` is ``[N, ...]`` (the task output after that event's step);
    ``pos`` is the event's 0-based position in its key's stream; ``fresh`` is True
    for the event that started its key from the initial state (a new key, or one
    evicted earlier: no state is ever reset silently).
    ``prev_outputs[name]`` (only with ``keep_last_output``) is the output of the
    step before each event (NaN where there was none), i.e. the model's prediction
    for this event.
    """

    outputs: dict[str, np.ndarray]
    pos: np.ndarray
    fresh: np.ndarray
    prev_outputs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Evictions:
    """Counts of keys whose state was dropped, by reason."""

    ttl: int = 0
    capacity: int = 0
    explicit: int = 0

    @property
    def total(self) -> int:
        return self.ttl + self.capacity + self.explicit


class KeyedOperator:
    """Owns the recurrent state of many keys.

    Args:
      model: the loaded model.
      max_keys: most keys held; past it the least recently used key is evicted.
      ttl: seconds (of ``clock``) a key may stay idle before its state is dropped; None keeps keys forever.
      clock: returns the current time in seconds; inject a fake in tests, or event time in streams.
      keep_last_output: also keep each key's last task output (needed to score or sample
        the next token between calls).

    State is host memory: ``[layers, capacity, hidden]`` slabs per state tensor, so a
    batch is gathered and scattered with one fancy index each. Thread-safe (one lock
    per operator).
    """

    def __init__(self, model: Model, *, max_keys: int = 1_000_000, ttl: float | None = None,
                 clock: Callable[[], float] = time.time, keep_last_output: bool = False,
                 initial_capacity: int = 1024):
        if max_keys < 1:
            raise InputError(f"KeyedOperator: max_keys: expected >= 1, got {max_keys}")
        if ttl is not None and not ttl > 0:
            raise InputError(f"KeyedOperator: ttl: expected a positive number of seconds or None, got {ttl}")
        self.model = model
        self.max_keys = max_keys
        self.ttl = ttl
        self.clock = clock
        self.keep_last_output = keep_last_output
        self.evictions = Evictions()
        self._lock = threading.Lock()
        spec = model.spec
        self._state_names = tuple(s.name for s in spec.state)
        self._state_tail = {s.name: tuple(int(d) for d in s.shape if d != "batch") for s in spec.state}
        self._out_tail = {o.name: tuple(int(d) for d in o.shape[2:]) for o in spec.outputs}
        self._reset_storage(min(initial_capacity, max_keys))

    # -- storage -----------------------------------------------------------------
    def _reset_storage(self, capacity: int) -> None:
        """Drop every key and allocate empty slabs for ``capacity`` keys."""
        self._cap = 0
        self._slab: dict[str, np.ndarray] = {}
        self._last: dict[str, np.ndarray] = {}
        self._steps = np.zeros(0, np.int64)
        self._seen = np.zeros(0, np.float64)
        self._slots: OrderedDict[Key, int] = OrderedDict()  # LRU order: oldest first
        self._free: list[int] = []
        self._grow(capacity)

    def _grow(self, cap: int) -> None:
        old = self._cap
        if cap <= old:
            return
        for n in self._state_names:
            L, H = self._state_tail[n][0], self._state_tail[n][1:]
            new = np.zeros((L, cap, *H), np.float32)
            if old:
                new[:, :old] = self._slab[n]
            self._slab[n] = new
        if self.keep_last_output:
            for n, tail in self._out_tail.items():
                new = np.full((cap, *tail), np.nan, np.float32)
                if old:
                    new[:old] = self._last[n]
                self._last[n] = new
        self._steps = np.concatenate([self._steps, np.zeros(cap - old, np.int64)])
        self._seen = np.concatenate([self._seen, np.zeros(cap - old, np.float64)])
        self._free.extend(range(cap - 1, old - 1, -1))
        self._cap = cap

    def _release(self, slot: int) -> None:
        for n in self._state_names:
            self._slab[n][:, slot] = 0.0
        for a in self._last.values():
            a[slot] = np.nan
        self._steps[slot] = 0
        self._free.append(slot)

    def _allocate(self, key: Key, now: float) -> int:
        if not self._free:
            if self._cap < self.max_keys:
                self._grow(min(self.max_keys, max(2 * self._cap, 16)))
            else:
                _, slot = self._slots.popitem(last=False)
                self._release(slot)
                self.evictions.capacity += 1
        slot = self._free.pop()
        self._slots[key] = slot
        self._seen[slot] = now
        return slot

    def _expire_locked(self, now: float) -> int:
        if self.ttl is None:
            return 0
        n = 0
        limit = now - self.ttl
        while self._slots:
            slot = next(iter(self._slots.values()))
            if self._seen[slot] >= limit:
                break
            self._slots.popitem(last=False)
            self._release(slot)
            n += 1
        self.evictions.ttl += n
        return n

    # -- public API --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slots

    def keys(self) -> list[Key]:
        """Held keys, least recently used first."""
        return list(self._slots)

    def expire(self) -> int:
        """Drop keys idle longer than ``ttl`` now; returns how many. ``process`` does this too."""
        with self._lock:
            return self._expire_locked(self.clock())

    def evict(self, key: Key) -> bool:
        """Drop one key's state (counted as ``explicit``); False if it was not held."""
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                return False
            self._release(slot)
            self.evictions.explicit += 1
            return True

    def state_of(self, key: Key) -> State:
        """A copy of one key's state, batch 1 (the initial state for an unknown key)."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return self.model.initial_state(1)
            return State({n: self._slab[n][:, slot:slot + 1].copy() for n in self._state_names}, self._state_names)

    def last_output(self, key: Key) -> dict[str, np.ndarray] | None:
        """Copy of a key's last task output (needs ``keep_last_output``); None for an unknown key."""
        if not self.keep_last_output:
            raise InputError("last_output: expected an operator built with keep_last_output=True, got False")
        with self._lock:
            slot = self._slots.get(key)
            return None if slot is None else {n: a[slot].copy() for n, a in self._last.items()}

    def steps_of(self, key: Key) -> int:
        """How many steps the key's state has absorbed (0 for an unknown key)."""
        slot = self._slots.get(key)
        return 0 if slot is None else int(self._steps[slot])

    def process(self, keys: Sequence[Key], x: Any) -> KeyedResult:
        """Apply one step per event, in order, in ONE batched model call.

        Args:
          keys: N keys (str or bytes); a key may repeat, its events apply in list order.
          x: one step per event: int tokens ``[N]`` or float features ``[N, F]``.

        Events of one key become one row of the batch (right-padded to the longest
        row, with ``lengths`` giving each row's real length), so B = distinct keys
        and T = the most events any key has in this call.
        """
        x = np.asarray(x)
        tokens = self.model.spec.input.kind == "tokens"
        want_rank = 1 if tokens else 2
        if x.ndim != want_rank:
            shape = "[N]" if tokens else f"[N, {self.model.spec.input.n_features}]"
            raise InputError(f"process: x rank: expected {shape} (one step per event), got shape {list(x.shape)}")
        N = x.shape[0]
        if len(keys) != N:
            raise InputError(f"process: keys: expected {N} keys (one per event in x), got {len(keys)}")
        if N == 0:
            return KeyedResult({n: np.zeros((0, *t), np.float32) for n, t in self._out_tail.items()},
                               np.zeros(0, np.int64), np.zeros(0, bool))
        x = self.model.check_x(x[:, None])[:, 0]
        row_of: dict[Key, int] = {}
        rows = np.empty(N, np.int64)
        cols = np.empty(N, np.int64)
        counts: list[int] = []
        for i, k in enumerate(keys):
            try:
                r = row_of.get(k)
            except TypeError:  # unhashable: rejected just below
                r = None
            if r is None:  # a key not seen yet in this call: check its type once
                if not isinstance(k, (str, bytes)):
                    raise InputError(f"process: keys[{i}]: expected str or bytes, got {type(k).__name__} {k!r}")
                r = row_of[k] = len(counts)
                counts.append(0)
            rows[i] = r
            cols[i] = counts[r]
            counts[r] += 1
        B, T = len(counts), max(counts)
        if B > self.max_keys:
            raise InputError(f"process: distinct keys in one call: expected <= max_keys={self.max_keys}, got {B}")
        with self._lock:
            now = float(self.clock())
            self._expire_locked(now)
            slots = np.empty(B, np.int64)
            fresh_row = np.zeros(B, bool)
            held = self._slots
            new_keys = []
            for k, r in row_of.items():
                s = held.get(k)
                if s is None:
                    new_keys.append((k, r))
                else:
                    held.move_to_end(k)  # most recently used: never evicted for this call's new keys
                    slots[r] = s
            for k, r in new_keys:
                slots[r] = self._allocate(k, now)
                fresh_row[r] = True
            self._seen[slots] = now
            if T == 1:  # every key once: events are already the batch rows, in order
                xb = x[:, None]
            else:
                xb = np.zeros((B, T, *x.shape[1:]), x.dtype)
                xb[rows, cols] = x
            lengths = np.asarray(counts, np.int32)
            state = State({n: self._slab[n][:, slots] for n in self._state_names}, self._state_names)
            outs, new = self.model.run_unchecked(xb, lengths, state)
            for n in self._state_names:
                self._slab[n][:, slots] = new.raw(n)
            pos = self._steps[slots][rows] + cols
            self._steps[slots] += lengths
            prev: dict[str, np.ndarray] = {}
            if self.keep_last_output:
                for n, o in outs.items():
                    before = self._last[n][slots]  # [B, ...], NaN for fresh keys
                    p = np.empty((N, *o.shape[2:]), np.float32)
                    first = cols == 0
                    p[first] = before[rows[first]]
                    p[~first] = o[rows[~first], cols[~first] - 1]
                    prev[n] = p
                    self._last[n][slots] = o[np.arange(B), lengths - 1]
        per_event = {n: o[rows, cols] for n, o in outs.items()}
        return KeyedResult(per_event, pos, fresh_row[rows] & (cols == 0), prev)

    # -- snapshot / restore ------------------------------------------------------
    def snapshot(self, keys: Sequence[Key] | None = None) -> pa.Table:
        """All key state (or only ``keys``, skipping unknown ones) as an Arrow table (no pickle).

        Restore with :meth:`restore`.

        One row per key: ``key`` (binary), ``key_is_str``, ``steps``, ``last_seen``, one
        ``state_<name>`` float32 list column per state tensor (``[layers * hidden]``,
        row-major), and ``last_<output>`` columns with ``keep_last_output``. The
        schema metadata names the model (fingerprint, state shapes).
        """
        with self._lock:
            if keys is None:
                keys = list(self._slots)
            else:
                keys = [k for k in dict.fromkeys(keys) if k in self._slots]
            slots = np.fromiter((self._slots[k] for k in keys), np.int64, len(keys))
            cols: dict[str, pa.Array] = {
                "key": pa.array([k.encode() if isinstance(k, str) else k for k in keys], pa.binary()),
                "key_is_str": pa.array([isinstance(k, str) for k in keys], pa.bool_()),
                "steps": pa.array(self._steps[slots]),
                "last_seen": pa.array(self._seen[slots]),
            }
            for n in self._state_names:
                per_key = np.moveaxis(self._slab[n][:, slots], 1, 0)  # [keys, layers, hidden]
                cols[f"state_{n}"] = _fixed_list(per_key)
            for n, a in self._last.items():
                cols[f"last_{n}"] = _fixed_list(a[slots])
        spec = self.model.spec
        meta = {"format": SNAPSHOT_FORMAT, "model": spec.name, "version": spec.version,
                "fingerprint": spec.fingerprint, "state": [list(s) for s in _sig(spec)],
                "keep_last_output": self.keep_last_output}
        return pa.table(cols).replace_schema_metadata({SNAPSHOT_KEY: json.dumps(meta).encode()})

    def save(self, path: str | Path) -> None:
        """Write :meth:`snapshot` to a Parquet file."""
        pq.write_table(self.snapshot(), str(path))

    def restore(self, source: pa.Table | str | Path, *, allow_other_model: bool = False) -> int:
        """Replace all key state with a snapshot (a table or a Parquet path). Returns keys restored.

        A snapshot of a different model (other weights fingerprint) is refused unless
        ``allow_other_model`` and its state shapes match; other shapes are always refused.
        """
        table = source if isinstance(source, pa.Table) else _read_parquet(source)
        meta_raw = (table.schema.metadata or {}).get(SNAPSHOT_KEY)
        if meta_raw is None:
            raise SnapshotError(f"restore: schema metadata: expected key {SNAPSHOT_KEY.decode()!r}, "
                                "got a table that is not a streamrnn snapshot")
        meta = json.loads(meta_raw)
        spec = self.model.spec
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"restore: format: expected {SNAPSHOT_FORMAT!r}, got {meta.get('format')!r}")
        want_sig = [list(s) for s in _sig(spec)]
        if meta["state"] != want_sig:
            raise SnapshotError(f"restore: state shapes: expected {want_sig} (model {spec.name}), "
                                f"got {meta['state']} (model {meta.get('model')})")
        if meta["fingerprint"] != spec.fingerprint and not allow_other_model:
            raise SnapshotError(
                f"restore: model: expected a snapshot of {spec.name} v{spec.version} "
                f"(weights {spec.fingerprint[:12]}), got one of {meta.get('model')} v{meta.get('version')} "
                f"(weights {meta['fingerprint'][:12]}); "
                "pass allow_other_model=True to continue compatible state under new weights")
        n = table.num_rows
        if n > self.max_keys:
            raise SnapshotError(f"restore: keys: expected <= max_keys={self.max_keys}, got {n}")
        keys = [k.decode() if is_str else k for k, is_str in
                zip(table.column("key").to_pylist(), table.column("key_is_str").to_pylist(), strict=True)]
        states = {}
        for s in self._state_names:
            L, H = self._state_tail[s][0], self._state_tail[s][1:]
            flat = _from_fixed_list(table.column(f"state_{s}"), n)
            states[s] = np.moveaxis(flat.reshape(n, L, *H), 0, 1)
        last = {}
        if self.keep_last_output:
            for o, tail in self._out_tail.items():
                name = f"last_{o}"
                last[o] = (_from_fixed_list(table.column(name), n).reshape(n, *tail) if name in table.column_names
                           else np.full((n, *tail), np.nan, np.float32))
        with self._lock:
            self._reset_storage(max(min(self.max_keys, 16), n))
            for k in keys:
                self._slots[k] = self._free.pop()
            slots = np.fromiter(self._slots.values(), np.int64, n)
            for s in self._state_names:
                self._slab[s][:, slots] = states[s]
            for o, a in last.items():
                self._last[o][slots] = a
            self._steps[slots] = table.column("steps").to_numpy()
            self._seen[slots] = table.column("last_seen").to_numpy()
        return n


def _sig(spec) -> list[tuple]:
    return [(s.name, list(s.shape), s.dtype) for s in spec.state]


def _fixed_list(a: np.ndarray) -> pa.Array:
    """``[n, ...]`` float32 -> a fixed-size list column of width ``prod(...)`` (row-major)."""
    a = np.ascontiguousarray(a, np.float32)
    width = int(np.prod(a.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), width)


def _from_fixed_list(col: pa.ChunkedArray, n: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, width)


def _read_parquet(path: str | Path) -> pa.Table:
    try:
        return pq.read_table(str(path))
    except (OSError, pa.ArrowInvalid) as e:
        raise SnapshotError(f"restore: expected a Parquet snapshot at {str(path)!r}, got: {e}") from e
