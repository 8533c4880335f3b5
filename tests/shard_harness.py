"""A DoFn-level harness for ``ShardStep``: fake Beam state that commits or rolls back per bundle.

It plays what a runner does around the stateful step, one work item per bundle: the
release-window ``GroupByKey`` (on-time panes when the watermark passes a window's release
time, late panes at once, arrivals past the dedupe horizon dropped), then each shard's
timers in time order. Every state write can be made to fail (after the write, as a worker
dying mid-bundle would): the bundle's writes and outputs are then discarded and the bundle
runs again, on this worker (warm: the process cache as it is) or on another (cold: the
cache dropped). Used by the determinism tests: warm, cold and failed-then-retried runs of
the same input must give the same outputs, dead letters and stores.

Beyond the unbounded (streaming) path it plays three more:

* ``bounded=True``: the batch runner (``flush_all``): no watermark until the input ends, then
  every pane is delivered (all on time), then the timers fire (in time order, or the end
  timer first: ``timer_order="end-first"``; batch runners do not promise an order).
* ``save_state=True``: a stopped job's snapshot. Each shard's ``SNAPSHOT`` output of its end
  timer is kept (``snapshots``); :meth:`Harness.write_snapshot` writes the snapshot set with
  savepoint's own writers (one folder per shard, the manifest last).
* ``initial_state=PATH``: a pipeline seeded from such a set: the manifest is read and checked
  as the transform does, and every shard gets its ``SEED`` kick (as ``seed_kicks``) before any
  input, so it takes its keys on its first flush.

Failures: ``fail_at`` (global state-write numbers, as before) and ``fail_in`` (per kind of
bundle: ``"process"``, ``"flush"``, ``"end"``, or ``"first"`` for a shard's first timer, the
seeding flush of a seeded run): ``{"end": (2, 5)}`` fails every end-timer bundle after its
2nd state write, then its retry after its 5th, then lets it through.
"""

from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.utils.timestamp import Timestamp

from streamrnn.beam.records import event_json
from streamrnn.beam.step.apply import Config
from streamrnn.beam.step.clock import EARLIEST, END_OF_INPUT_MICROS, release_micros, to_micros
from streamrnn.beam.step.intake import DEAD, UPDATE, Intake
from streamrnn.beam.step.savepoint import MANIFEST, WriteSnapshot, _WriteManifest, _WriteShard, read_manifest
from streamrnn.beam.step.stateful import SEED, SNAPSHOT, ShardStep
from streamrnn.beam.step.store import CACHE, PARTS, ShardStore, unpack
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU


class Injected(RuntimeError):
    """A failure the harness injected after a state write."""


class _Writes:
    """Counts state writes; raises after the ones listed in ``fail_at`` (each once), and after the n-th write of
    a bundle's attempt where ``fail_in`` says so (see the module doc)."""

    def __init__(self, fail_at=(), fail_in=None):
        self.n = 0
        self.fail_at = set(fail_at)
        self.fail_in = dict(fail_in or {})
        self.failed = 0
        self.failed_in: dict[str, int] = {}  # kind -> failures injected by fail_in
        self.in_bundle = 0
        self.plan: tuple[str, int] | None = None  # (kind, write number) that fails in this attempt

    def begin(self, kinds: tuple[str, ...], attempt: int) -> None:
        self.in_bundle = 0
        self.plan = None
        for k in kinds:
            if k in self.fail_in:
                at = tuple(self.fail_in[k])
                self.plan = (k, at[attempt]) if attempt < len(at) else None
                return

    def wrote(self) -> None:
        self.n += 1
        self.in_bundle += 1
        if self.plan is not None and self.plan[1] == self.in_bundle:
            kind = self.plan[0]
            self.plan = None
            self.failed += 1
            self.failed_in[kind] = self.failed_in.get(kind, 0) + 1
            raise Injected(f"injected failure after write {self.in_bundle} of a {kind} bundle")
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
    def __init__(self, model_path: str, sc: Scenario, *, mode: str = "warm", fail_at=(), check_every_flush=True,
                 bounded: bool = False, save_state: bool = False, initial_state: str | None = None,
                 fail_in: dict | None = None, timer_order: str = "time", pane_seed: int | None = None,
                 health="off"):
        """mode: "warm" (cache kept), "cold" (no cache: every flush rebuilds), "retry-warm" / "retry-cold"
        (failures injected at ``fail_at`` state writes or as ``fail_in`` says; the retry keeps or drops the
        cache). ``bounded``: the batch runner's path (``flush_all``; the scenario's watermark steps are not
        seen); ``timer_order``: "time" or "end-first" (bounded only); ``pane_seed``: deliver a bounded run's
        panes in a shuffled order. ``save_state`` / ``initial_state``: see the module doc. ``health``: the
        carried-state health policy, as ``StatefulInference(health=...)`` passes it."""
        assert timer_order in ("time", "end-first")
        self.sc, self.mode = sc, mode
        self.bounded, self.timer_order, self.pane_seed = bounded, timer_order, pane_seed
        self.save_state, self.initial_state = save_state, initial_state
        self.size, self.late = to_micros(sc.window), to_micros(sc.lateness)
        self.horizon = to_micros(sc.horizon)
        model = load(model_path, providers=[CPU])
        self.tid = f"harness-{id(self)}"
        from streamrnn.beam.postprocess import NextTokenPostprocess

        post = NextTokenPostprocess(3) if sc.next_fields else None
        tokens, n_features = model.spec.input.kind == "tokens", model.spec.input.n_features or 0  # LM or features
        cfg = Config(ttl=sc.ttl, size=self.size, lateness=self.late, max_steps=4, max_batch=3, tokens=tokens,
                     n_features=n_features, postprocess=post)
        self.spec = model.spec
        self.manifest = None if initial_state is None else read_manifest(initial_state, model.spec,
                                                                         next_fields=tuple(sc.next_fields))
        self.step = ShardStep(transform_id=self.tid, model_path=str(model_path), spec_json=model.spec.to_json(),
                              num_shards=sc.num_shards, cfg=cfg, dedupe_horizon=self.horizon,
                              keep_last_output=post is not None, output="arrow", providers=[CPU],
                              flush_all=bounded, next_fields=sc.next_fields, fault_injector=None,
                              cache_bytes=0 if mode == "cold" else 1 << 30, save_state=save_state,
                              initial_state=initial_state, manifest=self.manifest, health=health)
        self.step.setup()
        self.intake = Intake(tokens=tokens, vocab=model.spec.input.vocab_size or 0, n_features=n_features,
                             num_shards=sc.num_shards, size_micros=self.size, lateness_micros=self.late)
        self.intake.setup()
        self.w = _Writes(fail_at, fail_in)
        self.shards = {s: Shard() for s in range(sc.num_shards)}
        self.timers_fired: dict[int, int] = {}  # shard -> timer bundles committed
        self.snapshots: dict[int, bytes] = {}  # shard -> its SNAPSHOT blob (save_state)
        self.panes: dict[tuple[int, int], list] = {}  # (shard, rel) -> payloads waiting for the watermark
        self.wm = -(2**62)
        self.outputs: list = []
        self.dead: list = []
        self.dropped = 0
        self.flushes = 0
        self.check_every_flush = check_every_flush and mode == "warm"

    # -- a bundle: run, commit or roll back, retry ------------------------------------------------
    def _bundle(self, shard: int, fn, kinds: tuple[str, ...] = ("process",)) -> None:
        attempt = 0
        while True:
            self.w.begin(kinds, attempt)
            attempt += 1
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
            if isinstance(o, beam.pvalue.TaggedOutput) and o.tag == SNAPSHOT:
                shard, blob = o.value
                assert shard not in self.snapshots, f"shard {shard}: a second snapshot"
                self.snapshots[shard] = blob
            elif isinstance(o, beam.pvalue.TaggedOutput):
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
            # panes in release-time order over all shards: a shard's timer never fires before a pane of an earlier
            # release (the runner's watermark hold)
            ready = sorted((k for k in self.panes if k[1] < self.wm), key=lambda k: (k[1], k[0]))
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
        first = not self.timers_fired.get(shard)
        self._bundle(shard, run, (("first",) if first else ()) + (kind,))
        self.timers_fired[shard] = self.timers_fired.get(shard, 0) + 1
        self.flushes += 1
        if self.check_every_flush:
            assert_warm_equals_rebuilt(self, shard)

    def seed(self) -> None:
        """A seeded pipeline's kicks (as ``savepoint.seed_kicks``): one SEED payload per shard, released with the
        window of the snapshot's last applied event."""
        ends = [s.get("extra", {}).get("applied_max", EARLIEST) for s in self.manifest["shards"]]
        at = int(release_micros(np.array([min(ends, default=EARLIEST)]), size=self.size, lateness=self.late)[0])
        for s in range(self.sc.num_shards):
            self._arrive(s, at, (SEED, json.dumps({"at": at}).encode()))

    def end_bounded(self) -> None:
        """The batch runner at the end of a bounded input: every pane (all on time), then the timers."""
        panes = sorted(self.panes)
        if self.pane_seed is not None:
            random.Random(self.pane_seed).shuffle(panes)
        for key in panes:
            self._deliver(key[0], False, key[1], self.panes.pop(key))
        self.wm = END_OF_INPUT_MICROS
        while True:
            timers = sorted(((1 if kind == "flush" else 0) if self.timer_order == "end-first" else 0, at,
                             0 if kind == "flush" else 1, s)
                            for s, st in self.shards.items()
                            for kind, at in (("flush", st.flush_at), ("end", st.end_at))
                            if at is not None and at <= self.wm)
            if not timers:
                return
            _, at, kind, s = timers[0]
            self._fire(s, at, "flush" if kind == 0 else "end")

    def run(self) -> Harness:
        if self.initial_state is not None:
            self.seed()
        for kind, arg in self.sc.steps:
            if kind == "add":
                self.add(arg)
            elif kind == "update":
                self.update(*arg)
            elif not self.bounded:  # a bounded input has no watermark before its end
                self.advance(to_micros(arg))
        if self.bounded:
            self.end_bounded()
        else:
            self.advance(END_OF_INPUT_MICROS)
        return self

    # -- save_state: the snapshot set --------------------------------------------------------------
    def settings(self) -> dict:
        """What ``StatefulInference`` puts in a snapshot's manifest besides the model."""
        sc = self.sc
        return {"num_shards": sc.num_shards, "window_size": float(sc.window), "allowed_lateness": float(sc.lateness),
                "ttl": None if sc.ttl is None else float(sc.ttl), "dedupe_horizon": float(sc.horizon),
                "next_fields": list(sc.next_fields)}

    def write_snapshot(self, root: str) -> dict | None:
        """Write the kept shard snapshots as ``WriteSnapshot`` does (shard files, then the manifest); returns the
        manifest. No shard snapshot (no input reached any shard): nothing, as ``ToList().without_defaults()``."""
        if not self.snapshots:
            return None
        base = WriteSnapshot(root, self.spec, self.settings()).base
        listed = [e for s in sorted(self.snapshots) for e in _WriteShard(root).process((s, self.snapshots[s]))]
        (path,) = list(_WriteManifest(root, base).process(listed))
        with open(path) as f:
            return json.load(f)

    def snapshot_contents(self) -> dict:
        """Each kept shard snapshot's head and tables, in plain values and in row order."""
        out = {}
        for s, blob in sorted(self.snapshots.items()):
            head, parts = unpack(blob)
            out[s] = {"head": head, **{n: (parts[n].schema.to_string(), _canon_rows(parts[n].to_pylist()))
                                       for n in PARTS}}
        return out

    # -- results ---------------------------------------------------------------------------------
    def rebuilt(self, shard: int) -> dict | None:
        st = self.shards[shard]
        if not st.log:
            return None
        store, _ = ShardStore.from_log(list(st.log), self.step._model, keep_last_output=self.step.keep_last_output,
                                       default_path=self.step.model_path)
        return store.lasting()

    def result(self) -> dict:
        r = {"outputs": sorted(self.outputs, key=repr), "dead": sorted(self.dead, key=repr),
             "stores": {s: self.rebuilt(s) for s in self.shards}, "dropped": self.dropped}
        if self.save_state:
            r["snapshots"] = self.snapshot_contents()
        return r


def runs_in_every_mode(model_path: str, sc: Scenario, *, fail_every: int = 3, fail_in: dict | None = None,
                       **kw) -> dict[str, Harness]:
    """The scenario run warm (checking warm == rebuilt after every flush), cold, and failed-then-retried on this
    worker (retry-warm) or another (retry-cold). The retry modes fail after every ``fail_every``-th state write
    of the clean run's count (0: none) and as ``fail_in`` says; the failures are asserted to have happened where
    anything was written. ``kw``: the other :class:`Harness` options, the same in every mode."""
    clean = Harness(model_path, sc, mode="warm", **kw).run()
    fails = range(1, clean.w.n + 1, fail_every) if fail_every else ()
    out = {"warm": clean, "cold": Harness(model_path, sc, mode="cold", **kw).run()}
    for mode in ("retry-warm", "retry-cold"):
        h = Harness(model_path, sc, mode=mode, fail_at=fails, fail_in=fail_in, **kw).run()
        assert h.w.failed > 0 or clean.w.n == 0, mode
        out[mode] = h
    return out


def snapshot_files(root: str) -> dict[str, bytes]:
    """Every file of a snapshot set (the manifest and each listed shard file), by path under ``root``."""
    with open(os.path.join(root, MANIFEST), "rb") as f:
        raw = f.read()
    out = {MANIFEST: raw}
    for s in json.loads(raw)["shards"]:
        for rel in s["files"].values():
            with open(os.path.join(root, rel), "rb") as f:
                out[rel] = f.read()
    return out


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


def _canon_rows(rows: list) -> list:
    return [tuple(sorted((k, _plain(v)) for k, v in r.items())) for r in rows]


def _plain(v):
    if isinstance(v, float):
        return round(v, 9) if np.isfinite(v) else repr(v)
    if isinstance(v, list):
        return tuple(_plain(x) for x in v)
    if isinstance(v, pa.Scalar):
        return _plain(v.as_py())
    return v
