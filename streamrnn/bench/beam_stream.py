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

    from ..beam.clock import to_micros_array

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

    from ..beam.clock import timestamp
    from ..beam.records import END_OF_INPUT

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

    from ..beam.clock import release_micros, timestamp, to_micros_array
    from ..beam.records import shard_of, to_ipc

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

    from ..beam.clock import timestamp
    from ..beam.records import from_ipc, to_ipc

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


def _run_identity(blocks, size: int, shards: int, root: str) -> float:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.transforms import trigger
    from apache_beam.transforms.window import FixedWindows, GlobalWindows, TimestampCombiner
    from apache_beam.utils.timestamp import Duration

    sink = _Count(root)

    class Panes(beam.DoFn):
        def process(self, element, ts=beam.DoFn.TimestampParam) -> Iterator:
            yield element[0], (ts.micros, list(element[1]))

    t0 = time.perf_counter()
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
    return time.perf_counter() - t0


def _run_stateful(blocks, model: str, size: int, shards: int, root: str, *, identity: bool = False
                  ) -> tuple[float, int]:
    import contextlib

    from .beam import identity_models

    with identity_models() if identity else contextlib.nullcontext():
        return _run_stateful_once(blocks, model, size, shards, root)


def _run_stateful_once(blocks, model: str, size: int, shards: int, root: str) -> tuple[float, int]:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from ..beam import NextTokenPostprocess, StatefulInference
    from ..runtime import CPU

    sink, dead_root = _Count(root), os.path.join(root, "dead")
    os.makedirs(dead_root)
    inference = StatefulInference(model=model, num_shards=shards, window_size=size / 1e6,
                                  postprocess=NextTokenPostprocess(5), next_fields=("logprob",), output="arrow",
                                  providers=[CPU])
    t0 = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--streaming"])) as p:
        out, dead = p | _test_stream(blocks, size) | inference
        out | "Count" >> beam.Map(sink)
        dead | "CountDead" >> beam.Map(_Count(dead_root))
    dt = time.perf_counter() - t0
    n_dead = _Count(dead_root).total()
    shutil.rmtree(dead_root)
    return dt, n_dead


def run(model: str, tok: np.ndarray, ts: np.ndarray, *, windows: int, shards: int, repeats: int) -> dict:
    """Both streaming variants on ``tok``/``ts`` (see the module doc); a JSON-able result."""
    span = float(ts.max() - ts.min())
    size = max(1, int(span / (windows - 0.5) * 1000)) * 1000  # about ``windows`` windows, whole milliseconds
    blocks = _blocks(tok, ts, size)
    n = tok.size
    names = {"s": "stateful_inference", "si": "stateful_identity_model", "t": "identity"}
    times: dict[str, list[float]] = {v: [] for v in names}
    for _ in range(repeats):
        for v in names:  # alternating, so a change of machine load hits all alike
            root = tempfile.mkdtemp(prefix=f"bench-stream-{v}-")
            try:
                if v != "t":
                    dt, n_dead = _run_stateful(blocks, model, size, shards, root, identity=v == "si")
                    if n_dead:
                        raise RuntimeError(f"bench stream: StatefulInference dead-lettered {n_dead} events")
                else:
                    dt = _run_identity(blocks, size, shards, root)
                got = _Count(root).total()
                if got != n:
                    raise RuntimeError(f"bench stream ({v}): expected {n} output rows, got {got}")
            finally:
                shutil.rmtree(root, ignore_errors=True)
            times[v].append(dt)
    res = {}
    for v, name in names.items():
        med = statistics.median(times[v])
        res[name] = {"seconds_median": med, "seconds_all": times[v], "events_per_s": n / med}
    return {"runner": "DirectRunner --streaming (TestStream)", "events": n, "keys": tok.shape[0],
            "watermark_steps": len(blocks), "window_s": size / 1e6, "shards": shards, "repeats": repeats,
            "variants": res,
            "ratio_stateful_over_identity": res["stateful_inference"]["events_per_s"] / res["identity"]["events_per_s"],
            "ratio_stateful_identity_model_over_identity": (res["stateful_identity_model"]["events_per_s"]
                                                            / res["identity"]["events_per_s"])}
