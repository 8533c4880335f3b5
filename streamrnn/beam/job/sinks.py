"""Sinks of the Beam layer: Parquet files written by Beam's own file sink, retry-safe.

:class:`WriteParquet` hands its input to ``apache_beam.io.fileio.WriteToFiles`` with
:class:`ParquetSink`: each bundle writes a temporary file, and only the files of bundles
that committed are moved to their final names. A retried bundle (a crash, a lost worker,
a different bundle split) writes a new temporary file; the failed attempt's file is never
finalized, so every row lands in exactly one final file, in batch and in streaming.

Windowing: the input is put in the global window with a trigger that fires for every
bundle's file (``Repeatedly(AfterCount(1))``). Nothing is ever late there, so no row is
dropped whatever timestamps its elements carry (event time, flush time, or Beam's minimum),
and files are finalized as bundles commit in streaming and at the end in batch.

Final names: ``<prefix>-<earliest ts in the file, epoch s>-<part>-<shard>.parquet``, one
file per bundle (``part`` is a random name drawn per bundle attempt).
"""

from __future__ import annotations

import math
import uuid
from typing import Any, NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.options.value_provider import StaticValueProvider
from apache_beam.transforms import trigger
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue


class Part(NamedTuple):
    """What one bundle writes for one window: its rows as one table, under a name of its own."""

    name: str
    data: pa.Table


class ParquetSink(fileio.FileSink):
    """A ``FileSink`` writing Arrow data to one Parquet file with pyarrow.

    Records are :class:`Part`, ``pyarrow.RecordBatch`` or ``Table`` blocks (cast to
    ``schema``), or rows (dicts or NamedTuples), buffered and written ``row_group`` at a time.
    """

    def __init__(self, schema: pa.Schema, row_group: int = 65536):
        self.schema, self.row_group = schema, row_group

    def open(self, fh) -> None:
        self._writer = pq.ParquetWriter(fh, self.schema)
        self._rows: list[dict[str, Any]] = []

    def write(self, record: Any) -> None:
        if isinstance(record, Part):
            record = record.data
        if isinstance(record, (pa.RecordBatch, pa.Table)):
            self._write_rows()
            self._writer.write(record.select(self.schema.names).cast(self.schema))
            return
        self._rows.append(record._asdict() if hasattr(record, "_asdict") else dict(record))
        if len(self._rows) >= self.row_group:
            self._write_rows()

    def _write_rows(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def flush(self) -> None:
        self._write_rows()
        self._writer.close()

    def create_metadata(self, destination: str, full_file_name: str) -> fileio.FileMetadata:
        return fileio.FileMetadata(mime_type="application/vnd.apache.parquet",
                                   compression_type=CompressionTypes.UNCOMPRESSED)


class _ParquetSinkFactory:
    """What ``WriteToFiles(sink=...)`` calls per file (an instance would be re-made without its schema)."""

    def __init__(self, schema: pa.Schema, row_group: int):
        self.schema, self.row_group = schema, row_group

    def __call__(self, destination: Any) -> ParquetSink:
        return ParquetSink(self.schema, self.row_group)


def _part_name(part: Part) -> str:
    return part.name


def as_table(items: list[Any], schema: pa.Schema) -> pa.Table:
    """Arrow blocks and rows (dicts, NamedTuples) as one table in ``schema``."""
    tables = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b for b in items
              if isinstance(b, (pa.RecordBatch, pa.Table))]
    tables = [t.select(schema.names).cast(schema) for t in tables]
    rows = [r._asdict() if hasattr(r, "_asdict") else r for r in items if not isinstance(r, (pa.RecordBatch, pa.Table))]
    if rows:
        tables.append(pa.Table.from_pylist(rows, schema=schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


class _Parts(beam.DoFn):
    """Gathers a bundle's blocks and rows per window into one :class:`Part` with a fresh random name.

    The name keeps apart the files of every firing (``WriteToFiles`` names files by window
    and shard index only, so a second firing would overwrite the first). A retried bundle
    draws new names, and the failed attempt's parts are discarded with it.
    """

    def __init__(self, schema: pa.Schema):
        self.schema = schema

    def start_bundle(self) -> None:
        self._parts: dict[Any, list] = {}

    def process(self, item: Any, window=beam.DoFn.WindowParam) -> None:
        self._parts.setdefault(window, []).append(item)

    def finish_bundle(self):
        for w, items in self._parts.items():
            t = as_table(items, self.schema)
            if not t.num_rows:
                continue
            first = pc.min(t.column("ts")).as_py() if "ts" in t.column_names else None
            start = math.floor(first) if first is not None and math.isfinite(first) else 0
            yield WindowedValue(Part(f"{start}-{uuid.uuid4().hex[:12]}", t), w.max_timestamp(), [w])
        self._parts = {}


class _Naming:
    """``<prefix>-<part name>-<shard>.parquet``."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, window, pane, shard_index, total_shards, compression, destination) -> str:
        return f"{self.prefix}-{destination}-{shard_index or 0}.parquet"


class WriteParquet(beam.PTransform):
    """Write Arrow blocks or rows to ``directory`` as Parquet through ``fileio.WriteToFiles``.

    ``directory`` may be on any Beam filesystem. ``temp_directory`` (default: a new
    ``.temp<uuid>`` folder under ``directory``) holds files until they are finalized.
    Returns the ``FileResult`` of each final file.
    """

    def __init__(self, directory: str, *, prefix: str, schema: pa.Schema, temp_directory: str | None = None,
                 row_group: int = 65536, label: str | None = None):
        super().__init__(label)
        self.directory, self.prefix, self.schema = directory, prefix, schema
        self.temp_directory, self.row_group = temp_directory, row_group

    def expand(self, pcoll):
        temp = None if self.temp_directory is None else StaticValueProvider(str, self.temp_directory)
        return (pcoll
                | "Panes" >> beam.WindowInto(GlobalWindows(), trigger=trigger.Repeatedly(trigger.AfterCount(1)),
                                             accumulation_mode=trigger.AccumulationMode.DISCARDING)
                | "Parts" >> beam.ParDo(_Parts(self.schema))
                | "Files" >> fileio.WriteToFiles(
                    self.directory, file_naming=_Naming(self.prefix), destination=_part_name,
                    sink=_ParquetSinkFactory(self.schema, self.row_group), temp_directory=temp, shards=1))
