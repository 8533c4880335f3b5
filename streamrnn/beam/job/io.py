"""Sources of the Beam layer: event files read inside the pipeline, or replayed as a stream.

Every read goes through Beam's filesystems (``apache_beam.io.filesystems.FileSystems``),
so ``gs://``, ``s3://``, ``hdfs://`` and any registered scheme work as local paths do.
The file formats and the per-row rules are in :mod:`streamrnn.beam.job.event_files`: a row
that cannot be used is a dead letter, never an error that stops the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import datetime

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io import fileio
from apache_beam.io.filesystem import BeamIOError, FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.transforms.window import TimestampedValue

from ...errors import InputError
from ..records import DEAD, TS, DeadLetter
from .event_files import FORMATS, format_of, parse_events
from .live import EventParser, LiveParser
from .replay import play, step_bounds, stepped_stream

#: Output tag of the rows that cannot be used (dead letters).

__all__ = ["DEMO_TEXT", "FORMATS", "ParseFiles", "ReadEvents", "ReplayEvents", "blocks", "demo_events", "local_copy",
           "match_inputs", "read_events"]


#: Beam's extra that brings each scheme's filesystem
EXTRAS = {"gs": "gcp", "s3": "aws", "azfs": "azure"}


def missing_filesystem(path: str) -> str | None:
    """None when a Beam filesystem here opens ``path``, else why not in a few words, naming the missing extra:
    ``gs:// needs Beam's gcp extra: pip install "apache-beam[gcp]==2.77.0"``."""
    try:
        FileSystems.get_filesystem(path)
        return None
    except ValueError:
        import apache_beam

        scheme = path.split("://", 1)[0].lower() if "://" in path else path
        extra = EXTRAS.get(scheme)
        if extra is None:
            return f"no Beam filesystem for {scheme}:// is installed"
        return f'{scheme}:// needs Beam\'s {extra} extra: pip install "apache-beam[{extra}]=={apache_beam.__version__}"'


def match_inputs(pattern: str) -> list[FileMetadata]:
    """The files an input path or glob names, by metadata only (nothing is opened).

    InputError (one line) when nothing matches, when every match is empty, when no Beam
    filesystem here opens the path (naming the missing extra), or when a match has an extension
    that is not an events format.
    """
    why = missing_filesystem(pattern)
    if why is not None:
        raise InputError(f"input: expected a path on a filesystem Beam can open here, got {pattern!r} ({why})")
    try:
        found = [m for r in FileSystems.match([pattern]) for m in r.metadata_list]
    except BeamIOError:
        found = []
    except Exception as e:  # a filesystem's own error (no such bucket, no credentials)
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"input: expected an events file at {pattern!r}, got: {why}") from None
    if not found:
        raise InputError(f"input: expected an events file at {pattern!r}, got no such file")
    for m in found:
        format_of(m.path)
    if all(m.size_in_bytes == 0 for m in found):
        raise InputError(f"input: expected events in {pattern!r}, got an empty file")
    return sorted(found, key=lambda m: m.path)


def read_events(path: str | os.PathLike, *, vocab_size: int = 256) -> tuple[pa.Table, list[DeadLetter]]:
    """Events of one file (``key, ts, seq, sub, x, event``) and its unusable rows, read through Beam's filesystems."""
    path = os.fspath(path)
    format_of(path)
    with FileSystems.open(path, compression_type="uncompressed") as f:
        data = f.read()
    return parse_events(data, path, vocab_size=vocab_size)


def local_copy(path: str | os.PathLike) -> str:
    """A local path for a file on any Beam filesystem (the path itself when it is local).

    A remote file is copied once into the temp directory, named by its path and size, so
    ONNX Runtime (which reads local files only) can load e.g. ``--model gs://b/charlm.onnx``.
    """
    path = os.fspath(path)
    if isinstance(FileSystems.get_filesystem(path), LocalFileSystem):
        return path
    size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    name = hashlib.sha1(f"{path}:{size}".encode()).hexdigest()[:16] + "-" + path.rsplit("/", 1)[-1]
    local = os.path.join(tempfile.gettempdir(), "streamrnn-files", name)
    if not os.path.exists(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        part = f"{local}.{os.getpid()}.part"
        with FileSystems.open(path, compression_type="uncompressed") as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(part, local)
    return local


def blocks(table: pa.Table, rows: int = 4096) -> list[pa.RecordBatch]:
    """Split an event table into RecordBatch blocks of at most ``rows`` events."""
    return table.combine_chunks().to_batches(max_chunksize=rows) if table.num_rows else []


def _first_ts(table: pa.Table) -> float:
    """Event time for a file's dead letters: its earliest event (0.0 when it has none)."""
    return float(pc.min(table.column(TS)).as_py()) if table.num_rows else 0.0


class ParseFiles(beam.DoFn):
    """One matched file -> its elements (main output) and dead letters (``DEAD``), by a job's parser.

    The one rule for reading files inside the pipeline, for events and bars alike: the parser is the
    job's :class:`~streamrnn.beam.job.live.LiveParser` (the live sources use it too). ``files`` is the
    launch-time list, whose positions are the files' indices (a file not in it comes after them). With
    ``timestamped``, each element carries its earliest event time and the dead letters the file's
    earliest (0.0 without one); else they keep the file's timestamp.
    """

    def __init__(self, parser: LiveParser, files: Sequence[str] = (), *, timestamped: bool = True):
        self.parser, self.timestamped = parser, timestamped
        self.index = {f: i for i, f in enumerate(files)}

    def process(self, f: fileio.ReadableFile) -> Iterator:
        path = f.metadata.path
        parsed = self.parser.file(path, f.read(), self.index.get(path, len(self.index)))
        t0 = min((t for _, t in parsed.items), default=0.0)
        for d in parsed.dead:
            yield beam.pvalue.TaggedOutput(DEAD, TimestampedValue(d, t0) if self.timestamped else d)
        for item, t in parsed.items:
            yield TimestampedValue(item, t) if self.timestamped else item


class ReadEvents(beam.PTransform):
    """Read event files (a path or a glob, on any Beam filesystem) inside the pipeline: ``(blocks, dead_letters)``.

    Workers list and read the files; the launching process opens nothing.
    """

    def __init__(self, path: str | os.PathLike, *, block_rows: int = 4096, label: str | None = None):
        super().__init__(label)
        self.path = os.fspath(path)
        self.block_rows = block_rows

    def expand(self, pbegin):
        res = (pbegin | "Match" >> fileio.MatchFiles(self.path)
               | "Open" >> fileio.ReadMatches(compression="uncompressed")
               | "Parse" >> beam.ParDo(ParseFiles(EventParser(self.block_rows))).with_outputs(DEAD, main="blocks"))
        return res.blocks, res[DEAD]


class _Pace(beam.DoFn):
    """Releases each block no earlier than ``wall0 + (event time - t0) / speedup`` on the wall clock.

    ``wall0`` is fixed when the pipeline is built: the DirectRunner may set up a fresh
    DoFn instance per bundle, so a start time taken in ``setup()`` would restart the
    schedule at every bundle and the delays would add up.
    """

    def __init__(self, t0: float, speedup: float, wall0: float):
        self.t0, self.speedup, self.wall0 = t0, speedup, wall0

    def process(self, block):
        if self.speedup > 0 and isinstance(block, pa.RecordBatch) and block.num_rows:
            due = self.wall0 + (float(pc.min(block.column(TS)).as_py()) - self.t0) / self.speedup
            wait = due - time.time()
            if wait > 0:
                time.sleep(min(wait, 60.0))
        yield block


class ReplayEvents(beam.PTransform):
    """Play recorded event files as an unbounded stream, in event-time order, with advancing watermarks.

    Events are cut into steps of ``step`` event-time seconds; each step is added to a
    TestStream and the watermark then advances to the step's end (minus
    ``out_of_orderness``). With ``speedup > 0`` blocks are released at
    ``event time / speedup`` on the wall clock (``speedup=0``: as fast as possible).
    Runs on the DirectRunner with ``--streaming``. A TestStream holds its elements from
    the start, so the files are read (through Beam's filesystems) when the pipeline is
    built. Returns ``(blocks, dead_letters)``; unusable rows are dead letters in the first step.
    """

    def __init__(self, path: str | os.PathLike, *, speedup: float = 0.0, step: float = 10.0,
                 out_of_orderness: float = 0.0, block_rows: int = 4096, label: str | None = None):
        super().__init__(label)
        if not step > 0:
            raise InputError(f"ReplayEvents: step: expected seconds > 0, got {step!r}")
        self.path = os.fspath(path)
        self.speedup, self.step, self.ooo, self.block_rows = speedup, step, out_of_orderness, block_rows

    def expand(self, pbegin):
        tables, dead = [], []
        for m in match_inputs(self.path):
            t, d = read_events(m.path)
            tables.append(t)
            dead.extend(d)
        table = pa.concat_tables(tables)
        t0 = _first_ts(table)
        steps = []
        if table.num_rows:
            table = table.take(pa.array(np.argsort(table.column(TS).to_numpy(), kind="stable")))
            for a, b, k in step_bounds(table.column(TS).to_numpy(), t0, self.step):
                items = [TimestampedValue(rb, float(rb.column(TS)[0].as_py()))
                         for rb in blocks(table.slice(a, b - a), self.block_rows)]
                steps.append((items, t0 + (k + 1) * self.step - self.ooo))
        events, dead_letters = play(pbegin, stepped_stream(steps, dead, t0), "events")
        return events | "Pace" >> beam.ParDo(_Pace(t0, self.speedup, time.time())), dead_letters


def demo_events(path: str | os.PathLike, *, keys: int = 6, seed: int = 0) -> str:
    """Write a small JSONL event file: several keys' text, interleaved and out of order, a duplicate
    row and an unreadable row. Returns the path."""
    rng = np.random.default_rng(seed)
    lines = DEMO_TEXT.strip().split("\n")
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


#: The demo events' text (Coriolanus, act 1): ``demo_events`` and the benchmarks' byte events.
DEMO_TEXT = """
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
