"""The metric catalogue: every Prometheus metric streamrnn reports, defined once.

Names follow Prometheus conventions (snake_case, base units, ``_total`` counters, help
text on each). Labels have bounded cardinality: ``job``, ``model``, ``model_version``,
``task``, ``provider`` and ``reason``; never a stream key. The Beam layer mirrors its
counters here (:mod:`streamrnn.beam.step.counters`); operator-API users get the same metrics by
passing a registry to :class:`streamrnn.metrics.operator.MeteredOperator`. Exporting
(HTTP ``/metrics``, multiprocess, Pushgateway) is in :mod:`streamrnn.metrics.export`.

Forecast-only metrics (``tasks=("forecast",)``) are created for forecast models only: a byte
LM's job exports no interval coverage at 0.

**Active keys in multiprocess mode.** A runner may move a shard between live processes (the
DirectRunner's ``multi_processing`` mode sends a shard's timers to its workers in turn). Each
process then writes its last report of each shard to the multiprocess directory (internal
gauges ``streamrnn_shard_*`` with a ``shard`` label, mode ``mostrecent``), and the serving
process exposes, per job, the sum over shards of each shard's most recent report
(:func:`streamrnn.metrics.export.serving_registry`): what is held now, never a stale report of
a process the shard has left. The ``shard`` label is never exposed.

Histogram buckets: ORT batch calls of the shipped 2x512 char LSTM measured 0.4 ms (one
event) to ~1 s (long text records, 256-step segments of many keys) on a 2-core CPU, so the
buckets span 0.25 ms .. 10 s, about three per decade.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

log = logging.getLogger("streamrnn.metrics")

JOB = ("job",)
MODEL = ("job", "model", "model_version", "task", "provider")
DEAD = ("job", "reason")
#: the market job's live scores of every horizon (after the model: the version comes from its output rows)
HORIZON = ("job", "model_version", "horizon")
#: The bounded values of the ``reason`` label (dead-letter kinds).
REASONS = ("invalid", "late", "duplicate", "error")

LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EVENT_LATENCY_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01,
                         0.025, 0.05)
BATCH_EVENTS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class MetricDef:
    """One catalogued metric. ``name`` is the exposed name (counters end in ``_total``)."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None
    #: gauges only: how values of several processes combine under PROMETHEUS_MULTIPROC_DIR
    mode: str | None = None
    #: the model tasks whose jobs export it (MODEL-labelled metrics); None: every task
    tasks: tuple[str, ...] | None = None


CATALOGUE: tuple[MetricDef, ...] = (
    MetricDef("streamrnn_events_in_total", "counter",
              "Input events received: by the intake, or dead-lettered by the reader (valid or not).", JOB),
    MetricDef("streamrnn_events_applied_total", "counter", "Events applied to key state by the model.", MODEL),
    MetricDef("streamrnn_batches_total", "counter", "Model (ONNX Runtime) calls.", MODEL),
    MetricDef("streamrnn_batch_latency_seconds", "histogram", "Wall time of one model call (a batch of events).",
              MODEL, LATENCY_BUCKETS),
    MetricDef("streamrnn_event_latency_seconds", "histogram",
              "Model time per event: a call's wall time divided by its events, observed once per call.",
              MODEL, EVENT_LATENCY_BUCKETS),
    MetricDef("streamrnn_batch_events", "histogram", "Events in one model call.", MODEL, BATCH_EVENTS_BUCKETS),
    MetricDef("streamrnn_flushes_total", "counter", "Shard flushes (timer firings that apply due events).", JOB),
    MetricDef("streamrnn_dead_letters_total", "counter",
              "Events sent to dead letters, by reason (invalid, late, duplicate, error).", DEAD),
    MetricDef("streamrnn_expired_keys_total", "counter", "Key states dropped after the idle TTL (event time).", JOB),
    MetricDef("streamrnn_model_switches_total", "counter",
              "Model updates a shard took into use, each once, whether or not its events used it.", JOB),
    MetricDef("streamrnn_model_update_resets_total", "counter",
              "Key states restarted because an update's state layout differed.", JOB),
    MetricDef("streamrnn_state_compactions_total", "counter", "Shard state logs rewritten as one full snapshot.", JOB),
    MetricDef("streamrnn_state_rebuilds_total", "counter",
              "Shard states rebuilt from the runner's state (cache miss: new worker, retry).", JOB),
    MetricDef("streamrnn_state_written_bytes_total", "counter", "Bytes of state deltas written to runner state.",
              JOB),
    MetricDef("streamrnn_active_keys", "gauge",
              "Keys holding recurrent state: the sum over shards of each shard's latest report.", JOB,
              mode="livesum"),
    MetricDef("streamrnn_state_bytes", "gauge", "Bytes of recurrent state held for the active keys.", JOB,
              mode="livesum"),
    MetricDef("streamrnn_health_bad_keys", "gauge",
              "Keys whose carried state is in bad health (state_health above 1 + bad_margin at their last event; "
              "0 with health off): the sum over shards of each shard's latest report.", JOB, mode="livesum"),
    MetricDef("streamrnn_health_resets_total", "counter",
              "Key states replaced by their fresh shadow's state (health='heal': reset='health').", JOB),
    MetricDef("streamrnn_model_info", "gauge", "1 for each model a worker has loaded, with the provider in use.",
              MODEL, mode="livemax"),
    MetricDef("streamrnn_cuda_expected", "gauge",
              "1 where CUDA was requested, or 'auto' was requested and ONNX Runtime offers CUDA; else 0.",
              JOB, mode="livemax"),
    MetricDef("streamrnn_online_loss_nats_total", "counter",
              "Online next-event loss: sum of -log p(actual event) in nats over scored events.", MODEL),
    MetricDef("streamrnn_online_scored_events_total", "counter",
              "Events scored online (the model had predicted them: not the first of a stream).", MODEL),
    MetricDef("streamrnn_online_abs_error_percent_total", "counter",
              "Forecasts: absolute error of the median (realised minus median) in percentage points of log return "
              "(one step ahead), summed over scored events.",
              MODEL, tasks=("forecast",)),
    MetricDef("streamrnn_online_in_interval_80_total", "counter",
              "Forecasts: scored events whose realised value fell inside the previous 80% interval.", MODEL,
              tasks=("forecast",)),
    MetricDef("streamrnn_online_in_interval_95_total", "counter",
              "Forecasts: scored events whose realised value fell inside the previous 95% interval.", MODEL,
              tasks=("forecast",)),
    MetricDef("streamrnn_forecast_scored_total", "counter",
              "Forecasts: h-bar-ahead forecasts scored when their h-th bar arrived (not across a corporate-action "
              "jump), by horizon.", HORIZON, tasks=("forecast",)),
    MetricDef("streamrnn_forecast_loss_nats_total", "counter",
              "Forecasts: negative log density in nats of the realised h-bar % log return under its forecast, "
              "summed over scored forecasts, by horizon.", HORIZON, tasks=("forecast",)),
    MetricDef("streamrnn_forecast_abs_error_percent_total", "counter",
              "Forecasts: absolute error of the h-bar median (realised minus median) in percentage points of log "
              "return, summed over scored forecasts, by horizon.", HORIZON, tasks=("forecast",)),
    MetricDef("streamrnn_forecast_in_interval_total", "counter",
              "Forecasts: scored h-bar forecasts whose realised return fell inside the central interval of that "
              "level, raw (the model's) or calibrated (ACI), by horizon.", (*HORIZON, "level", "calibration"),
              tasks=("forecast",)),
    MetricDef("streamrnn_forecast_var_breaches_total", "counter",
              "Forecasts: scored h-bar forecasts whose realised loss exceeded the value at risk of that tail "
              "probability, raw or calibrated (ACI), by horizon.", (*HORIZON, "tail", "calibration"),
              tasks=("forecast",)),
    MetricDef("streamrnn_model_reference_loss_nats", "gauge",
              "The model's training-time validation loss per scored event in nats, what the online loss is "
              "compared with (from its metadata).",
              ("job", "model", "model_version", "task"), mode="livemax"),
)

BY_NAME: dict[str, MetricDef] = {d.name: d for d in CATALOGUE}

#: multiprocess mode: catalogued gauge -> the internal per-shard gauge whose latest report per shard is summed
SHARD_GAUGES = {"streamrnn_active_keys": "streamrnn_shard_active_keys",
                "streamrnn_state_bytes": "streamrnn_shard_state_bytes",
                "streamrnn_health_bad_keys": "streamrnn_shard_health_bad_keys"}


def exported_for(d: MetricDef, task: str) -> bool:
    """Whether a job whose model has ``task`` exports ``d``."""
    return d.tasks is None or task in d.tasks


def reference_loss_nats(spec: Any) -> float | None:
    """The training-time validation loss per scored event in nats that the online loss is compared with.

    * ``lm``: ``metrics["val_nats_per_char"]`` (next byte, what the job scores online);
    * ``forecast``: the one-bar-ahead validation NLL, the horizon the job scores online:
      ``metrics["val_nll_h1"]`` if the export wrote it, else horizon 1 of ``val_nll_h`` in the
      training history at ``best_step`` (the weights exported), else ``metrics["val_nll"]`` when the
      model has one horizon. ``val_nll`` itself averages every horizon (1.789 nats at h1 and 2.291
      over h1..h5 for the shipped ``market``), so it is not the reference of a multi-horizon model.

    None when the metadata has no such figure.
    """
    import json

    metrics = spec.metrics if isinstance(spec.metrics, Mapping) else {}
    training = spec.training if isinstance(spec.training, Mapping) else {}

    def finite(v: Any) -> float | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return float(v) if ok else None

    if spec.task == "lm":
        return finite(metrics.get("val_nats_per_char"))
    if spec.task != "forecast":
        return None
    got = finite(metrics.get("val_nll_h1"))
    if got is not None:
        return got
    try:
        history = training.get("history")
        history = json.loads(history) if isinstance(history, str) else history
        best = [h for h in history or () if isinstance(h, Mapping) and h.get("step") == training.get("best_step")]
        if best and best[-1].get("val_nll_h"):
            return finite(best[-1]["val_nll_h"][0])
    except (TypeError, ValueError):  # metadata of another shape: no reference
        pass
    forecast = training.get("forecast")
    if isinstance(forecast, Mapping) and forecast.get("horizons") == 1:
        return finite(metrics.get("val_nll"))
    return None


def provider_label(provider: str) -> str:
    """``CUDAExecutionProvider`` -> ``CUDA`` (the ``provider`` label's values)."""
    return provider[:-len("ExecutionProvider")] if provider.endswith("ExecutionProvider") else provider


def model_labels(model: Any, job: str) -> dict[str, str]:
    """The MODEL label values for a loaded :class:`streamrnn.model.loaded.Model`."""
    spec = model.spec
    return {"job": job, "model": spec.name, "model_version": f"{spec.name}-{spec.version}+{spec.fingerprint[:8]}",
            "task": spec.task, "provider": provider_label(model.provider)}


def state_bytes_per_key(model: Any) -> int:
    """Bytes of recurrent state one key holds (the model's state tensors without the batch axis)."""
    total = 0
    for s in model.spec.state:
        n = 1
        for d in s.shape:
            if d != "batch":
                n *= int(d)
        total += n * np.dtype(s.dtype).itemsize
    return total


def cuda_expected(requested: Any) -> bool:
    """Whether the provider request means CUDA should be in use (see ``streamrnn_cuda_expected``)."""
    text = requested if isinstance(requested, str) else " ".join(str(p) for p in (requested or ()))
    if "cuda" in text.lower():
        return True
    if text == "auto":
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    return False


class Catalogue:
    """The catalogue's metrics registered in one registry (create once per registry)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.m: dict[str, Any] = {}
        for d in CATALOGUE:
            base = d.name[:-len("_total")] if d.kind == "counter" else d.name
            if d.kind == "counter":
                self.m[d.name] = Counter(base, d.help, d.labels, registry=registry)
            elif d.kind == "gauge":
                self.m[d.name] = Gauge(base, d.help, d.labels, registry=registry, multiprocess_mode=d.mode or "all")
            else:
                self.m[d.name] = Histogram(base, d.help, d.labels, registry=registry, buckets=d.buckets)

    def __getitem__(self, name: str) -> Any:
        return self.m[name]


_CATALOGUES: dict[int, Catalogue] = {}
_LOCK = threading.RLock()


def catalogue(registry: CollectorRegistry | None = None) -> Catalogue:
    """The catalogue registered in ``registry`` (default: prometheus_client's global REGISTRY), made once."""
    if registry is None:
        from prometheus_client import REGISTRY

        from .export import multiprocess_ready

        multiprocess_ready()
        registry = REGISTRY
    with _LOCK:
        cat = _CATALOGUES.get(id(registry))
        if cat is None or cat.registry is not registry:
            cat = _CATALOGUES[id(registry)] = Catalogue(registry)
        return cat


class _Guard:
    """Metrics never crash the caller: a failing update is logged once and then ignored."""

    failed = False

    @classmethod
    def run(cls, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # a metrics failure must not fail a pipeline
            if not cls.failed:
                cls.failed = True
                log.error("streamrnn metrics: an update failed (%s: %s); metrics may be incomplete",
                          type(e).__name__, e)


class Recorder:
    """Records the catalogue's events for one job into one registry's catalogue.

    The Beam counters and :class:`~streamrnn.metrics.operator.MeteredOperator` both report
    through this, so each event is counted in one place.
    """

    def __init__(self, job: str, registry: CollectorRegistry | None = None):
        self.job = job
        self.cat = catalogue(registry)
        self.multiprocess = values.ValueClass is not values.MutexValue
        self._models: dict[int, tuple[Any, dict[str, Any]]] = {}
        self._shards: dict[Any, tuple[int, int]] = {}
        self._lock = threading.Lock()
        j = self.cat
        self.job_children = {n: j[n].labels(job=job) for n, d in BY_NAME.items()
                             if d.labels == JOB and not (self.multiprocess and n in SHARD_GAUGES)}
        self.dead_children = {r: j["streamrnn_dead_letters_total"].labels(job=job, reason=r) for r in REASONS}
        #: multiprocess mode: per-shard gauges (not in any registry: their values go to the multiprocess files)
        self._shard_gauges = None if not self.multiprocess else tuple(
            Gauge(SHARD_GAUGES[n], f"Per shard, its latest report (internal; served summed as {n}).",
                  ("job", "shard"), registry=None, multiprocess_mode="mostrecent") for n in SHARD_GAUGES)

    # -- model-labelled -------------------------------------------------------------------
    def bind(self, model: Any, requested: Any = None) -> dict[str, Any]:
        """The model's label children (made on first use; info gauges set then)."""
        got = self._models.get(id(model))
        if got is not None and got[0] is model:
            return got[1]
        labels = model_labels(model, self.job)
        kids = {n: self.cat[n].labels(**labels) for n, d in BY_NAME.items()
                if d.labels == MODEL and exported_for(d, model.spec.task)}
        ref = reference_loss_nats(model.spec)
        self.cat["streamrnn_model_info"].labels(**labels).set(1)
        if ref is not None:
            self.cat["streamrnn_model_reference_loss_nats"].labels(
                **{k: labels[k] for k in ("job", "model", "model_version", "task")}).set(ref)
        if requested is not None:
            self.job_children["streamrnn_cuda_expected"].set(int(cuda_expected(requested)))
        with self._lock:
            self._models[id(model)] = (model, kids)
        from .export import await_first_scrape

        await_first_scrape(f"model {labels['model_version']}")  # its series at 0 before anything is counted
        return kids

    def batch(self, model: Any, seconds: float, events: int) -> None:
        kids = self.bind(model)
        kids["streamrnn_batches_total"].inc()
        kids["streamrnn_batch_latency_seconds"].observe(seconds)
        kids["streamrnn_batch_events"].observe(events)
        if events:
            kids["streamrnn_event_latency_seconds"].observe(seconds / events)

    def applied(self, model: Any, n: int) -> None:
        if n:
            self.bind(model)["streamrnn_events_applied_total"].inc(n)

    def scored(self, model: Any, logprob: np.ndarray, forecast: dict[str, np.ndarray] | None = None) -> None:
        """Online quality: ``logprob`` (natural log, NaN where unscored) of the events as they arrived.

        ``forecast`` (forecast tasks) holds ``abs_err``, ``in_80`` and ``in_95`` per event, NaN where
        unscored: the previous forecast against the value that arrived.
        """
        lp = np.asarray(logprob, np.float64)
        ok = np.isfinite(lp)
        n = int(ok.sum())
        if n:
            kids = self.bind(model)
            kids["streamrnn_online_loss_nats_total"].inc(float(-lp[ok].sum()))
            kids["streamrnn_online_scored_events_total"].inc(n)
        for col, name in (("abs_err", "streamrnn_online_abs_error_percent_total"),
                          ("in_80", "streamrnn_online_in_interval_80_total"),
                          ("in_95", "streamrnn_online_in_interval_95_total")):
            v = None if forecast is None else forecast.get(col)
            kid = self.bind(model).get(name) if v is not None else None
            if kid is not None:
                v = np.asarray(v, np.float64)
                total = float(v[np.isfinite(v)].sum())
                if total:
                    kid.inc(total)

    def forecast_horizons(self, model_version: str, sums: np.ndarray, levels: Sequence[str],
                          tails: Sequence[str]) -> None:
        """The market job's live scores of every horizon: ``sums [H, 3 + 2 L + 2 P]`` per horizon scored
        forecasts, NLL (nats), absolute error (%), raw then calibrated hits per level (``levels``: their labels,
        e.g. ``"80"``), raw then calibrated VaR breaches per tail (``tails``: ``"1"``, ...); see
        :func:`streamrnn.forecast.calibrate_step.score_sums`."""
        c = self.cat
        L, P = len(levels), len(tails)
        for h, row in enumerate(np.asarray(sums, np.float64).tolist(), 1):
            lab = {"job": self.job, "model_version": model_version, "horizon": str(h)}
            for i, name in enumerate(("streamrnn_forecast_scored_total", "streamrnn_forecast_loss_nats_total",
                                      "streamrnn_forecast_abs_error_percent_total")):
                c[name].labels(**lab).inc(row[i])
            for k, lv in enumerate(levels):
                for how, j in (("raw", 3 + k), ("calibrated", 3 + L + k)):
                    c["streamrnn_forecast_in_interval_total"].labels(**lab, level=lv, calibration=how).inc(row[j])
            for k, p in enumerate(tails):
                for how, j in (("raw", 3 + 2 * L + k), ("calibrated", 3 + 2 * L + P + k)):
                    c["streamrnn_forecast_var_breaches_total"].labels(**lab, tail=p, calibration=how).inc(row[j])

    # -- job-labelled -------------------------------------------------------------------
    def inc(self, name: str, n: float = 1) -> None:
        if n:
            self.job_children[name].inc(n)

    def dead(self, reason: str, n: int = 1) -> None:
        self.dead_children[reason].inc(n)

    def shard_state(self, shard: Any, keys: int, nbytes: int, bad: int = 0) -> None:
        """A shard's (keys, bytes, keys in bad health) after a flush: the gauges are the sum over shards of each
        one's latest report.

        One process: the sum over this process's shards. Multiprocess mode: each report goes to the
        per-shard gauges (see the module notes), summed over every process's latest report per shard
        when served, so a shard that moved to another process is not counted twice.
        """
        if self._shard_gauges is not None:
            label = ":".join(map(str, shard)) if isinstance(shard, tuple) else str(shard)
            for g, v in zip(self._shard_gauges, (keys, nbytes, bad), strict=True):  # SHARD_GAUGES order
                g.labels(job=self.job, shard=label).set(v)
            return
        with self._lock:
            self._shards[shard] = (keys, nbytes, bad)
            sums = [sum(v[i] for v in self._shards.values()) for i in range(3)]
        for name, v in zip(SHARD_GAUGES, sums, strict=True):
            self.job_children[name].set(v)


_RECORDERS: dict[tuple[str, int], Recorder] = {}


def recorder(job: str, registry: CollectorRegistry | None = None, *, wait: bool = True) -> Recorder:
    """The process's :class:`Recorder` for ``job`` in ``registry`` (shared, so gauges sum over its shards).

    Made here for the first time, its series are at 0 and, with ``wait`` (and ``STREAMRNN_METRICS_WAIT``
    set), this waits for a scrape of them (:func:`streamrnn.metrics.export.await_first_scrape`).
    """
    cat = catalogue(registry)
    key = (job, id(cat.registry))
    with _LOCK:
        r = _RECORDERS.get(key)
        if r is not None and r.cat is cat:
            return r
        r = _RECORDERS[key] = Recorder(job, registry)
    if wait:
        from .export import await_first_scrape

        await_first_scrape(f"job {job}")  # its series at 0 before anything is counted
    return r


guarded = _Guard.run
