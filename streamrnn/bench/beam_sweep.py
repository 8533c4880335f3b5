"""Key-count sweep of the stateful step's flush: does its cost follow the keys touched or the keys held?

Below Beam, through the code the ``ShardStep`` DoFn runs: a :class:`~streamrnn.beam.step.stateful.ShardStep`
(set up as a worker would) is given in-memory stand-ins for its Beam state and timer, and
its flush timer (``on_flush``: apply, pairing, TTL, one delta of the shard store, outputs)
is called once per event-time window, as the runner calls it. Event blocks come from the real ``Intake``.

For each key count N (one shard holding N keys, the job's configuration: next-token
postprocess, ``logprob`` paired with the next event, last outputs kept):

* populate: one flush with one event for each of the N keys;
* then ``flushes`` windows, each with the same ``keys_per_flush x events_per_key`` events
  on keys drawn at random from the N. Flushes of the different N are interleaved round
  by round, so a change of machine load hits every N alike;
* per flush: seconds (median), events/s, and the state bytes it wrote (the delta's size:
  what the ``state_bytes_written`` counter and ``flush_state_bytes`` distribution count);
* for context: a compaction (one full snapshot), its cost amortised over the flushes
  between compactions (by the store's own ``should_compact`` rule), and a cache-miss
  rebuild from the log (up to ``rebuild_max_keys``: today's rebuild is quadratic in held
  rows).
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from apache_beam.utils.timestamp import Timestamp


class _Bag:
    """Stands in for Beam's ``BagState``."""

    def __init__(self) -> None:
        self.items: list[bytes] = []

    def read(self):
        return iter(list(self.items))

    def add(self, v: bytes) -> None:
        self.items.append(v)

    def clear(self) -> None:
        self.items = []


class _Value:
    """Stands in for Beam's ``ReadModifyWriteState``."""

    def __init__(self) -> None:
        self.v = None

    def read(self):
        return self.v

    def write(self, v) -> None:
        self.v = v

    def clear(self) -> None:
        self.v = None


class _Timer:
    def set(self, ts) -> None:
        self.at = ts

    def clear(self) -> None:
        self.at = None


@dataclass
class _Shard:
    """One ShardStep holding ``n_keys`` keys, with its state stand-ins and its measurements."""

    n_keys: int
    step: object
    pending: _Bag = field(default_factory=_Bag)
    log: _Bag = field(default_factory=_Bag)
    ctrl: _Value = field(default_factory=_Value)
    timer: _Timer = field(default_factory=_Timer)
    seconds: list[float] = field(default_factory=list)
    bytes_written: list[int] = field(default_factory=list)
    log_rows_added: list[int] = field(default_factory=list)
    compactions: int = 0
    outputs: int = 0

    def flush(self, blob: bytes, rel: int) -> float:
        """Buffer one window's block as ``process`` does, then fire the flush timer at its release time."""
        self.pending.add(blob)
        rows_before = self._store_peek().log.rows if self.log.items else 0
        t0 = time.perf_counter()
        out = list(self.step.on_flush(key=0, fire=Timestamp(micros=rel), pending=self.pending, log_state=self.log,
                                      ctrl_state=self.ctrl, flush_timer=self.timer))
        dt = time.perf_counter() - t0
        self.outputs += sum(v.value.num_rows for v in out if hasattr(v.value, "num_rows"))
        store = self._store_peek()
        if len(self.log.items) == 1 and rows_before:
            self.compactions += 1
        self.bytes_written.append(len(self.log.items[-1]))
        self.log_rows_added.append(store.log.rows - rows_before)
        return dt

    def _store_peek(self):
        from ..beam.step.store import CACHE

        store = CACHE.take(self.step.transform_id, 0, _ctrl_token(self.ctrl))
        if store is None:
            raise RuntimeError("bench sweep: the shard's cached store was not valid after a flush")
        CACHE.put(self.step.transform_id, 0, store, self.step.cache_bytes)
        return store


def _flushes_to_compaction(store, rows: float, nbytes: float, limit: int = 1_000_000) -> int:
    """How many more flushes like these until ``store.should_compact()`` (just after a compaction).

    Uses the store's own rule on its own log counters, advanced as these flushes would; the
    live rows are held fixed, so the estimate errs early (the ids a flush applies also grow
    the live state).
    """
    n = 0
    while not store.should_compact() and n < limit:
        store.log.rows += rows
        store.log.bytes += nbytes
        n += 1
    return n


def _ctrl_token(ctrl: _Value) -> str | None:
    import json

    return json.loads(ctrl.v)["token"] if ctrl.v else None


def _step(model: str, window_micros: int, ttl: float | None):
    """A ShardStep configured as the next-token job configures it (one shard), set up as on a worker."""
    from ..beam.models import load_model
    from ..beam.postprocess import NextTokenPostprocess
    from ..beam.step.apply import Config
    from ..beam.step.stateful import ShardStep
    from ..model.runtime import CPU

    spec = load_model(model, [CPU]).spec
    cfg = Config(ttl=ttl, size=window_micros, lateness=0, max_steps=256, max_batch=4096, tokens=True,
                 n_features=0, postprocess=NextTokenPostprocess(5))
    step = ShardStep(transform_id=f"bench-sweep-{uuid.uuid4().hex}", model_path=model, spec_json=spec.to_json(),
                     num_shards=1, cfg=cfg, dedupe_horizon=3600 * 1_000_000, keep_last_output=True,
                     output="arrow", providers=[CPU], flush_all=False, next_fields=("logprob",),
                     fault_injector=None)
    step.setup()
    return step


def _block(keys: np.ndarray, seqs: np.ndarray, ts: np.ndarray, tokens: np.ndarray, window_micros: int):
    """One window's events through the real Intake: (IPC blob, release micros)."""
    from ..beam.step.intake import EVENTS, Intake

    ik = Intake(tokens=True, vocab=256, n_features=0, num_shards=1, size_micros=window_micros, lateness_micros=0)
    ik.setup()
    ik.start_bundle()
    batch = pa.RecordBatch.from_pydict({"key": pa.array(keys.tolist(), pa.string()), "ts": pa.array(ts),
                                        "seq": pa.array(seqs), "x": pa.array(tokens)})
    dead = list(ik.process(batch))
    if dead:
        raise RuntimeError(f"bench sweep: Intake rejected {len(dead)} generated events")
    out = list(ik.finish_bundle())
    if len(out) != 1:
        raise RuntimeError(f"bench sweep: expected one block per window, got {len(out)}")
    _shard, (kind, blob) = out[0].value
    if kind != EVENTS:
        raise RuntimeError("bench sweep: Intake emitted a non-event payload")
    return blob, out[0].timestamp.micros


def _window_events(rng, n_keys: int, w: int, keys_per_flush: int, per_key: int, window: float, corpus):
    """``keys_per_flush`` random keys of ``n_keys``, ``per_key`` events each, inside window ``w``."""
    k = keys_per_flush
    chosen = rng.choice(n_keys, k, replace=False)
    names = np.array([f"key-{i:06d}" for i in chosen], dtype=object)
    keys = np.repeat(names, per_key)
    j = np.tile(np.arange(per_key), k)
    ts = w * window + (j + rng.uniform(0.0, 0.5, k * per_key)) * (window / (per_key + 1))
    seqs = (w * 64 + j).astype(np.int64)
    tokens = corpus[rng.integers(0, len(corpus), k * per_key)].astype(np.int64)
    return keys, seqs, ts, tokens


def run(model: str, key_counts: list[int], *, keys_per_flush: int = 256, events_per_key: int = 4,
        flushes: int = 12, warmup: int = 2, window: float = 60.0, ttl: float | None = None,
        rebuild_max_keys: int = 10_000, seed: int = 0) -> dict:
    """The sweep (see the module doc); a JSON-able result."""
    from ..beam.job.io import DEMO_TEXT
    from ..beam.step.store import CACHE, ShardStore

    corpus = np.frombuffer(DEMO_TEXT.encode(), np.uint8)
    window_micros = round(window * 1_000_000)
    rng = np.random.default_rng(seed)
    base = 1_000_000  # window index of the first window (event time ~ 1.9 years after the epoch)
    shards: list[_Shard] = []
    populate: dict[int, float] = {}
    for n in key_counts:
        sh = _Shard(n, _step(model, window_micros, ttl))
        names = np.array([f"key-{i:06d}" for i in range(n)], dtype=object)
        blob, rel = _block(names, np.zeros(n, np.int64), np.full(n, base * window + 1.0),
                           corpus[rng.integers(0, len(corpus), n)].astype(np.int64), window_micros)
        populate[n] = sh.flush(blob, rel)
        sh.seconds.clear()
        sh.bytes_written.clear()
        sh.log_rows_added.clear()
        shards.append(sh)
    keys_per_flush = min(keys_per_flush, min(key_counts))  # the same events per flush for every N
    events = keys_per_flush * events_per_key
    for w in range(1, warmup + flushes + 1):
        for sh in shards:  # interleaved: round w of every N before round w + 1 of any
            blob, rel = _block(*_window_events(rng, sh.n_keys, base + w, keys_per_flush, events_per_key, window,
                                               corpus), window_micros)
            dt = sh.flush(blob, rel)
            if w > warmup:
                sh.seconds.append(dt)
            else:
                sh.bytes_written.pop()
                sh.log_rows_added.pop()
    out: dict = {"model": model, "keys_per_flush": keys_per_flush, "events_per_key": events_per_key,
                 "events_per_flush": events, "flushes_timed": flushes, "window_s": window, "ttl": ttl,
                 "by_keys": {}}
    for sh in shards:
        med = statistics.median(sh.seconds)
        r: dict = {"keys_held": sh.n_keys, "flush_seconds_median": med, "flush_seconds_all": sh.seconds,
                   "events_per_s": events / med, "populate_seconds": populate[sh.n_keys],
                   "state_bytes_per_flush_median": statistics.median(sh.bytes_written),
                   "state_bytes_per_flush_max": max(sh.bytes_written),
                   "compactions_during_timed_flushes": sh.compactions, "log_bytes": sum(map(len, sh.log.items)),
                   "log_entries": len(sh.log.items)}
        store = CACHE.take(sh.step.transform_id, 0, _ctrl_token(sh.ctrl))
        if sh.n_keys <= rebuild_max_keys:
            t0 = time.perf_counter()
            rebuilt, _ = ShardStore.from_log(list(sh.log.items), sh.step._model, keep_last_output=True,
                                             default_path=model)
            r["rebuild_seconds"] = time.perf_counter() - t0
            if len(rebuilt.op) != len(store.op):
                raise RuntimeError(f"bench sweep: rebuild restored {len(rebuilt.op)} keys, expected {len(store.op)}")
            del rebuilt
        else:
            r["rebuild_seconds"] = None
            r["rebuild_skipped"] = (f"more than {rebuild_max_keys} keys: store.rebuild slices held rows out of a "
                                    "table with one chunk per row (quadratic; see docs/bench.md)")
        t0 = time.perf_counter()
        full, _ = store.delta(compact=True)
        r["compaction_seconds"] = time.perf_counter() - t0
        r["compaction_bytes"] = len(full)
        between = _flushes_to_compaction(store, statistics.mean(sh.log_rows_added),
                                         statistics.median(sh.bytes_written))
        r["flushes_between_compactions_est"] = between
        r["events_per_s_amortized"] = events / (med + r["compaction_seconds"] / between)
        out["by_keys"][str(sh.n_keys)] = r
        del store, full
    lo, hi = str(min(key_counts)), str(max(key_counts))
    out["ratio_max_over_min_keys"] = out["by_keys"][hi]["events_per_s"] / out["by_keys"][lo]["events_per_s"]
    out["ratio_max_over_min_keys_amortized"] = (out["by_keys"][hi]["events_per_s_amortized"]
                                                / out["by_keys"][lo]["events_per_s_amortized"])
    # the same ratio per round (flushes of one round ran back to back), then the median: robust to load drift
    t_lo, t_hi = out["by_keys"][lo]["flush_seconds_all"], out["by_keys"][hi]["flush_seconds_all"]
    out["ratio_max_over_min_keys_paired"] = statistics.median(a / b for a, b in zip(t_lo, t_hi, strict=True))
    return out
