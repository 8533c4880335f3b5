"""The Beam layer's counters and distributions (namespace ``streamrnn``), defined once.

Runners report them natively (Dataflow monitoring, Flink's metric reporters). Each event
counted here also feeds the matching Prometheus metric of :mod:`streamrnn.metrics.catalogue` (one
place for both), and creating :class:`Counters` in ``DoFn.setup()`` starts the worker's
``/metrics`` exporter once per process when the environment asks for one
(:func:`streamrnn.metrics.export.exporter_from_env`).
"""

from __future__ import annotations

import logging
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from ...metrics.catalogue import Recorder, guarded, recorder
from ...metrics.export import exporter_from_env, exporter_settings, prometheus_on

NAMESPACE = "streamrnn"

#: Dead-letter kinds; each has a counter of the same name and adds to ``dead_letters``.
DEAD_KINDS = ("invalid", "late", "duplicate", "error")
_DEAD_COUNTER = {"invalid": "invalid", "late": "late", "duplicate": "duplicates", "error": "errors"}

#: Beam counter name -> Prometheus counter it mirrors (job-labelled).
_MIRROR = {"events_in": "streamrnn_events_in_total", "flushes": "streamrnn_flushes_total",
           "expired": "streamrnn_expired_keys_total", "model_update_resets": "streamrnn_model_update_resets_total",
           "model_switches": "streamrnn_model_switches_total", "state_compactions": "streamrnn_state_compactions_total",
           "state_rebuilds": "streamrnn_state_rebuilds_total",
           "state_bytes_written": "streamrnn_state_written_bytes_total",
           "health_resets": "streamrnn_health_resets_total"}

log = logging.getLogger("streamrnn.metrics")


class _Mirrored:
    """A Beam counter whose increments also go to a job-labelled Prometheus counter."""

    def __init__(self, name: str, rec: Recorder | None):
        self.beam = Metrics.counter(NAMESPACE, name)
        self.rec, self.prom = rec, _MIRROR.get(name)

    def inc(self, n: int = 1) -> None:
        self.beam.inc(n)
        if self.rec is not None and self.prom is not None:
            guarded(self.rec.inc, self.prom, n)


def _recorder() -> Recorder | None:
    if not prometheus_on():
        return None
    try:
        exporter_from_env()
        return recorder(exporter_settings()[2])
    except Exception as e:  # metrics must never crash a pipeline: Beam counters still count
        log.error("streamrnn metrics: Prometheus metrics off in this process (%s: %s)", type(e).__name__, e)
        return None


class Counters:
    """Create inside ``setup()``; cheap to create."""

    def __init__(self) -> None:
        self.prom = rec = _recorder()

        def c(n: str) -> _Mirrored:
            return _Mirrored(n, rec)

        self.events_in = c("events_in")
        self.events = Metrics.counter(NAMESPACE, "events_applied")
        self.batches = Metrics.counter(NAMESPACE, "batches")
        self.flushes = c("flushes")
        self.expired = c("expired")
        self.model_resets = c("model_update_resets")
        self.model_switches = c("model_switches")
        self.compactions = c("state_compactions")
        self.rebuilds = c("state_rebuilds")
        self.state_bytes_written = c("state_bytes_written")
        self.health_resets = c("health_resets")
        self._dead = {k: Metrics.counter(NAMESPACE, v) for k, v in _DEAD_COUNTER.items()}
        self._dead_total = Metrics.counter(NAMESPACE, "dead_letters")
        self.batch_latency = Metrics.distribution(NAMESPACE, "batch_latency_us")
        self.batch_size = Metrics.distribution(NAMESPACE, "batch_size")
        self.flush_state_bytes = Metrics.distribution(NAMESPACE, "flush_state_bytes")
        self.online_scored = Metrics.counter(NAMESPACE, "online_scored")
        self.online_loss_micronats = Metrics.counter(NAMESPACE, "online_loss_micronats")

    def dead(self, kind: str, n: int = 1) -> None:
        self._dead[kind].inc(n)
        self._dead_total.inc(n)
        if self.prom is not None:
            guarded(self.prom.dead, kind, n)

    # -- calls that carry the model (its labels: name, version, task, provider) ----------------
    def model_loaded(self, model: Any, requested: Any) -> None:
        """A worker loaded ``model`` asking for ``requested`` providers: the info gauges."""
        if self.prom is not None:
            guarded(self.prom.bind, model, requested)

    def batch(self, model: Any, seconds: float, events: int) -> None:
        """One model call of ``events`` events that took ``seconds``."""
        self.batch_latency.update(int(seconds * 1e6))
        self.batches.inc()
        self.batch_size.update(events)
        if self.prom is not None:
            guarded(self.prom.batch, model, seconds, events)

    def applied(self, model: Any, n: int) -> None:
        self.events.inc(n)
        if self.prom is not None:
            guarded(self.prom.applied, model, n)

    def scored(self, model: Any, outputs: dict[str, np.ndarray]) -> None:
        """Online quality from a postprocess's outputs: its ``logprob`` column (nats; NaN = not scored)."""
        lp = outputs.get("logprob")
        if lp is None:
            return
        lp = np.asarray(lp, np.float64)
        ok = np.isfinite(lp)
        n = int(ok.sum())
        if n:
            self.online_scored.inc(n)
            self.online_loss_micronats.inc(round(float(-lp[ok].sum()) * 1e6))
            if self.prom is not None:
                guarded(self.prom.scored, model, lp,
                        {c: outputs[c] for c in ("abs_err", "in_80", "in_95") if c in outputs})

    def shard_state(self, shard: Any, store: Any) -> None:
        """After a flush: the shard's active keys and their state bytes (process gauges)."""
        if self.prom is not None:
            guarded(self._shard_state, shard, store)

    def _shard_state(self, shard: Any, store: Any) -> None:
        from ...metrics.catalogue import state_bytes_per_key

        keys = len(store.op)
        self.prom.shard_state(shard, keys, keys * state_bytes_per_key(store.op.model), store.op.bad_health_keys())


class CountUnread(beam.DoFn):
    """Passes the dead letters of rows the reader could not read, counting each as an input row and a dead letter.

    Rows that fail before the transform's intake (bad JSON, an unreadable Parquet block)
    are counted here, so ``events_in`` and ``dead_letters`` cover every input row.
    """

    def setup(self) -> None:
        self.m = Counters()

    def process(self, dead: Any):
        self.m.events_in.inc()
        self.m.dead(dead.kind if dead.kind in DEAD_KINDS else "invalid")
        yield dead
