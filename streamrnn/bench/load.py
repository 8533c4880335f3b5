"""``streamrnn bench load``: StatefulInference under key churn, 1 vs 2 workers; memory bounded by the TTL.

The load: ``--keys`` distinct keys (default 100,000) arrive in ``--waves`` waves over event
time (wave ``w`` starts at ``w * --wave-gap`` seconds, each key at a random time within
it). Each key has ``--events-per-key`` byte events ``--event-gap`` seconds apart, then goes
idle for good; later waves are new keys. With ``--ttl``, an idle key's state is dropped
once the watermark passes ``last event + ttl``, so the keys held at once stay near
``keys per wave x (activity + ttl + window) / wave gap`` however many keys the stream has.
An expired key's metadata and its applied event ids stay for ``--dedupe-horizon`` of event
time (duplicate detection), so memory is bounded by the keys seen within that horizon.

The pipeline is a job's: Parquet events read by :class:`~streamrnn.beam.job.io.ReadEvents`,
:class:`~streamrnn.beam.StatefulInference` with a next-token postprocess (Arrow output),
on the DirectRunner with ``--direct_running_mode=multi_processing``, once with
``--direct_num_workers=1`` and once with 2, each in its own subprocess. The model is a tiny
random-weight LSTM LM (``--layers`` x ``--hidden``, default 2x32) exported through
:mod:`streamrnn.train.export`, so the run is framework-bound and fits a few minutes on 2
cores; the shipped models' per-key state bytes (from their specs) scale the figures.

Measured per run: events/s (wall time of the pipeline), Beam counters (events applied,
keys expired, flushes, state rebuilds), and a sampler thread (every ``--sample-every`` s)
reading the Prometheus gauges ``streamrnn_active_keys`` / ``streamrnn_state_bytes`` /
``streamrnn_events_applied_total`` from a ``PROMETHEUS_MULTIPROC_DIR`` and the RSS of
the process tree from ``/proc`` (the launcher, which in batch mode also holds the runner's
buffered PCollections, and the SDK worker processes). "Bounded" compares the first and
last third of the apply phase (by events applied): keys held and worker RSS (the middle third
too, to tell a one-off warm-up from steady growth).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

GAUGE_NOTE = ("keys held = streamrnn_active_keys summed over live processes (livesum). Each process reports the "
              "shards it last flushed; with more than one worker a shard that moved to another process is still "
              "counted in the old one, so keys held (and state bytes) are an upper bound there. Which keys are held "
              "depends only on event time, so it is the same in every run: the 1-worker figure is the exact one.")

#: ``--quick``: a smoke test at toy size (the numbers mean little).
QUICK = {"keys": 5_000, "waves": 10, "sample_every": 0.2}


def write_events(path: str, *, keys: int, waves: int, events_per_key: int, wave_gap: float, event_gap: float,
                 seed: int = 0) -> int:
    """The churn load as Parquet (``key, ts, seq, token``) in event-time order; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    wave = np.arange(keys) * waves // keys
    start = 1_000.0 + wave * wave_gap + rng.uniform(0.0, wave_gap, keys)
    ts = (start[:, None] + np.arange(events_per_key)[None, :] * event_gap).reshape(-1)
    key = np.repeat(np.arange(keys), events_per_key)
    seq = np.tile(np.arange(events_per_key), keys)
    tok = rng.integers(32, 127, ts.size)
    order = np.argsort(ts, kind="stable")
    names = np.array([f"user-{k:07d}" for k in range(keys)], dtype=object)
    pq.write_table(pa.table({"key": pa.array(names[key[order]].tolist(), pa.string()), "ts": ts[order],
                             "seq": seq[order], "token": tok[order]}), path)
    return int(ts.size)


# -- sampling -----------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int) -> tuple[int, int, int]:
    """(launcher RSS, summed RSS of all its descendants, number of descendants), bytes."""
    kids, todo, desc = _children(), [root], []
    while todo:
        for c in kids.get(todo.pop(), []):
            desc.append(c)
            todo.append(c)
    return _rss(root), sum(_rss(p) for p in desc), len(desc)


class Sampler(threading.Thread):
    """Samples (seconds, launcher RSS, workers' RSS, workers, active keys, state bytes, applied) until stopped."""

    def __init__(self, prom_dir: str, every: float):
        super().__init__(daemon=True)
        self.prom_dir, self.every = prom_dir, every
        self.rows: list[tuple[float, int, int, int, float, float, float]] = []
        self._halt = threading.Event()

    def _gauges(self) -> tuple[float, float, float]:
        from ..metrics.export import directory_registry, totals

        try:  # what the exporter serves from the processes' directory (per-shard gauges summed per job)
            t = totals(directory_registry(self.prom_dir))
        except Exception:  # a file being created as we read: skip this sample's gauges
            return (float("nan"),) * 3
        return (t.get("streamrnn_active_keys", 0.0), t.get("streamrnn_state_bytes", 0.0),
                t.get("streamrnn_events_applied_total", 0.0))

    def run(self) -> None:
        t0, me = time.perf_counter(), os.getpid()
        while not self._halt.is_set():
            launcher, workers, n = tree_rss(me)
            self.rows.append((time.perf_counter() - t0, launcher, workers, n, *self._gauges()))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- one run (in its own process) -----------------------------------------------------------------
def _count(b: Any) -> int:
    from apache_beam.metrics import Metrics

    Metrics.counter("load", "outputs").inc(b.num_rows)
    return b.num_rows


def _run(args: argparse.Namespace) -> dict:
    """One pipeline run with ``args.workers`` workers; counters, events/s and the sampled series."""
    prom_dir = tempfile.mkdtemp(prefix="streamrnn-load-prom-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir  # the SDK worker processes inherit it
    os.environ["STREAMRNN_METRICS_JOB"] = "load"
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from ..beam import NextTokenPostprocess, StatefulInference
    from ..beam.job.io import ReadEvents

    opts = PipelineOptions(["--direct_running_mode=multi_processing", f"--direct_num_workers={args.workers}"])
    sampler = Sampler(prom_dir, args.sample_every)
    sampler.start()
    t0 = time.perf_counter()
    try:
        p = beam.Pipeline(options=opts)
        blocks, _unread = p | ReadEvents(args.events_path, block_rows=8192)
        out, dead = blocks | StatefulInference(
            model=args.model, num_shards=args.shards, window_size=args.window, ttl=args.ttl,
            dedupe_horizon=args.dedupe_horizon or None,
            postprocess=NextTokenPostprocess(1), output="arrow", providers=["CPUExecutionProvider"],
            flush_bounded_at_once=False)
        _ = out | "CountOutputs" >> beam.Map(_count)
        _ = dead | "CountDead" >> beam.Map(_count_dead)
        result = p.run()
        result.wait_until_finish()
        seconds = time.perf_counter() - t0
    finally:
        sampler.stop()
        shutil.rmtree(prom_dir, ignore_errors=True)
    counters = {r.key.metric.name: r.committed for r in result.metrics().query(MetricsFilter())["counters"]}
    return {"workers": args.workers, "seconds": seconds, "events_per_s": args.n_events / seconds,
            "counters": {k: counters.get(k, 0) for k in ("events_in", "events_applied", "expired", "flushes",
                                                         "batches", "state_rebuilds", "state_compactions",
                                                         "dead_letters", "outputs", "dead")},
            **summarize(sampler.rows, args.n_events)}


def _count_dead(d: Any) -> None:
    from apache_beam.metrics import Metrics

    Metrics.counter("load", "dead").inc()


def summarize(rows: list[tuple], n_events: int) -> dict:
    """Peak and per-third figures of the sampled series (thirds of the apply phase, by events applied)."""
    mb = 1 / 2**20
    a = np.array(rows, dtype=np.float64) if rows else np.zeros((0, 7))
    ok = a[~np.isnan(a[:, 4])] if len(a) else a
    applying = ok[(ok[:, 6] > 0) & (ok[:, 6] < n_events)] if len(ok) else ok
    third = {}
    for name, lo, hi in (("first", 0, 1 / 3), ("middle", 1 / 3, 2 / 3), ("last", 2 / 3, 1.0)):
        s = applying[(applying[:, 6] >= lo * n_events) & (applying[:, 6] < hi * n_events)]
        third[name] = {"samples": len(s), "keys_held_max": float(s[:, 4].max()) if len(s) else None,
                       "workers_rss_mb_max": float(s[:, 2].max() * mb) if len(s) else None,
                       "launcher_rss_mb_max": float(s[:, 1].max() * mb) if len(s) else None}
    f, la = third["first"], third["last"]
    growth = (la["workers_rss_mb_max"] / f["workers_rss_mb_max"]
              if f["workers_rss_mb_max"] and la["workers_rss_mb_max"] else None)
    return {"samples": len(a),
            "keys_held_peak": float(ok[:, 4].max()) if len(ok) else None,
            "state_bytes_peak": float(ok[:, 5].max()) if len(ok) else None,
            "keys_held_after_input_end": float(ok[-1, 4]) if len(ok) else None,
            "peak_rss_mb": {"tree": float((a[:, 1] + a[:, 2]).max() * mb) if len(a) else None,
                            "launcher": float(a[:, 1].max() * mb) if len(a) else None,
                            "workers": float(a[:, 2].max() * mb) if len(a) else None,
                            "worker_processes_max": int(a[:, 3].max()) if len(a) else 0},
            "apply_phase_thirds": third, "workers_rss_growth_last_over_first_third": growth}


# -- the report -----------------------------------------------------------------------------------
def shipped_state_bytes() -> dict:
    """Per-key bytes of the shipped models from their specs: state tensors, and the last output kept for scoring."""
    from .. import DEFAULT_MODEL
    from ..metrics.catalogue import state_bytes_per_key
    from ..model.loaded import load

    out = {}
    for name in ("charlm.onnx", "market.onnx"):
        path = os.path.join(os.path.dirname(DEFAULT_MODEL), name)
        if not os.path.exists(path):
            out[name] = None
            continue
        m = load(path, providers=["CPUExecutionProvider"])
        last = sum(int(np.prod([d for d in o.shape[2:]])) * np.dtype(o.dtype).itemsize for o in m.spec.outputs)
        out[name] = {"state_bytes_per_key": state_bytes_per_key(m), "last_output_bytes": last,
                     "state": [f"{s.name} {s.dtype} {list(s.shape)}" for s in m.spec.state]}
    return out


def _verdict(runs: dict, keys: int) -> dict:
    """Whether memory stayed bounded, per run: what was held vs all keys, and growth over the apply phase."""
    out = {}
    for w, r in runs.items():
        th = r["apply_phase_thirds"]
        f, la = th["first"]["keys_held_max"], th["last"]["keys_held_max"]
        out[w] = {"keys_held_peak_over_total": r["keys_held_peak"] / keys if r["keys_held_peak"] is not None else None,
                  "keys_held_last_over_first_third": la / f if f and la is not None else None,
                  "every_key_expired": r["counters"]["expired"] == keys,
                  "workers_rss_growth_last_over_first_third": r["workers_rss_growth_last_over_first_third"]}
    return out


def _parser() -> argparse.ArgumentParser:
    from ..cli.args import OneLineParser, at_least

    ap = OneLineParser(prog="streamrnn bench load", description=__doc__.splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, one, pos = ap.add_argument, at_least(1), at_least(0.0, open_=True)
    add("--keys", type=one, default=100_000, help="distinct keys over the whole stream")
    add("--waves", type=one, default=50, help="waves of new keys")
    add("--wave-gap", type=pos, default=30.0, help="event-time seconds between waves")
    add("--events-per-key", type=one, default=4, help="events of each key before it goes idle")
    add("--event-gap", type=pos, default=5.0, help="event-time seconds between a key's events")
    add("--window", type=pos, default=10.0, help="StatefulInference window_size (s)")
    add("--ttl", type=pos, default=60.0, help="StatefulInference ttl (s)")
    add("--dedupe-horizon", type=at_least(0.0), default=300.0,
        help="StatefulInference dedupe_horizon (s; 0: its default, 1 h). Applied ids and expired keys' "
             "metadata are kept this long, so it bounds memory together with the ttl")
    add("--shards", type=one, default=8, help="StatefulInference num_shards")
    add("--workers", default="1,2", help="direct_num_workers values to run, comma-separated")
    add("--hidden", type=one, default=32, help="hidden size of the tiny bench LSTM")
    add("--layers", type=one, default=2)
    add("--model", default=None, help="model to run (default: the tiny random LSTM LM)")
    add("--sample-every", type=pos, default=0.5, help="sampling period of RSS and gauges (s)")
    add("--quick", action="store_true", help="5,000 keys in 10 waves (a smoke test)")
    add("--json", action="store_true", help="print the JSON result to stdout")
    add("--run", type=int, help=argparse.SUPPRESS)
    add("--events-path", help=argparse.SUPPRESS)
    add("--n-events", type=int, help=argparse.SUPPRESS)
    return ap


def _workers(ap: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        ws = [int(v) for v in text.split(",")]
    except ValueError:
        ws = []
    if not ws or min(ws) < 1:
        ap.error(f"--workers: expected comma-separated ints >= 1, got {text!r}")
    return ws


def main(argv: list[str] | None = None) -> int:
    from ..cli.args import Heartbeat, parse_with_quick

    ap = _parser()
    args, argv = parse_with_quick(ap, argv, QUICK)
    if args.run is not None:
        print(json.dumps(_run(argparse.Namespace(**{**vars(args), "workers": args.run}))))
        return 0
    workers = _workers(ap, args.workers)
    tmp = tempfile.mkdtemp(prefix="streamrnn-bench-load-")
    with Heartbeat("streamrnn bench load") as hb:
        return _bench(args, argv, workers, tmp, hb.update)


def _bench(args: argparse.Namespace, argv: list[str], workers: list[int], tmp: str,
           progress: Callable[[str], None]) -> int:
    """The runs of :func:`main` (``progress(status)``: the CLI's progress lines)."""
    from .common import code_state, make_model

    try:
        load_before = os.getloadavg()
        model = args.model or os.path.join(tmp, "tiny.onnx")
        if args.model is None:
            progress("building the model")
            make_model(model, args.hidden, args.layers)
        progress(f"writing {args.keys:,} keys' events")
        events_path = os.path.join(tmp, "events.parquet")
        n = write_events(events_path, keys=args.keys, waves=args.waves, events_per_key=args.events_per_key,
                         wave_gap=args.wave_gap, event_gap=args.event_gap)
        runs: dict[str, dict] = {}
        for i, w in enumerate(workers):
            print(f"streamrnn bench load: {args.keys} keys, {n} events, {w} worker(s) ...", file=sys.stderr)
            progress(f"run {i + 1}/{len(workers)} ({w} worker(s), {args.keys:,} keys, {n:,} events)")
            cmd = [sys.executable, "-m", "streamrnn.bench.load", *argv, "--run", str(w), "--model", model,
                   "--events-path", events_path, "--n-events", str(n)]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if r.returncode != 0:
                print(r.stderr[-4000:], file=sys.stderr)
                return r.returncode
            runs[str(w)] = json.loads(r.stdout.strip().splitlines()[-1])
        eps = {w: r["events_per_s"] for w, r in runs.items()}
        out = {"config": {"keys": args.keys, "events": n, "waves": args.waves, "wave_gap_s": args.wave_gap,
                          "events_per_key": args.events_per_key, "event_gap_s": args.event_gap,
                          "window_s": args.window, "ttl_s": args.ttl, "shards": args.shards,
                          "dedupe_horizon_s": args.dedupe_horizon or 3600.0,
                          "model": args.model or f"random {args.layers}x{args.hidden} LSTM LM (tiny, bench-built)",
                          "runner": "DirectRunner multi_processing (FnApiRunner), batch", "quick": args.quick,
                          "cpus": os.cpu_count(), "code": code_state(),
                          "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
               "runs": runs, "events_per_s": eps,
               "ratio_2_over_1_workers": eps["2"] / eps["1"] if "1" in eps and "2" in eps else None,
               "bounded": _verdict(runs, args.keys), "shipped_models": shipped_state_bytes(),
               "note": GAUGE_NOTE}
        print(json.dumps(out, indent=2) if args.json else json.dumps(out))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
