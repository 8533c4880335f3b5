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

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, fields
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from ..model.loaded import ORT_ERRORS, Binding, Model, State, inference_error
from . import health as hl
from . import snapshot as snap
from .device_slab import DeviceSlabs
from .packing import group, pack
from .slab import HEALTH_FILL, SlotStore

Key = str | bytes
SNAPSHOT_KEY = snap.SNAPSHOT_KEY
SNAPSHOT_FORMAT = snap.SNAPSHOT_FORMAT
#: ``KeyedResult.reset`` of an event that started its key fresh: why (the Beam layer's reasons)
NEW, EXPIRED, EVICTED, MODEL_UPDATE = "new", "expired", "evicted", "model_update"
#: how many dropped keys the operator remembers the reason of (older ones restart as ``new``)
REMEMBER_ENDED = 65_536
#: a packed group of at most this many rows and at least this many steps runs beside the others when they
#: hold at least SIDE_REST padded key-steps (``KeyedOperator._side_groups``)
SIDE_ROWS, SIDE_STEPS, SIDE_REST = 16, 32, 256
#: what :meth:`KeyedOperator._use_model` sets: a failed ``update_model`` puts each back as it was
_MODEL_FIELDS = ("health", "_health_on", "_alpha", "_d", "_bad_above", "_loss", "_lm_loss", "_keep_last", "model",
                 "_tokens", "_vocab", "_state_names", "_state_tail", "_out_tail", "_store", "_dev")
#: known-keys calls of at most this many keys run on bound buffers (``Model.binding``), at most BIND_SIZES
#: call sizes kept per operator
BIND_MAX_KEYS, BIND_SIZES = 64, 8
#: the health columns that ``flag`` reads and changes (with ``last_health``, which it writes); the others keep
#: their fill values
_FLAG_FILL = tuple((n, HEALTH_FILL[n]) for n in ("ew_num", "ew_den"))


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
    ``reset`` says why a fresh event started fresh, as the Beam layer does: ``"new"``
    (never seen, or dropped too long ago to remember: the last :data:`REMEMBER_ENDED`
    drops are remembered), ``"expired"`` (idle past the TTL), ``"evicted"`` (dropped
    for capacity, or by :meth:`KeyedOperator.evict`), ``"model_update"`` (its state
    ended at :meth:`KeyedOperator.update_model`); ``""`` for every other event.
    """

    outputs: dict[str, np.ndarray]
    pos: np.ndarray
    fresh: np.ndarray
    prev_outputs: dict[str, np.ndarray] = field(default_factory=dict)
    reset: np.ndarray = field(default_factory=lambda: np.zeros(0, "<U12"))
    #: with ``health`` on (see :mod:`streamrnn.keyed.health`): each event's state health (carried / fresh loss,
    #: or EW loss / the model's reference loss), and how many of the call's keys end it in bad health
    state_health: np.ndarray | None = None
    bad_health: int | None = None

    def __repr__(self) -> str:
        return summary_repr(self)


def _shape(v: object) -> str:
    if isinstance(v, np.ndarray):
        return f"{v.dtype}[{', '.join(map(str, v.shape))}]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_shape(a)}" for k, a in v.items()) + "}"
    return repr(v)


def summary_repr(result: Any) -> str:
    """A per-event result in one line: its event count and fresh starts, then each field's dtype and shape, not
    its values (a result's arrays run to thousands of numbers: read them by name)."""
    n, fresh = len(result.pos), int(np.count_nonzero(result.fresh))
    rest = ", ".join(f"{f.name}={_shape(getattr(result, f.name))}" for f in fields(result)
                     if f.name not in ("pos", "fresh") and getattr(result, f.name) is not None)
    return f"{type(result).__name__}({n:,} event{'' if n == 1 else 's'}, {fresh:,} fresh; {rest})"


@dataclass
class Evictions:
    """Counts of keys whose state was dropped, by reason."""

    ttl: int = 0
    capacity: int = 0
    explicit: int = 0
    model_update: int = 0

    @property
    def total(self) -> int:
        return self.ttl + self.capacity + self.explicit + self.model_update


@dataclass
class HealthCounts:
    """Counts of the carried-state health policy (:mod:`streamrnn.keyed.health`): keys whose state was replaced by
    their shadow's (``heal``)."""

    heals: int = 0


class KeyedOperator:
    """Owns the recurrent state of many keys.

    Args:
      model: the loaded model.
      max_keys: most keys held; past it the least recently used keys are evicted.
      ttl: seconds (of ``clock``) a key may stay idle before its state is dropped; None keeps keys forever.
        Every idle key expires, wherever it is in recency order (event-time clocks may go back). Every
        read (``len``, ``in``, :meth:`keys`, :meth:`state_of`, :meth:`steps_of`, :meth:`last_output`,
        :meth:`snapshot`) answers as if expiry had run at the clock's current time; the state is dropped
        (and counted in ``evictions.ttl``) by the next :meth:`process`, :meth:`expire`, :meth:`evict` or
        :meth:`update_model`.
      clock: returns the current time in seconds; inject a fake in tests, or event time in streams.
        A reading that is not a finite number is an :class:`InputError` (and changes nothing). A key's
        ``last_seen`` is the latest time it was touched (``max``): a clock going back never moves a
        key's expiry earlier. Recency (which key :meth:`keys` lists last, and capacity eviction spares)
        follows the order events are processed, by each key's last event.
      keep_last_output: also keep each key's last task output (needed to score or sample
        the next token between calls).
      health: ``"off"``, ``"flag"``, ``"heal"`` or a :class:`~streamrnn.keyed.health.HealthConfig`:
        watch each key's carried-state loss (the task's: next-token or forecast,
        :func:`~streamrnn.keyed.health.task_loss`) against the model's reference loss and, under ``heal``, against
        a fresh shadow state, replacing the carried state when the shadow does better for long enough
        (:mod:`streamrnn.keyed.health`). ``heal`` needs host state. The default (None) is the model's
        (:func:`~streamrnn.keyed.health.default_policy`): ``flag`` for a next-token model with a reference
        loss (the shipped charlm), ``off`` for any other.
      pack_step_cost: keys of one call are packed into model calls by length (see
        :func:`streamrnn.keyed.packing.pack`), so one busy key does not make every other key pay
        for its length; the fixed cost of one recurrent step in key-steps. ``math.inf``
        runs every call as one padded batch.

    State lives in ``[layers, capacity, hidden]`` slabs per state tensor (see
    :mod:`streamrnn.keyed.slab`): host memory, or ``OrtValue`` slabs on the model's device when
    ``state_on_device`` (the default with the CUDA provider; see :mod:`streamrnn.keyed.device_slab`),
    with a host copy only for snapshots and ``state_of``. Every state change is all-or-nothing: ``process`` and
    ``restore`` compute everything first and commit only when nothing failed. Thread-safe
    (one lock per operator).
    """

    def __init__(self, model: Model, *, max_keys: int = 1_000_000, ttl: float | None = None,
                 clock: Callable[[], float] = time.time, keep_last_output: bool = False,
                 initial_capacity: int = 1024, pack_step_cost: float = 4.0, state_on_device: bool | None = None,
                 health: str | hl.HealthConfig | None = None):
        if not isinstance(max_keys, (int, np.integer)) or isinstance(max_keys, bool) or max_keys < 1:
            raise InputError(f"KeyedOperator: max_keys: expected an int >= 1, got {max_keys!r}")
        if ttl is not None and not (isinstance(ttl, (int, float)) and 0 < ttl < math.inf):
            raise InputError(f"KeyedOperator: ttl: expected a positive number of seconds or None, got {ttl!r}")
        if not (isinstance(initial_capacity, (int, np.integer)) and initial_capacity >= 1):
            raise InputError(f"KeyedOperator: initial_capacity: expected an int >= 1, got {initial_capacity!r}")
        if not (isinstance(pack_step_cost, (int, float)) and pack_step_cost >= 0):
            raise InputError(f"KeyedOperator: pack_step_cost: expected a number >= 0, got {pack_step_cost!r}")
        self.max_keys = int(max_keys)
        self.ttl = ttl
        self.clock = clock
        self.keep_last_output = keep_last_output
        self.pack_step_cost = pack_step_cost
        self.evictions = Evictions()
        self.health_counts = HealthCounts()
        self._health_arg = health
        self._lock = threading.Lock()
        self._initial_capacity = int(initial_capacity)
        self._on_device_arg = state_on_device
        self._ended: OrderedDict[Key, str] = OrderedDict()  # dropped key -> why (bounded: REMEMBER_ENDED)
        self._bindings: tuple[Model | None, dict[int, Binding]] = (None, {})  # the known path's, by call size
        self._use_model(model)

    def _use_model(self, model: Model) -> None:
        """Serve ``model`` with an empty store (construction, and the new side of :meth:`update_model`). Sets
        exactly :data:`_MODEL_FIELDS` (what a failed update puts back)."""
        cfg = hl.resolve(self._health_arg, model, self.max_keys)
        on_device = model.on_cuda if self._on_device_arg is None else bool(self._on_device_arg)
        if cfg.policy == "heal" and on_device:
            raise InputError("KeyedOperator: health='heal': expected host state (state_on_device=False), got "
                             "state on the device; use health='flag' there")
        self.health = cfg
        self._health_on = cfg.policy != "off"
        self._alpha, self._d = cfg.alpha, 1.0 - cfg.alpha  # the EW weights (hl.ew_one's)
        self._bad_above = 1.0 + cfg.bad_margin
        self._loss = hl.task_loss(model.spec) if self._health_on else None  # the task's health loss
        self._lm_loss = self._loss is hl.lm_loss
        self._keep_last = self.keep_last_output or self._health_on
        self.model = model
        spec = model.spec
        self._tokens, self._vocab = spec.input.kind == "tokens", spec.input.vocab_size
        self._state_names = tuple(s.name for s in spec.state)
        self._state_tail = {s.name: tuple(int(d) for d in s.shape if d != "batch") for s in spec.state}
        self._out_tail = {o.name: tuple(int(d) for d in o.shape[2:]) for o in spec.outputs}
        self._store = self._new_store(self._initial_capacity, on_device)
        self._dev = DeviceSlabs(model.session, self._state_tail, self._store.cap) if on_device else None

    @property
    def state_on_device(self) -> bool:
        """Whether key state lives in ``OrtValue`` slabs on the model's device (IOBinding)."""
        return self._dev is not None

    def _new_store(self, capacity: int, on_device: bool) -> SlotStore:
        return SlotStore({} if on_device else self._state_tail, self._out_tail if self._keep_last else None,
                         min(capacity, self.max_keys), self.max_keys, health=self._health_on)

    def _host_state(self, name: str, slots: np.ndarray) -> np.ndarray:
        """``[layers, len(slots), ...]`` host copy of held slots' state."""
        if self._dev is not None:
            return self._dev.host(name, slots)
        return np.take(self._store.slab[name], slots, axis=1)

    def _now(self, what: str) -> float:
        t = self.clock()
        try:
            now = float(t)
        except (TypeError, ValueError):
            now = math.nan
        if not math.isfinite(now):
            raise InputError(f"{what}: clock: expected a finite time in seconds, got {t!r}")
        return now

    def _limit(self, what: str) -> float | None:
        """Keys last seen before this time have expired (None without a TTL: no clock is read)."""
        return None if self.ttl is None else self._now(what) - self.ttl

    def _slot(self, key: Any, limit: float | None) -> int | None:
        """The slot of a held, unexpired ``key`` (None for anything else)."""
        try:
            slot = self._store.slots.get(key)
        except TypeError:  # unhashable
            return None
        return None if slot is None or (limit is not None and self._store.seen[slot] < limit) else slot

    def _live(self, limit: float | None) -> list[Key]:
        """Held, unexpired keys, least recently used first."""
        store = self._store
        keys = store.lru_order()
        if limit is None or not limit > store.min_seen:
            return keys
        return [k for k in keys if store.seen[store.slots[k]] >= limit]

    def _forget_ended(self, keys: Sequence[Key]) -> None:
        for k in keys:
            self._ended.pop(k, None)

    def _remember_ended(self, keys: Sequence[Key], why: str) -> None:
        ended = self._ended
        for k in keys:
            ended.pop(k, None)
            ended[k] = why
        while len(ended) > REMEMBER_ENDED:
            ended.popitem(last=False)

    def _expire_at(self, limit: float | None) -> int:
        """Drop every key last seen before ``limit`` (nothing for None)."""
        if limit is None:
            return 0
        expired = self._store.expire(limit)
        self.evictions.ttl += len(expired)
        self._remember_ended(expired, EXPIRED)
        return len(expired)

    # -- public API --------------------------------------------------------------
    def __len__(self) -> int:
        if self.ttl is None:
            return len(self._store.slots)
        with self._lock:
            limit, store = self._limit("len"), self._store
            if not limit > store.min_seen:
                return len(store.slots)
            return int(np.count_nonzero(store.in_use & (store.seen >= limit)))

    def __contains__(self, key: Hashable) -> bool:
        if self.ttl is None:
            return self._slot(key, None) is not None
        with self._lock:
            return self._slot(key, self._limit("contains")) is not None

    def keys(self) -> list[Key]:
        """Held keys (not expired), least recently used first."""
        with self._lock:
            return self._live(self._limit("keys"))

    def expire(self) -> int:
        """Drop keys idle longer than ``ttl`` now; returns how many. ``process`` does this too."""
        with self._lock:
            now = self._now("expire")
            return 0 if self.ttl is None else self._expire_at(now - self.ttl)

    def evict(self, key: Key) -> bool:
        """Drop one key's state (counted as ``explicit``; its next event starts fresh with reset ``evicted``).
        False if it was not held (an expired key is dropped as expired, and False too)."""
        with self._lock:
            self._expire_at(self._limit("evict"))
            slot = self._slot(key, None) if isinstance(key, (str, bytes)) else None
            if slot is None:
                return False
            self._store.release(np.array([slot]))
            self.evictions.explicit += 1
            self._remember_ended([key], EVICTED)
            return True

    def state_of(self, key: Key) -> State:
        """A copy of one key's state, batch 1 (the initial state for an unknown or expired key)."""
        with self._lock:
            slot = self._slot(key, self._limit("state_of"))
            if slot is None:
                return self.model.initial_state(1)
            one = np.array([slot])
            return State({n: self._host_state(n, one) for n in self._state_names}, self._state_names)

    def last_output(self, key: Key) -> dict[str, np.ndarray] | None:
        """Copy of a key's last task output (needs ``keep_last_output``); None for an unknown or expired key."""
        if not self.keep_last_output:
            raise InputError("last_output: expected an operator built with keep_last_output=True, got False")
        with self._lock:
            slot = self._slot(key, self._limit("last_output"))
            return None if slot is None else {n: a[slot].copy() for n, a in self._store.last.items()}

    def steps_of(self, key: Key) -> int:
        """How many steps the key's state has absorbed (0 for an unknown or expired key)."""
        with self._lock:
            slot = self._slot(key, self._limit("steps_of"))
            return 0 if slot is None else int(self._store.steps[slot])

    def bad_health_keys(self) -> int:
        """How many held (unexpired) keys are in bad health now: ``state_health`` of their last event above
        ``1 + bad_margin`` (0 with health off); what the ``streamrnn_health_bad_keys`` gauge reports."""
        if not self._health_on:
            return 0
        with self._lock:
            store, limit = self._store, self._limit("bad_health_keys")
            bad = store.in_use & hl.bad(self.health, store.health["last_health"])
            if limit is not None:
                bad &= store.seen >= limit
            return int(np.count_nonzero(bad))

    def process(self, keys: Sequence[Key], x: Any) -> KeyedResult:
        """Apply one step per event, in order; all-or-nothing.

        Args:
          keys: N keys (str or bytes); a key may repeat, its events apply in list order.
            A single str or bytes is an error (it is not a list of one-character keys).
          x: one step per event: int tokens ``[N]`` or float features ``[N, F]``.

        Events of one key become one row (right-padded, with ``lengths`` giving each
        row's real length). Rows are packed into as few model calls as keep the padded
        volume near the event count (see :mod:`streamrnn.keyed.packing`). If anything fails
        (bad input, the clock, ONNX Runtime), no state, recency, counter or eviction changes.
        """
        if isinstance(keys, (str, bytes)):
            raise InputError(f"process: keys: expected a sequence of str/bytes keys (one per event), got a single "
                             f"{type(keys).__name__} {keys[:40]!r}; pass [{keys[:40]!r}] for one key")
        x = np.asarray(x)
        tokens = self._tokens
        if x.ndim != (1 if tokens else 2):
            shape = "[N]" if tokens else f"[N, {self.model.spec.input.n_features}]"
            raise InputError(f"process: x rank: expected {shape} (one step per event), got shape {list(x.shape)}")
        N = x.shape[0]
        try:
            n_keys = len(keys)
        except TypeError:
            raise InputError(f"process: keys: expected a sequence of {N} keys, got {type(keys).__name__}") from None
        if n_keys != N:
            raise InputError(f"process: keys: expected {N} keys (one per event in x), got {n_keys}")
        if N == 0:
            return KeyedResult({n: np.zeros((0, *t), np.float32) for n, t in self._out_tail.items()},
                               np.zeros(0, np.int64), np.zeros(0, bool),
                               {n: np.zeros((0, *t), np.float32) for n, t in self._out_tail.items()}
                               if self.keep_last_output else {}, np.zeros(0, object))
        if not (tokens and N <= 64 and x.dtype == np.int64 and _in_vocab(x, self._vocab)):  # else: a few tokens
            x = self.model.check_x(x[:, None])[:, 0]
        # a call of str/bytes keys no more than max_keys may take the known-keys path (it cannot fail the key
        # checks below, so trying it first changes no error); any other call is grouped (and checked) first
        known = self._dev is None and N <= self.max_keys and _plain_keys(keys)
        g = None if known else self._group(keys)
        with self._lock:
            now = self._now("process")
            if known:
                r = self._process_known(keys, x, now)
                if r is not None:
                    return r
                g = self._group(keys)
            return self._process_grouped(g, x, now)

    def _group(self, keys: Sequence[Key]):
        g = group(keys)
        if len(g.keys) > self.max_keys:
            raise InputError(f"process: distinct keys in one call: expected <= max_keys={self.max_keys}, "
                             f"got {len(g.keys)}")
        return g

    def _process_known(self, keys: Sequence[Key], x: np.ndarray, now: float) -> KeyedResult | None:
        """The steady-state call without grouping or planning: every key held and unexpired, each once (one
        step per key). None, having changed nothing, for any other call (the general path then runs it).
        Results, state and counters equal the general path's (tests/test_keyed_fast.py). Host state only;
        the caller holds the lock and read the clock.

        One key (the latency path) is addressed by a slice: views and scalar writes, no fancy indexing.
        Health: the EW update alone where no shadow runs or starts (:meth:`_known_health`), else the full
        verdict with the shadows as extra rows of the same call (:meth:`_known_verdict`)."""
        store, N = self._store, len(x)
        get = store.slots.get
        if N == 1:
            s = get(next(iter(keys)))  # any sized iterable of keys, as the general path takes
            if s is None:
                return None
            at: slice | np.ndarray = slice(s, s + 1)
        else:
            held = list(map(get, keys))
            if None in held or len(set(held)) < N:
                return None
            at = np.array(held, np.int64)
        # a wide call whose keys hold consecutive slots in order (a steady stream's keys, in the order they first
        # came): the bulk copies of state and last outputs go by slice, not by index
        run = (slice(held[0], held[0] + N) if N > max(BIND_MAX_KEYS, 1) and held[-1] - held[0] == N - 1
               and bool((at[1:] - at[:-1] == 1).all()) else None)
        if self.ttl is not None and not store.none_expired(now - self.ttl):
            return None
        health = verdict = None
        names, slab, last = self._state_names, store.slab, store.last
        if self._health_on:
            health = self._known_health(at, x)
            if health is None:
                if N == 1:
                    at = np.array([s])
                verdict, sh, watched = self._known_verdict(at, x)
        if verdict is not None and len(watched):  # the shadows: extra rows of the same call
            pool = store.shadow.slab
            st = {n: np.concatenate([slab[n].take(at, axis=1), pool[n][:, sh[watched]]], axis=1) for n in names}
            xb = np.concatenate([x, x[watched]])[:, None]
            o, new = self.model.run_unchecked(xb, self.model._lengths(None, len(xb), 1), State(st, names))
            outs = {n: v[:N, 0] for n, v in o.items()}
        elif N <= BIND_MAX_KEYS:  # bound buffers: one key's slab columns copied in; more: gathered into them
            b = self._binding(N)
            st = ({n: slab[n][:, at] for n in names} if N == 1
                  else {n: np.take(slab[n], at, axis=1, out=b.state_in(n), mode="clip") for n in names})
            o, new = self.model.run_unchecked(x[:, None], b.lengths, State(st, names), binding=b)
            outs = {n: v[:, 0].copy() for n, v in o.items()}  # the binding's buffers: the next call reuses them
        else:  # one gather per tensor (none where the call's run is the whole slab)
            st = {n: slab[n][:, at] if N == 1 else np.ascontiguousarray(slab[n][:, run]) if run is not None
                  else slab[n].take(at, axis=1) for n in names}
            o, new = self.model.run_unchecked(x[:, None], self.model._lengths(None, N, 1), State(st, names))
            outs = {n: v[:, 0] for n, v in o.items()}
        put = at if run is None else run
        # (a slice is a view of the store's rows: copied; an index array gathers a copy already)
        prev = ({n: last[n][put].copy() if isinstance(put, slice) else last[n][put] for n in outs}
                if self.keep_last_output else {})
        # -- commit (nothing below can fail on valid data)
        whole = run is not None and run.start == 0 and N == store.cap
        for n in names:
            v = new.raw(n)
            if whole and v.shape == slab[n].shape and v.dtype == slab[n].dtype and v.flags.c_contiguous and \
                    v.flags.writeable and verdict is None:
                slab[n] = v  # the call held every slot: the model's new state (its own array) is the slab
            else:
                slab[n][:, put] = v[:, :N]
        if self._keep_last:
            if N == 1:  # a row by int index: cheaper than a slice of one row
                for n, v in outs.items():
                    last[n][s] = v[0]
            else:
                for n, v in outs.items():
                    last[n][put] = v
        steps = store.steps
        if N == 1:
            pos = steps[at].copy()
            steps[s] += 1
            store.touch_one(s, now)
        else:
            pos = steps[at]
            steps[at] = pos + 1
            store.touch(at, now)
        reset, fresh = np.array([""] * N, object), np.zeros(N, bool)
        if verdict is not None:
            shadow = {"row_of": np.full(N, -1, np.int64), "state": {n: new.raw(n)[:, N:] for n in names},
                      "last": {n: v[N:, 0] for n, v in o.items()}}
            shadow["row_of"][watched] = np.arange(len(watched))
            self._commit_health(verdict, at, shadow, sh)
            reset[verdict.marks[:, 0]] = hl.HEALTH  # ran from a state that health reset after the key's last event
            return KeyedResult(outs, pos, fresh, prev, reset, verdict.health[:, 0],
                               int(np.count_nonzero(hl.bad(self.health, verdict.last_health))))
        if health is None:
            return KeyedResult(outs, pos, fresh, prev, reset)
        h = store.health
        state_health = health[2]
        if N == 1:
            h["ew_num"][s], h["ew_den"][s], h["last_health"][s] = health
            bad = int(state_health > self._bad_above)
            state_health = np.array(state_health, ndmin=1)
        else:
            h["ew_num"][put], h["ew_den"][put], h["last_health"][put] = health
            bad = int(np.count_nonzero(hl.bad(self.health, state_health)))
        return KeyedResult(outs, pos, fresh, prev, reset, state_health, bad)

    def _binding(self, n: int) -> Binding:
        """The model's bound buffers for a known-keys call of ``n`` keys, one step each (made on first use; the
        caller holds the lock, so one call uses them at a time)."""
        model, cache = self._bindings
        if model is not self.model:
            model, cache = self._bindings = (self.model, {})
        b = cache.get(n)
        if b is None:
            if len(cache) >= BIND_SIZES:
                cache.clear()
            b = cache[n] = model.binding(n, 1)
        return b

    def _known_health(self, at: slice | np.ndarray, x: np.ndarray) -> tuple | None:
        """The known-keys path's health update, computed before the model runs (one step per key: its loss
        is scored by the key's last output): the new EW numerator, denominator and state health of the keys
        at ``at`` (Python floats for one key); None when a shadow runs or would start (``heal``), or for a
        key with no EW loss yet: :meth:`_known_verdict` decides those."""
        cfg, store = self.health, self._store
        h = store.health
        heal = cfg.policy == "heal"
        ref = cfg.reference
        if isinstance(at, slice):  # one key (the latency path): Python floats, the operations of hl.ew_one
            s = at.start
            if heal and h["shadow_slot"].item(s) >= 0:
                return None
            lc = (-store.last["logprobs"].item(s, x.item(0)) if self._lm_loss  # the LM's loss, in floats
                  else float(self._loss(store.last, (np.array([s]),), x[:1])[0]))
            if lc == lc:  # scored
                num, den = self._d * h["ew_num"].item(s) + self._alpha * lc, self._d * h["ew_den"].item(s) + self._alpha
            else:
                num, den = h["ew_num"].item(s), h["ew_den"].item(s)
            if not den > 0:
                return None
            ew_now = num / den
            health = ew_now / ref if ref is not None else math.nan
            if heal and store.shadow.used < cfg.max_watch and hl.want_watch(cfg, ew_now, store.steps.item(s) + 1):
                return None
            return num, den, health
        if heal and (h["shadow_slot"][at] >= 0).any():
            return None
        lc = self._loss(store.last, (at,), x)
        num, den = hl.ew_one(h["ew_num"][at], h["ew_den"][at], lc, self._alpha)
        if den.min() > 0:  # (every key has an EW loss: most calls)
            ew_now = num / den
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                ew_now = num / den
        health = ew_now / ref if ref is not None else np.full(len(at), np.nan)
        if heal and store.shadow.used < cfg.max_watch and hl.want_watch(cfg, ew_now, store.steps[at] + 1).any():
            return None
        return num, den, health

    def _known_verdict(self, at: np.ndarray, x: np.ndarray) -> tuple[hl.Verdict, np.ndarray | None, np.ndarray]:
        """The known-keys path's full health verdict (:func:`streamrnn.keyed.health.decide`, one step per key), as
        the general path makes it, before the model runs: the shadows' losses are scored by their last
        outputs. Returns the verdict, the keys' shadow slots (None without ``heal``) and the watched keys."""
        cfg, store = self.health, self._store
        N = len(at)
        cols = {n: a[at] for n, a in store.health.items()}
        lc = self._loss(store.last, (at,), x)
        sh, watched, ls, room = None, np.zeros(0, np.int64), None, 0
        if cfg.policy == "heal":
            pool = store.shadow
            sh = store.health["shadow_slot"][at]
            watched = np.flatnonzero(sh >= 0)
            room = cfg.max_watch - pool.used
            if len(watched):
                ls = np.full((N, 1), np.nan)
                ls[watched, 0] = self._loss(pool.last, (sh[watched],), x[watched])
        v = hl.decide(cfg, cols, lc[:, None], ls, np.ones(N, np.int64), store.steps[at] + 1,
                      np.zeros(N, bool) if sh is None else sh >= 0, room)
        return v, sh, watched

    def _process_grouped(self, g, x: np.ndarray, now: float) -> KeyedResult:
        """Any call (grouped by key, rows packed into model calls); the caller holds the lock."""
        N, B = len(x), len(g.keys)
        store = self._store
        slot_of = store.slots
        held = np.fromiter(map(slot_of.get, g.keys, repeat(-1, B)), np.int64, B)
        fresh = held < 0
        if self.ttl is not None:  # a held key idle past the TTL starts fresh (it expires at commit)
            fresh |= store.seen[np.maximum(held, 0)] < now - self.ttl
        hs = np.where(fresh, 0, held)
        steps_before = np.where(fresh, 0, store.steps[hs])
        sh = None
        if self.health.policy == "heal":
            sh = np.where(fresh, -1, store.health["shadow_slot"][hs])
        outs, new_state, last_row, prev, lc, shadow = self._run(g, x, hs, fresh, sh)
        verdict = None
        if self._health_on:
            verdict = self._health_verdict(g, x, hs, fresh, steps_before, lc, shadow, sh)
        # -- commit: plan where new keys go, build new device slabs, then change the store
        new_rows = np.flatnonzero(fresh)
        why = self._reasons(g.keys, held, new_rows)
        plan = store.plan(held[~fresh], len(new_rows), None if self.ttl is None else now - self.ttl)
        slots = held.copy()
        slots[new_rows] = plan.new_slots
        dev_slabs = self._scattered_slabs(plan.grow_to, slots, new_state) if self._dev is not None else None
        # nothing below can fail on valid data
        expired, victims = store.key_of[plan.expired].tolist(), store.key_of[plan.victims].tolist()
        new_keys = [g.keys[i] for i in new_rows.tolist()]
        store.apply(plan, new_keys)
        self.evictions.ttl += len(expired)
        self.evictions.capacity += len(victims)
        self._remember_ended(expired, EXPIRED)
        self._remember_ended(victims, EVICTED)
        if self._ended:
            self._forget_ended(new_keys)
        last_event = g.cols == g.counts[g.rows] - 1
        store.touch(slots[g.rows[last_event]], now)  # recency: by each key's last event in this call
        if dev_slabs is not None:
            self._dev.slab, self._dev.cap = dev_slabs, plan.grow_to
        else:
            for grp, values in new_state:
                for n, v in values.items():
                    store.slab[n][:, slots[grp]] = v
        for n, a in last_row.items():
            store.last[n][slots] = a
        store.steps[slots] = steps_before + g.counts
        if verdict is not None:
            self._commit_health(verdict, slots, shadow, sh)
        first = fresh[g.rows] & (g.cols == 0)
        reset = np.full(N, "", object)
        reset[first] = why[g.rows[first]]
        if verdict is None:
            return KeyedResult(outs, steps_before[g.rows] + g.cols, first, prev, reset)
        if verdict.heals:  # after a heal's event, the key's outputs are its reset state's run
            self._healed_outputs(g, verdict, shadow, outs, prev)
        if verdict.marks.any():
            reset[self._event_of(g)[verdict.marks]] = hl.HEALTH
        return KeyedResult(outs, steps_before[g.rows] + g.cols, first, prev, reset,
                           verdict.health[g.rows, g.cols], int(np.count_nonzero(hl.bad(self.health,
                                                                                        verdict.last_health))))

    @staticmethod
    def _event_of(g) -> np.ndarray:
        """Index of each key's events by column ``[B, T]`` (-1: padding)."""
        out = np.full((len(g.keys), int(g.counts.max())), -1, np.int64)
        out[g.rows, g.cols] = np.arange(len(g.rows))
        return out

    def _healed_outputs(self, g, v: hl.Verdict, shadow: dict, outs: dict, prev: dict) -> None:
        """Outputs of keys healed within a call: after each heal's event, the fresh run that started there from the
        initial state (the event after the heal is predicted by the output before it, as after any reset)."""
        ev_of = shadow.get("event_of")
        if ev_of is None:
            ev_of = self._event_of(g)
        after, before = [], []
        for b, t, run in sorted(v.heals):  # a key's later heals overwrite its later events
            n_ev = int(g.counts[b])
            if run == hl.NEXT or t + 1 >= n_ev:
                continue
            ev = ev_of[b, t + 1:n_ev]
            for n in outs:
                outs[n][ev] = self._run_outputs(shadow, b, t + 1, n_ev, run, n)
            after.append(ev[1:])
            before.append(ev[:-1])
        if prev and after:
            ev, bev = np.concatenate(after), np.concatenate(before)
            for n in prev:
                prev[n][ev] = outs[n][bev]

    @staticmethod
    def _run_outputs(shadow: dict, b: int, t0: int, t1: int, run: int, name: str) -> np.ndarray:
        """Outputs of key row ``b``'s ``run`` at its columns ``t0 .. t1 - 1``."""
        if run == hl.SHADOW:
            return shadow["outs"][name][shadow["event_of"][b, t0:t1]]
        f = shadow["fresh"][(b, run)]
        return f["outs"][name][t0 - f["from"]:t1 - f["from"]]

    def _health_verdict(self, g, x, hs, fresh, steps_before, lc, shadow, sh) -> hl.Verdict:
        """This call's health decisions (pure: reads the store, changes nothing)."""
        store, cfg = self._store, self.health
        B = len(g.keys)
        cols = {}
        # flag changes only the EW sums and last_health (a fresh key's slot holds the fill values already)
        for n, (_, fill) in (store.health_fill.items() if cfg.policy == "heal" else _FLAG_FILL):
            a = store.health[n][hs]
            a[fresh] = fill
            cols[n] = a
        T = int(g.counts.max())
        if B == 1:  # one key: its events are the columns, in order
            lcp = lc[None, :]
        elif T == 1 and len(g.rows) == B and (g.rows == np.arange(B)).all():
            lcp = lc[:, None]
        else:
            lcp = np.full((B, T), np.nan)
            lcp[g.rows, g.cols] = lc
        watched = np.zeros(B, bool) if sh is None else sh >= 0
        lsp = None
        if shadow is not None:
            shadow["event_of"] = self._event_of(g)
            shadow["fresh"] = {}
            if len(shadow["rows"]):
                lsp = np.full((B, T), np.nan)
                ev = shadow["events"]
                lsp[g.rows[ev], g.cols[ev]] = shadow["loss"]
        room = 0
        if cfg.policy == "heal":
            room = cfg.max_watch - store.shadow.used
            if T > 1:
                return hl.scan(cfg, cols, lcp, lsp, g.counts, steps_before, watched, room,
                               lambda asks: self._fresh_runs(g, x, asks, shadow))
        return hl.decide(cfg, cols, lcp, lsp, g.counts, steps_before + g.counts, watched, room)

    def _fresh_runs(self, g, x: np.ndarray, asks: list[tuple[int, int, int]], shadow: dict) -> list[np.ndarray]:
        """Fresh shadows that a call starts after an event (:func:`streamrnn.keyed.health.scan`): each over its
        key's later events of the call, from the initial state, as rows of one model call. Keeps their outputs,
        final state and last output in ``shadow["fresh"]``; returns their losses by column."""
        ev_of = shadow["event_of"]
        T = ev_of.shape[1]
        starts = np.array([t + 1 for _, t, _ in asks], np.int64)
        lens = np.array([int(g.counts[b]) for b, _, _ in asks], np.int64) - starts
        K, L = len(asks), int(lens.max())
        ev = np.zeros((K, L), np.int64)
        for i, (b, t, _) in enumerate(asks):
            ev[i, :lens[i]] = ev_of[b, t + 1:t + 1 + lens[i]]
        xb = np.zeros((K, L, *x.shape[1:]), x.dtype)
        valid = np.arange(L)[None, :] < lens[:, None]
        xb[valid] = x[ev[valid]]
        o, new = self.model.run_unchecked(xb, lens.astype(np.int32), self.model.initial_state(K))
        out = []
        for i, (b, t, run) in enumerate(asks):
            n = int(lens[i])
            loss = np.full(T, np.nan)
            if n > 1:
                loss[t + 2:t + 1 + n] = self._loss(o, (np.full(n - 1, i), np.arange(n - 1)), xb[i, 1:n])
            out.append(loss)
            shadow["fresh"][(b, run)] = {
                "from": t + 1, "outs": {k: v[i, :n] for k, v in o.items()},
                "state": {k: new.raw(k)[:, i] for k in self._state_names},
                "last": {k: v[i, n - 1] for k, v in o.items()}}
        return out

    def _commit_health(self, v: hl.Verdict, slots: np.ndarray, shadow, sh) -> None:
        """Write a verdict (after the carried state was written): shadows go on, end, or start (a pool slot each;
        a healed key's shadow goes on as the state that was not reset); then healed keys take their run's
        state and last output, or the initial state after the call (last output kept)."""
        store = self._store
        self.health_counts.heals += len(v.heals)
        cols = v.cols
        if sh is not None:
            pool = store.shadow
            had = sh >= 0
            fin = v.shadow
            gone = np.flatnonzero(had & (fin == hl.UNWATCHED))
            pool.release(sh[gone])
            slot = np.where(had & (fin != hl.UNWATCHED), sh, -1)
            new = np.flatnonzero(~had & (fin != hl.UNWATCHED))
            if len(new):
                slot[new] = pool.allocate(len(new))  # the initial state, no last output
            keep = np.flatnonzero(fin == hl.SHADOW)
            if len(keep):
                rows = shadow["row_of"][keep]
                for n, a in shadow["state"].items():
                    pool.slab[n][:, slot[keep]] = a[:, rows]
                for n, a in shadow["last"].items():
                    pool.last[n][slot[keep]] = a[rows]
            own = np.flatnonzero(fin == hl.CARRIED)  # the key's state as the call left it, before any reset
            if len(own):
                for n, a in store.slab.items():
                    pool.slab[n][:, slot[own]] = a[:, slots[own]]
                for n, a in store.last.items():
                    if n in pool.last:
                        pool.last[n][slot[own]] = a[slots[own]]
            for b in np.flatnonzero(had & (fin == hl.NEXT)):  # ended and started again at the last event
                for a in pool.slab.values():
                    a[:, slot[b]] = 0.0
                for a in pool.last.values():
                    a[slot[b]] = np.nan
            for b in np.flatnonzero(fin > hl.SHADOW):  # a run the call started, going on as the shadow
                st, last = self._run_state(shadow, int(b), int(fin[b]))
                for n, a in st.items():
                    pool.slab[n][:, slot[b]] = a
                for n, a in last.items():
                    pool.last[n][slot[b]] = a
            cols["shadow_slot"] = slot
        if v.heals:  # a key carries another run, or the initial state, only after a heal (none under flag)
            for b in np.flatnonzero(v.carried != hl.CARRIED):
                st, last = self._run_state(shadow, int(b), int(v.carried[b]))
                for n, a in st.items():
                    store.slab[n][:, slots[b]] = a
                for n, a in last.items():
                    store.last[n][slots[b]] = a
            zero = np.flatnonzero(v.zero)
            if len(zero):
                for a in store.slab.values():
                    a[:, slots[zero]] = 0.0
        for n, a in cols.items():
            store.health[n][slots] = a

    @staticmethod
    def _run_state(shadow: dict, b: int, run: int) -> tuple[dict, dict]:
        """Final state ``{name: [layers, ...]}`` and last output of key row ``b``'s shadow ``run``."""
        if run == hl.SHADOW:
            r = shadow["row_of"][b]
            return {n: a[:, r] for n, a in shadow["state"].items()}, {n: a[r] for n, a in shadow["last"].items()}
        f = shadow["fresh"][(b, run)]
        return f["state"], f["last"]

    def _reasons(self, keys: list[Key], held: np.ndarray, new_rows: np.ndarray) -> np.ndarray:
        """Why each key of a call starts fresh (``[B]``, '' for keys that continue); reads, changes nothing."""
        why = np.full(len(keys), "", object)
        why[new_rows] = NEW
        why[new_rows[held[new_rows] >= 0]] = EXPIRED  # held, but idle past the TTL
        if self._ended:
            ended = self._ended
            for i in new_rows[held[new_rows] < 0].tolist():
                why[i] = ended.get(keys[i], NEW)
        return why

    def _scattered_slabs(self, cap: int, slots: np.ndarray, new_state: list) -> dict:
        """New device slabs with this call's states written at ``slots`` (the current ones untouched)."""
        dev = self._dev
        out = {}
        try:
            for n in self._state_names:
                slab = dev.slab[n] if cap <= dev.cap else dev.grown(dev.slab[n], cap)
                for grp, values in new_state:
                    slab = dev.scattered(slab, slots[grp], values[n])
                out[n] = slab
        except ORT_ERRORS as e:
            raise inference_error(self.model.source, e) from e
        return out

    def _run(self, g, x: np.ndarray, hs: np.ndarray, fresh: np.ndarray, sh: np.ndarray | None = None):
        """All model calls of one ``process``; reads the store, writes nothing.

        With health on, also each event's carried loss ``lc [N]`` (nats; NaN where the key had no
        prediction); with shadows (``sh [B]``: pool slot, -1 none) their rows run in the same calls, and
        ``shadow`` holds their per-event losses, new state and last output."""
        store = self._store
        N, B = len(g.rows), len(g.keys)
        groups = pack(g.counts, step_cost=self.pack_step_cost)
        outs: dict[str, np.ndarray] = {}
        new_state: list[tuple[np.ndarray, dict]] = []  # (rows, {state name: [layers, rows, ...]})
        last_row: dict[str, np.ndarray] = {}
        prev: dict[str, np.ndarray] = {}
        keep_last, expose = self._keep_last, self.keep_last_output
        health = self._health_on
        lc = np.empty(N, np.float64) if health else None
        shadow = None
        if sh is not None:
            pool = store.shadow
            watched = np.flatnonzero(sh >= 0)
            row_of = np.full(B, -1, np.int64)
            row_of[watched] = np.arange(len(watched))
            shadow = {"rows": watched, "row_of": row_of, "events": [], "loss": [], "outs": {},
                      "state": {n: np.empty((t[0], len(watched), *t[1:]), np.float32)
                                for n, t in self._state_tail.items()},
                      "last": {n: np.empty((len(watched), *t), np.float32) for n, t in self._out_tail.items()}}
        whole = len(groups) == 1

        def inputs(grp: np.ndarray) -> tuple:
            """One model call's inputs: the rows ``grp`` of the call, their events and padded steps."""
            counts = g.counts if whole else g.counts[grp]
            T = int(counts.max())
            if whole:
                ev, lr = slice(None), g.rows
            else:
                local = np.full(B, -1, np.int64)
                local[grp] = np.arange(len(grp))
                lr = local[g.rows]
                ev = np.flatnonzero(lr >= 0)
                lr = lr[ev]
            c = g.cols[ev]
            if whole and T == 1:  # every key once: events are already the batch rows, in order
                xb = x[:, None]
            else:
                xb = np.zeros((len(counts), T, *x.shape[1:]), x.dtype)
                xb[lr, c] = x[ev]
            gh, gf = hs[grp], fresh[grp]
            lengths = counts.astype(np.int32)
            wrow = np.zeros(0, np.int64)
            if shadow is not None:
                wrow = np.flatnonzero(sh[grp] >= 0)  # local rows with a shadow: extra rows of this call
            st = None
            if self._dev is None:
                st = {}
                any_fresh = bool(gf.any())
                for n in self._state_names:
                    a = np.take(store.slab[n], gh, axis=1)
                    if any_fresh:
                        a[:, gf] = 0.0
                    if len(wrow):
                        a = np.concatenate([a, pool.slab[n][:, sh[grp][wrow]]], axis=1)
                    st[n] = a
                st = State(st, self._state_names)
                if len(wrow):
                    xb = np.concatenate([xb, xb[wrow]])
                    lengths = np.concatenate([lengths, lengths[wrow]])
            return counts, T, ev, lr, c, xb, gh, gf, lengths, wrow, st

        def call(xb: np.ndarray, lengths: np.ndarray, gh: np.ndarray, gf: np.ndarray, st: State | None) -> tuple:
            if self._dev is not None:
                st = State({n: self._dev.gather(n, gh, gf) for n in self._state_names}, self._state_names)
                return self.model._step_iobinding(xb, lengths, st, device=self._dev.device,
                                                  device_id=self._dev.device_id)
            return self.model.run_unchecked(xb, lengths, st)

        # the longest, narrowest groups may run on a thread of their own meanwhile (see _side_groups); that
        # thread then takes the remaining groups from the front (narrow, long) while this one takes them from
        # the back (wide, short), so that a narrow call overlaps a wide one until none is left
        n_side = self._side_groups(groups, g.counts)
        queue = _Shared(n_side, len(groups)) if n_side else None
        side = None
        if queue is not None:
            run = self.model.run_unchecked

            def side_calls() -> dict:
                done = {}
                try:
                    for gi in queue.front():
                        inp = inputs(groups[gi])
                        done[gi] = inp, run(inp[5], inp[8], inp[10])
                except BaseException:
                    queue.stop()  # the main thread takes no more groups either
                    raise
                return done

            side = _Background(side_calls)

        def results():
            """(group index, its inputs, its call's outputs) of every group, whichever thread ran it."""
            for gi in (range(len(groups)) if queue is None else queue.back()):
                inp = inputs(groups[gi])
                yield gi, inp, call(inp[5], inp[8], inp[6], inp[7], inp[10])
            if side is not None:
                for gi, (inp, res) in side.result().items():
                    yield gi, inp, res

        try:
            for gi, (counts, T, ev, lr, c, _, gh, gf, _, wrow, _), (o, new) in results():
                grp = groups[gi]
                nb = len(counts)
                for n, v in o.items():
                    if len(wrow):
                        v, vs = v[:nb], v[nb:]
                    if whole and T == 1:
                        outs[n] = v[:, 0]
                    else:
                        outs.setdefault(n, np.empty((N, *v.shape[2:]), np.float32))[ev] = v[lr, c]
                    if keep_last:
                        last = v[np.arange(nb), counts - 1]
                        if whole:
                            last_row[n] = last
                        else:
                            last_row.setdefault(n, np.empty((B, *v.shape[2:]), np.float32))[grp] = last
                    if expose:
                        before = store.last[n][gh]
                        before[gf] = np.nan
                        first = c == 0
                        p = np.empty((len(c), *v.shape[2:]), np.float32)
                        p[first] = before[lr[first]]
                        p[~first] = v[lr[~first], c[~first] - 1]
                        if whole:
                            prev[n] = p
                        else:
                            prev.setdefault(n, np.empty((N, *v.shape[2:]), np.float32))[ev] = p
                    if len(wrow):
                        shadow["last"][n][shadow["row_of"][grp[wrow]]] = vs[np.arange(len(wrow)), counts[wrow] - 1]
                        wpos = np.full(len(counts), -1, np.int64)
                        wpos[wrow] = np.arange(len(wrow))
                        sel = np.flatnonzero(wpos[lr] >= 0)
                        shadow["outs"].setdefault(n, np.full((N, *v.shape[2:]), np.nan, np.float32))[
                            sel if isinstance(ev, slice) else ev[sel]] = vs[wpos[lr[sel]], c[sel]]
                if health:  # each event's loss under its key's previous output (the task's loss)
                    oc = {n: v[:nb] for n, v in o.items()} if len(wrow) else o
                    xe = x[ev]
                    first = c == 0
                    loss = np.empty(len(c), np.float64)
                    fr = np.flatnonzero(first)
                    if len(fr):
                        loss[fr] = self._loss(store.last, (gh[lr[fr]],), xe[fr])
                        loss[fr[gf[lr[fr]]]] = np.nan  # a fresh key's first event: nothing predicted it
                    nf = np.flatnonzero(~first)
                    if len(nf):
                        loss[nf] = self._loss(oc, (lr[nf], c[nf] - 1), xe[nf])
                    lc[ev] = loss
                    if len(wrow):
                        self._shadow_losses(shadow, grp, wrow, lr, c, ev, xe, {n: v[nb:] for n, v in o.items()},
                                            sh, counts)
                if len(wrow):
                    rows = shadow["row_of"][grp[wrow]]
                    for n in self._state_names:
                        shadow["state"][n][:, rows] = new.raw(n)[:, nb:]
                    new_state.append((grp, {n: new.raw(n)[:, :nb] for n in self._state_names}))
                else:
                    new_state.append((grp, {n: new.raw(n) for n in self._state_names}))
        except BaseException:
            if queue is not None:
                queue.stop()
            raise
        finally:
            if side is not None:
                side.join()  # a failure in the main thread's calls: the side call ends before the error goes up
        if shadow is not None:
            shadow["events"] = np.concatenate(shadow["events"]) if shadow["events"] else np.zeros(0, np.int64)
            shadow["loss"] = np.concatenate(shadow["loss"]) if shadow["loss"] else np.zeros(0)
        return outs, new_state, last_row, prev, lc, shadow

    def _side_groups(self, groups: list[np.ndarray], counts: np.ndarray) -> int:
        """How many of the first (longest) packed groups run on a thread of their own while the rest run.

        A narrow group (at most :data:`SIDE_ROWS` rows) of long rows (at least :data:`SIDE_STEPS` steps) is
        latency-bound: one recurrent step after another at a small batch, which ONNX Runtime's threads
        cannot split well (each step waits for every thread). Run on a thread of its own (ONNX Runtime
        allows concurrent runs of one session; same results), its steps overlap with the wide calls'
        instead of adding to them. Groups are taken while the side's cost (the packing's cost model) stays
        within half the call's (the first one always, if narrow and long: it is the critical path), and
        only when the rest holds at least :data:`SIDE_REST` padded key-steps to overlap with. Host state
        only; 0: everything runs in turn."""
        if self._dev is not None or len(groups) < 2 or not math.isfinite(self.pack_step_cost):
            return 0
        T = [int(counts[gr].max()) for gr in groups]
        cost = [t * (self.pack_step_cost + len(gr)) for t, gr in zip(T, groups, strict=True)]
        half, side, n = sum(cost) / 2, 0.0, 0
        while (n < len(groups) - 1 and len(groups[n]) <= SIDE_ROWS and T[n] >= SIDE_STEPS
               and (n == 0 or side + cost[n] <= half)):
            side += cost[n]
            n += 1
        rest = sum(t * len(gr) for t, gr in zip(T[n:], groups[n:], strict=True))
        return n if rest >= SIDE_REST else 0

    def _shadow_losses(self, shadow, grp, wrow, lr, c, ev, xe, vs, sh, counts) -> None:
        """Per-event losses of one call's shadow rows (its first event scored by the shadow's last output)."""
        pos = np.full(len(counts), -1, np.int64)
        pos[wrow] = np.arange(len(wrow))
        sel = np.flatnonzero(pos[lr] >= 0)
        r, cc, xs = pos[lr[sel]], c[sel], xe[sel]
        loss = np.empty(len(sel), np.float64)
        first = cc == 0
        slot = sh[grp][wrow][r[first]]
        if len(slot):
            loss[first] = self._loss(self._store.shadow.last, (slot,), xs[first])
        nf = ~first
        if nf.any():
            loss[nf] = self._loss(vs, (r[nf], cc[nf] - 1), xs[nf])
        events = sel if isinstance(ev, slice) else ev[sel]
        shadow["events"].append(np.asarray(events, np.int64))
        shadow["loss"].append(loss)

    # -- snapshot / restore ------------------------------------------------------
    def snapshot(self, keys: Sequence[Key] | None = None) -> pa.Table:
        """All key state (or only ``keys``, skipping unknown and expired ones) as an Arrow table (no pickle).

        Rows are in recency order (least recent first). Restore with :meth:`restore`;
        the format is described in :mod:`streamrnn.keyed.snapshot`.
        """
        if isinstance(keys, (str, bytes)):
            raise InputError(f"snapshot: keys: expected a sequence of keys, got a single {type(keys).__name__}")
        with self._lock:
            limit = self._limit("snapshot")
            if keys is None:
                keys = self._live(limit)
            else:
                keys = [k for k in dict.fromkeys(k for k in keys if isinstance(k, (str, bytes)))
                        if self._slot(k, limit) is not None]
            return self._snapshot_locked(keys)

    def _snapshot_locked(self, keys: list[Key]) -> pa.Table:
        store = self._store
        slots = np.fromiter((store.slots[k] for k in keys), np.int64, len(keys))
        states = {n: np.moveaxis(self._host_state(n, slots), 1, 0) for n in self._state_names}
        last = {n: a[slots] for n, a in store.last.items()}
        steps, seen = store.steps[slots], store.seen[slots]
        health = None
        if self._health_on:
            health = {n: a[slots] for n, a in store.health.items() if n != "shadow_slot"}
            health["watched"] = store.health["shadow_slot"][slots] >= 0
            if self.health.policy == "heal":
                w = store.health["shadow_slot"][slots]
                pool = store.shadow
                health["shadow"] = {n: np.moveaxis(np.where((w >= 0)[None, :, None], a[:, np.maximum(w, 0)], 0.0),
                                                   1, 0) for n, a in pool.slab.items()} if pool.cap else {
                    n: np.zeros((len(w), *t), np.float32) for n, t in self._state_tail.items()}  # no shadow yet
                health["shadow_last"] = {n: np.where((w >= 0)[:, None], a[np.maximum(w, 0)], np.nan)
                                         for n, a in pool.last.items()} if pool.cap else {
                    n: np.full((len(w), *t), np.nan, np.float32) for n, t in self._out_tail.items()}
        return snap.encode(keys, steps, seen, states, last, self.model.spec, self._keep_last, health)

    def save(self, path: str | Path) -> None:
        """Write :meth:`snapshot` to a Parquet file."""
        pq.write_table(self.snapshot(), str(path))

    def restore(self, source: pa.Table | str | Path, *, allow_other_model: bool = False) -> int:
        """Replace all key state with a snapshot (a table or one Parquet file). Returns keys restored.

        A snapshot of a different model (other fingerprint) is refused unless
        ``allow_other_model`` and its state shapes match; other shapes are always refused.
        The snapshot is validated in full first (:class:`SnapshotError`, or
        :class:`StateError` for NaN/inf state); on any error the current state is kept.
        A directory is refused: :meth:`save` writes one file, and a folder of files could
        hold snapshots of several models.
        """
        table = snap.read(source)
        with self._lock:
            n = self._restore_locked(table, allow_other_model)
            self._ended.clear()  # another history: earlier drops say nothing about the restored keys
            return n

    def _restore_locked(self, table: pa.Table, allow_other_model: bool) -> int:
        d = snap.decode(table, self.model.spec, self._state_tail, self._out_tail,
                        keep_last_output=self._keep_last, allow_other_model=allow_other_model,
                        max_keys=self.max_keys, health=self.health.policy)
        n = len(d.keys)
        store = self._new_store(max(self._initial_capacity, n), self._dev is not None)
        host = {s: np.zeros((t[0], store.cap, *t[1:]), np.float32) for s, t in self._state_tail.items()}
        if n:
            slots = store.allocate(d.keys)
            store.touch(slots, 0.0)
            for s, a in d.states.items():
                host[s][:, slots] = np.moveaxis(a, 0, 1)
            for o, a in d.last.items():
                store.last[o][slots] = a
            store.steps[slots] = d.steps
            store.seen[slots] = d.seen
            store.min_seen = float(d.seen.min())
            if d.health:
                for c, a in d.health.items():
                    if c in store.health:
                        store.health[c][slots] = a
                if self.health.policy == "heal" and d.watched is not None:
                    w = np.flatnonzero(d.watched)
                    if len(w):
                        ps = store.shadow.allocate(len(w))
                        store.health["shadow_slot"][slots[w]] = ps
                        for c, a in d.shadow.items():
                            store.shadow.slab[c][:, ps] = np.moveaxis(a[w], 0, 1)
                        for c, a in d.shadow_last.items():
                            store.shadow.last[c][ps] = a[w]
        if self._dev is None:
            store.slab = host
        else:
            dev_slabs = {s: self._dev.from_host(a) for s, a in host.items()}
            self._dev.slab, self._dev.cap = dev_slabs, store.cap
        self._store = store
        return n

    def update_model(self, model: Model) -> list[Key]:
        """Serve ``model`` from now on (a retrained or re-exported file), as the Beam layer's model updates do.

        Same state shapes (``spec.state_signature``): every key's state, steps, ``last_seen`` and recency
        carry on under ``model`` (last outputs too where the output shapes match; else NaN). Other shapes:
        every key's state ends, its next event starts fresh with reset ``model_update``, and those keys
        are returned (counted in ``evictions.model_update``). A model of another input (kind, vocabulary,
        feature count) is refused: the events it would get are not its input. All-or-nothing.
        """
        if not isinstance(model, Model):
            raise InputError(f"update_model: model: expected a streamrnn Model (streamrnn.load), "
                             f"got {type(model).__name__}")
        serves, new = self.model.spec.input, model.spec.input
        if (new.kind, new.vocab_size, new.n_features) != (serves.kind, serves.vocab_size, serves.n_features):
            raise InputError(f"update_model: model input: expected {_describe_input(serves)} (what this operator "
                             f"serves), got {_describe_input(new)}")
        with self._lock:
            limit = self._limit("update_model")
            store = self._store
            expired = store.key_of[store.expired_slots(limit)].tolist()
            live = self._live(limit)
            carry = model.spec.state_signature == self.model.spec.state_signature
            table = self._snapshot_locked(live) if carry else None
            before = {f: getattr(self, f) for f in _MODEL_FIELDS}
            try:
                same_outputs = {o.name: o.shape for o in model.spec.outputs} == {
                    o.name: o.shape for o in self.model.spec.outputs}
                self._use_model(model)
                if table is not None:
                    if not same_outputs:
                        table = table.drop_columns([c for c in table.column_names if c.startswith("last_")])
                    self._restore_locked(table, allow_other_model=True)
            except BaseException:
                for f, v in before.items():
                    setattr(self, f, v)
                raise
            self.evictions.ttl += len(expired)
            self._remember_ended(expired, EXPIRED)
            ended = [] if carry else live
            self.evictions.model_update += len(ended)
            self._remember_ended(ended, MODEL_UPDATE)
            return ended


class _Background:
    """``fn()`` on a thread of its own; :meth:`result` waits and returns its value or raises its error."""

    def __init__(self, fn: Callable[[], Any]):
        self._value: Any = None
        self._error: BaseException | None = None

        def target() -> None:
            try:
                self._value = fn()
            except BaseException as e:  # handed to the caller by result()
                self._error = e

        self._thread = threading.Thread(target=target, name="streamrnn-side-call", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class _Shared:
    """The packed groups of one call shared by two threads: the side thread runs groups ``0 .. n_side - 1`` and
    then takes the rest from the front (:meth:`front`), the main thread from the back (:meth:`back`), until
    none is left or :meth:`stop` (a failure on either thread)."""

    def __init__(self, n_side: int, n: int):
        self._lock = threading.Lock()
        self._n_side, self._lo, self._hi = n_side, n_side, n - 1
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    def _take(self, from_front: bool) -> int | None:
        with self._lock:
            if self._stopped or self._lo > self._hi:
                return None
            if from_front:
                self._lo += 1
                return self._lo - 1
            self._hi -= 1
            return self._hi + 1

    def front(self):
        for gi in range(self._n_side):
            if self._stopped:
                return
            yield gi
        while (gi := self._take(True)) is not None:
            yield gi

    def back(self):
        while (gi := self._take(False)) is not None:
            yield gi


_PLAIN_KEYS = frozenset((str, bytes))


def _in_vocab(x: np.ndarray, vocab: int) -> bool:
    """Whether a few int64 tokens ``[N]`` (contiguous) are all in ``0..vocab-1``, in Python (no numpy pass)."""
    if not x.flags.c_contiguous:
        return False
    v = x.tolist()
    return min(v) >= 0 and max(v) < vocab


def _plain_keys(keys: Sequence[Any]) -> bool:
    """Whether every key is exactly a str or bytes (subclasses and anything else go through the checks)."""
    if len(keys) == 1:
        return type(next(iter(keys))) in _PLAIN_KEYS
    return set(map(type, keys)) <= _PLAIN_KEYS


def _describe_input(i: Any) -> str:
    return f"tokens (vocab {i.vocab_size})" if i.kind == "tokens" else f"features ({i.n_features})"
