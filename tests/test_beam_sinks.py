"""Parquet files through Beam's file sink: every row exactly once, even when writes fail and bundles are retried.

Runs on a filesystem that is not the local one (``memfs://``), whose writes of temporary
files fail half-way (leaving a partial file, as a crash would) until the injected failures
are used up; the DirectRunner retries the failed bundles.
"""

from __future__ import annotations

import io

import apache_beam as beam
import beam_memfs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_stream
from apache_beam.transforms.window import FixedWindows, TimestampedValue
from apache_beam.utils.timestamp import MIN_TIMESTAMP

from streamrnn.beam.job.sinks import WriteParquet
from streamrnn.beam.records import DEAD_LETTER_SCHEMA, END_OF_INPUT, DeadLetter

SCHEMA = pa.schema([("key", pa.string()), ("ts", pa.float64()), ("seq", pa.int64())])
LEGACY_BATCH = "apache_beam.runners.direct.direct_runner.BundleBasedDirectRunner"


@pytest.fixture()
def memfs():
    beam_memfs.reset()
    yield beam_memfs.FILES
    beam_memfs.reset()


def _block(lo: int, hi: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"key": [f"k{i % 7}" for i in range(lo, hi)],
                                       "ts": [100.0 + i for i in range(lo, hi)], "seq": list(range(lo, hi))},
                                      schema=SCHEMA)


def _final_rows(files: dict, prefix: str) -> list[tuple]:
    """Rows of the final files (each must be a complete Parquet file)."""
    tables = [pq.read_table(io.BytesIO(b)) for p, b in files.items() if p.startswith(prefix)]
    return sorted(tuple(r.values()) for t in tables for r in t.to_pylist())


@pytest.mark.parametrize("streaming", [False, True])
def test_retried_bundles_leave_one_copy_of_every_row(memfs, streaming):
    faults = beam_memfs.fail_writes(lambda p: p.startswith("memfs://out/"), times=3)  # any data file write
    blocks = [_block(i, i + 25) for i in range(0, 200, 25)]
    opts = ["--streaming"] if streaming else ["--runner", LEGACY_BATCH]
    with beam.Pipeline(options=PipelineOptions(opts)) as p:
        if streaming:
            # timestamps on time, behind the watermark (late for any event-time window), at Beam's minimum
            # timestamp and at the end of the input: the sink must take them all
            s = test_stream.TestStream()
            for i, b in enumerate(blocks):
                s = s.add_elements([TimestampedValue(b, 100.0 + 25 * i if i % 3 else 0.0)])
                s = s.advance_watermark_to(100.0 + 25 * (i + 1))
            s = s.add_elements([TimestampedValue(_block(500, 510), MIN_TIMESTAMP),
                                TimestampedValue(_block(510, 520), END_OF_INPUT)])
            src = p | s.advance_watermark_to_infinity() | beam.WindowInto(FixedWindows(10))
        else:
            src = p | beam.Create([*blocks, _block(500, 510), _block(510, 520)])
        src | WriteParquet("memfs://out", prefix="rows", schema=SCHEMA, temp_directory="memfs://out/.temp-x")
    assert faults[1] == 0 and len(beam_memfs.FAULTED) == 3  # every injected failure happened (and was retried)
    assert not [f for f in beam_memfs.FAULTED if f.startswith("memfs://out/rows-")]  # never under a final name
    want = sorted(tuple(r.values()) for b in [*blocks, _block(500, 510), _block(510, 520)] for r in b.to_pylist())
    assert _final_rows(memfs, "memfs://out/rows-") == want


def test_rows_and_dead_letters(memfs):
    """Row elements (NamedTuples) are written as one table per bundle, in the records' schema."""
    dead = [DeadLetter("a", 1.5, i, None, "invalid", f"ts: bad {i}", "{}") for i in range(30)]
    dead.append(DeadLetter(None, None, None, None, "invalid", "line 3: expected a JSON object, got list", "[1]"))
    with beam.Pipeline(options=PipelineOptions([])) as p:
        p | beam.Create(dead) | WriteParquet("memfs://d", prefix="dead", schema=DEAD_LETTER_SCHEMA)
    got = [pq.read_table(io.BytesIO(b)) for path, b in memfs.items() if path.startswith("memfs://d/dead-")]
    assert all(t.schema.equals(DEAD_LETTER_SCHEMA) for t in got)
    rows = sorted((DeadLetter(**r) for t in got for r in t.to_pylist()), key=repr)
    assert rows == sorted(dead, key=repr)
    assert not [path for path in memfs if "/.temp" in path]
