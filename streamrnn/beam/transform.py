"""``StatefulInference``: per-key recurrent state carried across windows, batched across keys.

Event flow (see the README section "Apache Beam")::

  events ─► Intake ─► GlobalWindow ─► OrderAndApply (state per shard) ─► outputs
   (user     validate,   re-window       buffer until window end + lateness,
  windows)   shard,      (state never    then per key: dedupe, (ts, seq) order,
             columnar    resets at a     TTL, one batched ORT call for many keys
             blocks      window edge)    ─► dead letters (invalid / late / duplicate / error)

Stateful DoFns see one key at a time, so the state key is a *shard* (crc32(key) mod
``num_shards``): each shard's state holds the (h, c) of all its keys as one Arrow
table, and a flush advances all its due keys in one ONNX Runtime call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.coders import BytesCoder, StrUtf8Coder
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow, GlobalWindows, TimestampedValue
from apache_beam.utils import shared
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from ..errors import InputError
from ..keyed import KeyedOperator
from ..model import Model, load
from ..runtime import CPU
from ..spec import ModelSpec
from .postprocess import Postprocess
from .records import (
    ARRIVAL,
    END_OF_INPUT,
    EVENT,
    FIRE,
    KEY,
    SEQ,
    SUB,
    TS,
    WEND,
    DeadLetter,
    Event,
    ModelUpdate,
    Prediction,
    event_json,
    from_ipc,
    shard_of,
    to_ipc,
)

log = logging.getLogger("streamrnn.beam")

NAMESPACE = "streamrnn"
DEAD = "dead_letters"
_MAX_KEYS = 2**31 - 1


def model_version(spec: ModelSpec) -> str:
    """``name-version+fingerprint8``: unambiguous even when two exports share a version string."""
    return f"{spec.name}-{spec.version}+{spec.fingerprint[:8]}"


class _Loaded:
    """Weak-referenceable holder for :class:`apache_beam.utils.shared.Shared`."""

    def __init__(self, model: Model):
        self.model = model


class _Metrics:
    """The transform's Beam metrics (namespace ``streamrnn``)."""

    def __init__(self) -> None:
        c = lambda n: Metrics.counter(NAMESPACE, n)  # noqa: E731
        self.events_in = c("events_in")
        self.events = c("events_applied")
        self.batches = c("batches")
        self.flushes = c("flushes")
        self.late = c("late")
        self.duplicates = c("duplicates")
        self.invalid = c("invalid")
        self.errors = c("errors")
        self.expired = c("expired")
        self.model_resets = c("model_update_resets")
        self.model_switches = c("model_switches")
        self.dead = c("dead_letters")
        self.batch_latency = Metrics.distribution(NAMESPACE, "batch_latency_us")
        self.batch_size = Metrics.distribution(NAMESPACE, "batch_size")


# --------------------------------------------------------------------------------------
# Intake: validate, assign window end / fire time / shard, emit columnar blocks per shard
# --------------------------------------------------------------------------------------
class _Intake(beam.DoFn):
    def __init__(self, spec_json: str, *, num_shards: int, window_size: float, allowed_lateness: float):
        self.spec_json = spec_json
        self.num_shards = num_shards
        self.window_size = window_size
        self.allowed_lateness = allowed_lateness

    def setup(self) -> None:
        spec = ModelSpec.from_json(self.spec_json)
        self.tokens = spec.input.kind == "tokens"
        self.vocab = spec.input.vocab_size
        self.nfeat = spec.input.n_features
        self.m = _Metrics()

    def start_bundle(self) -> None:
        self._rows: list[tuple] = []
        self._blocks: list[pa.Table] = []
        self._arrival = 0

    def _wend(self, ts: np.ndarray) -> np.ndarray:
        w = self.window_size
        return (np.floor(ts / w) + 1.0) * w

    # -- one Event per element (slow path, validated in Python) --------------------------
    def _check_event(self, e: Any, ts_default: float) -> tuple[tuple | None, str | None]:
        if not isinstance(e, tuple) or len(e) < 4:
            return None, f"event: expected an Event(key, ts, seq, x) or a pyarrow RecordBatch, got {type(e).__name__}"
        key, ts, seq, x = e[0], e[1], e[2], e[3]
        sub = e[4] if len(e) > 4 else 0
        if not isinstance(key, str) or not key:
            return None, f"key: expected a non-empty string, got {key!r}"
        if ts is None:
            ts = ts_default
        if isinstance(ts, bool) or not isinstance(ts, (int, float, np.integer, np.floating)) or not math.isfinite(ts):
            return None, f"ts: expected finite seconds since the epoch, got {ts!r}"
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)):
            return None, f"seq: expected an int, got {seq!r}"
        if isinstance(sub, bool) or not isinstance(sub, (int, np.integer)):
            return None, f"sub: expected an int, got {sub!r}"
        if self.tokens:
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= x < self.vocab:
                return None, f"x: expected a token in [0, {self.vocab}), got {x!r}"
        else:
            try:
                xv = np.asarray(x, np.float64)
            except (TypeError, ValueError):
                xv = None
            if xv is None or xv.shape != (self.nfeat,) or not np.isfinite(xv).all():
                return None, f"x: expected {self.nfeat} finite floats, got {x!r}"
            x = xv.astype(np.float32)
        return (key, float(ts), int(seq), int(sub), x), None

    def process(self, element, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        if isinstance(element, (pa.RecordBatch, pa.Table)):
            yield from self._process_block(pa.Table.from_batches([element]) if isinstance(element, pa.RecordBatch)
                                           else element, window)
            return
        self.m.events_in.inc()
        row, reason = self._check_event(element, float(timestamp.micros) / 1e6)
        if row is None:
            yield from self._dead_one(element, reason)
            return
        end = getattr(window, "end", None)
        wend = (float(end.micros) / 1e6 if end is not None and not isinstance(window, GlobalWindow)
                else float(self._wend(np.array([row[1]]))[0]))
        self._rows.append((*row, event_json(Event(*row[:3], row[4], row[3])._asdict()), wend))

    def _dead_one(self, element, reason: str):
        self.m.invalid.inc()
        self.m.dead.inc()
        fields = element._asdict() if hasattr(element, "_asdict") else {"element": repr(element)}
        get = fields.get
        key = get("key") if isinstance(get("key"), str) else None
        ts = get("ts") if isinstance(get("ts"), (int, float)) and not isinstance(get("ts"), bool) else None
        seq = get("seq") if isinstance(get("seq"), int) and not isinstance(get("seq"), bool) else None
        dl = DeadLetter(key, None if ts is None else float(ts), seq, None, "invalid", reason, event_json(fields))
        yield beam.pvalue.TaggedOutput(DEAD, dl)

    # -- columnar blocks (fast path, validated with Arrow compute) -----------------------
    def _process_block(self, t: pa.Table, window):
        n = t.num_rows
        self.m.events_in.inc(n)
        if n == 0:
            return
        bad = np.zeros(n, bool)
        reasons: list[str | None] = [None] * n

        def mark(mask: np.ndarray, fmt: Callable[[int], str]) -> None:
            for i in np.flatnonzero(mask & ~bad):
                reasons[i] = fmt(i)
            bad[:] |= mask

        cols = set(t.column_names)
        for need in (KEY, TS, "x"):
            if need not in cols:
                raise InputError(f"StatefulInference: event block columns: expected {need!r}, got {sorted(cols)}")
        keys = t.column(KEY)
        if not pa.types.is_string(keys.type) and not pa.types.is_large_string(keys.type):
            keys = keys.cast(pa.string())
        keys_py = keys.to_pylist()
        mark(np.array([not isinstance(k, str) or not k for k in keys_py]),
             lambda i: f"key: expected a non-empty string, got {keys_py[i]!r}")
        ts = t.column(TS).cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        mark(~np.isfinite(ts), lambda i: f"ts: expected finite seconds since the epoch, got {ts[i]!r}")
        if SEQ in cols:
            seq_col = t.column(SEQ)
            seq_null = seq_col.is_null().to_numpy(zero_copy_only=False)
            seq = pc.fill_null(seq_col, 0).cast(pa.int64()).to_numpy(zero_copy_only=False)
            mark(seq_null, lambda i: "seq: expected an int, got null")
        else:
            seq = np.arange(n, dtype=np.int64)
        sub = (pc.fill_null(t.column(SUB), 0).cast(pa.int64()).to_numpy(zero_copy_only=False)
               if SUB in cols else np.zeros(n, np.int64))
        xcol = t.column("x")
        xnull = xcol.is_null().to_numpy(zero_copy_only=False)
        if self.tokens:
            xv = pc.fill_null(xcol, 0).to_numpy(zero_copy_only=False)
            if xv.dtype.kind not in "iu":
                raise InputError(f"StatefulInference: column x: expected integer tokens, got {xcol.type}")
            xv = xv.astype(np.int64)
            mark(xnull | (xv < 0) | (xv >= self.vocab),
                 lambda i: f"x: expected a token in [0, {self.vocab}), got {xcol[i].as_py()!r}")
            x_arr = pa.array(xv)
        else:
            lens = pc.fill_null(pc.list_value_length(xcol), -1).to_numpy(zero_copy_only=False)
            wrong = xnull | (lens != self.nfeat)
            flat = np.zeros((n, self.nfeat), np.float32)
            ok = ~wrong
            if ok.any():
                vals = pc.list_flatten(xcol.filter(pa.array(ok))).cast(pa.float32())
                flat[ok] = vals.to_numpy(zero_copy_only=False).reshape(-1, self.nfeat)
            mark(wrong | ~np.isfinite(flat).all(axis=1),
                 lambda i: f"x: expected {self.nfeat} finite floats, got {xcol[i].as_py()!r}")
            x_arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), self.nfeat)
        ev = t.column(EVENT) if EVENT in cols else None
        if bad.any():
            for i in np.flatnonzero(bad):
                self.m.invalid.inc()
                self.m.dead.inc()
                orig = ev[i].as_py() if ev is not None else event_json(
                    {c: t.column(c)[int(i)].as_py() for c in t.column_names})
                k = keys_py[i] if isinstance(keys_py[i], str) else None
                sq = None if SEQ in cols and seq_null[i] else int(seq[i])
                yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(
                    k, float(ts[i]) if np.isfinite(ts[i]) else None, sq, int(sub[i]), "invalid", reasons[i], orig))
        good = ~bad
        if not good.any():
            return
        if ev is None:
            ev = pa.nulls(n, pa.string())
        block = pa.table({KEY: keys, TS: pa.array(ts), SEQ: pa.array(seq), SUB: pa.array(sub), "x": x_arr,
                          EVENT: ev.cast(pa.string()), WEND: pa.array(self._wend(ts))}).filter(pa.array(good))
        self._blocks.append(block)

    def finish_bundle(self):
        if self._rows:
            key, ts, seq, sub, x, ev, wend = zip(*self._rows, strict=True)
            if self.tokens:
                x_arr = pa.array(np.asarray(x, np.int64))
            else:
                x_arr = pa.FixedSizeListArray.from_arrays(pa.array(np.stack(x).reshape(-1)), self.nfeat)
            self._blocks.append(pa.table({KEY: pa.array(key, pa.string()), TS: pa.array(ts, pa.float64()),
                                          SEQ: pa.array(seq, pa.int64()), SUB: pa.array(sub, pa.int64()),
                                          "x": x_arr, EVENT: pa.array(ev, pa.string()),
                                          WEND: pa.array(wend, pa.float64())}))
            self._rows = []
        if not self._blocks:
            return
        t = pa.concat_tables(self._blocks).combine_chunks()
        self._blocks = []
        t = t.append_column(FIRE, pa.array(t.column(WEND).to_numpy() + self.allowed_lateness))
        keys = t.column(KEY)
        uniq = pc.unique(keys)
        shard_u = np.array([shard_of(k, self.num_shards) for k in uniq.to_pylist()], np.int64)
        shards = shard_u[pc.index_in(keys, uniq).to_numpy(zero_copy_only=False)]
        ts = t.column(TS).to_numpy()
        for s in np.unique(shards):
            m = shards == s
            sub_t = t.filter(pa.array(m))
            yield WindowedValue((int(s), to_ipc(sub_t)), Timestamp.of(float(ts[m].min())), [GlobalWindow()])


# --------------------------------------------------------------------------------------
# OrderAndApply: the stateful step, one Beam key per shard
# --------------------------------------------------------------------------------------
class _Ctrl:
    """Small per-shard control state, stored as JSON."""

    def __init__(self, d: dict | None, model_path: str):
        d = d or {}
        self.fired: float = d.get("fired", -math.inf)
        self.flush_at: float | None = d.get("flush_at")
        self.model: str = d.get("model", model_path)
        self.updates: list[list] = d.get("updates", [])  # [[path, effective_ts], ...] sorted
        self.seen_updates: list[list] = d.get("seen", [])
        self.applied_max: float = d.get("applied_max", -math.inf)

    def to_json(self) -> str:
        return json.dumps({"fired": self.fired, "flush_at": self.flush_at, "model": self.model,
                           "updates": self.updates, "seen": self.seen_updates, "applied_max": self.applied_max})


def _read_ctrl(state, model_path: str) -> _Ctrl:
    raw = state.read()
    return _Ctrl(json.loads(raw) if raw else None, model_path)


class _OrderAndApply(beam.DoFn):
    BUFFER = BagStateSpec("buffer", BytesCoder())
    KEYS = ReadModifyWriteStateSpec("keys", BytesCoder())
    META = ReadModifyWriteStateSpec("meta", BytesCoder())
    RECENT = ReadModifyWriteStateSpec("recent", BytesCoder())
    CTRL = ReadModifyWriteStateSpec("ctrl", StrUtf8Coder())
    HELD = ReadModifyWriteStateSpec("held", BytesCoder())
    FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)
    EXPIRE = TimerSpec("expire", TimeDomain.WATERMARK)
    END = TimerSpec("end", TimeDomain.WATERMARK)

    def __init__(self, *, model_path: str, spec_json: str, ttl: float | None, dedupe_horizon: float,
                 postprocess: Postprocess | None, keep_last_output: bool, output: str, providers: Any,
                 max_steps_per_call: int, max_batch: int, flush_all: bool,
                 fault_injector: Callable[[int, list[str]], None] | None, next_fields: Sequence[str] = ()):
        self.next_fields = tuple(next_fields)
        self.model_path = model_path
        self.spec_json = spec_json
        self.ttl = ttl
        self.dedupe_horizon = dedupe_horizon
        self.postprocess = postprocess
        self.keep_last_output = keep_last_output or bool(postprocess is not None and postprocess.needs_prev)
        self.output = output
        self.providers = providers
        self.max_steps = max_steps_per_call
        self.max_batch = max_batch
        self.flush_all = flush_all
        self.fault_injector = fault_injector
        self._shared = shared.Shared()

    # -- models ---------------------------------------------------------------------------
    def setup(self) -> None:
        self.m = _Metrics()
        spec = ModelSpec.from_json(self.spec_json)
        self.tokens = spec.input.kind == "tokens"
        self.nfeat = spec.input.n_features
        self._models: dict[str, Model] = {}
        self._model(self.model_path)

    def _model(self, path: str) -> Model:
        m = self._models.get(path)
        if m is None:
            try:
                mtime = os.path.getmtime(path)
            except OSError:
                mtime = 0.0
            providers = self.providers

            def _load() -> _Loaded:
                return _Loaded(load(path, providers=providers))

            holder = self._shared.acquire(_load, tag=f"{path}@{mtime}")
            m = self._models[path] = holder.model
            self._holders = [*getattr(self, "_holders", []), holder]  # keep the weak-ref'd holder alive
        return m

    # -- intake -------------------------------------------------------------------------
    def process(self, element, buffer=beam.DoFn.StateParam(BUFFER), recent_state=beam.DoFn.StateParam(RECENT),
                ctrl_state=beam.DoFn.StateParam(CTRL), flush_timer=beam.DoFn.TimerParam(FLUSH),
                end_timer=beam.DoFn.TimerParam(END), updates: Sequence[ModelUpdate] | None = None):
        _shard, blob = element
        if self.next_fields and not self.flush_all:
            end_timer.set(END_OF_INPUT)  # releases the rows still held back when the input ends
        ctrl = _read_ctrl(ctrl_state, self.model_path)
        if updates:
            self._merge_updates(ctrl, updates)
        t = from_ipc(blob)
        fire = t.column(FIRE).to_numpy()
        behind = fire <= ctrl.fired
        if behind.any():
            # The shard already flushed these events' windows: a duplicate of an applied event, or late.
            old = t.filter(pa.array(behind))
            dup = self._is_applied(old, recent_state)
            for i in range(old.num_rows):
                kind = "duplicate" if dup[i] else "late"
                (self.m.duplicates if dup[i] else self.m.late).inc()
                self.m.dead.inc()
                yield self._dead_row(old, i, kind, kind)
            t = t.filter(pa.array(~behind))
        if t.num_rows:
            arrival = np.full(t.num_rows, time.monotonic_ns(), np.int64)
            buffer.add(to_ipc(t.append_column(ARRIVAL, pa.array(arrival))))
            first = float(t.column(FIRE).to_numpy().min())
            if ctrl.flush_at is None or first < ctrl.flush_at:
                ctrl.flush_at = first
                flush_timer.set(Timestamp.of(first))
        ctrl_state.write(ctrl.to_json())

    def _merge_updates(self, ctrl: _Ctrl, updates: Sequence[ModelUpdate]) -> None:
        for u in updates:
            path, eff = str(u[0]), float(u[1]) if len(u) > 1 else -math.inf
            if [path, eff] in ctrl.seen_updates:
                continue
            ctrl.seen_updates.append([path, eff])
            # Never rewrite history: an update behind what this shard applied starts just after it.
            eff2 = eff if eff > ctrl.applied_max else float(np.nextafter(ctrl.applied_max, math.inf))
            ctrl.updates.append([path, eff2])
            ctrl.updates.sort(key=lambda p: p[1])

    def _is_applied(self, t: pa.Table, recent_state) -> np.ndarray:
        raw = recent_state.read()
        if not raw:
            return np.zeros(t.num_rows, bool)
        recent = from_ipc(raw)
        recent = recent.filter(pc.is_in(recent.column(KEY), value_set=pc.unique(t.column(KEY))))
        seen = set(zip(recent.column(KEY).to_pylist(), recent.column(SEQ).to_pylist(),
                       recent.column(SUB).to_pylist(), strict=True))
        return np.array([(k, s, b) in seen for k, s, b in zip(
            t.column(KEY).to_pylist(), t.column(SEQ).to_pylist(), t.column(SUB).to_pylist(), strict=True)], bool)

    @staticmethod
    def _dead_row(t: pa.Table, i: int, kind: str, reason: str):
        ev = t.column(EVENT)[i].as_py()
        if ev is None:
            ev = event_json({c: t.column(c)[i].as_py() for c in (KEY, TS, SEQ, SUB, "x")})
        ts = t.column(TS)[i].as_py()
        dl = DeadLetter(t.column(KEY)[i].as_py(), ts, t.column(SEQ)[i].as_py(), t.column(SUB)[i].as_py(),
                        kind, reason, ev)
        return beam.pvalue.TaggedOutput(DEAD, TimestampedValue(dl, ts))

    # -- timers ---------------------------------------------------------------------------
    @on_timer(FLUSH)
    def on_flush(self, key=beam.DoFn.KeyParam, fire_ts=beam.DoFn.TimestampParam,
                 buffer=beam.DoFn.StateParam(BUFFER), keys_state=beam.DoFn.StateParam(KEYS),
                 meta_state=beam.DoFn.StateParam(META), recent_state=beam.DoFn.StateParam(RECENT),
                 ctrl_state=beam.DoFn.StateParam(CTRL), flush_timer=beam.DoFn.TimerParam(FLUSH),
                 expire_timer=beam.DoFn.TimerParam(EXPIRE), held_state=beam.DoFn.StateParam(HELD)):
        yield from self._flush(key, float(fire_ts.micros) / 1e6, buffer, keys_state, meta_state, recent_state,
                               ctrl_state, flush_timer, expire_timer, held_state, final=self.flush_all)

    @on_timer(END)
    def on_end(self, key=beam.DoFn.KeyParam, fire_ts=beam.DoFn.TimestampParam,
               buffer=beam.DoFn.StateParam(BUFFER), keys_state=beam.DoFn.StateParam(KEYS),
               meta_state=beam.DoFn.StateParam(META), recent_state=beam.DoFn.StateParam(RECENT),
               ctrl_state=beam.DoFn.StateParam(CTRL), flush_timer=beam.DoFn.TimerParam(FLUSH),
               expire_timer=beam.DoFn.TimerParam(EXPIRE), held_state=beam.DoFn.StateParam(HELD)):
        """The input ended: apply whatever is still buffered, then release every held-back row."""
        outs = list(self._flush(key, float(fire_ts.micros) / 1e6, buffer, keys_state, meta_state, recent_state,
                                ctrl_state, flush_timer, expire_timer, held_state, final=True))
        # whatever is still held (keys with nothing buffered) ends its stream here
        outs += list(self._emit_table(self._pair(None, held_state, set(), final=True)))
        yield from outs

    def _flush(self, key, T: float, buffer, keys_state, meta_state, recent_state, ctrl_state, flush_timer,
               expire_timer, held_state, *, final: bool):
        ctrl = _read_ctrl(ctrl_state, self.model_path)
        blobs = list(buffer.read())
        pending = pa.concat_tables([from_ipc(b) for b in blobs]) if blobs else None
        if pending is None or pending.num_rows == 0:
            ctrl.flush_at = None
            ctrl_state.write(ctrl.to_json())
            return
        fire = pending.column(FIRE).to_numpy()
        due_m = np.ones(len(fire), bool) if final else fire <= T
        due, rest = pending.filter(pa.array(due_m)), pending.filter(pa.array(~due_m))
        buffer.clear()
        if rest.num_rows:
            buffer.add(to_ipc(rest))
            ctrl.flush_at = float(rest.column(FIRE).to_numpy().min())
            flush_timer.set(Timestamp.of(ctrl.flush_at))
        else:
            ctrl.flush_at = None
        ctrl.fired = max(ctrl.fired, float(fire[due_m].max()) if final else T)
        self.m.flushes.inc()
        outs = list(self._apply(key, due, ctrl, keys_state, meta_state, recent_state, T, held_state, final))
        ctrl_state.write(ctrl.to_json())
        self._set_expire(keys_state, meta_state, expire_timer)
        if self.fault_injector is not None:
            self.fault_injector(key, sorted(set(due.column(KEY).to_pylist())))
        yield from outs

    @on_timer(EXPIRE)
    def on_expire(self, fire_ts=beam.DoFn.TimestampParam, buffer=beam.DoFn.StateParam(BUFFER),
                  keys_state=beam.DoFn.StateParam(KEYS), meta_state=beam.DoFn.StateParam(META),
                  ctrl_state=beam.DoFn.StateParam(CTRL), expire_timer=beam.DoFn.TimerParam(EXPIRE),
                  held_state=beam.DoFn.StateParam(HELD)):
        if self.ttl is None:
            return
        E = float(fire_ts.micros) / 1e6
        raw = keys_state.read()
        if not raw:
            return
        ctrl = _read_ctrl(ctrl_state, self.model_path)
        op = self._restore(ctrl.model, raw)
        meta = self._read_meta(meta_state)
        # A key with a pending event within its TTL is not idle: that event continues it.
        pending_min: dict[str, float] = {}
        for b in buffer.read():
            p = from_ipc(b)
            for k, ts in zip(p.column(KEY).to_pylist(), p.column(TS).to_pylist(), strict=True):
                pending_min[k] = min(ts, pending_min.get(k, math.inf))
        n = 0
        for k in op.keys():
            last = meta[k][0]
            if last + self.ttl <= E and not pending_min.get(k, math.inf) - last <= self.ttl:
                op.evict(k)
                meta[k] = [last, "expired"]
                n += 1
        if n:
            self.m.expired.inc(n)
            keys_state.write(to_ipc(op.snapshot()))
            self._write_meta(meta_state, meta)
            if self.next_fields:  # the expired keys' streams ended: their held rows go out with no next
                yield from self._emit_table(self._pair(None, held_state, set(op.keys()), final=False))
        self._set_expire(keys_state, meta_state, expire_timer, after=E)

    def _set_expire(self, keys_state, meta_state, expire_timer, after: float = -math.inf) -> None:
        if self.ttl is None:
            return
        raw = keys_state.read()
        if not raw:
            return
        live = from_ipc(raw).column("key").to_pylist()
        meta = self._read_meta(meta_state)
        times = [meta[k.decode()][0] + self.ttl for k in live]
        times = [t for t in times if t > after]
        if times:
            expire_timer.set(Timestamp.of(min(times)))

    # -- state helpers ----------------------------------------------------------------------
    def _restore(self, path: str, raw: bytes | None) -> KeyedOperator:
        op = KeyedOperator(self._model(path), max_keys=_MAX_KEYS, ttl=None, keep_last_output=self.keep_last_output,
                           initial_capacity=16)
        if raw:
            op.restore(from_ipc(raw))
        return op

    @staticmethod
    def _read_meta(meta_state) -> dict[str, list]:
        raw = meta_state.read()
        if not raw:
            return {}
        t = from_ipc(raw)
        return {k: [ts, r] for k, ts, r in zip(t.column(KEY).to_pylist(), t.column("last_ts").to_pylist(),
                                               t.column("reason").to_pylist(), strict=True)}

    @staticmethod
    def _write_meta(meta_state, meta: dict[str, list]) -> None:
        keys = list(meta)
        meta_state.write(to_ipc(pa.table({KEY: pa.array(keys, pa.string()),
                                          "last_ts": pa.array([meta[k][0] for k in keys], pa.float64()),
                                          "reason": pa.array([meta[k][1] for k in keys], pa.string())})))

    # -- the flush ------------------------------------------------------------------------
    def _apply(self, shard: int, due: pa.Table, ctrl: _Ctrl, keys_state, meta_state, recent_state, T: float,
               held_state=None, final: bool = True):
        n = due.num_rows
        keys_py = due.column(KEY).to_pylist()
        ts = due.column(TS).to_numpy()
        seq = due.column(SEQ).to_numpy()
        sub = due.column(SUB).to_numpy()
        arrival = due.column(ARRIVAL).to_numpy()
        kcodes = pc.index_in(due.column(KEY), pc.unique(due.column(KEY))).to_numpy(zero_copy_only=False)
        # 1) duplicates: same (key, seq, sub) within the flush (keep the earliest arrival) or already applied.
        order = np.lexsort((arrival, ts, sub, seq, kcodes))
        same = np.zeros(n, bool)
        same[1:] = ((kcodes[order][1:] == kcodes[order][:-1]) & (seq[order][1:] == seq[order][:-1])
                    & (sub[order][1:] == sub[order][:-1]))
        dup = np.zeros(n, bool)
        dup[order[same]] = True
        dup |= self._is_applied(due, recent_state)
        for i in np.flatnonzero(dup):
            self.m.duplicates.inc()
            self.m.dead.inc()
            yield self._dead_row(due, int(i), "duplicate", "duplicate")
        keep = np.flatnonzero(~dup)
        if not len(keep):
            return
        # 2) event-time order per key.
        order = keep[np.lexsort((sub[keep], seq[keep], ts[keep], kcodes[keep]))]
        ok = [keys_py[i] for i in order]
        ots, okc = ts[order], kcodes[order]
        x = due.column("x").take(pa.array(order))
        xv = (x.to_numpy(zero_copy_only=False).astype(np.int64) if self.tokens
              else pc.list_flatten(x).to_numpy(zero_copy_only=False).reshape(-1, self.nfeat).astype(np.float32))
        N = len(order)
        # 3) model epochs (event-time model updates).
        effs = [u[1] for u in ctrl.updates]
        epoch = np.searchsorted(np.asarray(effs, np.float64), ots, side="right") if effs else np.zeros(N, np.int64)
        paths = [self.model_path] + [u[0] for u in ctrl.updates]  # epoch 0: the base model
        # 4) segments: split at TTL gaps, epoch changes, and max_steps chunks.
        meta = self._read_meta(meta_state)
        op = self._restore(ctrl.model, keys_state.read())
        first = np.ones(N, bool)
        first[1:] = okc[1:] != okc[:-1]
        gap = np.zeros(N, bool)
        if self.ttl is not None:
            gap[1:] = ~first[1:] & (ots[1:] - ots[:-1] > self.ttl)
            for i in np.flatnonzero(first):
                k = ok[i]
                if k in op and ots[i] - meta[k][0] > self.ttl:
                    gap[i] = True
        new_seg = first | gap
        new_seg[1:] |= epoch[1:] != epoch[:-1]
        run = 0
        for i in range(N):  # chunk long segments
            run = 0 if new_seg[i] else run + 1
            if run == self.max_steps:
                new_seg[i], run = True, 0
        seg_start = np.flatnonzero(new_seg)
        seg_key_rank = np.zeros(len(seg_start), np.int64)  # rank of the segment within its key
        for j in range(1, len(seg_start)):
            if okc[seg_start[j]] == okc[seg_start[j - 1]]:
                seg_key_rank[j] = seg_key_rank[j - 1] + 1
        results: dict[str, np.ndarray] = {}
        pos = np.zeros(N, np.int64)
        fresh = np.zeros(N, bool)
        reset = np.array([""] * N, dtype=object)
        version = np.array([""] * N, dtype=object)
        applied = np.zeros(N, bool)
        errors: list[tuple[np.ndarray, str]] = []
        seg_epoch = epoch[seg_start]
        for e in np.unique(seg_epoch):
            target = paths[e]
            if target != ctrl.model:
                op = self._switch(op, ctrl, target, meta)
            ver = model_version(op.model.spec)
            in_e = np.flatnonzero(seg_epoch == e)
            for r in np.unique(seg_key_rank[in_e]):
                segs = in_e[seg_key_rank[in_e] == r]
                for c0 in range(0, len(segs), self.max_batch):
                    chunk = segs[c0:c0 + self.max_batch]
                    rows = np.concatenate([np.arange(seg_start[s], seg_start[s + 1] if s + 1 < len(seg_start) else N)
                                           for s in chunk])
                    reasons = {}
                    for s in chunk:
                        i0 = seg_start[s]
                        k = ok[i0]
                        if gap[i0]:
                            if op.evict(k):
                                self.m.expired.inc()
                            meta.setdefault(k, [ots[i0], ""])[1] = "expired"
                        reasons[k] = (meta.get(k, [0, ""])[1] or "new") if k not in op else ""
                    rkeys = [ok[i] for i in rows]
                    t0 = time.perf_counter()
                    try:
                        res = op.process(rkeys, xv[rows])
                    except Exception as ex:  # an ORT failure: these events go to dead letters, state unchanged
                        errors.append((rows, f"error: {type(ex).__name__}: {ex}"))
                        continue
                    self.m.batch_latency.update(int((time.perf_counter() - t0) * 1e6))
                    self.m.batches.inc()
                    self.m.batch_size.update(len(rows))
                    post = (self.postprocess(xv[rows], res.outputs, res.prev_outputs) if self.postprocess is not None
                            else res.outputs)
                    for name, v in post.items():
                        if name not in results:
                            results[name] = np.zeros((N, *v.shape[1:]), v.dtype)
                        results[name][rows] = v
                    pos[rows] = res.pos
                    fresh[rows] = res.fresh
                    for j, i in enumerate(rows):
                        if res.fresh[j]:
                            reset[i] = reasons[ok[i]]
                    version[rows] = ver
                    applied[rows] = True
                    for s in chunk:
                        end = (seg_start[s + 1] if s + 1 < len(seg_start) else N) - 1
                        meta[ok[end]] = [float(ots[end]), ""]
        for rows, msg in errors:
            for i in rows:
                self.m.errors.inc()
                self.m.dead.inc()
                yield self._dead_row(due, int(order[i]), "error", msg)
        n_ok = int(applied.sum())
        self.m.events.inc(n_ok)
        if n_ok:
            ctrl.applied_max = max(ctrl.applied_max, float(ots[applied].max()))
        # 5) persist: key state, meta (with tombstones), recent (event ids for dedupe).
        keys_state.write(to_ipc(op.snapshot()))
        horizon = self.ttl if self.ttl is not None else self.dedupe_horizon
        meta = {k: v for k, v in meta.items() if k in op or v[0] + 2 * horizon >= T}
        self._write_meta(meta_state, meta)
        self._append_recent(recent_state, due.take(pa.array(order[applied])), ctrl.applied_max)
        if self.next_fields:
            rows = self._rows_table(due, order, applied, ok, ots, pos, fresh, reset, version, results)
            yield from self._emit_table(self._pair(rows, held_state, set(op.keys()), final=final))
        else:
            yield from self._emit(due, order, applied, ok, ots, pos, fresh, reset, version, results)

    def _switch(self, op: KeyedOperator, ctrl: _Ctrl, path: str, meta: dict[str, list]) -> KeyedOperator:
        new_model = self._model(path)
        self.m.model_switches.inc()
        new = KeyedOperator(new_model, max_keys=_MAX_KEYS, ttl=None, keep_last_output=self.keep_last_output,
                            initial_capacity=16)
        if new_model.spec.state_signature == op.model.spec.state_signature:
            new.restore(op.snapshot(), allow_other_model=True)
        else:
            for k in op.keys():
                meta.setdefault(k, [0.0, ""])[1] = "model_update"
            self.m.model_resets.inc(len(op))
        ctrl.model = path
        return new

    def _append_recent(self, recent_state, applied: pa.Table, applied_max: float) -> None:
        new = applied.select([KEY, SEQ, SUB, TS])
        raw = recent_state.read()
        t = pa.concat_tables([from_ipc(raw), new]) if raw else new
        t = t.filter(pc.greater_equal(t.column(TS), applied_max - self.dedupe_horizon))
        recent_state.write(to_ipc(t))

    def _emit(self, due, order, applied, ok, ots, pos, fresh, reset, version, results):
        idx = np.flatnonzero(applied)
        if not len(idx):
            return
        src = order[idx]
        seq = due.column(SEQ).to_numpy()[src]
        sub = due.column(SUB).to_numpy()[src]
        if self.output == "arrow":
            cols: dict[str, pa.Array] = {
                KEY: pa.array([ok[i] for i in idx], pa.string()), TS: pa.array(ots[idx]), SEQ: pa.array(seq),
                SUB: pa.array(sub), "pos": pa.array(pos[idx]), "fresh": pa.array(fresh[idx]),
                "reset": pa.array(reset[idx].tolist(), pa.string()),
                "model_version": pa.array(version[idx].tolist(), pa.string())}
            for name, v in results.items():
                cols[name] = _to_arrow(v[idx])
            batch = pa.RecordBatch.from_pydict(cols)
            yield TimestampedValue(batch, float(ots[idx].min()))
            return
        for j, i in enumerate(idx):
            yield TimestampedValue(Prediction(ok[i], float(ots[i]), int(seq[j]), int(sub[j]), int(pos[i]),
                                              bool(fresh[i]), str(reset[i]), str(version[i]),
                                              {n: v[i] for n, v in results.items()}), float(ots[i]))


    # -- pairing each row with its key's next event (next_fields) -----------------------------
    def _rows_table(self, due, order, applied, ok, ots, pos, fresh, reset, version, results) -> pa.Table | None:
        idx = np.flatnonzero(applied)
        if not len(idx):
            return None
        src = order[idx]
        cols: dict[str, pa.Array] = {
            KEY: pa.array([ok[i] for i in idx], pa.string()), TS: pa.array(ots[idx]),
            SEQ: pa.array(due.column(SEQ).to_numpy()[src]), SUB: pa.array(due.column(SUB).to_numpy()[src]),
            "pos": pa.array(pos[idx]), "fresh": pa.array(fresh[idx]),
            "reset": pa.array(reset[idx].tolist(), pa.string()),
            "model_version": pa.array(version[idx].tolist(), pa.string())}
        for name, v in results.items():
            cols[name] = _to_arrow(v[idx])
        return pa.table(cols)

    def _pair(self, rows: pa.Table | None, held_state, live: set[str], *, final: bool) -> pa.Table | None:
        """Rows ready to go out, each with ``<field>_next`` = that field on its key's next event.

        ``rows``: this flush's applied rows, grouped by key in stream order. The row held back
        per key from earlier flushes (Arrow in ``held_state``) precedes them. A row's next is
        the following row of its key unless that one started fresh (the stream ended: TTL,
        model-update reset). A key's last row is held back again, unless ``final`` (the input
        ended) or its key has no state any more (``live``): then it goes out with null.
        """
        raw = held_state.read()
        held = from_ipc(raw) if raw else None
        parts = [t for t in (held, rows) if t is not None and t.num_rows]
        if not parts:
            return None
        t = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
        n = t.num_rows
        grp = np.zeros(n, np.int64)
        if held is not None and rows is not None and held.num_rows:
            grp[held.num_rows:] = 1
        keys = t.column(KEY)
        kc = pc.index_in(keys, pc.unique(keys)).to_numpy(zero_copy_only=False)
        o = np.lexsort((np.arange(n), grp, kc))
        t, kc = t.take(pa.array(o)), kc[o]
        fresh = t.column("fresh").to_numpy(zero_copy_only=False).astype(bool)
        cont = np.zeros(n, bool)
        cont[:-1] = (kc[1:] == kc[:-1]) & ~fresh[1:]
        last = np.ones(n, bool)
        last[:-1] = kc[1:] != kc[:-1]
        hold = np.zeros(n, bool)
        if not final:
            li = np.flatnonzero(last)
            hold[li] = [k in live for k in t.column(KEY).take(pa.array(li)).to_pylist()]
        nxt_idx = pa.array(np.minimum(np.arange(1, n + 1), n - 1))
        out = t
        for f in self.next_fields:
            col = t.column(f).combine_chunks()
            out = out.append_column(f + "_next", pc.if_else(pa.array(cont), col.take(nxt_idx),
                                                            pa.nulls(n, col.type)))
        if hold.any():
            held_state.write(to_ipc(t.filter(pa.array(hold))))
        else:
            held_state.clear()
        out = out.filter(pa.array(~hold))
        return out if out.num_rows else None

    def _emit_table(self, t: pa.Table | None):
        if t is None or not t.num_rows:
            return
        ts = t.column(TS).to_numpy()
        if self.output == "arrow":
            for b in t.combine_chunks().to_batches():
                yield TimestampedValue(b, float(ts.min()))
            return
        base = {KEY, TS, SEQ, SUB, "pos", "fresh", "reset", "model_version"}
        names = [c for c in t.column_names if c not in base]
        vals = {}
        for name in names:
            col = t.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                vals[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
            elif col.null_count:
                vals[name] = col.to_pylist()
            else:
                vals[name] = col.to_numpy(zero_copy_only=False)
        cols = {c: t.column(c).to_pylist() for c in base}
        for i in range(t.num_rows):
            yield TimestampedValue(Prediction(cols[KEY][i], cols[TS][i], cols[SEQ][i], cols[SUB][i], cols["pos"][i],
                                              cols["fresh"][i], cols["reset"][i], cols["model_version"][i],
                                              {n: v[i] for n, v in vals.items()}), float(ts[i]))


def _to_arrow(v: np.ndarray) -> pa.Array:
    if v.ndim == 1:
        return pa.array(v)
    width = int(np.prod(v.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(v).reshape(-1)), width)


# --------------------------------------------------------------------------------------
# The PTransform
# --------------------------------------------------------------------------------------
class StatefulResult(NamedTuple):
    """What :class:`StatefulInference` returns: ``(outputs, dead_letters)``."""

    outputs: beam.PCollection
    dead_letters: beam.PCollection


class StatefulInference(beam.PTransform):
    """Online recurrent inference with per-key (h, c) carried across windows.

    Input: a PCollection of :class:`~streamrnn.beam.Event` or of ``pyarrow.RecordBatch``
    blocks with columns ``key, ts, x`` (+ ``seq``, ``sub``, ``event``). Returns
    :class:`StatefulResult` ``(outputs, dead_letters)``: typed
    :class:`~streamrnn.beam.Prediction` records (or Arrow blocks with
    ``output="arrow"``), and :class:`~streamrnn.beam.DeadLetter` records.

    Keyword-only configuration:
      model: path of the streamrnn ONNX model.
      num_shards: state shards; keys of a shard advance together in one ORT call.
        More shards: more parallelism, smaller batches.
      window_size: seconds; events are released per fixed event-time window (an input
        ``Event`` already in a non-global window uses that window's end).
      allowed_lateness: seconds after a window's end that its events still wait.
      ttl: event-time seconds a key may idle before its state is dropped (None: never).
      dedupe_horizon: event-time seconds that applied event ids are kept for de-duplication.
      model_updates: PCollection of :class:`~streamrnn.beam.ModelUpdate` (side input).
      postprocess: reduces raw outputs to columns inside the worker
        (e.g. :class:`~streamrnn.beam.NextTokenPostprocess`).
      keep_last_output: carry each key's last output (needed to score the next event).
      output: ``"records"`` (one Prediction per event) or ``"arrow"`` (one RecordBatch per flush).
      providers: ONNX Runtime providers (``"auto"``: CUDA when it loads).
      max_steps_per_call / max_batch: caps on T and B of one ORT call.
      flush_bounded_at_once: for bounded input (batch), one flush per shard with all
        windows (same results; far bigger batches).
      next_fields: output columns to pair with each key's *next* event: each output gets
        ``<name>_next``, that column's value on the key's next applied event of the same
        stream (null where the stream ended: TTL expiry, a reset, the end of the input).
        A key's latest row is held back (Arrow, in Beam state) until its next event is
        applied or its stream ends, so it comes out that much later. E.g.
        ``next_fields=("logprob",)`` with :class:`NextTokenPostprocess` gives ``logprob_next``.
      fault_injector: testing hook ``f(shard, keys)`` called after a flush's state
        writes, before its bundle commits.
    """

    def __init__(self, *, model: str | os.PathLike, num_shards: int = 16, window_size: float = 60.0,
                 allowed_lateness: float = 0.0, ttl: float | None = None, dedupe_horizon: float = 3600.0,
                 model_updates: beam.PCollection | None = None, postprocess: Postprocess | None = None,
                 keep_last_output: bool = False, output: Literal["records", "arrow"] = "records",
                 providers: Any = "auto", max_steps_per_call: int = 256, max_batch: int = 4096,
                 flush_bounded_at_once: bool = True, next_fields: Sequence[str] = (),
                 fault_injector: Callable[[int, list[str]], None] | None = None,
                 label: str | None = None):
        super().__init__(label)
        if not isinstance(num_shards, int) or num_shards < 1:
            raise InputError(f"StatefulInference: num_shards: expected an int >= 1, got {num_shards!r}")
        if not window_size > 0:
            raise InputError(f"StatefulInference: window_size: expected seconds > 0, got {window_size!r}")
        if not allowed_lateness >= 0:
            raise InputError(f"StatefulInference: allowed_lateness: expected seconds >= 0, got {allowed_lateness!r}")
        if ttl is not None and not ttl > 0:
            raise InputError(f"StatefulInference: ttl: expected seconds > 0 or None, got {ttl!r}")
        if not dedupe_horizon >= 0:
            raise InputError(f"StatefulInference: dedupe_horizon: expected seconds >= 0, got {dedupe_horizon!r}")
        if output not in ("records", "arrow"):
            raise InputError(f"StatefulInference: output: expected 'records' or 'arrow', got {output!r}")
        if max_steps_per_call < 1 or max_batch < 1:
            raise InputError(f"StatefulInference: max_steps_per_call, max_batch: expected >= 1, got "
                             f"{max_steps_per_call}, {max_batch}")
        self.model = os.fspath(model)
        spec = load(self.model, providers=[CPU]).spec  # fails fast at construction on a bad model
        self.spec = spec
        self.num_shards = num_shards
        self.window_size = float(window_size)
        self.allowed_lateness = float(allowed_lateness)
        self.ttl = None if ttl is None else float(ttl)
        self.dedupe_horizon = float(dedupe_horizon)
        self.model_updates = model_updates
        self.postprocess = postprocess
        self.keep_last_output = keep_last_output
        self.output = output
        self.providers = providers
        self.max_steps_per_call = max_steps_per_call
        self.max_batch = max_batch
        self.flush_bounded_at_once = flush_bounded_at_once
        self.fault_injector = fault_injector
        self.next_fields = tuple(next_fields)
        if any(not isinstance(f, str) or not f for f in self.next_fields):
            raise InputError(f"StatefulInference: next_fields: expected output column names, got {next_fields!r}")

    def expand(self, events: beam.PCollection) -> StatefulResult:
        spec_json = self.spec.to_json()
        intake = events | "Intake" >> beam.ParDo(_Intake(
            spec_json, num_shards=self.num_shards, window_size=self.window_size,
            allowed_lateness=self.allowed_lateness)).with_outputs(DEAD, main="blocks")
        blocks = intake.blocks | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
        blocks.element_type = beam.typehints.Tuple[int, bytes]  # (shard, Arrow IPC block): deterministic key coder
        side = {}
        if self.model_updates is not None:
            upd = self.model_updates | "UpdatesWindow" >> beam.WindowInto(
                GlobalWindows(), trigger=trigger.Repeatedly(trigger.AfterCount(1)),
                accumulation_mode=trigger.AccumulationMode.ACCUMULATING)
            side["updates"] = beam.pvalue.AsList(upd)
        flush_all = self.flush_bounded_at_once and bool(getattr(events, "is_bounded", True))
        applied = blocks | "OrderAndApply" >> beam.ParDo(_OrderAndApply(
            model_path=self.model, spec_json=spec_json, ttl=self.ttl, dedupe_horizon=self.dedupe_horizon,
            postprocess=self.postprocess, keep_last_output=self.keep_last_output, output=self.output,
            providers=self.providers, max_steps_per_call=self.max_steps_per_call, max_batch=self.max_batch,
            flush_all=flush_all, fault_injector=self.fault_injector, next_fields=self.next_fields),
            **side).with_outputs(DEAD, main="outputs")
        dead = ((intake[DEAD], applied[DEAD]) | "DeadLetters" >> beam.Flatten()
                | "DeadLettersGlobal" >> beam.WindowInto(GlobalWindows()))
        return StatefulResult(applied.outputs, dead)
