"""Event files (Parquet, JSONL, CSV) read with pyarrow into columnar event blocks; replay as a stream.

Columns: ``key`` (string), ``ts`` (float seconds since the epoch, or ISO-8601),
``seq`` (int, optional: defaults to the row's position in the file), and a payload:
``text`` (UTF-8, expanded into one event per byte, in order; ``sub`` is the byte
offset) or ``token`` (int). Rows that cannot be read become dead letters naming the
field, what was expected and what was got.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from ..errors import InputError
from .records import END_OF_INPUT, EVENT, KEY, SEQ, SUB, TS, DeadLetter, event_json
from .transform import DEAD

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
           ".csv": "csv"}


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read an event file by its extension (all columns as read; ``ts`` and ``key`` as strings for CSV)."""
    path = os.fspath(path)
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise InputError(f"events file {path!r}: extension: expected one of {sorted(FORMATS)}, got "
                         f"{os.path.splitext(path)[1]!r}")
    if not os.path.exists(path):
        raise InputError(f"events file: expected a file at {path!r}, got no such file")
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt == "jsonl":
            try:
                return pjson.read_json(path)
            except pa.ArrowInvalid:
                return _read_jsonl_mixed(path)
        return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
            column_types={"key": pa.string(), "text": pa.string()}, strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"events file {path!r}: expected valid {fmt}, got: {e}") from e


def _read_jsonl_mixed(path: str) -> pa.Table:
    """JSONL whose columns mix types (e.g. ts as numbers and ISO strings): mixed columns become strings."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append({"_unreadable": f"line {i + 1}: {e}"})
    names = list(dict.fromkeys(k for r in rows for k in r))
    cols = {}
    for n in names:
        vals = [r.get(n) for r in rows]
        kinds = {type(v) for v in vals if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            vals = [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in vals]
        cols[n] = pa.array(vals)
    return pa.table(cols)


def _parse_ts(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str | None]]:
    """Float seconds; ISO-8601 strings parsed; NaN + a reason where neither."""
    n = len(col)
    why: list[str | None] = [None] * n
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        ts = pc.fill_null(col.cast(pa.float64()), math.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    elif pa.types.is_timestamp(col.type):
        ts = col.cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
        ts /= {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[col.type.unit]
    else:
        ts = np.full(n, math.nan)
        for i, v in enumerate(col.to_pylist()):
            try:
                ts[i] = float(v)
            except (TypeError, ValueError):
                try:
                    d = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
                    if d.tzinfo is None:
                        d = d.replace(tzinfo=UTC)
                    ts[i] = d.timestamp()
                except ValueError:
                    pass
    for i in np.flatnonzero(~np.isfinite(ts)):
        why[i] = f"ts: expected float seconds since the epoch or an ISO-8601 time, got {col[int(i)].as_py()!r}"
    return ts, why


def read_events(path: str | os.PathLike, *, vocab_size: int = 256) -> tuple[pa.Table, list[DeadLetter]]:
    """Events of a file as one table (``key, ts, seq, sub, x, event``) and the rows that could not be read.

    ``text`` rows expand to one event per UTF-8 byte (``sub`` = byte offset, same ts and seq);
    ``token`` rows are one event each. ``event`` is left null for good rows (the transform
    rebuilds it from the columns if that event is dead-lettered).
    """
    t = read_table(path)
    n = t.num_rows
    cols = set(t.column_names)
    if "key" not in cols or "ts" not in cols or not ({"text", "token"} & cols):
        raise InputError(f"events file {os.fspath(path)!r}: columns: expected key, ts and text or token, got "
                         f"{sorted(cols)}")
    dead: list[DeadLetter] = []
    keys = t.column("key").cast(pa.string()).to_pylist()
    ts, why = _parse_ts(t.column("ts"))
    if "seq" in cols:
        seq_raw = t.column("seq").to_pylist()
    else:
        seq_raw = list(range(n))
    texts = t.column("text").to_pylist() if "text" in cols else [None] * n
    toks = t.column("token").to_pylist() if "token" in cols else [None] * n
    out_key, out_ts, out_seq, out_sub, out_x = [], [], [], [], []
    for i in range(n):
        reason = None
        k, s, tx, tk = keys[i], seq_raw[i], texts[i], toks[i]
        if not isinstance(k, str) or not k:
            reason = f"key: expected a non-empty string, got {k!r}"
        elif why[i]:
            reason = why[i]
        elif isinstance(s, bool) or not isinstance(s, int):
            reason = f"seq: expected an int, got {s!r}"
        elif tx is None and tk is None:
            reason = "text/token: expected a UTF-8 string in text or an int in token, got neither"
        elif tx is not None and not isinstance(tx, str):
            reason = f"text: expected a UTF-8 string, got {tx!r}"
        elif tx is None and (isinstance(tk, bool) or not isinstance(tk, int) or not 0 <= tk < vocab_size):
            reason = f"token: expected an int in [0, {vocab_size}), got {tk!r}"
        elif tx is not None and not tx:
            reason = "text: expected a non-empty string, got ''"
        if reason is not None:
            row = {c: t.column(c)[i].as_py() for c in t.column_names}
            dead.append(DeadLetter(k if isinstance(k, str) else None, float(ts[i]) if np.isfinite(ts[i]) else None,
                                   s if isinstance(s, int) and not isinstance(s, bool) else None, None, "invalid",
                                   reason, event_json(row)))
            continue
        if tx is not None:
            b = np.frombuffer(tx.encode("utf-8"), np.uint8)
            m = len(b)
            out_key.extend([k] * m)
            out_ts.extend([float(ts[i])] * m)
            out_seq.extend([s] * m)
            out_sub.extend(range(m))
            out_x.append(b.astype(np.int64))
        else:
            out_key.append(k)
            out_ts.append(float(ts[i]))
            out_seq.append(s)
            out_sub.append(0)
            out_x.append(np.array([tk], np.int64))
    x = np.concatenate(out_x) if out_x else np.zeros(0, np.int64)
    table = pa.table({KEY: pa.array(out_key, pa.string()), TS: pa.array(out_ts, pa.float64()),
                      SEQ: pa.array(out_seq, pa.int64()), SUB: pa.array(out_sub, pa.int64()), "x": pa.array(x),
                      EVENT: pa.nulls(len(out_key), pa.string())})
    return table, dead


def blocks(table: pa.Table, rows: int = 4096) -> list[pa.RecordBatch]:
    """Split an event table into RecordBatch blocks of at most ``rows`` events."""
    return table.combine_chunks().to_batches(max_chunksize=rows) if table.num_rows else []


class _ReadFile(beam.DoFn):
    def __init__(self, block_rows: int):
        self.block_rows = block_rows

    def process(self, path: str) -> Iterator:
        table, dead = read_events(path)
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD, d)
        yield from blocks(table, self.block_rows)


class ReadEvents(beam.PTransform):
    """Read an event file inside the pipeline: ``(blocks, dead_letters)``.

    The file is read by a worker (not the launching process), so this works on
    distributed runners where the path is visible to workers.
    """

    def __init__(self, path: str | os.PathLike, *, block_rows: int = 4096, label: str | None = None):
        super().__init__(label)
        self.path = os.fspath(path)
        self.block_rows = block_rows

    def expand(self, pbegin):
        res = (pbegin | "Path" >> beam.Create([self.path])
               | "Read" >> beam.ParDo(_ReadFile(self.block_rows)).with_outputs(DEAD, main="blocks"))
        return res.blocks, res[DEAD]


class _Pace(beam.DoFn):
    """Releases each block no earlier than ``wall0 + (event time - t0) / speedup`` on the wall clock.

    ``wall0`` is fixed when the pipeline is built: the DirectRunner may set up a fresh
    DoFn instance per bundle, so a start time taken in ``setup()`` would restart the
    schedule at every bundle and the delays would add up.
    """

    def __init__(self, t0: float, speedup: float, wall0: float):
        self.t0, self.speedup, self.wall0 = t0, speedup, wall0

    def process(self, block: pa.RecordBatch):
        if self.speedup > 0 and block.num_rows:
            due = self.wall0 + (float(pc.min(block.column(TS)).as_py()) - self.t0) / self.speedup
            wait = due - time.time()
            if wait > 0:
                time.sleep(min(wait, 60.0))
        yield block


class ReplayEvents(beam.PTransform):
    """Play a recorded event file as an unbounded stream, in event-time order, with advancing watermarks.

    Events are cut into steps of ``step`` event-time seconds; each step is added to a
    TestStream and the watermark then advances to the step's end (minus
    ``out_of_orderness``). With ``speedup > 0`` blocks are released at
    ``event time / speedup`` on the wall clock (``speedup=0``: as fast as possible).
    Runs on the DirectRunner with ``--streaming`` (TestStream is not on the portable path).
    Returns ``(blocks, dead_letters)``; unreadable rows are dead letters from the start.
    """

    def __init__(self, path: str | os.PathLike, *, speedup: float = 0.0, step: float = 10.0,
                 out_of_orderness: float = 0.0, block_rows: int = 4096, label: str | None = None):
        super().__init__(label)
        if not step > 0:
            raise InputError(f"ReplayEvents: step: expected seconds > 0, got {step!r}")
        self.path = os.fspath(path)
        self.speedup, self.step, self.ooo, self.block_rows = speedup, step, out_of_orderness, block_rows

    def expand(self, pbegin):
        table, dead = read_events(self.path)
        stream = TestStream()
        n_dead = len(dead)
        if table.num_rows:
            order = np.argsort(table.column(TS).to_numpy(), kind="stable")
            table = table.take(pa.array(order))
            ts = table.column(TS).to_numpy()
            t0 = float(ts[0])
            step_of = np.floor((ts - t0) / self.step).astype(np.int64)
            bounds = np.flatnonzero(np.diff(step_of)) + 1
            starts = np.concatenate([[0], bounds])
            ends = np.concatenate([bounds, [len(ts)]])
            for a, b in zip(starts, ends, strict=True):
                part = table.slice(int(a), int(b - a))
                stream = stream.add_elements([TimestampedValue(rb, float(rb.column(TS)[0].as_py()))
                                              for rb in blocks(part, self.block_rows)])
                stream = stream.advance_watermark_to(t0 + (step_of[a] + 1) * self.step - self.ooo)
        else:
            t0 = 0.0
        stream = stream.advance_watermark_to(1e12).advance_watermark_to(END_OF_INPUT).advance_watermark_to_infinity()
        events = pbegin | "Stream" >> stream | "Pace" >> beam.ParDo(_Pace(t0, self.speedup, time.time()))
        dl = pbegin | "UnreadableRows" >> beam.Create(dead) if n_dead else (
            pbegin | "UnreadableRows" >> beam.Create([]))
        return events, dl


def demo_events(path: str | os.PathLike, *, keys: int = 6, seed: int = 0) -> str:
    """Write a small JSONL event file: several keys' text, interleaved and out of order, a duplicate
    row and an unreadable row. Returns the path."""
    rng = np.random.default_rng(seed)
    lines = _DEMO_TEXT.strip().split("\n")
    rows = []
    t0 = 1_700_000_000.0
    for k in range(keys):
        start = (k * len(lines) // keys) % len(lines)  # a different passage per key
        chunk = [lines[(start + j) % len(lines)] + "\n" for j in range(6)]
        t = t0 + float(rng.uniform(0, 20))
        for s, text in enumerate(chunk):
            t += float(rng.uniform(5, 40))
            rows.append({"key": f"user-{k}", "ts": round(t, 3), "seq": s, "text": text})
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    rows.insert(3, dict(rows[0]))  # at-least-once delivery: a duplicate row
    rows.append({"key": "user-0", "ts": "not-a-time", "seq": 99, "text": "bad row"})
    rows[5] = {**rows[5], "ts": datetime.fromtimestamp(rows[5]["ts"]).astimezone().isoformat()}  # ISO-8601 works too
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return os.fspath(path)


_DEMO_TEXT = """
First Citizen: Before we proceed any further, hear me speak.
All: Speak, speak.
First Citizen: You are all resolved rather to die than to famish?
All: Resolved. resolved.
First Citizen: First, you know Caius Marcius is chief enemy to the people.
All: We know't, we know't.
First Citizen: Let us kill him, and we'll have corn at our own price. Is't a verdict?
All: No more talking on't; let it be done: away, away!
Second Citizen: One word, good citizens.
First Citizen: We are accounted poor citizens, the patricians good.
What authority surfeits on would relieve us: if they would yield us but the superfluity,
while it were wholesome, we might guess they relieved us humanely;
but they think we are too dear: the leanness that afflicts us, the object of our misery,
is as an inventory to particularise their abundance; our sufferance is a gain to them.
Let us revenge this with our pikes, ere we become rakes: for the gods know I
speak this in hunger for bread, not in thirst for revenge.
"""
