"""The metric catalogue, the Recorder, the exporter, multiprocess mode, Pushgateway push, the operator wrapper.

Every test uses its own CollectorRegistry (never the global one). The real-server test is
tests/test_metrics_prometheus.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import streamrnn
from streamrnn.beam.job.summary import live_line
from streamrnn.errors import InputError
from streamrnn.metrics.catalogue import (
    BY_NAME,
    CATALOGUE,
    LATENCY_BUCKETS,
    MODEL,
    REASONS,
    Recorder,
    cuda_expected,
    model_labels,
    provider_label,
    reference_loss_nats,
    state_bytes_per_key,
)
from streamrnn.metrics.export import (
    await_scrape,
    check_multiproc_dir,
    directory_registry,
    exporter_settings,
    start_exporter,
    totals,
)
from streamrnn.metrics.operator import MeteredOperator

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_LABELS = {"job", "model", "model_version", "task", "provider", "reason", "horizon", "level", "tail",
                  "calibration"}


@pytest.fixture(scope="module")
def model():
    return streamrnn.load(streamrnn.DEFAULT_MODEL, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def market():
    return streamrnn.load("shipped:market", providers=["CPUExecutionProvider"])


def _value(reg: CollectorRegistry, name: str, labels: dict) -> float | None:
    return reg.get_sample_value(name, labels)


# -- catalogue ------------------------------------------------------------------------------
def test_catalogue_follows_prometheus_conventions():
    names = [d.name for d in CATALOGUE]
    assert len(names) == len(set(names))
    for d in CATALOGUE:
        assert re.fullmatch(r"streamrnn_[a-z][a-z0-9_]*", d.name), d.name
        assert d.help.strip() and d.help.endswith("."), d.name
        assert (d.kind == "counter") == d.name.endswith("_total"), d.name
        assert set(d.labels) <= ALLOWED_LABELS and "key" not in d.labels, d.name
        if "latency" in d.name:
            assert d.name.endswith("_seconds") and d.kind == "histogram"
        if "bytes" in d.name:
            assert d.name.endswith(("_bytes", "_bytes_total"))
        if d.kind == "gauge":
            assert d.mode in ("livesum", "livemax"), d.name  # chosen per gauge, not the default "all"
        if d.kind == "histogram":
            assert list(d.buckets) == sorted(d.buckets) and len(d.buckets) >= 8


def test_every_catalogued_metric_is_exposed_with_its_help_and_type(model):
    reg = CollectorRegistry()
    rec = Recorder("j", reg)
    rec.bind(model, "cpu")
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    for d in CATALOGUE:
        base = d.name[:-len("_total")] if d.kind == "counter" else d.name
        assert base in fams, d.name
        assert fams[base].type == d.kind and fams[base].documentation == d.help


def test_model_labels_and_state_bytes_come_from_the_model(model):
    lab = model_labels(model, "j")
    spec = model.spec
    version = f"{spec.name}-{spec.version}+{spec.fingerprint[:8]}"
    assert lab == {"job": "j", "model": spec.name, "model_version": version, "task": spec.task, "provider": "CPU"}
    # independent: the bytes of one key's state as the model itself makes it
    st0 = model.initial_state(1)
    assert state_bytes_per_key(model) == sum(st0[n].nbytes for n in st0.names)
    assert provider_label("CUDAExecutionProvider") == "CUDA" and provider_label("Other") == "Other"


@pytest.mark.parametrize("requested, expected", [
    ("cuda", True), ("cuda:1", True), (["CUDAExecutionProvider"], True), (["CPUExecutionProvider"], False),
    ("cpu", False)])
def test_cuda_expected_from_the_request(requested, expected):
    assert cuda_expected(requested) is expected


def test_cuda_expected_for_auto_follows_what_onnxruntime_offers():
    import onnxruntime as ort

    assert cuda_expected("auto") is ("CUDAExecutionProvider" in ort.get_available_providers())


# -- the Recorder against independent arithmetic ---------------------------------------------
@settings(max_examples=25, deadline=None)
@given(calls=st.lists(st.tuples(st.floats(1e-6, 20.0), st.integers(0, 20000)), min_size=1, max_size=20),
       lps=st.lists(st.one_of(st.floats(-30.0, 0.0), st.just(float("nan"))), min_size=0, max_size=300))
def test_recorder_counts_match_numpy(model, calls, lps):
    reg = CollectorRegistry()
    rec = Recorder("j", reg)
    lab = model_labels(model, "j")
    for sec, n in calls:
        rec.batch(model, sec, n)
        rec.applied(model, n)
    rec.scored(model, np.array(lps))
    secs = np.array([c[0] for c in calls])
    ns = np.array([c[1] for c in calls])
    assert _value(reg, "streamrnn_batches_total", lab) == len(calls)
    assert _value(reg, "streamrnn_batch_latency_seconds_sum", lab) == pytest.approx(secs.sum())
    for le in LATENCY_BUCKETS:
        assert _value(reg, "streamrnn_batch_latency_seconds_bucket", {**lab, "le": str(le)}) == (secs <= le).sum()
    assert _value(reg, "streamrnn_events_applied_total", lab) == ns.sum()
    assert _value(reg, "streamrnn_batch_events_sum", lab) == ns.sum()
    assert _value(reg, "streamrnn_event_latency_seconds_count", lab) == (ns > 0).sum()
    arr = np.array(lps, np.float64)
    ok = np.isfinite(arr)
    scored = _value(reg, "streamrnn_online_scored_events_total", lab)
    assert scored == ok.sum()
    assert _value(reg, "streamrnn_online_loss_nats_total", lab) == pytest.approx(-arr[ok].sum(), abs=1e-9)


def test_forecast_quality_counters_score_the_previous_forecast_against_scipy(market):
    """ForecastPostprocess scores the previous one-bar-ahead Student-t forecast against the arriving return:
    |realised - median| and whether it fell inside the 80% / 95% intervals (reference: scipy.stats.t)."""
    scipy_t = pytest.importorskip("scipy.stats").t
    from streamrnn.beam.step.counters import Counters
    from streamrnn.forecast.beam import ForecastPostprocess

    rng = np.random.default_rng(0)
    n, df = 400, 4.0
    prev = {"mean": rng.normal(0, 0.5, (n, 5)).astype(np.float32),
            "log_scale": rng.normal(0, 0.3, (n, 5)).astype(np.float32)}
    x = np.zeros((n, 8), np.float32)
    x[:, 0] = prev["mean"][:, 0] + np.exp(prev["log_scale"][:, 0]) * rng.standard_t(df, n)  # drawn from each forecast
    x[:3, 7] = 1.0  # jumps: not scored
    out = ForecastPostprocess([df] * 5)(x, prev, prev)
    loc, scale = prev["mean"][:, 0].astype(np.float64), np.exp(prev["log_scale"][:, 0].astype(np.float64))
    r = x[:, 0].astype(np.float64)
    scored = np.ones(n, bool)
    scored[:3] = False
    for name, (lo, hi) in {"80": (0.10, 0.90), "95": (0.025, 0.975)}.items():
        want = (scipy_t.ppf(lo, df, loc, scale) <= r) & (r <= scipy_t.ppf(hi, df, loc, scale))
        assert np.array_equal(out[f"in_{name}"][scored] > 0.5, want[scored])
        assert np.isnan(out[f"in_{name}"][~scored]).all()
    assert np.allclose(out["abs_err"][scored], np.abs(r - loc)[scored], atol=1e-6)
    reg = CollectorRegistry()
    rec = Recorder("j", reg)
    lab = model_labels(market, "j")
    rec.scored(market, out["logprob"], {c: out[c] for c in ("abs_err", "in_80", "in_95")})
    assert _value(reg, "streamrnn_online_scored_events_total", lab) == scored.sum()
    assert _value(reg, "streamrnn_online_in_interval_80_total", lab) == float(np.nansum(out["in_80"]))
    assert _value(reg, "streamrnn_online_in_interval_95_total", lab) == float(np.nansum(out["in_95"]))
    assert _value(reg, "streamrnn_online_abs_error_percent_total", lab) == pytest.approx(
        float(np.nansum(out["abs_err"])))
    assert 0.72 < np.nanmean(out["in_80"]) < 0.88  # returns drawn from the forecasts: coverage near nominal
    Counters().scored(market, out)  # the Beam path passes the same columns (no Prometheus recorder here)


def test_forecast_only_metrics_are_not_exported_for_a_byte_lm(model, market):
    """A byte LM's job has no interval coverage to show (its dashboard panel: no data, not "0%"), even when a
    caller passes forecast columns; a forecast model's job exports them from the start, at 0."""
    forecast_only = {d.name for d in CATALOGUE if d.tasks == ("forecast",) and "task" in d.labels}
    assert forecast_only == {"streamrnn_online_abs_error_percent_total", "streamrnn_online_in_interval_80_total",
                             "streamrnn_online_in_interval_95_total"}
    reg = CollectorRegistry()
    rec = Recorder("j", reg)
    cols = {"abs_err": np.array([0.5, 1.0]), "in_80": np.array([1.0, 0.0]), "in_95": np.array([1.0, 1.0])}
    rec.scored(model, np.array([-1.0, -2.0]), cols)
    rec.bind(market)
    exposed = [(m.name, m.labels) for m in text_string_to_metric_families(generate_latest(reg).decode())
               for m in m.samples]
    for name in forecast_only:
        tasks = {labels["task"] for sample, labels in exposed if sample == name}
        assert tasks == {"forecast"}, (name, tasks)
        assert _value(reg, name, model_labels(market, "j")) == 0
    assert _value(reg, "streamrnn_online_scored_events_total", model_labels(model, "j")) == 2


def test_reference_loss_is_what_each_task_scores_online(model, market):
    """The byte LM's next-byte validation nats/char; the market model's one-bar-ahead validation NLL (what
    ForecastPostprocess scores online), not ``val_nll``, which averages its five horizons."""
    import json

    assert reference_loss_nats(model.spec) == model.spec.metrics["val_nats_per_char"]
    history = json.loads(market.spec.training["history"])
    best = next(h for h in history if h["step"] == market.spec.training["best_step"])
    assert reference_loss_nats(market.spec) == best["val_nll_h"][0] == 1.7894
    assert market.spec.metrics["val_nll"] == pytest.approx(np.mean(best["val_nll_h"]), abs=5e-3)  # masks differ by h
    assert market.spec.metrics["val_nll"] > 2.2
    reg = CollectorRegistry()
    Recorder("m", reg).bind(market)
    ref_labels = {k: model_labels(market, "m")[k] for k in ("job", "model", "model_version", "task")}
    assert _value(reg, "streamrnn_model_reference_loss_nats", ref_labels) == 1.7894


def test_dead_letters_by_reason_and_gauges_sum_over_shards():
    reg = CollectorRegistry()
    rec = Recorder("j", reg)
    for r in REASONS:
        assert _value(reg, "streamrnn_dead_letters_total", {"job": "j", "reason": r}) == 0  # present from the start
    rec.dead("late", 3)
    rec.dead("invalid")
    rec.shard_state(("t", 0), 5, 500)
    rec.shard_state(("t", 1), 2, 200)
    rec.shard_state(("t", 0), 4, 400)  # shard 0's latest report replaces its earlier one
    assert _value(reg, "streamrnn_dead_letters_total", {"job": "j", "reason": "late"}) == 3
    assert _value(reg, "streamrnn_active_keys", {"job": "j"}) == 6
    assert _value(reg, "streamrnn_state_bytes", {"job": "j"}) == 600
    t = totals(reg)
    assert t["streamrnn_dead_letters_total"] == 4 and t["streamrnn_dead_letters_total{reason=late}"] == 3
    line = live_line(t)
    assert "6 keys (600 B state)" in line and "4 dead letters (invalid 1, late 3)" in line


def test_a_failing_metric_update_is_logged_once_and_never_raises(monkeypatch, caplog):
    from streamrnn.metrics import catalogue as metrics

    monkeypatch.setattr(metrics._Guard, "failed", False)
    rec = Recorder("j", CollectorRegistry())
    with caplog.at_level("ERROR", logger="streamrnn.metrics"):
        metrics.guarded(rec.dead, "no-such-reason")  # a KeyError inside: swallowed
        metrics.guarded(rec.dead, "no-such-reason")
    assert caplog.text.count("an update failed (KeyError") == 1


# -- operator API ------------------------------------------------------------------------------
def test_metered_operator_reports_what_the_operator_did(model):
    reg = CollectorRegistry()
    op = MeteredOperator(streamrnn.KeyedOperator(model, keep_last_output=True), registry=reg, job="chat")
    keys = ["a", "b", "a", "c", "a", "b"]
    x = streamrnn.lm.encode("hello!")
    r1 = op.process(keys, x)
    r2 = op.process(["a", "d"], streamrnn.lm.encode("yo"))
    lab = model_labels(model, "chat")
    assert _value(reg, "streamrnn_events_applied_total", lab) == 8
    assert _value(reg, "streamrnn_batches_total", lab) == 2
    assert _value(reg, "streamrnn_active_keys", {"job": "chat"}) == len(op) == 4
    assert _value(reg, "streamrnn_state_bytes", {"job": "chat"}) == 4 * state_bytes_per_key(model)
    lp = np.concatenate([streamrnn.lm.token_logprob(r.prev_outputs["logprobs"], xx)
                         for r, xx in ((r1, x), (r2, streamrnn.lm.encode("yo")))])
    ok = np.isfinite(lp)
    assert _value(reg, "streamrnn_online_scored_events_total", lab) == ok.sum() == 8 - 4  # 4 keys started fresh
    assert _value(reg, "streamrnn_online_loss_nats_total", lab) == pytest.approx(-lp[ok].sum())
    assert _value(reg, "streamrnn_model_info", lab) == 1
    assert _value(reg, "streamrnn_model_reference_loss_nats", {k: lab[k] for k in MODEL if k != "provider"}) == \
        pytest.approx(model.spec.metrics["val_nats_per_char"])


def test_metered_operator_counts_ttl_expiries(model):
    reg = CollectorRegistry()
    now = [0.0]
    op = MeteredOperator(streamrnn.KeyedOperator(model, ttl=10.0, clock=lambda: now[0]), registry=reg, job="t")
    op.process(["a", "b"], streamrnn.lm.encode("hi"))
    now[0] = 100.0
    op.process(["c"], streamrnn.lm.encode("x"))
    assert _value(reg, "streamrnn_expired_keys_total", {"job": "t"}) == op.evictions.ttl == 2
    assert _value(reg, "streamrnn_active_keys", {"job": "t"}) == 1


# -- exporter ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def test_exporter_serves_the_registry_on_loopback_and_falls_back_to_the_next_free_port(caplog):
    reg = CollectorRegistry()
    Recorder("exp", reg).dead("error", 2)
    port = _free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        with caplog.at_level("WARNING", logger="streamrnn.metrics"):
            ex = start_exporter(port, registry=reg)
        assert ex is not None and ex.port != port and port < ex.port < port + 16 and ex.bind == "127.0.0.1"
        assert f"port {port} in use" in caplog.text and str(ex.port) in caplog.text
        body = _get(ex.url)
        assert 'streamrnn_dead_letters_total{job="exp",reason="error"} 2.0' in body
        ex.close()
        with pytest.raises(InputError, match=rf"expected a free port on 127.0.0.1, got {port} \(in use\)"):
            start_exporter(port, registry=reg, fallback=False)
    finally:
        blocker.close()


@pytest.mark.parametrize("port", [-1, 65536, "9464", True, 1.5])
def test_exporter_rejects_a_bad_port(port):
    with pytest.raises(InputError, match="metrics port: expected an int in \\[0, 65535\\]"):
        start_exporter(port, registry=CollectorRegistry())


def test_port_zero_disables_and_settings_come_from_the_environment():
    assert start_exporter(0, registry=CollectorRegistry()) is None
    assert exporter_settings({}) == (0, "127.0.0.1", "streamrnn")
    assert exporter_settings({"STREAMRNN_METRICS_PORT": "9500", "STREAMRNN_METRICS_BIND": "0.0.0.0",
                              "STREAMRNN_METRICS_JOB": "nt"}) == (9500, "0.0.0.0", "nt")
    with pytest.raises(InputError, match="STREAMRNN_METRICS_PORT: expected a port number"):
        exporter_settings({"STREAMRNN_METRICS_PORT": "http"})


def test_multiproc_dir_must_be_a_writable_directory(tmp_path):
    check_multiproc_dir(str(tmp_path))
    with pytest.raises(InputError, match="PROMETHEUS_MULTIPROC_DIR: expected a writable directory.*no such"):
        check_multiproc_dir(str(tmp_path / "missing"))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="PROMETHEUS_MULTIPROC_DIR: expected a writable directory"):
        check_multiproc_dir(str(f))


_WORKER = """
import sys
from streamrnn.metrics.catalogue import recorder
from streamrnn.metrics.export import serving_registry
n, cuda, stay = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "stay"
r = recorder("mp")
r.dead("late", n)
for report in sys.argv[4:]:  # shard=keys
    shard, keys = map(int, report.split("="))
    r.shard_state(("t", shard), keys, 10 * keys)
r.cat["streamrnn_cuda_expected"].labels(job="mp").set(cuda)
served = serving_registry()
print(served.get_sample_value("streamrnn_dead_letters_total", {"job": "mp", "reason": "late"}),
      served.get_sample_value("streamrnn_active_keys", {"job": "mp"}), flush=True)
if stay:
    sys.stdin.read()  # alive until the test closes stdin; then it exits normally (atexit marks it dead)
"""


class _Workers:
    """Worker processes sharing one PROMETHEUS_MULTIPROC_DIR, each recording as a Beam worker would."""

    def __init__(self, path: Path):
        self.path, self.procs = path, []
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path), "PYTHONPATH": str(ROOT)}

    def start(self, n: int, cuda: int, stay: bool, *reports: str) -> tuple[float, float | None]:
        """Start one; what its /metrics would serve once it has recorded: (late dead letters, active keys)."""
        p = subprocess.Popen([sys.executable, "-c", _WORKER, str(n), str(cuda), "stay" if stay else "exit", *reports],
                             env=self.env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        self.procs.append(p)
        line = p.stdout.readline()
        assert line, p.stderr.read()
        if not stay:
            assert p.wait(timeout=60) == 0
        late, keys = line.split()
        return float(late), None if keys == "None" else float(keys)

    def served(self, name: str, labels: dict) -> float | None:
        return directory_registry(str(self.path)).get_sample_value(name, labels)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.communicate(timeout=60)
        assert all(p.returncode == 0 for p in self.procs)


def test_multiprocess_mode_adds_counters_and_sums_each_shards_latest_report(tmp_path):
    """Three worker processes share PROMETHEUS_MULTIPROC_DIR: counters add up; active keys and state bytes are
    the sum over shards of each shard's latest report (a shard's keys stay held when its process exits: they
    live in the runner's state); the CUDA gauge is the max over live processes."""
    w = _Workers(tmp_path)
    try:
        seen = [w.start(3, 0, True, "3=3"), w.start(5, 1, True, "5=5"), w.start(7, 0, False, "7=7")]
        assert seen == [(3, 3), (8, 8), (15, 15)]  # what each worker's /metrics serves: the directory so far
        assert w.served("streamrnn_dead_letters_total", {"job": "mp", "reason": "late"}) == 15
        assert w.served("streamrnn_active_keys", {"job": "mp"}) == 3 + 5 + 7
        assert w.served("streamrnn_state_bytes", {"job": "mp"}) == 150
        assert w.served("streamrnn_cuda_expected", {"job": "mp"}) == 1  # livemax
    finally:
        w.close()
    assert w.served("streamrnn_dead_letters_total", {"job": "mp", "reason": "late"}) == 15  # counters stay
    assert w.served("streamrnn_active_keys", {"job": "mp"}) == 15  # still held: the last reports stand
    assert w.served("streamrnn_cuda_expected", {"job": "mp"}) is None  # no live process


def test_multiprocess_active_keys_count_a_moved_shard_once(tmp_path):
    """A runner moves a shard between live processes (the DirectRunner's multi_processing mode sends a shard's
    timers to its workers in turn): the process it left keeps its old report, the new one reports the shard's
    keys after expiry (0). Served: the latest report per shard (4), not the sum over processes (16 + 0 + 4)."""
    w = _Workers(tmp_path)
    try:
        assert w.start(1, 0, True, "0=16") == (1, 16)
        assert w.start(1, 0, False, "0=0", "1=4") == (2, 4)
        assert w.served("streamrnn_active_keys", {"job": "mp"}) == 4
        assert w.served("streamrnn_state_bytes", {"job": "mp"}) == 40
        exposed = generate_latest(directory_registry(str(tmp_path))).decode()
        assert "shard=" not in exposed and "streamrnn_shard_" not in exposed  # internal: never served
    finally:
        w.close()


def test_exporter_serves_zero_series_and_await_scrape_returns_at_the_next_scrape():
    """A job's series are served at 0 before anything is counted, and :func:`await_scrape` (what
    ``--metrics-wait`` and ``--metrics-linger`` use) returns when a scrape starts after the given time."""
    reg = CollectorRegistry()
    Recorder("w", reg)
    ex = start_exporter(_free_port(), registry=reg)
    got: dict[str, bool | None] = {}
    try:
        since = time.time()
        assert await_scrape(since, 0.05) is False  # not scraped since: times out
        waiter = threading.Thread(target=lambda: got.setdefault("scraped", await_scrape(since, 60)))
        waiter.start()
        body = _get(ex.url)
        waiter.join(60)
    finally:
        ex.close()
    assert got == {"scraped": True}
    assert 'streamrnn_events_in_total{job="w"} 0.0' in body
    assert 'streamrnn_dead_letters_total{job="w",reason="invalid"} 0.0' in body
    assert await_scrape(time.time(), 60) is None  # nothing serves this process's metrics now: no wait


# -- Pushgateway --------------------------------------------------------------------------------
def test_dashboard_is_generated_and_uses_only_catalogued_metrics():
    sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    on_disk = json.loads((ROOT / "deploy" / "grafana" / "streamrnn.json").read_text())
    assert on_disk == generate.dashboard(), "run: python deploy/grafana/generate.py"
    known = set(BY_NAME) | {n[:-len("_total")] for n in BY_NAME}
    hist = {d.name for d in CATALOGUE if d.kind == "histogram"}
    for p in on_disk["panels"]:
        for t in p["targets"]:
            for m in re.findall(r"streamrnn_[a-z0-9_]+", t["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", m) if re.sub(r"_(bucket|sum|count)$", "", m) in hist else m
                assert base in known, (m, t["expr"])
            assert 'job=~"$job"' in t["expr"]


def test_live_line_bits_are_nats_over_scored_in_bits():
    line = live_line({"streamrnn_online_loss_nats_total": 2 * math.log(2) * 10,
                      "streamrnn_online_scored_events_total": 10})
    assert "2.000 bits/event online" in line and "0 dead letters" in line


def test_docs_catalogue_table_matches_the_catalogue():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(streamrnn_[a-z0-9_]+)` \| [^|]+ \| [^|]+ \| (.+) \|$",
                                                         doc, re.M)}
    assert set(rows) == set(BY_NAME)
    for d in CATALOGUE:
        assert rows[d.name].replace("`", "'") == d.help, d.name
