"""The stateful step: one Beam key per shard, a timer at each release time.

``process`` receives the panes of the release-time windows (see ``transform.py``): on-time
panes are buffered until the watermark passes their release time; late panes (the
watermark had already passed) become ``late`` or ``duplicate`` dead letters. The flush
timer applies what is due, then drops the state of keys idle past the TTL, then writes
one delta of the shard store (``store.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.coders import BytesCoder, StrUtf8Coder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils import shared

from ...errors import InputError
from ...keyed.health import HealthConfig
from ...model.loaded import Model
from ...model.spec import ModelSpec
from ..models import load_model, model_version
from ..records import KEY, SEQ, SUB, TS, DeadLetter, from_ipc, to_ipc
from . import store as _store
from . import worker_check
from .apply import Applied, Config, apply_due, dead_event_json, is_duplicate, switch_model
from .clock import (
    EARLIEST,
    END_OF_INPUT_MICROS,
    ceil_millis,
    ceil_millis_array,
    release_micros,
    timestamp,
    to_micros_array,
)
from .counters import Counters
from .intake import DEAD, EVENTS, REL, TSU
from .outputs import emit
from .pairing import pair
from .savepoint import seed_blob
from .store import CACHE, ModelChange, ShardStore, new_token

#: The stateful step's output of shard snapshots (``save_state``), at the end of the input.
SNAPSHOT = "snapshot"
#: Payload kind (beside intake's EVENTS and UPDATE) that makes a shard of a seeded pipeline flush once.
SEED = 2


class _Loaded:
    """Weak-referenceable holder for :class:`apache_beam.utils.shared.Shared`."""

    def __init__(self, model: Model):
        self.model = model


class Ctrl:
    """Small per-shard control state (JSON)."""

    def __init__(self, d: dict | None, model_path: str):
        d = d or {}
        self.token: str | None = d.get("token")
        self.num_shards: int | None = d.get("num_shards")
        self.armed: int | None = d.get("armed")
        self.model: str = d.get("model", model_path)
        self.updates: list[list] = d.get("updates", [])  # [[path, effective micros], ...] sorted by time, path
        self.seen: list[list] = d.get("seen", [])
        self.applied_max: int = d.get("applied_max", EARLIEST)
        self.end_set: bool = d.get("end_set", False)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


@dataclass
class Flush:
    """What one flush of one shard does beyond the store: its time, and the keys whose stream ended."""

    T: int  # the event time (micros) the watermark passed
    apply_all: bool  # the input ended (or a bounded input is applied at once): everything pending applies
    release_all: bool  # ... and nothing is held back (not when the state is saved for the next run)
    ended: list[str] = field(default_factory=list)  # keys whose stream a model change ended in this flush


class ShardStep(beam.DoFn):
    PENDING = BagStateSpec("pending", BytesCoder())
    LOG = BagStateSpec("log", BytesCoder())
    CTRL = ReadModifyWriteStateSpec("ctrl", StrUtf8Coder())
    FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)
    END = TimerSpec("end", TimeDomain.WATERMARK)

    def __init__(self, *, transform_id: str, model_path: str, spec_json: str, num_shards: int, cfg: Config,
                 dedupe_horizon: int, keep_last_output: bool, output: str, providers: Any, flush_all: bool,
                 next_fields: Sequence[str], fault_injector: Callable[[int, list[str]], None] | None,
                 cache_bytes: int | None = None, save_state: bool = False, initial_state: str | None = None,
                 manifest: dict | None = None, health: str | HealthConfig = "off"):
        self.launcher_env = worker_check.environment()  # pickled with the DoFn: checked on the worker
        self.transform_id = transform_id
        self.model_path = model_path
        self.spec_json = spec_json
        self.num_shards = num_shards
        self.cfg = cfg
        self.horizon = dedupe_horizon
        self.keep_last_output = keep_last_output
        self.output = output
        self.providers = providers
        self.flush_all = flush_all
        self.next_fields = tuple(next_fields)
        self.fault_injector = fault_injector
        self.cache_bytes = _store.DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
        self.save_state = save_state
        self.initial_state = initial_state
        self.manifest = manifest
        self.health = health  # carried-state health policy of every shard's keys (streamrnn.keyed.health)
        # the release time of the last window the saved run applied: later arrivals of it are late here too
        ends = [sh.get("extra", {}).get("applied_max", EARLIEST) for sh in (manifest or {}).get("shards", [])]
        self._cut = self._release(max(ends)) if ends and max(ends) > EARLIEST else None
        self._shared = shared.Shared()

    def __dir__(self) -> list[str]:
        # Beam's legacy DirectRunner introspects every method that dir() lists, once or twice per bundle
        # (userstate.get_dofn_specs wraps each to read its parameter defaults): 3.2 ms for this DoFn with its
        # helpers listed, 1.9 ms without. The private helpers declare no DoFn parameters (state, timers), so
        # they are left out; process, the timer callbacks and Beam's own methods are all still listed.
        return [n for n in super().__dir__() if n not in _HELPERS]

    def setup(self) -> None:
        worker_check.require_environment(self.launcher_env, "StatefulInference")
        self.m = Counters()
        self.spec = ModelSpec.from_json(self.spec_json)
        self._models: dict[str, Model] = {}
        self._holders: list[_Loaded] = []
        model = self._model(self.model_path)
        worker_check.require_model(self.spec, model.spec, self.model_path, "StatefulInference")

    def teardown(self) -> None:
        # Streaming runners may tear a DoFn down after any bundle (the legacy DirectRunner does after every
        # one): the cache outlives it, kept correct by the token check. A bounded input's pipeline is done.
        if self.flush_all:
            CACHE.drop(self.transform_id)

    def _model(self, path: str) -> Model:
        m = self._models.get(path)
        if m is None:
            providers = self.providers
            holder = self._shared.acquire(lambda: _Loaded(load_model(path, providers)), tag=path)
            m = self._models[path] = holder.model
            self._holders.append(holder)  # keep the weak-ref'd holder alive
            self.m.model_loaded(m, providers)
        return m

    # -- state ------------------------------------------------------------------------------
    def _ctrl(self, ctrl_state) -> Ctrl:
        raw = ctrl_state.read()
        ctrl = Ctrl(json.loads(raw) if raw else None, self.model_path)
        if ctrl.num_shards is not None and ctrl.num_shards != self.num_shards:
            raise InputError(
                f"StatefulInference: num_shards: expected {ctrl.num_shards} (the value this pipeline's state was "
                f"written with), got {self.num_shards}; changing it would restart every key as new. Drain the "
                "job and start it fresh to re-shard.")
        ctrl.num_shards = self.num_shards
        return ctrl

    def _store(self, shard: int, ctrl: Ctrl, log_state) -> tuple[ShardStore, ModelChange | None]:
        """The shard's store: the cached one if Beam state still holds its token, else rebuilt from the log."""
        store = CACHE.take(self.transform_id, shard, ctrl.token)
        if store is not None:
            return store, None
        blobs = list(log_state.read())
        change = None
        if not blobs and self.initial_state is not None:  # a new pipeline seeded from a snapshot set
            blob = seed_blob(self.initial_state, self.manifest, shard, self.num_shards, self.model_path)
            store, change = ShardStore.from_log([blob], self._model, keep_last_output=self.keep_last_output,
                                                default_path=self.model_path, health=self.health)
            store.log.seq, store.log.full = 0, True  # its first write is its base snapshot
        elif not blobs:
            store = ShardStore.new(self._model(ctrl.model), ctrl.model, keep_last_output=self.keep_last_output,
                                   health=self.health)
        else:
            self.m.rebuilds.inc()
            store, change = ShardStore.from_log(blobs, self._model, keep_last_output=self.keep_last_output,
                                                default_path=ctrl.model, health=self.health)
        store.token = ctrl.token or ""  # it now mirrors what Beam state holds
        return store, change

    def _save(self, shard: int, store: ShardStore, ctrl: Ctrl, log_state) -> None:
        compact = store.should_compact()
        if compact or store.changed:
            blob, full = store.delta(compact=compact)
            if full:
                log_state.clear()
                self.m.compactions.inc(int(compact))
            log_state.add(blob)
            self.m.state_bytes_written.inc(len(blob))
            self.m.flush_state_bytes.update(len(blob))
            store.token = ctrl.token = new_token()
            ctrl.model = store.model_path
        # else nothing to write: the token in state stays valid
        CACHE.put(self.transform_id, shard, store, self.cache_bytes)

    def _arm(self, ctrl: Ctrl, timer, at: int | None) -> None:
        """Set the flush timer for ``at`` if that is earlier than what is armed (or nothing is).

        Timers are set on whole milliseconds (the first at or after ``at``): runners with
        millisecond timers (batch FnApiRunner, Flink, Dataflow) then fire exactly when set,
        so a firing always means the watermark passed ``at``.
        """
        if at is None:
            return
        at = ceil_millis(at)
        if ctrl.armed is None or at < ctrl.armed:
            ctrl.armed = at
            timer.set(timestamp(at))

    # -- input --------------------------------------------------------------------------------
    def process(self, element, pending=beam.DoFn.StateParam(PENDING), log_state=beam.DoFn.StateParam(LOG),
                ctrl_state=beam.DoFn.StateParam(CTRL), flush_timer=beam.DoFn.TimerParam(FLUSH),
                end_timer=beam.DoFn.TimerParam(END)) -> Iterator:
        shard, (late, _pane_ts, payloads) = element
        ctrl = self._ctrl(ctrl_state)
        if not ctrl.end_set and ((self.next_fields and not self.flush_all) or self.save_state):
            end_timer.set(timestamp(END_OF_INPUT_MICROS))  # releases (or saves) what is still held at the end
            ctrl.end_set = True
        late_blocks = []
        for kind, blob in payloads:
            # the release time from the payload itself, in micros (some runners truncate a pane's timestamp
            # to whole milliseconds, which would arm a timer before the release time)
            if kind == EVENTS:
                block = from_ipc(blob)
                if late:
                    late_blocks.append(block)
                else:
                    pending.add(blob)
                    self._arm(ctrl, flush_timer, int(pc.min(block.column(REL)).as_py()))
            elif kind == SEED:  # a pipeline seeded from a snapshot: every shard flushes once to take its keys
                self._arm(ctrl, flush_timer, int(json.loads(blob)["at"]))
            else:
                u = json.loads(blob)
                self._merge_update(ctrl, u)
                self._arm(ctrl, flush_timer, self._release(max(int(u["effective_micros"]), EARLIEST)))
        if late_blocks:
            yield from self._late(shard, pa.concat_tables(late_blocks), ctrl, pending, log_state)
        ctrl_state.write(ctrl.to_json())

    def _release(self, micros: int) -> int:
        return int(release_micros(np.array([micros]), size=self.cfg.size, lateness=self.cfg.lateness)[0])

    def _merge_update(self, ctrl: Ctrl, u: dict) -> None:
        key = [u["path"], u["effective_micros"]]
        if key in ctrl.seen:
            return
        ctrl.seen.append(key)
        # Applied events are final; an update (even a late one) serves the events after it that are
        # applied from now on, as the newest update at or before their time: the same on every shard.
        ctrl.updates.append([u["path"], int(u["effective_micros"])])
        ctrl.updates.sort(key=lambda p: (p[1], p[0]))  # (updates at one time: by path, not by arrival)

    def _late(self, shard: int, t: pa.Table, ctrl: Ctrl, pending, log_state) -> Iterator:
        """Events of windows the watermark had passed: duplicates of applied/pending rows, else late."""
        store, change = self._store(shard, ctrl, log_state)
        if change is None:  # read-only use: still valid for this token (a model change is the next flush's)
            CACHE.put(self.transform_id, shard, store, self.cache_bytes)
        pending_ids = set()
        for b in pending.read():
            p = from_ipc(b)
            pending_ids.update(zip(p.column(KEY).to_pylist(), p.column(SEQ).to_pylist(), strict=True))
        for i, kind in self._late_kinds(t, store, pending_ids):
            yield self._dead(t, i, kind, kind)

    def _late_kinds(self, t: pa.Table, store: ShardStore, pending_ids=frozenset()) -> Iterator[tuple[int, str]]:
        """Each row of ``t`` (events whose window had passed): a duplicate of an applied or pending row, else late."""
        ids = zip(t.column(KEY).to_pylist(), t.column(SEQ).to_pylist(), t.column(TSU).to_pylist(), strict=True)
        for i, (k, q, tsu) in enumerate(ids):
            dup = (k, q) in pending_ids or is_duplicate(store, k, q, tsu, self.horizon)
            yield i, "duplicate" if dup else "late"

    def _dead(self, t: pa.Table, i: int, kind: str, reason: str, at: int | None = None):
        self.m.dead(kind)
        ts = t.column(TS)[i].as_py()
        dl = DeadLetter(t.column(KEY)[i].as_py(), ts, t.column(SEQ)[i].as_py(), t.column(SUB)[i].as_py(), kind,
                        reason, dead_event_json(t, i))
        if at is None:
            return beam.pvalue.TaggedOutput(DEAD, dl)
        return beam.pvalue.TaggedOutput(DEAD, TimestampedValue(dl, timestamp(at)))

    # -- timers -------------------------------------------------------------------------------
    @on_timer(FLUSH)
    def on_flush(self, key=beam.DoFn.KeyParam, fire=beam.DoFn.TimestampParam,
                 pending=beam.DoFn.StateParam(PENDING), log_state=beam.DoFn.StateParam(LOG),
                 ctrl_state=beam.DoFn.StateParam(CTRL), flush_timer=beam.DoFn.TimerParam(FLUSH)) -> Iterator:
        yield from self._flush(key, fire.micros, pending, log_state, ctrl_state, flush_timer, apply_all=self.flush_all,
                               release_all=self.flush_all and not self.save_state)

    @on_timer(END)
    def on_end(self, key=beam.DoFn.KeyParam, fire=beam.DoFn.TimestampParam,
               pending=beam.DoFn.StateParam(PENDING), log_state=beam.DoFn.StateParam(LOG),
               ctrl_state=beam.DoFn.StateParam(CTRL), flush_timer=beam.DoFn.TimerParam(FLUSH)) -> Iterator:
        """The input ended: apply whatever is still buffered, then release every held-back row, or, with
        ``save_state``, keep them and every stream as they are in the shard's snapshot."""
        yield from self._flush(key, fire.micros, pending, log_state, ctrl_state, flush_timer, apply_all=True,
                               release_all=not self.save_state, end=True)

    def _flush(self, shard: int, T: int, pending, log_state, ctrl_state, flush_timer, *, apply_all: bool,
               release_all: bool, end: bool = False) -> Iterator:
        ctrl = self._ctrl(ctrl_state)
        # Runners may fire a timer at a truncated time (whole milliseconds in batch): the timer that
        # fired is the one armed last, so its armed time is what the watermark has passed.
        f = Flush(max(T, ctrl.armed if ctrl.armed is not None else T), apply_all, release_all)
        T = f.T
        ctrl.armed = None
        store, change = self._store(shard, ctrl, log_state)
        blobs = list(pending.read())
        t = pa.concat_tables([from_ipc(b) for b in blobs]) if blobs else None
        rest_min = None
        due = None
        if t is not None and t.num_rows:
            rel = t.column(REL).to_numpy()
            due_m = np.ones(len(rel), bool) if apply_all else rel <= T
            due = t.filter(pa.array(due_m)) if not due_m.all() else t
            pending.clear()
            if not due_m.all():
                rest = t.filter(pa.array(~due_m))
                pending.add(to_ipc(rest))
                rest_min = int(rest.column(REL).to_numpy().min())
        self.m.flushes.inc()
        if change is not None:  # the file at the state's model path changed since the state was written
            self.m.model_switches.inc()
            self.m.model_resets.inc(len(change.reset_keys))
            f.ended += change.reset_keys
        out = Applied(None)
        before_cut: list[tuple[pa.Table, int, str, str]] = []
        if due is not None and due.num_rows and self._cut is not None:
            # seeded from a snapshot: windows the saved run had released are over; their events were late
            old_m = due.column(REL).to_numpy() <= self._cut
            if old_m.any():
                old = due.filter(pa.array(old_m))
                before_cut = [(old, i, k, k) for i, k in self._late_kinds(old, store)]
                due = due.filter(pa.array(~old_m))
        prior_max = ctrl.applied_max
        if due is not None and due.num_rows:
            out = apply_due(due, store, self.cfg, horizon=self.horizon, epochs=lambda tsu: self._epochs(ctrl, tsu),
                            load_model=self._model, version=lambda mdl: model_version(mdl.spec), m=self.m)
            f.ended += out.ended
            # how far this shard's input has been applied: duplicates and failed rows too (they were due here)
            ctrl.applied_max = max(ctrl.applied_max, int(pc.max(due.column(TSU)).as_py()))
        # with save_state, an update takes effect only once events past it were applied (the end of the input
        # switches no model the next run would not have switched)
        f.ended += self._switch_due_updates(ctrl, store, ctrl.applied_max if self.save_state else
                                            max(T, ctrl.applied_max))
        # With save_state, a key expires only once its shard applied events past its expiry: the end of the
        # input (or a drain) ends no stream that the run seeded from the snapshot could still continue.
        # (A bounded input applied at once expires them all in the flush that applied them, stamped as a
        # streaming run would have: see _stream_ends.)
        now = (ctrl.applied_max if self.flush_all else min(T, ctrl.applied_max)) if self.save_state else T
        released = [*f.ended, *self._expire(store, now)]
        if release_all:  # the input ended: every held-back row goes out
            released = list(dict.fromkeys([*released, *store.held]))
        store.forget_old(now, self.horizon, self.cfg.size + self.cfg.lateness)
        rows = out.rows
        if self.next_fields:
            # rows whose stream ended take the time it ended (computed where a bounded input applies at once)
            ends = (self._stream_ends(ctrl, prior_max, due, saved=self.save_state)
                    if release_all or self.flush_all else None)
            rows = pair(rows, store, self.next_fields, final=release_all, released=released, ends=ends)
        self._save(shard, store, ctrl, log_state)
        self.m.shard_state((self.transform_id, shard), store)
        upd = self._next_update(ctrl, max(T, ctrl.applied_max))
        exp = store.next_expiry()
        if exp is not None and self.save_state and exp > ctrl.applied_max:
            exp = None  # a later flush that applies events past it expires it
        nxt = [v for v in (rest_min, exp, upd) if v is not None]
        if nxt:
            self._arm(ctrl, flush_timer, max(min(nxt), T + 1))
        ctrl_state.write(ctrl.to_json())
        if self.fault_injector is not None:
            self.fault_injector(shard, sorted(set(due.column(KEY).to_pylist())) if due is not None else [])
        # a bounded input's end timer may fire before its flush timer: stamp as the flush would have
        floor = T if not (end and self.flush_all) or due is None or not due.num_rows else min(
            T, ceil_millis(int(pc.min(due.column(REL)).as_py())))
        for tbl, i, kind, reason in [*before_cut, *out.dead]:
            yield self._dead(tbl, i, kind, reason, at=floor)
        yield from emit(rows, self.output, floor=floor)
        if end and self.save_state:
            yield beam.pvalue.TaggedOutput(SNAPSHOT, (shard, store.full_blob(
                {"applied_max": ctrl.applied_max, "fingerprint": store.op.model.spec.fingerprint})))

    def _stream_ends(self, ctrl: Ctrl, prior_max: int, due: pa.Table | None, *,
                     saved: bool) -> Callable[[np.ndarray], np.ndarray]:
        """When a stream whose last event is at ``ts`` (s) ended if nothing of its key followed (micros): the
        earlier of its TTL expiry and the next update to a model of other state shapes, else the end of the input.

        Each end is stamped when a streaming run would apply it: when the watermark passes it (the expiry or
        update timer); with ``saved`` (``save_state``), at the first flush that applied events past it, since a
        drain fires every timer and must end no stream that the next run could continue. There ``due`` (this
        flush's events, applied at once) gives the flushes a streaming run would have made.
        """
        resets = self._reset_times(ctrl)
        if saved:
            known = _first_flush_past(prior_max, due)
        else:
            def known(x: np.ndarray) -> np.ndarray:
                return ceil_millis_array(x)

        def ends(last_ts: np.ndarray) -> np.ndarray:
            ts = np.asarray(last_ts, np.float64)
            out = np.full(len(ts), END_OF_INPUT_MICROS, np.int64)
            if self.cfg.ttl is not None:  # the expiry the store records, as its timer fires
                out = np.minimum(out, known(release_micros(to_micros_array(ts + self.cfg.ttl), size=self.cfg.size,
                                                           lateness=self.cfg.lateness)))
            if len(resets):
                j = np.searchsorted(resets, to_micros_array(ts), side="right")
                eff = resets[np.minimum(j, len(resets) - 1)]
                at = known(eff if saved else release_micros(eff, size=self.cfg.size, lateness=self.cfg.lateness))
                out = np.where(j < len(resets), np.minimum(out, at), out)
            return np.minimum(out, END_OF_INPUT_MICROS)
        return ends

    def _reset_times(self, ctrl: Ctrl) -> np.ndarray:
        """Effective times (micros, sorted) of the updates whose model has other state shapes than the one before."""
        out = []
        sig = self._model(self.model_path).spec.state_signature
        for path, eff in ctrl.updates:
            s = self._model(path).spec.state_signature
            if s != sig:
                out.append(int(eff))
            sig = s
        return np.asarray(out, np.int64)

    # -- model updates --------------------------------------------------------------------------
    def _epochs(self, ctrl: Ctrl, tsu: np.ndarray) -> tuple[np.ndarray, list[str], list[int | None]]:
        effs = np.asarray([u[1] for u in ctrl.updates], np.int64)
        epoch = np.searchsorted(effs, tsu, side="right") if len(effs) else np.zeros(len(tsu), np.int64)
        return epoch, [self.model_path] + [u[0] for u in ctrl.updates], [None] + [int(u[1]) for u in ctrl.updates]

    def _next_update(self, ctrl: Ctrl, T: int) -> int | None:
        later = [u[1] for u in ctrl.updates if u[1] > T]
        return min(later) if later else None

    def _switch_due_updates(self, ctrl: Ctrl, store: ShardStore, T: int) -> list[str]:
        """An update whose effective time has passed takes effect even if no event of this shard needed it."""
        _, paths, effs = self._epochs(ctrl, np.zeros(0, np.int64))
        e = sum(1 for u in ctrl.updates if u[1] <= T)
        if not e:
            return []
        return switch_model(store, paths, effs, e, self._model, self.m, ttl=self.cfg.ttl)

    # -- TTL ------------------------------------------------------------------------------------
    def _expire(self, store: ShardStore, T: int) -> list[str]:
        if self.cfg.ttl is None:
            return []
        keys = store.due_expiries(T)
        store.expire(keys)
        self.m.expired.inc(len(keys))
        return keys


def _first_flush_past(prior_max: int, due: pa.Table | None) -> Callable[[np.ndarray], np.ndarray]:
    """For event times ``x`` (micros): the first flush of a streaming run over ``due`` (one per release time,
    whole milliseconds) after which its shard had applied events at or past ``x`` (``prior_max``: the latest
    event time applied before these), else the end of the input."""
    if due is None or not due.num_rows:
        return lambda x: np.full(np.shape(x), END_OF_INPUT_MICROS, np.int64)
    rel = ceil_millis_array(due.column(REL).to_numpy())
    o = np.argsort(rel, kind="stable")
    r = rel[o]
    reached = np.maximum(np.maximum.accumulate(due.column(TSU).to_numpy()[o]), prior_max)
    last = np.append(np.flatnonzero(r[1:] != r[:-1]), len(r) - 1)  # each flush's last event
    flush_at, flush_reached = r[last], reached[last]

    def known(x: np.ndarray) -> np.ndarray:
        i = np.searchsorted(flush_reached, np.asarray(x, np.int64), side="left")
        return np.where(i < len(flush_at), flush_at[np.minimum(i, len(flush_at) - 1)], END_OF_INPUT_MICROS)
    return known


#: ShardStep's private helper methods: no DoFn parameters, so not listed by its ``__dir__``.
_HELPERS = frozenset(n for n, v in vars(ShardStep).items()
                     if n.startswith("_") and not n.startswith("__") and callable(v))
