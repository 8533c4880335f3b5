"""Streaming variant of ``streamrnn bench beam``: the same events replayed window by window.

DirectRunner ``--streaming`` with a ``TestStream``: the events of each event-time window
arrive as one Arrow block, then the watermark advances past that window's end (one
watermark step per window, 30+ windows), then to the end of the input.

* ``s``: :class:`~streamrnn.beam.StatefulInference` as the next-token job runs it
  (next-token postprocess, ``logprob`` paired with the next event, Arrow output);
* ``s`` with the model call replaced by identity (``stateful_identity_model``): the same
  transform without model compute, to split the gap to ``t`` into compute and framework;
* ``t``: a streaming identity pipeline with the same windows and shards: rows keyed by
  the same shard function and release time, the same ``GroupByKey`` on release-time
  windows with the same trigger, and a stateful DoFn (bag state + event-time timer) that
  only buffers each shard's rows and re-emits them when the watermark passes their
  release time.

The two run alternately, ``repeats`` times each, in one process; times are medians of
the whole pipeline run (start-up included, for both). Each run checks that every event
came out once.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator

import numpy as np


def _blocks(tok: np.ndarray, ts: np.ndarray, size: int):
    """Per window of ``size`` micros, in event-time order: (window index, Arrow RecordBatch ``key, ts, seq, x``)."""
    import pyarrow as pa

    from ..beam.step.clock import to_micros_array

    K, E = tok.shape
    keys = np.repeat(np.array([f"key-{k:05d}" for k in range(K)], dtype=object), E)
    flat_ts = ts.reshape(-1)
    seq = np.tile(np.arange(E), K)
    win = to_micros_array(flat_ts) // size
    out = []
    for w in np.unique(win):
        idx = np.flatnonzero(win == w)
        idx = idx[np.argsort(flat_ts[idx], kind="stable")]
        out.append((int(w), pa.RecordBatch.from_pydict({
            "key": pa.array(keys[idx].tolist(), pa.string()), "ts": pa.array(flat_ts[idx]),
            "seq": pa.array(seq[idx]), "x": pa.array(tok.reshape(-1)[idx])})))
    return out


def _test_stream(blocks, size: int):
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    from ..beam.records import END_OF_INPUT
    from ..beam.step.clock import timestamp

    s = TestStream()
    for w, b in blocks:  # size is whole milliseconds, as TestStream's watermarks must be
        s = s.add_elements([TimestampedValue(b, timestamp(w * size))]).advance_watermark_to(timestamp((w + 1) * size))
    # End at a finite time first (the legacy DirectRunner does not hold the watermark for timers that
    # fire on the jump to infinity), then the end of the input, where held-back rows are released.
    return s.advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity()


class _Count:
    """Writes the row count of each output element to its own file (read back after the run)."""

    def __init__(self, root: str):
        self.root = root

    def __call__(self, item) -> None:
        import uuid

        n = item.num_rows if hasattr(item, "num_rows") else 1
        with open(os.path.join(self.root, uuid.uuid4().hex), "w") as f:
            f.write(str(n))

    def total(self) -> int:
        n = 0
        for name in os.listdir(self.root):
            with open(os.path.join(self.root, name)) as f:
                n += int(f.read())
        return n


def _shard_blocks(num_shards: int, size: int):
    """Rows of a block -> (shard, IPC bytes) per (shard, release time), timestamped at the release time."""
    import apache_beam as beam
    import pyarrow as pa
    import pyarrow.compute as pc
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    from ..beam.records import shard_of, to_ipc
    from ..beam.step.clock import release_micros, timestamp, to_micros_array

    class ShardBlocks(beam.DoFn):
        def process(self, b) -> Iterator:
            t = pa.Table.from_batches([b])
            rel = release_micros(to_micros_array(t.column("ts").to_numpy()), size=size, lateness=0)
            uniq = pc.unique(t.column("key"))
            shard_u = np.array([shard_of(k, num_shards) for k in uniq.to_pylist()], np.int64)
            shards = shard_u[pc.index_in(t.column("key"), uniq).to_numpy(zero_copy_only=False)]
            g, inv = np.unique(np.stack([shards, rel], axis=1), axis=0, return_inverse=True)
            for j, (s, r) in enumerate(g):
                part = t.filter(pa.array(inv.reshape(-1) == j)).append_column("_rel", pa.array(
                    np.full(int((inv.reshape(-1) == j).sum()), r, np.int64)))
                yield WindowedValue((int(s), to_ipc(part)), timestamp(int(r)), [GlobalWindow()])

    return ShardBlocks()


def _buffer_emit():
    """A stateful DoFn that buffers each shard's blocks and re-emits them at their release time."""
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.coders import BytesCoder
    from apache_beam.transforms.timeutil import TimeDomain
    from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
    from apache_beam.transforms.window import TimestampedValue

    from ..beam.records import from_ipc, to_ipc
    from ..beam.step.clock import timestamp

    class BufferEmit(beam.DoFn):
        PENDING = BagStateSpec("pending", BytesCoder())
        FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

        # Beam's DoFn idiom declares state and timer parameters as argument defaults.
        def process(self, element, pending=beam.DoFn.StateParam(PENDING),  # noqa: B008
                    timer=beam.DoFn.TimerParam(FLUSH)) -> Iterator:  # noqa: B008
            _shard, (rel, blobs) = element
            for b in blobs:
                pending.add(b)
            timer.set(timestamp(rel))
            return iter(())

        @on_timer(FLUSH)
        def flush(self, fire=beam.DoFn.TimestampParam, pending=beam.DoFn.StateParam(PENDING),  # noqa: B008
                  timer=beam.DoFn.TimerParam(FLUSH)) -> Iterator:  # noqa: B008
            t = pa.concat_tables([from_ipc(b) for b in pending.read()])
            due = t.column("_rel").to_numpy() <= fire.micros
            pending.clear()
            if not due.all():
                rest = t.filter(pa.array(~due))
                pending.add(to_ipc(rest))
                timer.set(timestamp(int(rest.column("_rel").to_numpy().min())))
            for b in t.filter(pa.array(due)).combine_chunks().to_batches():
                yield TimestampedValue(b, fire)

    return BufferEmit()


def _run_identity(blocks, size: int, shards: int, root: str) -> tuple[float, float]:
    """One replay through the identity pipeline: (wall seconds, CPU seconds of this process)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.transforms import trigger
    from apache_beam.transforms.window import FixedWindows, GlobalWindows, TimestampCombiner
    from apache_beam.utils.timestamp import Duration

    sink = _Count(root)

    class Panes(beam.DoFn):
        def process(self, element, ts=beam.DoFn.TimestampParam) -> Iterator:
            yield element[0], (ts.micros, list(element[1]))

    t0, c0 = time.perf_counter(), time.process_time()
    with beam.Pipeline(options=PipelineOptions(["--streaming"])) as p:
        (p | _test_stream(blocks, size)
         | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
         | "ShardBlocks" >> beam.ParDo(_shard_blocks(shards, size))
         | "ReleaseWindows" >> beam.WindowInto(
             FixedWindows(Duration(micros=size)), trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
             accumulation_mode=trigger.AccumulationMode.DISCARDING, timestamp_combiner=TimestampCombiner.OUTPUT_AT_EOW,
             allowed_lateness=Duration(seconds=3600))
         | "ByShardAndRelease" >> beam.GroupByKey()
         | "Panes" >> beam.ParDo(Panes())
         | "ShardGlobal" >> beam.WindowInto(GlobalWindows())
         | "BufferEmit" >> beam.ParDo(_buffer_emit()).with_input_types(
             beam.typehints.Tuple[int, beam.typehints.Tuple[int, beam.typehints.List[bytes]]])
         | "Count" >> beam.Map(sink))
    return time.perf_counter() - t0, time.process_time() - c0


def _run_stateful(blocks, model: str, size: int, shards: int, root: str, *, identity: bool = False,
                  cache_bytes: int | None = None) -> tuple[float, int, dict[str, int]]:
    import contextlib

    from .common import identity_models

    with identity_models() if identity else contextlib.nullcontext():
        return _run_stateful_once(blocks, model, size, shards, root, cache_bytes=cache_bytes)


class _Tally:
    """Within: the transform's counters (``state_rebuilds``, ``flushes``, ...) as incremented in this process.

    Counted at the increment, not read back from the runner: the legacy streaming DirectRunner
    reports a step's counters from its first bundle only (each later bundle's increments land in
    the metrics container of the first, already committed: Beam 2.77's state sampler keeps the
    first scoped state per step name), so its ``result.metrics()`` misses every flush after it.
    """

    def __enter__(self):
        from ..beam.step import counters as bc

        self.counts: dict[str, int] = {}
        self._real = real = bc._Mirrored.inc
        counts = self.counts

        def inc(c, n: int = 1) -> None:
            name = c.beam.metric_name.name
            counts[name] = counts.get(name, 0) + n
            real(c, n)

        bc._Mirrored.inc = inc
        return self

    def __exit__(self, *exc) -> None:
        from ..beam.step import counters as bc

        bc._Mirrored.inc = self._real


def _run_stateful_once(blocks, model: str, size: int, shards: int, root: str, *, cache_bytes: int | None = None
                       ) -> tuple[float, int, dict[str, int]]:
    """One replay through StatefulInference: (seconds, dead letters, the transform's counters and the
    process's CPU seconds, ``cpu_seconds``)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from ..beam import NextTokenPostprocess, StatefulInference
    from ..model.runtime import CPU

    sink, dead_root = _Count(root), os.path.join(root, "dead")
    os.makedirs(dead_root)
    inference = StatefulInference(model=model, num_shards=shards, window_size=size / 1e6,
                                  postprocess=NextTokenPostprocess(5), next_fields=("logprob",), output="arrow",
                                  providers=[CPU], shard_cache_bytes=cache_bytes)
    with _Tally() as tally:
        t0, c0 = time.perf_counter(), time.process_time()
        with beam.Pipeline(options=PipelineOptions(["--streaming"])) as p:
            out, dead = p | _test_stream(blocks, size) | inference
            out | "Count" >> beam.Map(sink)
            dead | "CountDead" >> beam.Map(_Count(dead_root))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_dead = _Count(dead_root).total()
    shutil.rmtree(dead_root)
    return dt, n_dead, {**tally.counts, "cpu_seconds": cpu}


def _check_rebuilds(name: str, c: dict[str, int], shards: int) -> None:
    """A replay without failures, in one process, rebuilds each shard at most once (the cache outlives teardown)."""
    if c.get("state_rebuilds", 0) > shards:
        raise RuntimeError(f"bench stream ({name}): {c.get('state_rebuilds')} shard rebuilds from Beam state in "
                           f"{c.get('flushes')} flushes; expected at most one per shard ({shards}) per process")


#: The replays of ``run``: name -> (identity model, shard cache bytes; None: the default cache, 0: none).
NAMES = {"s": "stateful_inference", "si": "stateful_identity_model", "sc": "stateful_inference_no_cache",
         "t": "identity"}


def run(model: str, tok: np.ndarray, ts: np.ndarray, *, windows: int, shards: int, repeats: int,
        no_cache: bool = True) -> dict:
    """The streaming variants on ``tok``/``ts`` (see the module doc); a JSON-able result."""
    span = float(ts.max() - ts.min())
    size = max(1, int(span / (windows - 0.5) * 1000)) * 1000  # about ``windows`` windows, whole milliseconds
    blocks = _blocks(tok, ts, size)
    n = tok.size
    names = {v: name for v, name in NAMES.items() if no_cache or v != "sc"}
    times: dict[str, list[float]] = {v: [] for v in names}
    cpus: dict[str, list[float]] = {v: [] for v in names}
    counts: dict[str, list[dict[str, int]]] = {v: [] for v in names if v != "t"}
    for _ in range(repeats):
        for v in names:  # alternating, so a change of machine load hits all alike
            root = tempfile.mkdtemp(prefix=f"bench-stream-{v}-")
            try:
                if v != "t":
                    dt, n_dead, c = _run_stateful(blocks, model, size, shards, root, identity=v == "si",
                                                  cache_bytes=0 if v == "sc" else None)
                    if n_dead:
                        raise RuntimeError(f"bench stream: StatefulInference dead-lettered {n_dead} events")
                    if v != "sc":
                        _check_rebuilds(names[v], c, shards)
                    counts[v].append(c)
                    cpu = c["cpu_seconds"]
                else:
                    dt, cpu = _run_identity(blocks, size, shards, root)
                got = _Count(root).total()
                if got != n:
                    raise RuntimeError(f"bench stream ({v}): expected {n} output rows, got {got}")
            finally:
                shutil.rmtree(root, ignore_errors=True)
            times[v].append(dt)
            cpus[v].append(cpu)
    res = {}
    for v, name in names.items():
        med, cpu = statistics.median(times[v]), statistics.median(cpus[v])
        res[name] = {"seconds_median": med, "seconds_all": times[v], "events_per_s": n / med,
                     "cpu_seconds_median": cpu, "cpu_seconds_all": cpus[v], "events_per_cpu_s": n / cpu}
        if v in counts:  # the same every repeat (a replay is deterministic): the first run's
            res[name].update({"flushes": counts[v][0].get("flushes", 0),
                              "state_rebuilds": counts[v][0].get("state_rebuilds", 0),
                              "state_rebuilds_all": [c.get("state_rebuilds", 0) for c in counts[v]]})
    out = {"runner": "DirectRunner --streaming (TestStream)", "events": n, "keys": tok.shape[0],
           "watermark_steps": len(blocks), "window_s": size / 1e6, "shards": shards, "repeats": repeats,
           "rebuilds_at_most_one_per_shard": True, "variants": res,
           "ratio_stateful_over_identity": res["stateful_inference"]["events_per_s"] / res["identity"]["events_per_s"],
           # the same on CPU seconds of the process: less sensitive to other work on a shared machine
           "ratio_stateful_over_identity_cpu": (res["stateful_inference"]["events_per_cpu_s"]
                                                / res["identity"]["events_per_cpu_s"]),
           "ratio_stateful_identity_model_over_identity": (res["stateful_identity_model"]["events_per_s"]
                                                           / res["identity"]["events_per_s"])}
    if "sc" in names:
        out["ratio_stateful_over_no_cache"] = (res["stateful_inference"]["events_per_s"]
                                               / res["stateful_inference_no_cache"]["events_per_s"])
    return out


# -- keys held: does a streaming flush cost follow the keys it touches or the keys its shard holds? ----------
def _held_blocks(n_keys: int, *, windows: int, keys_per_flush: int, events_per_key: int, size: int, seed: int = 0):
    """Window 0: one event for each of ``n_keys`` keys (populate); windows 1..``windows``: ``keys_per_flush``
    keys drawn at random from them, ``events_per_key`` events each. (window index, Arrow block) per window."""
    import pyarrow as pa

    from ..beam.job.io import DEMO_TEXT

    corpus = np.frombuffer(DEMO_TEXT.encode(), np.uint8).astype(np.int64)
    rng = np.random.default_rng(seed)
    base = 1_000_000_000_000 // size  # window index of the first window (event time ~ 11.6 days after the epoch)
    names = np.array([f"key-{i:06d}" for i in range(n_keys)], dtype=object)
    w_s = size / 1e6

    def block(keys, seq, ts):
        return pa.RecordBatch.from_pydict({"key": pa.array(keys.tolist(), pa.string()), "ts": pa.array(ts),
                                           "seq": pa.array(seq, pa.int64()),
                                           "x": pa.array(corpus[rng.integers(0, len(corpus), len(keys))])})

    out = [(base, block(names, np.zeros(n_keys, np.int64), np.full(n_keys, base * w_s + 0.5 * w_s)))]
    for w in range(1, windows + 1):
        chosen = names[rng.choice(n_keys, keys_per_flush, replace=False)]
        j = np.tile(np.arange(events_per_key), keys_per_flush)
        ts = (base + w) * w_s + (j + rng.uniform(0.0, 0.5, len(j))) * (w_s / (events_per_key + 1))
        order = np.argsort(ts, kind="stable")
        out.append((base + w, block(np.repeat(chosen, events_per_key)[order], (w * 64 + j)[order], ts[order])))
    return out


class _FlushLog:
    """Within: every ``ShardStep._flush`` of this process is timed (the DirectRunner runs the DoFn here)."""

    def __init__(self) -> None:
        #: (flush time T micros, start, end) in perf_counter seconds, and the process's CPU seconds at the end
        self.rows: list[tuple[int, float, float, float]] = []

    def __enter__(self):
        from ..beam.step import stateful as st

        self._real = real = st.ShardStep._flush
        log = self.rows

        def timed(step, shard, T, *a, **kw):
            t0 = time.perf_counter()
            out = list(real(step, shard, T, *a, **kw))
            log.append((T, t0, time.perf_counter(), time.process_time()))
            return iter(out)

        st.ShardStep._flush = timed
        return self

    def __exit__(self, *exc) -> None:
        from ..beam.step import stateful as st

        st.ShardStep._flush = self._real


def _run_held_once(model: str, blocks, size: int, root: str, warmup: int) -> dict:
    """One replay of ``_held_blocks`` through StatefulInference on one shard: per-window seconds in the pipeline."""
    from ..beam.step.clock import END_OF_INPUT_MICROS

    with _FlushLog() as fl:
        dt, n_dead, c = _run_stateful_once(blocks, model, size, 1, root)
    if n_dead:
        raise RuntimeError(f"bench stream (held keys): StatefulInference dead-lettered {n_dead} events")
    _check_rebuilds("held keys", c, 1)
    flushes = sorted((r for r in fl.rows if r[0] < END_OF_INPUT_MICROS), key=lambda r: r[2])
    if len(flushes) != len(blocks):
        raise RuntimeError(f"bench stream (held keys): expected one flush per window ({len(blocks)}), "
                           f"got {len(flushes)}")
    ends = np.array([r[2] for r in flushes])
    timed = slice(1 + warmup, None)  # after populate and the warm-up windows
    return {"seconds": dt, "populate_flush_seconds": flushes[0][2] - flushes[0][1],
            "window_seconds": np.diff(ends)[warmup:].tolist(),  # flush end to flush end: one window, end to end
            "window_cpu_seconds": np.diff([r[3] for r in flushes])[warmup:].tolist(),
            "flush_seconds": [e - s for _, s, e, _ in flushes[timed]], "counters": c}


def run_held(model: str, held: list[int], *, keys_per_flush: int = 256, events_per_key: int = 4, windows: int = 12,
             warmup: int = 2, repeats: int = 3, window: float = 60.0) -> dict:
    """A replay with N keys held by one shard, the same events per window for every N; a JSON-able result.

    Through a real streaming pipeline (DirectRunner ``--streaming``, TestStream, one watermark
    step per window): window 0 populates the N keys, then ``warmup + windows`` windows each
    carry ``keys_per_flush x events_per_key`` events on keys drawn from the N. Per window, the
    wall time from one flush's end to the next's (intake, GroupByKey, timer, flush, outputs:
    the pipeline's cost of a window) and, inside it, the flush itself. Runs of the different N
    alternate, ``repeats`` times; medians over all timed windows of all runs.
    """
    size = round(window * 1_000_000)
    keys_per_flush = min(keys_per_flush, min(held))
    events = keys_per_flush * events_per_key
    per: dict[int, dict] = {n: {"window_seconds": [], "window_cpu_seconds": [], "flush_seconds": [],
                                "populate_flush_seconds": [],
                                "pipeline_seconds": [], "rebuilds": [], "flushes": []} for n in held}
    for _ in range(repeats):
        for n in held:
            blocks = _held_blocks(n, windows=warmup + windows, keys_per_flush=keys_per_flush,
                                  events_per_key=events_per_key, size=size)
            root = tempfile.mkdtemp(prefix=f"bench-stream-held-{n}-")
            try:
                r = _run_held_once(model, blocks, size, root, warmup)
                got = _Count(root).total()
                if got != n + (warmup + windows) * events:
                    raise RuntimeError(f"bench stream (held {n}): expected {n + (warmup + windows) * events} output "
                                       f"rows, got {got}")
            finally:
                shutil.rmtree(root, ignore_errors=True)
            p = per[n]
            p["window_seconds"] += r["window_seconds"]
            p["window_cpu_seconds"] += r["window_cpu_seconds"]
            p["flush_seconds"] += r["flush_seconds"]
            p["populate_flush_seconds"].append(r["populate_flush_seconds"])
            p["pipeline_seconds"].append(r["seconds"])
            p["rebuilds"].append(r["counters"].get("state_rebuilds", 0))
            p["flushes"].append(r["counters"].get("flushes", 0))
    by = {}
    for n, p in per.items():
        w, f = statistics.median(p["window_seconds"]), statistics.median(p["flush_seconds"])
        wc = statistics.median(p["window_cpu_seconds"])
        by[str(n)] = {"keys_held": n, "window_seconds_median": w, "events_per_s": events / w,
                      "window_cpu_seconds_median": wc, "events_per_cpu_s": events / wc,
                      "flush_seconds_median": f, "flush_events_per_s": events / f,
                      "populate_flush_seconds": p["populate_flush_seconds"], "pipeline_seconds": p["pipeline_seconds"],
                      "window_seconds_all": p["window_seconds"], "state_rebuilds": p["rebuilds"],
                      "flushes": p["flushes"]}
    lo, hi = str(min(held)), str(max(held))
    return {"runner": "DirectRunner --streaming (TestStream)", "shards": 1, "keys_per_flush": keys_per_flush,
            "events_per_key": events_per_key, "events_per_window": events, "windows_timed": windows,
            "warmup": warmup, "repeats": repeats, "window_s": window, "by_keys": by,
            "ratio_max_over_min_keys": by[hi]["events_per_s"] / by[lo]["events_per_s"],
            "ratio_max_over_min_keys_cpu": by[hi]["events_per_cpu_s"] / by[lo]["events_per_cpu_s"],
            "ratio_max_over_min_keys_flush_only": by[hi]["flush_events_per_s"] / by[lo]["flush_events_per_s"]}
