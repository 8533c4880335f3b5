"""Next-token job: online byte-level next-token prediction per key, on Apache Beam.

    python -m beam_jobs.next_token --input EVENTS --output DIR [--replay] [Beam pipeline options]
    python -m beam_jobs.next_token --demo --output DIR            # makes demo events, replays them

The pipeline itself writes, through Beam's filesystems (local, gs://, s3://, ...),
``DIR/predictions-*.parquet`` (one row per input byte: key, ts, seq, offset, pos,
topk_tokens, topk_probs, logprob, logprob_next, model_version, fresh, reset),
``DIR/dead_letters-*.parquet`` (original event + reason) and ``DIR/summary.json`` (per-key
online bits/char, combined in the pipeline). ``logprob_next`` is paired inside the stateful
step (each key's latest row waits for the key's next byte or the end of its stream); the
launcher only reads the small summary back and prints it. ``--replay`` plays the file as an
unbounded stream on the DirectRunner (``--streaming``) with a progress line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms import trigger
from apache_beam.transforms.window import GlobalWindows

import streamrnn
from streamrnn.beam import NextTokenPostprocess, StatefulInference
from streamrnn.beam.io import ReadEvents, ReplayEvents, demo_events
from streamrnn.beam.records import DEAD_LETTER_SCHEMA

LN2 = math.log(2.0)
PREDICTIONS, DEAD_LETTERS, SUMMARY = "predictions", "dead_letters", "summary.json"

PREDICTION_SCHEMA = pa.schema([
    ("key", pa.string()), ("ts", pa.float64()), ("seq", pa.int64()), ("offset", pa.int64()), ("pos", pa.int64()),
    ("topk_tokens", pa.list_(pa.int64())), ("topk_probs", pa.list_(pa.float32())), ("logprob", pa.float64()),
    ("logprob_next", pa.float64()), ("model_version", pa.string()), ("fresh", pa.bool_()), ("reset", pa.string())])


def job_columns(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The transform's Arrow block (with ``logprob_next`` paired in the pipeline) in the job's columns.

    ``logprob`` (this byte's log-prob given the previous ones) is null where the key's stream
    started fresh; ``logprob_next`` is null for a stream's last byte.
    """
    lp = batch.column("logprob").cast(pa.float64())
    lp = pc.if_else(pc.is_nan(lp), pa.nulls(len(lp), pa.float64()), lp)
    cols = {"key": batch.column("key"), "ts": batch.column("ts"), "seq": batch.column("seq"),
            "offset": batch.column("sub"), "pos": batch.column("pos"),
            "topk_tokens": _lists(batch.column("topk_tokens"), pa.int64()),
            "topk_probs": _lists(batch.column("topk_probs"), pa.float32()), "logprob": lp,
            "logprob_next": batch.column("logprob_next").cast(pa.float64()),
            "model_version": batch.column("model_version"), "fresh": batch.column("fresh"),
            "reset": batch.column("reset")}
    return pa.RecordBatch.from_arrays([cols[f.name] for f in PREDICTION_SCHEMA], schema=PREDICTION_SCHEMA)


def _lists(arr: pa.Array, typ: pa.DataType) -> pa.Array:
    n = arr.type.list_size
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(arr) * n + 1, n, dtype=np.int32)),
                                    arr.flatten().cast(typ))


class _WriteParquet(beam.DoFn):
    """Writes each bundle's rows to one Parquet file through Beam's filesystems (local, gs://, s3://, ...).

    ``DIR/<prefix>-<hash>-<rows>.parquet``: the hash is of the rows' identities, so a retried
    bundle rewrites the same file instead of adding a second copy; the row count in the name
    lets the launcher show progress without reading the files.
    """

    def __init__(self, root: str, prefix: str):
        self.root, self.prefix = root, prefix

    def start_bundle(self):
        self._items: list = []

    def process(self, item):
        self._items.append(item)

    def finish_bundle(self):
        if not self._items:
            return
        if self.prefix == PREDICTIONS:
            t = pa.Table.from_batches(self._items, schema=PREDICTION_SCHEMA)
        else:
            t = pa.Table.from_pylist([d._asdict() for d in self._items], schema=DEAD_LETTER_SCHEMA)
        self._items = []
        h = hashlib.sha1()
        for c in ("key", "seq", "offset", "sub", "kind"):
            if c in t.column_names:
                h.update(repr(t.column(c).to_pylist()).encode())
        path = FileSystems.join(self.root, f"{self.prefix}-{h.hexdigest()[:16]}-{t.num_rows}.parquet")
        with FileSystems.create(path) as f:
            pq.write_table(t, f)


def _key_stats(batch: pa.RecordBatch):
    """(key, (bytes, scored bytes, sum of logprob_next)) for each key of a block."""
    g = pa.Table.from_batches([batch]).group_by("key").aggregate(
        [("key", "count"), ("logprob_next", "count"), ("logprob_next", "sum")])
    for k, n, m, s in zip(g.column("key").to_pylist(), g.column("key_count").to_pylist(),
                          g.column("logprob_next_count").to_pylist(), g.column("logprob_next_sum").to_pylist(),
                          strict=True):
        yield k, (int(n), int(m), float(s or 0.0))


def _sum3(vs):
    b = m = 0
    s = 0.0
    for n, c, v in vs:
        b, m, s = b + n, m + c, s + v
    return b, m, s


def _at_end(label: str):
    # one final pane per key when the input ends (also for an unbounded replay: global window, watermark trigger)
    return label >> beam.WindowInto(GlobalWindows(), trigger=trigger.AfterWatermark(),
                                    accumulation_mode=trigger.AccumulationMode.DISCARDING)


def _bpc(scored: int, total: float) -> float | None:
    return -total / scored / LN2 if scored else None


class _WriteSummary(beam.DoFn):
    """Assembles ``summary.json`` from the pipeline's small aggregates and writes it via Beam's filesystems."""

    def __init__(self, root: str):
        self.root = root

    def process(self, items):
        summary: dict = {"keys": {}, "events": 0, "dead_letters": {}, "model_version": []}
        scored = 0
        total = 0.0
        for kind, v in items:
            if kind == "key":
                k, (n, m, s) = v
                summary["keys"][k] = {"bytes": n, "scored": m, "bits_per_char": _bpc(m, s)}
                summary["events"] += n
                scored, total = scored + m, total + s
            elif kind == "dead":
                summary["dead_letters"][v[0]] = int(v[1])
            else:
                summary["model_version"].append(v)
        summary["keys"] = dict(sorted(summary["keys"].items()))
        summary["dead_letters"] = dict(sorted(summary["dead_letters"].items()))
        summary["model_version"].sort()
        summary["bits_per_char"] = _bpc(scored, total)
        with FileSystems.create(FileSystems.join(self.root, SUMMARY), mime_type="application/json") as f:
            f.write(json.dumps(summary, indent=2).encode())


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m beam_jobs.next_token", description=__doc__.split("\n")[0])
    ap.add_argument("--input", help="events file (.parquet, .jsonl, .csv) with key, ts, [seq], text|token")
    ap.add_argument("--output", required=True, help="output directory")
    ap.add_argument("--demo", action="store_true", help="make demo events in DIR/demo_events.jsonl and use them")
    ap.add_argument("--model", default=streamrnn.DEFAULT_MODEL, help="streamrnn LM (default: %(default)s)")
    ap.add_argument("--replay", action="store_true",
                    help="play the file as an unbounded stream in event-time order (DirectRunner --streaming)")
    ap.add_argument("--speedup", type=float, default=0.0,
                    help="replay pace: event-time seconds per wall second (0: as fast as possible)")
    ap.add_argument("--step", type=float, default=30.0, help="replay: event-time seconds per watermark step")
    ap.add_argument("--window", type=float, default=60.0, help="event-time window (s) (default: %(default)s)")
    ap.add_argument("--allowed-lateness", type=float, default=0.0, help="seconds (default: %(default)s)")
    ap.add_argument("--ttl", type=float, default=None, help="idle seconds (event time) before a key's state drops")
    ap.add_argument("--shards", type=int, default=16, help="state shards (default: %(default)s)")
    ap.add_argument("--topk", type=int, default=5, help="top-k next bytes per event (default: %(default)s)")
    ap.add_argument("--providers", default="auto", help="'auto', 'cpu' or 'cuda'")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    args, beam_args = ap.parse_known_args(argv)
    if not args.input and not args.demo:
        ap.error("--input: expected an events file (or --demo), got neither")
    return args, beam_args


def _providers(s: str):
    return {"auto": "auto", "cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}.get(s, s)


def build(p: beam.Pipeline, args: argparse.Namespace) -> None:
    """events → StatefulInference (next-token postprocess, ``logprob_next`` paired in the pipeline)
    → Parquet predictions and dead letters, and the per-key summary, all written by the pipeline."""
    if args.replay:
        events, unread = p | "ReplayEvents" >> ReplayEvents(args.input, speedup=args.speedup, step=args.step)
    else:
        events, unread = p | "ReadEvents" >> ReadEvents(args.input)
    out, dead = events | "NextToken" >> StatefulInference(
        model=args.model, num_shards=args.shards, window_size=args.window, allowed_lateness=args.allowed_lateness,
        ttl=args.ttl, postprocess=NextTokenPostprocess(args.topk), next_fields=("logprob",), output="arrow",
        providers=_providers(args.providers))
    preds = out | "JobColumns" >> beam.Map(job_columns)
    preds | "WritePredictions" >> beam.ParDo(_WriteParquet(args.output, PREDICTIONS))
    dead_all = (dead, unread) | "AllDeadLetters" >> beam.Flatten()
    dead_all | "WriteDeadLetters" >> beam.ParDo(_WriteParquet(args.output, DEAD_LETTERS))
    per_key = (preds | "KeyStats" >> beam.FlatMap(_key_stats) | _at_end("KeyStatsAtEnd")
               | "SumPerKey" >> beam.CombinePerKey(_sum3) | "TagKeys" >> beam.Map(lambda kv: ("key", kv)))
    dead_n = (dead_all | "DeadKind" >> beam.Map(lambda d: d.kind) | _at_end("DeadAtEnd")
              | "CountDead" >> beam.combiners.Count.PerElement() | "TagDead" >> beam.Map(lambda kv: ("dead", kv)))
    versions = (preds | "Versions" >> beam.FlatMap(lambda b: set(b.column("model_version").to_pylist()))
                | _at_end("VersionsAtEnd") | "DistinctVersions" >> beam.Distinct()
                | "TagVersions" >> beam.Map(lambda v: ("model", v)))
    ((per_key, dead_n, versions) | "SummaryParts" >> beam.Flatten()
     | "SummaryList" >> beam.CombineGlobally(beam.combiners.ToListCombineFn()).without_defaults()
     | "WriteSummary" >> beam.ParDo(_WriteSummary(args.output)))


def _count_rows(output: str, prefix: str) -> int:
    try:
        res = FileSystems.match([FileSystems.join(output, f"{prefix}-*.parquet")])[0]
    except Exception:  # nothing written yet, or a filesystem that cannot list now
        return 0
    n = 0
    for m in res.metadata_list:
        try:
            n += int(m.path.rsplit("-", 1)[1].split(".")[0])
        except (IndexError, ValueError):
            pass
    return n


def _progress(output: str, total: int, stop: threading.Event, out=None) -> None:
    """Progress from the files the pipeline has written (their names carry their row counts)."""
    out = out or sys.stderr
    t0 = time.monotonic()
    while not stop.wait(0.5):
        done, dead = _count_rows(output, PREDICTIONS), _count_rows(output, DEAD_LETTERS)
        dt = time.monotonic() - t0
        pct = 100.0 * (done + dead) / total if total else 0.0
        out.write(f"\r  {done:,} predictions, {dead:,} dead letters ({pct:5.1f}% of {total:,} events), "
                  f"{done / dt if dt else 0:,.0f} events/s, {dt:5.1f} s ")
        out.flush()
    out.write("\n")


def _clear_outputs(output: str) -> None:
    """Remove a previous run's outputs (the job names its files by content, so old ones would mix in)."""
    pats = [FileSystems.join(output, f"{p}-*.parquet") for p in (PREDICTIONS, DEAD_LETTERS)]
    pats.append(FileSystems.join(output, SUMMARY))
    for res in FileSystems.match(pats):
        paths = [m.path for m in res.metadata_list]
        if paths:
            FileSystems.delete(paths)


def read_summary(output: str) -> dict | None:
    """The summary the pipeline wrote (small; read through Beam's filesystems), or None."""
    path = FileSystems.join(output, SUMMARY)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode())


def print_summary(summary: dict, out=None, *, top: int = 20) -> None:
    """The readable end-of-job summary."""
    out = out or sys.stdout
    keys = summary["keys"]
    out.write(f"\nonline next-byte loss per key (bits/char; lower is better), {len(keys)} keys\n")
    out.write(f"  {'key':<24} {'bytes':>8} {'bits/char':>10}\n")
    rows = sorted(keys.items(), key=lambda kv: -kv[1]["bytes"])
    for k, v in rows[:top]:
        bpc = "-" if v["bits_per_char"] is None else f"{v['bits_per_char']:.3f}"
        out.write(f"  {k:<24} {v['bytes']:>8,} {bpc:>10}\n")
    if len(rows) > top:
        out.write(f"  ... {len(rows) - top} more keys in summary.json\n")
    total = summary.get("bits_per_char")
    out.write(f"  {'all':<24} {summary['events']:>8,} {'-' if total is None else f'{total:.3f}':>10}\n")
    dl = summary["dead_letters"]
    out.write(f"dead letters: {sum(dl.values())} " + (f"({', '.join(f'{k} {v}' for k, v in sorted(dl.items()))})"
                                                      if dl else "") + "\n")
    if summary.get("model_version"):
        out.write(f"model: {', '.join(summary['model_version'])}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args, beam_args = _parse(argv)
    if "://" not in args.output:
        os.makedirs(args.output, exist_ok=True)
    if args.demo:
        args.input = demo_events(os.path.join(args.output, "demo_events.jsonl"))
        args.replay = True
        if args.speedup == 0.0 and "--speedup" not in (argv or sys.argv):
            args.speedup = 20.0
    if not os.path.exists(args.model):
        print(f"next_token: model: expected a streamrnn LM at {args.model!r}, got no such file "
              "(train one, or pass --model)", file=sys.stderr)
        return 2
    opts = PipelineOptions(beam_args)
    if args.replay:
        opts.view_as(StandardOptions).streaming = True
    _clear_outputs(args.output)
    from streamrnn.beam.io import read_events

    table, unreadable = read_events(args.input)
    total = table.num_rows + len(unreadable)
    del table
    mode = "replay (streaming)" if args.replay else "batch"
    print(f"next_token: {args.input} -> {args.output}: {total:,} events, {mode}, model {args.model}", file=sys.stderr)
    stop = threading.Event()
    bar = None
    if not args.quiet:
        bar = threading.Thread(target=_progress, args=(args.output, total, stop), daemon=True)
        bar.start()
    t0 = time.monotonic()
    try:
        with beam.Pipeline(options=opts) as p:
            build(p, args)
    finally:
        stop.set()
        if bar is not None:
            bar.join()
    seconds = time.monotonic() - t0
    summary = read_summary(args.output)
    if summary is None:
        print(f"next_token: {args.output}/{SUMMARY}: expected the pipeline's summary, got no file "
              "(no events were read?)", file=sys.stderr)
    else:
        print_summary(summary)
    print(f"wrote {args.output}/predictions-*.parquet, dead_letters-*.parquet, summary.json in {seconds:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
