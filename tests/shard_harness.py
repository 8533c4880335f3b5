"""A DoFn-level harness for ``ShardStep``: fake Beam state that commits or rolls back per bundle.

It plays what a runner does around the stateful step, one work item per bundle: the
release-window ``GroupByKey`` (on-time panes when the watermark passes a window's release
time, late panes at once, arrivals past the dedupe horizon dropped), then each shard's
timers in time order. Every state write can be made to fail (after the write, as a worker
dying mid-bundle would): the bundle's writes and outputs are then discarded and the bundle
runs again, on this worker (warm: the process cache as it is) or on another (cold: the
cache dropped). Used by the determinism tests: warm, cold and failed-then-retried runs of
the same input must give the same outputs, dead letters and stores.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.utils.timestamp import Timestamp

from streamrnn.beam.apply import Config
from streamrnn.beam.clock import END_OF_INPUT_MICROS, release_micros, to_micros
from streamrnn.beam.intake import DEAD, UPDATE, Intake
from streamrnn.beam.records import event_json
from streamrnn.beam.stateful import ShardStep
from streamrnn.beam.store import CACHE, ShardStore
from streamrnn.model import load
from streamrnn.runtime import CPU


class Injected(RuntimeError):
    """A failure the harness injected after a state write."""


class _Writes:
    """Counts state writes; raises after the ones listed in ``fail_at`` (each once)."""

    def __init__(self, fail_at=()):
        self.n = 0
        self.fail_at = set(fail_at)
        self.failed = 0

    def wrote(self) -> None:
        self.n += 1
        if self.n in self.fail_at:
            self.fail_at.discard(self.n)
            self.failed += 1
            raise Injected(f"injected failure after state write {self.n}")


class Bag:
    def __init__(self, w: _Writes, items=None):
        self.w, self.items = w, list(items or [])

    def read(self):
        return list(self.items)

    def add(self, v) -> None:
        self.items.append(v)
        self.w.wrote()

    def clear(self) -> None:
        self.items = []
        self.w.wrote()


class Value:
    def __init__(self, w: _Writes, v=None):
        self.w, self.v = w, v

    def read(self):
        return self.v

    def write(self, v) -> None:
        self.v = v
        self.w.wrote()


class Timer:
    def __init__(self, w: _Writes, at=None):
        self.w, self.at = w, at

    def set(self, ts: Timestamp) -> None:
        self.at = ts.micros
        self.w.wrote()


@dataclass
class Shard:
    pending: list = field(default_factory=list)
    log: list = field(default_factory=list)
    ctrl: str | None = None
    flush_at: int | None = None
    end_at: int | None = None


@dataclass
class Scenario:
    """Arrivals and watermark steps: ("add", [Event, ...]), ("update", (path, effective_ts)), ("wm", seconds)."""

    steps: list
    window: float = 10.0
    lateness: float = 0.0
    ttl: float | None = None
    horizon: float = 3600.0
    num_shards: int = 2
    next_fields: tuple = ()


class Harness:
    def __init__(self, model_path: str, sc: Scenario, *, mode: str = "warm", fail_at=(), check_every_flush=True):
        """mode: "warm" (cache kept), "cold" (no cache: every flush rebuilds), "retry-warm" / "retry-cold"
        (failures injected at ``fail_at`` state writes; the retry keeps or drops the cache)."""
        self.sc, self.mode = sc, mode
        self.size, self.late = to_micros(sc.window), to_micros(sc.lateness)
        self.horizon = to_micros(sc.horizon)
        model = load(model_path, providers=[CPU])
        self.tid = f"harness-{id(self)}"
        from streamrnn.beam.postprocess import NextTokenPostprocess

        post = NextTokenPostprocess(3) if sc.next_fields else None
        cfg = Config(ttl=sc.ttl, size=self.size, lateness=self.late, max_steps=4, max_batch=3, tokens=True,
                     n_features=0, postprocess=post)
        self.step = ShardStep(transform_id=self.tid, model_path=str(model_path), spec_json=model.spec.to_json(),
                              num_shards=sc.num_shards, cfg=cfg, dedupe_horizon=self.horizon,
                              keep_last_output=post is not None, output="arrow", providers=[CPU], flush_all=False,
                              next_fields=sc.next_fields, fault_injector=None,
                              cache_bytes=0 if mode == "cold" else 1 << 30)
        self.step.setup()
        self.intake = Intake(tokens=True, vocab=model.spec.input.vocab_size, n_features=0,
                             num_shards=sc.num_shards, size_micros=self.size, lateness_micros=self.late)
        self.intake.setup()
        self.w = _Writes(fail_at)
        self.shards = {s: Shard() for s in range(sc.num_shards)}
        self.panes: dict[tuple[int, int], list] = {}  # (shard, rel) -> payloads waiting for the watermark
        self.wm = -(2**62)
        self.outputs: list = []
        self.dead: list = []
        self.dropped = 0
        self.flushes = 0
        self.check_every_flush = check_every_flush and mode == "warm"

    # -- a bundle: run, commit or roll back, retry ------------------------------------------------
    def _bundle(self, shard: int, fn) -> None:
        while True:
            saved = copy.deepcopy(self.shards[shard])
            st = self.shards[shard]
            pending, log = Bag(self.w, st.pending), Bag(self.w, st.log)
            ctrl, flush, end = Value(self.w, st.ctrl), Timer(self.w, st.flush_at), Timer(self.w, st.end_at)
            try:
                out = list(fn(pending, log, ctrl, flush, end) or ())
            except Injected:
                self.shards[shard] = saved
                if self.mode == "retry-cold":
                    CACHE.drop(self.tid)  # the retry runs on another worker
                continue
            st.pending, st.log, st.ctrl, st.flush_at, st.end_at = (pending.items, log.items, ctrl.v, flush.at,
                                                                    end.at)
            self._collect(out)
            return

    def _collect(self, out) -> None:
        for o in out:
            if isinstance(o, beam.pvalue.TaggedOutput):
                assert o.tag == DEAD
                v = o.value
                at = v.timestamp.micros if hasattr(v, "timestamp") else None
                d = v.value if hasattr(v, "value") else v
                self.dead.append((d.key, d.ts, d.seq, d.sub, d.kind, d.reason, at))
            else:
                at = o.timestamp.micros
                for row in o.value.to_pylist():
                    self.outputs.append((*tuple(sorted((k, _plain(v)) for k, v in row.items())), ("@", at)))

    # -- what a runner does --------------------------------------------------------------------
    def _arrive(self, shard: int, rel: int, payload) -> None:
        if self.wm <= rel:
            self.panes.setdefault((shard, rel), []).append(payload)
        elif self.wm <= rel + self.horizon:
            self._deliver(shard, True, rel, [payload])
        else:
            self.dropped += 1  # Beam drops it (its lateness counter)

    def _deliver(self, shard: int, late: bool, rel: int, payloads: list) -> None:
        def run(pending, log, ctrl, flush, end):
            return self.step.process((shard, (late, rel, payloads)), pending=pending, log_state=log, ctrl_state=ctrl,
                                     flush_timer=flush, end_timer=end)
        self._bundle(shard, run)

    def add(self, events) -> None:
        self.intake.start_bundle()
        for e in events:
            for o in self.intake.process(e, ts=Timestamp(micros=to_micros(e.ts))):
                d = o.value
                self.dead.append((d.key, d.ts, d.seq, d.sub, d.kind, d.reason, None))
        for wv in self.intake.finish_bundle():
            shard, payload = wv.value
            self._arrive(shard, wv.timestamp.micros, payload)

    def update(self, path: str, eff: float) -> None:
        effu = to_micros(eff)
        rel = int(release_micros(np.array([effu]), size=self.size, lateness=self.late)[0])
        payload = (UPDATE, event_json({"path": path, "effective_ts": eff, "effective_micros": effu}).encode())
        for s in range(self.sc.num_shards):
            self._arrive(s, rel, payload)

    def advance(self, wm_micros: int) -> None:
        self.wm = max(self.wm, wm_micros)
        while True:
            ready = sorted(k for k in self.panes if k[1] < self.wm)
            timers = sorted((at, 0 if kind == "flush" else 1, s) for s, st in self.shards.items()
                            for kind, at in (("flush", st.flush_at), ("end", st.end_at))
                            if at is not None and at <= self.wm)
            if ready and (not timers or ready[0][1] < timers[0][0]):
                shard, rel = ready[0]
                self._deliver(shard, False, rel, self.panes.pop((shard, rel)))
                continue
            if not timers:
                return
            at, kind, s = timers[0]
            self._fire(s, at, "flush" if kind == 0 else "end")

    def _fire(self, shard: int, at: int, kind: str) -> None:
        def run(pending, log, ctrl, flush, end):
            if kind == "flush":
                flush.at = None  # a timer that fired is cleared (not a write)
                return self.step.on_flush(key=shard, fire=Timestamp(micros=at), pending=pending, log_state=log,
                                          ctrl_state=ctrl, flush_timer=flush)
            end.at = None
            return self.step.on_end(key=shard, fire=Timestamp(micros=at), pending=pending, log_state=log,
                                    ctrl_state=ctrl, flush_timer=flush)
        self._bundle(shard, run)
        self.flushes += 1
        if self.check_every_flush:
            assert_warm_equals_rebuilt(self, shard)

    def run(self) -> Harness:
        for kind, arg in self.sc.steps:
            if kind == "add":
                self.add(arg)
            elif kind == "update":
                self.update(*arg)
            else:
                self.advance(to_micros(arg))
        self.advance(END_OF_INPUT_MICROS)
        return self

    # -- results ---------------------------------------------------------------------------------
    def rebuilt(self, shard: int) -> dict | None:
        st = self.shards[shard]
        if not st.log:
            return None
        store, _ = ShardStore.from_log(list(st.log), self.step._model, keep_last_output=self.step.keep_last_output,
                                       default_path=self.step.model_path)
        return store.lasting()

    def result(self) -> dict:
        return {"outputs": sorted(self.outputs, key=repr), "dead": sorted(self.dead, key=repr),
                "stores": {s: self.rebuilt(s) for s in self.shards}, "dropped": self.dropped}


def assert_warm_equals_rebuilt(h: Harness, shard: int) -> None:
    """After a flush: the warm store in the cache equals the store rebuilt from the shard's log, field by field."""
    st = h.shards[shard]
    token = json.loads(st.ctrl)["token"] if st.ctrl else None
    warm = CACHE.take(h.tid, shard, token)
    if warm is None:
        return  # nothing cached for this token (no state yet)
    try:
        assert warm.lasting() == h.rebuilt(shard), f"shard {shard}: the warm store differs from its rebuild"
    finally:
        CACHE.put(h.tid, shard, warm, 1 << 30)


def _plain(v):
    if isinstance(v, float):
        return round(v, 9) if np.isfinite(v) else repr(v)
    if isinstance(v, list):
        return tuple(_plain(x) for x in v)
    if isinstance(v, pa.Scalar):
        return _plain(v.as_py())
    return v
