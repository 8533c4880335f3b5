"""Next-token job: online byte-level next-token prediction per key, on Apache Beam.

    python -m beam_jobs.next_token --input EVENTS --output DIR [--replay] [Beam pipeline options]
    python -m beam_jobs.next_token --demo --output DIR            # makes demo events, replays them
    python -m beam_jobs.next_token --input 'gs://b/events/*.jsonl' --watch --output DIR [--watch-stop-after 1h]
    python -m beam_jobs.next_token --input projects/P/subscriptions/S --output DIR     # Pub/Sub, JSON rows
    python -m beam_jobs.next_token --input kafka://BROKERS/TOPIC --output DIR --runner FlinkRunner ...

``EVENTS`` is a file or glob (.jsonl, .csv, .parquet, .arrow) on any Beam filesystem (local, gs://, s3://,
hdfs://); workers read it, the launcher only lists it. The pipeline writes, through Beam's file sinks
(temporary files, finalized per event-time window, so a retried bundle never leaves a second copy):
``DIR/predictions-*.parquet`` (one row per input byte: key, ts, seq, offset, pos, topk_tokens, topk_probs,
logprob, logprob_next, state_health [with ``--health flag|heal``; flag is the default for a model with a reference
loss, as the shipped charlm], model_version, fresh, reset),
``DIR/dead_letters-*.parquet`` (original row + reason) and ``DIR/summary.json`` (per-key online bits/char,
combined in the pipeline). Rows that cannot be read are dead letters; a missing or empty input, a missing
model or an unwritable output is a one-line error with exit code 2, as is a bad flag (a value out of range, a
flag neither this job nor Beam knows, a model of another task, ``--replay`` off the DirectRunner), found
before any pipeline runs. ``--replay`` plays the file as an unbounded stream on the DirectRunner
(``--streaming``). ``--watch``, a Pub/Sub subscription or a Kafka topic read live input (streaming;
:mod:`streamrnn.beam.job.live`): the same rows, dead letters and outputs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from streamrnn.cli.logs import guard_imports, imports_done, quiet_job_logging

guard_imports()  # before apache_beam: no import-time warnings on the user's terminal

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from streamrnn.beam import NextTokenPostprocess, StatefulInference  # noqa: E402
from streamrnn.beam.job import (  # noqa: E402
    DEAD_LETTER_SCHEMA,
    SUMMARY,
    CountUnread,
    EventParser,
    InputError,
    JobError,
    LiveRun,
    MeanMetric,
    ModelLoadError,
    Output,
    ReadEvents,
    ReadLive,
    ReplayEvents,
    WriteParquet,
    WriteSummary,
    add_live_args,
    at_least,
    demo_events,
    launcher,
    live_source,
    print_summary,
    read_summary,
)
from streamrnn.cli.args import add_health_args, health_arg  # noqa: E402
from streamrnn.keyed.health import policy_of  # noqa: E402

PREDICTIONS, DEAD_LETTERS = "predictions", "dead_letters"
BITS_PER_CHAR = MeanMetric("bits_per_char", "logprob_next", scale=-1.0 / math.log(2.0), count_name="bytes")

PREDICTION_SCHEMA = pa.schema([
    ("key", pa.string()), ("ts", pa.float64()), ("seq", pa.int64()), ("offset", pa.int64()), ("pos", pa.int64()),
    ("topk_tokens", pa.list_(pa.int64())), ("topk_probs", pa.list_(pa.float32())), ("logprob", pa.float64()),
    ("logprob_next", pa.float64()), ("model_version", pa.string()), ("fresh", pa.bool_()), ("reset", pa.string())])
HEALTH_FIELD = pa.field("state_health", pa.float64())  #: with health flag (the default) or heal, before model_version

imports_done()  # the placeholder goes: a program importing this module configures logging itself


def prediction_schema(health: bool = False) -> pa.Schema:
    """The predictions' columns: :data:`PREDICTION_SCHEMA`, with ``health`` also ``state_health``."""
    if not health:
        return PREDICTION_SCHEMA
    return PREDICTION_SCHEMA.insert(PREDICTION_SCHEMA.get_field_index("model_version"), HEALTH_FIELD)


def job_columns(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The transform's Arrow block (with ``logprob_next`` paired in the pipeline) in the job's columns.

    ``logprob`` (this byte's log-prob given the previous ones) is null where the key's stream
    started fresh; ``logprob_next`` is null for a stream's last byte. With health on, ``state_health`` (null where
    unknown: no reference loss and no shadow window yet).
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
    schema = prediction_schema(HEALTH_FIELD.name in batch.schema.names)
    if schema is not PREDICTION_SCHEMA:
        sh = batch.column(HEALTH_FIELD.name).cast(pa.float64())
        cols[HEALTH_FIELD.name] = pc.if_else(pc.is_nan(sh), pa.nulls(len(sh), pa.float64()), sh)
    return pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema)


def _lists(arr: pa.Array, typ: pa.DataType) -> pa.Array:
    n = arr.type.list_size
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(arr) * n + 1, n, dtype=np.int32)),
                                    arr.flatten().cast(typ))


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The job's flags and Beam's; JobError (one line) for a bad value, an unknown flag or runner."""
    ap = launcher.JobParser("next_token", description=__doc__.split("\n")[0])
    seconds, non_negative = at_least(0.0, open_=True), at_least(0.0)
    ap.add_argument("--input", help="events file or glob (.parquet, .jsonl, .csv, .arrow) with key, ts, [seq], "
                                    "text|token, on any Beam filesystem; or live: a glob with --watch, "
                                    "projects/P/subscriptions/S (Pub/Sub) or kafka://BROKERS/TOPIC (JSON rows)")
    ap.add_argument("--output", required=True, help="output directory (any Beam filesystem)")
    ap.add_argument("--demo", action="store_true", help="make demo events in DIR/demo_events.jsonl and use them")
    ap.add_argument("--model", default=os.environ.get("STREAMRNN_MODEL", "shipped:charlm"),
                    help="streamrnn LM: a path on any Beam filesystem, or shipped:NAME for a model shipped in the "
                         "package, found by each worker in its own install (default: %(default)s)")
    ap.add_argument("--replay", action="store_true",
                    help="play the file as an unbounded stream in event-time order (DirectRunner --streaming)")
    ap.add_argument("--speedup", type=non_negative, default=0.0,
                    help="replay pace: event-time seconds per wall second (0: as fast as possible)")
    ap.add_argument("--step", type=seconds, default=30.0, help="replay: event-time seconds per watermark step")
    ap.add_argument("--window", type=at_least(0.001, below=1e8), default=60.0,
                    help="event-time window (s): flush cadence and output file windows (default: %(default)s)")
    ap.add_argument("--allowed-lateness", type=non_negative, default=0.0, help="seconds (default: %(default)s)")
    ap.add_argument("--ttl", type=non_negative, default=1800.0,
                    help="idle seconds (event time) that end a key's stream and drop its state; 0: never "
                         "(default: %(default)s)")
    ap.add_argument("--shards", type=at_least(1), default=16, help="state shards (default: %(default)s)")
    ap.add_argument("--topk", type=at_least(1), default=5,
                    help="top-k next bytes per event, up to the model's vocabulary size (default: %(default)s)")
    ap.add_argument("--providers", default="auto", help="'auto', 'cpu' or 'cuda'")
    ap.add_argument("--save-state", metavar="DIR", default=None,
                    help="when the input ends, write every key's state (a snapshot set with a manifest; any Beam "
                         "filesystem) for a later run's --initial-state; streams are kept, not ended")
    ap.add_argument("--initial-state", metavar="DIR", default=None,
                    help="start from a --save-state snapshot (of the same model), with any --shards")
    add_health_args(ap, "keys", "flag for a model with a reference loss, such as the shipped charlm; else off")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    ap.add_argument("--verbose", action="store_true", help="Beam's INFO log lines too")
    add_live_args(ap)
    launcher.add_metrics_args(ap, "next_token")
    args, beam_args = ap.parse_known_args(argv)
    if not args.input and not args.demo and not args.watch:  # --watch without a glob: live_source names it
        ap.error("--input: expected an events file (or --demo), got neither")
    beam_args = launcher.beam_flags(ap, beam_args, replay="--demo" if args.demo else "--replay" if args.replay
                                    else None)
    args.live = live_source(args, beam_args)
    args.health_arg = health_arg(ap, args)
    return args, beam_args


def build(p: beam.Pipeline, args: argparse.Namespace, inference: StatefulInference, temp_dir: str) -> None:
    """events → StatefulInference (next-token postprocess, ``logprob_next`` paired in the pipeline)
    → Parquet predictions and dead letters (Beam file sinks), and the per-key summary."""
    if args.live is not None:
        events, unread = p | "ReadLive" >> ReadLive(args.live, EventParser())
    elif args.replay:
        events, unread = p | "ReplayEvents" >> ReplayEvents(args.input, speedup=args.speedup, step=args.step)
    else:
        events, unread = p | "ReadEvents" >> ReadEvents(args.input)
    out, dead = events | "NextToken" >> inference
    preds = out | "JobColumns" >> beam.Map(job_columns)
    unread = unread | "CountUnread" >> beam.ParDo(CountUnread())
    dead_all = (dead, unread) | "AllDeadLetters" >> beam.Flatten()
    schema = prediction_schema(args.health != "off")
    preds | "WritePredictions" >> WriteParquet(args.output, prefix=PREDICTIONS, schema=schema,
                                               temp_directory=temp_dir)
    dead_all | "WriteDeadLetters" >> WriteParquet(args.output, prefix=DEAD_LETTERS, schema=DEAD_LETTER_SCHEMA,
                                                  temp_directory=temp_dir)
    (preds, dead_all) | "Summary" >> WriteSummary(args.output, BITS_PER_CHAR)


def _inference(args: argparse.Namespace) -> StatefulInference:
    launcher.require_model(args.model, "a streamrnn LM", " (train one, or pass --model)")
    try:
        inference = StatefulInference(
            model=args.model, num_shards=args.shards, window_size=args.window,
            allowed_lateness=args.allowed_lateness, ttl=args.ttl or None, postprocess=NextTokenPostprocess(args.topk),
            next_fields=("logprob",), output="arrow", providers=args.providers, save_state=args.save_state,
            initial_state=args.initial_state, health=args.health_arg)
    except (InputError, ModelLoadError) as e:
        raise JobError(str(e).splitlines()[0]) from None
    args.health = policy_of(inference.health, inference.spec)  # the policy taken (the default: the model's)
    launcher.require_task(args.model, inference.spec, "lm", "a language model")
    if args.save_state and launcher.is_local(args.save_state):  # before the pipeline runs, not when it ends
        launcher.require_writable_file("--save-state", os.path.join(args.save_state, "manifest.json"))
    vocab = inference.spec.input.vocab_size or 0
    if args.topk > vocab:
        raise JobError(f"--topk: expected an int in 1..{vocab} (the model's vocabulary size), got {args.topk}")
    return inference


def _run(args: argparse.Namespace, beam_args: list[str], argv: Sequence[str] | None, out: Output) -> int:
    inference = _inference(args)  # the model's checks before the demo writes its events
    if args.demo:
        if not launcher.is_local(args.output):
            raise JobError(f"--demo: expected a local --output folder, got {args.output!r}")
        os.makedirs(args.output, exist_ok=True)
        args.input = demo_events(os.path.join(args.output, "demo_events.jsonl"))
        args.replay = True
        if args.speedup == 0.0 and "--speedup" not in (argv or sys.argv):
            args.speedup = 20.0
    if args.live is None:
        files = launcher.input_files(args.input)
        source = f"{args.input} ({len(files)} file(s), {sum(m.size_in_bytes for m in files):,} bytes)"
    else:
        source = args.live.describe()
    with LiveRun(args.live) as run:
        seconds = launcher.execute(
            "next_token", args, beam_args, out, source=source, live=run.status,
            outputs={PREDICTIONS: "predictions", DEAD_LETTERS: "dead letters"},
            build=lambda p: build(p, args, inference, out.temp))
    summary = read_summary(args.output)
    if summary is None:
        raise JobError(f"input: expected events in {args.input!r}, got none"
                       + (" before the input ended" if args.live is not None else ""))
    print_summary(summary, BITS_PER_CHAR, title="online next-byte loss per key (bits/char; lower is better)",
                  unit="bits/char")
    print(f"wrote {launcher.join(args.output, 'predictions-*.parquet')}, dead_letters-*.parquet, {SUMMARY} in "
          f"{seconds:.1f} s",
          file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, beam_args = _parse(argv)
    except JobError as e:
        return launcher.refuse("next_token", e)
    quiet_job_logging("next_token", verbose=args.verbose)
    out = Output(args.output, (PREDICTIONS, DEAD_LETTERS), (SUMMARY,))
    return launcher.run("next_token", out, lambda: _run(args, beam_args, argv, out))


if __name__ == "__main__":
    sys.exit(main())
