"""Next-token job: online byte-level next-token prediction per key, on Apache Beam.

    python -m beam_jobs.next_token --input EVENTS --output DIR [--replay] [Beam pipeline options]
    python -m beam_jobs.next_token --demo --output DIR            # makes demo events, replays them

Writes ``DIR/predictions-*.parquet`` (one row per input byte: key, ts, seq, offset,
pos, topk_tokens, topk_probs, logprob_next, model_version, fresh, reset),
``DIR/dead_letters-*.parquet`` (original event + reason) and ``DIR/summary.json``, and
prints a per-key online bits/char summary. ``--replay`` plays the file as an unbounded
stream on the DirectRunner (``--streaming``) with a progress line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

import streamrnn
from streamrnn.beam import NextTokenPostprocess, StatefulInference
from streamrnn.beam.io import ReadEvents, ReplayEvents, demo_events
from streamrnn.beam.records import DEAD_LETTER_SCHEMA

PARTS = "_parts"
LN2 = math.log(2.0)


class _WriteParts(beam.DoFn):
    """Writes each bundle's Arrow blocks (or dead letters) to one Parquet part.

    The file name is a hash of the rows' identities, so a retried bundle rewrites the
    same file instead of adding a second copy; it also carries the row count (progress).
    """

    def __init__(self, root: str, kind: str):
        self.root, self.kind = root, kind

    def start_bundle(self):
        self._items: list = []

    def process(self, item):
        self._items.append(item)

    def finish_bundle(self):
        if not self._items:
            return
        if self.kind == "pred":
            t = pa.Table.from_batches(self._items)
        else:
            t = pa.Table.from_pylist([d._asdict() for d in self._items], schema=DEAD_LETTER_SCHEMA)
        self._items = []
        h = hashlib.sha1()
        for c in ("key", "seq", "sub", "kind"):
            if c in t.column_names:
                h.update(repr(t.column(c).to_pylist()).encode())
        os.makedirs(self.root, exist_ok=True)
        name = f"{self.kind}-{h.hexdigest()[:16]}-{t.num_rows}.parquet"
        tmp = os.path.join(self.root, "." + name + f".{os.getpid()}.tmp")
        pq.write_table(t, tmp)
        os.replace(tmp, os.path.join(self.root, name))


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


def build(p: beam.Pipeline, args: argparse.Namespace, parts: str) -> None:
    """The job's pipeline: events → StatefulInference (next-token postprocess) → Parquet parts."""
    if args.replay:
        events, unread = p | "ReplayEvents" >> ReplayEvents(args.input, speedup=args.speedup, step=args.step)
    else:
        events, unread = p | "ReadEvents" >> ReadEvents(args.input)
    out, dead = events | "NextToken" >> StatefulInference(
        model=args.model, num_shards=args.shards, window_size=args.window, allowed_lateness=args.allowed_lateness,
        ttl=args.ttl, postprocess=NextTokenPostprocess(args.topk), output="arrow",
        providers=_providers(args.providers))
    out | "WritePredictions" >> beam.ParDo(_WriteParts(parts, "pred"))
    ((dead, unread) | "AllDeadLetters" >> beam.Flatten()
     | "WriteDeadLetters" >> beam.ParDo(_WriteParts(parts, "dead")))


def _progress(parts: str, total: int, stop: threading.Event, out=None) -> None:
    out = out or sys.stderr
    t0 = time.monotonic()
    while not stop.wait(0.5):
        done = dead = 0
        if os.path.isdir(parts):
            for f in os.listdir(parts):
                if f.endswith(".parquet"):
                    n = int(f.rsplit("-", 1)[1].split(".")[0])
                    if f.startswith("pred-"):
                        done += n
                    else:
                        dead += n
        dt = time.monotonic() - t0
        pct = 100.0 * (done + dead) / total if total else 0.0
        out.write(f"\r  {done:,} predictions, {dead:,} dead letters ({pct:5.1f}% of {total:,} events), "
                  f"{done / dt if dt else 0:,.0f} events/s, {dt:5.1f} s ")
        out.flush()
    out.write("\n")


def finalize(parts: str, output: str, *, rows_per_file: int = 1_000_000) -> dict:
    """Turn the pipeline's parts into the job's Parquet files and the per-key summary."""
    pred_files = sorted(f for f in os.listdir(parts) if f.startswith("pred-")) if os.path.isdir(parts) else []
    dead_files = sorted(f for f in os.listdir(parts) if f.startswith("dead-")) if os.path.isdir(parts) else []
    for f in os.listdir(output):
        if (f.startswith("predictions-") or f.startswith("dead_letters-")) and f.endswith(".parquet"):
            os.remove(os.path.join(output, f))
    if pred_files:
        t = pa.concat_tables([pq.read_table(os.path.join(parts, f)) for f in pred_files])
    else:
        t = None
    summary: dict = {"keys": {}, "events": 0}
    if t is not None and t.num_rows:
        # one stream per (key, fresh-start): order by key, ts, seq, offset
        order = np.lexsort((t.column("sub").to_numpy(), t.column("seq").to_numpy(), t.column("ts").to_numpy(),
                            np.asarray(t.column("key").to_pylist(), dtype=object).astype(str)))
        t = t.take(pa.array(order))
        keys = np.asarray(t.column("key").to_pylist(), dtype=object)
        lp = t.column("logprob").to_numpy(zero_copy_only=False).astype(np.float64)
        fresh = t.column("fresh").to_numpy(zero_copy_only=False)
        nxt = np.full(len(lp), np.nan)
        same = (keys[1:] == keys[:-1]) & ~fresh[1:]
        nxt[:-1][same] = lp[1:][same]
        pred = pa.table({
            "key": t.column("key"), "ts": t.column("ts"), "seq": t.column("seq"), "offset": t.column("sub"),
            "pos": t.column("pos"), "topk_tokens": _lists(t.column("topk_tokens"), pa.int64()),
            "topk_probs": _lists(t.column("topk_probs"), pa.float32()),
            "logprob_next": pa.array(nxt, pa.float64(), mask=np.isnan(nxt)),
            "model_version": t.column("model_version"), "fresh": t.column("fresh"), "reset": t.column("reset")})
        n_files = max(1, math.ceil(pred.num_rows / rows_per_file))
        for i in range(n_files):
            pq.write_table(pred.slice(i * rows_per_file, rows_per_file),
                           os.path.join(output, f"predictions-{i:05d}-of-{n_files:05d}.parquet"))
        summary["events"] = pred.num_rows
        uk, inv = np.unique(keys.astype(str), return_inverse=True)
        for j, k in enumerate(uk):
            m = inv == j
            scored = nxt[m][~np.isnan(nxt[m])]
            summary["keys"][str(k)] = {"bytes": int(m.sum()), "scored": len(scored),
                                       "bits_per_char": float(-scored.mean() / LN2) if len(scored) else None}
        allv = nxt[~np.isnan(nxt)]
        summary["bits_per_char"] = float(-allv.mean() / LN2) if len(allv) else None
        summary["model_version"] = sorted(set(t.column("model_version").to_pylist()))
    dead = (pa.concat_tables([pq.read_table(os.path.join(parts, f)) for f in dead_files]) if dead_files
            else DEAD_LETTER_SCHEMA.empty_table())
    pq.write_table(dead, os.path.join(output, "dead_letters-00000-of-00001.parquet"))
    summary["dead_letters"] = {k: int(v) for k, v in zip(*np.unique(
        np.asarray(dead.column("kind").to_pylist(), dtype=str), return_counts=True), strict=True)} if dead.num_rows \
        else {}
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    shutil.rmtree(parts, ignore_errors=True)
    return summary


def _lists(col: pa.ChunkedArray, typ: pa.DataType) -> pa.Array:
    arr = col.combine_chunks()
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(arr) * arr.type.list_size + 1, arr.type.list_size,
                                                       dtype=np.int32)), arr.flatten().cast(typ))


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
    parts = os.path.join(args.output, PARTS)
    shutil.rmtree(parts, ignore_errors=True)
    from streamrnn.beam.io import read_events

    table, unreadable = read_events(args.input)
    total = table.num_rows + len(unreadable)
    del table
    mode = "replay (streaming)" if args.replay else "batch"
    print(f"next_token: {args.input} -> {args.output}: {total:,} events, {mode}, model {args.model}", file=sys.stderr)
    stop = threading.Event()
    bar = None
    if not args.quiet:
        bar = threading.Thread(target=_progress, args=(parts, total, stop), daemon=True)
        bar.start()
    t0 = time.monotonic()
    try:
        with beam.Pipeline(options=opts) as p:
            build(p, args, parts)
    finally:
        stop.set()
        if bar is not None:
            bar.join()
    summary = finalize(parts, args.output)
    summary["seconds"] = round(time.monotonic() - t0, 3)
    print_summary(summary)
    print(f"wrote {args.output}/predictions-*.parquet, dead_letters-*.parquet, summary.json "
          f"in {summary['seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
