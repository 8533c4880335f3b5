"""The per-key summary of a job, combined in the pipeline and written as one small JSON file.

``summary.json``::

    {"keys": {KEY: {COUNT: n, "scored": m, METRIC: value}}, "events": N, METRIC: value,
     "dead_letters": {kind: n}, "model_version": [...]}

``METRIC`` is ``scale * mean`` of one output column over the rows where it is not null
(e.g. bits per char: ``-mean(logprob_next) / ln 2``). The file is written once, when the
input ends, through Beam's filesystems (temporary name, then renamed), so a retried
write never leaves a partial file under the final name.
"""

from __future__ import annotations

import json
import math
import sys
import uuid
from collections.abc import Iterable, Mapping
from typing import IO, Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import trigger
from apache_beam.transforms.window import GlobalWindows

SUMMARY = "summary.json"


class MeanMetric:
    """A per-key metric: ``scale * mean(column)`` over non-null rows; rows counted as ``count_name``."""

    def __init__(self, name: str, column: str, *, scale: float = 1.0, count_name: str = "events"):
        self.name, self.column, self.scale, self.count_name = name, column, scale, count_name

    def value(self, scored: int, total: float) -> float | None:
        return self.scale * total / scored if scored else None


class _KeyStats(beam.DoFn):
    """(key, (rows, scored rows, sum of the column)) for each key of an Arrow block."""

    def __init__(self, column: str):
        self.column = column

    def process(self, block: pa.RecordBatch):
        g = pa.Table.from_batches([block]).group_by("key").aggregate(
            [("key", "count"), (self.column, "count"), (self.column, "sum")])
        for k, n, m, s in zip(*(g.column(c).to_pylist() for c in
                                ("key", "key_count", f"{self.column}_count", f"{self.column}_sum")), strict=True):
            yield k, (int(n), int(m), float(s or 0.0))


def _sum3(vs: Iterable[tuple[int, int, float]]) -> tuple[int, int, float]:
    b = m = 0
    s = 0.0
    for n, c, v in vs:
        b, m, s = b + n, m + c, s + v
    return b, m, s


def _at_end(label: str):
    # one final pane when the input ends (also for an unbounded replay: global window, watermark trigger)
    return label >> beam.WindowInto(GlobalWindows(), trigger=trigger.AfterWatermark(),
                                    accumulation_mode=trigger.AccumulationMode.DISCARDING)


def write_json(path: str, obj: Any) -> None:
    """Write JSON through Beam's filesystems: a temporary name first, then a rename (no partial file)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(tmp, mime_type="application/json") as f:
        f.write(json.dumps(obj, indent=2).encode())
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


class _WriteSummary(beam.DoFn):
    def __init__(self, root: str, metric: MeanMetric):
        self.root, self.metric = root, metric

    def process(self, items):
        metric = self.metric
        summary: dict = {"keys": {}, "events": 0, "dead_letters": {}, "dead_letter_rows": {}, "model_version": []}
        scored, total = 0, 0.0
        for kind, v in items:
            if kind == "key":
                k, (n, m, s) = v
                summary["keys"][k] = {metric.count_name: n, "scored": m, metric.name: metric.value(m, s)}
                summary["events"] += n
                scored, total = scored + m, total + s
            elif kind == "dead":
                rows, events = v[1]
                summary["dead_letters"][v[0]] = int(events)
                summary["dead_letter_rows"][v[0]] = int(rows)
            else:
                summary["model_version"].append(v)
        summary["keys"] = dict(sorted(summary["keys"].items()))
        summary["dead_letters"] = dict(sorted(summary["dead_letters"].items()))
        summary["dead_letter_rows"] = dict(sorted(summary["dead_letter_rows"].items()))
        summary["model_version"].sort()
        summary[metric.name] = metric.value(scored, total)
        write_json(FileSystems.join(self.root, SUMMARY), summary)


class WriteSummary(beam.PTransform):
    """``(outputs, dead_letters) | WriteSummary(root, metric)``: ``root/summary.json`` when the input ends.

    ``outputs`` are Arrow blocks with ``key``, ``model_version`` and the metric's column;
    ``dead_letters`` are :class:`~streamrnn.beam.records.DeadLetter` records (counted by kind).
    """

    def __init__(self, root: str, metric: MeanMetric, label: str | None = None):
        super().__init__(label)
        self.root, self.metric = root, metric

    def expand(self, pcolls):
        outputs, dead = pcolls
        per_key = (outputs | "KeyStats" >> beam.ParDo(_KeyStats(self.metric.column)) | _at_end("KeyStatsAtEnd")
                   | "SumPerKey" >> beam.CombinePerKey(_sum3) | "TagKeys" >> beam.Map(lambda kv: ("key", kv)))
        # per kind: the input rows (key, seq, ts) that were dead-lettered, and their events (a text row's bytes)
        dead_n = (dead | "DeadRow" >> beam.Map(lambda d: ((d.kind, d.key, d.seq, d.ts), 1)) | _at_end("DeadAtEnd")
                  | "EventsPerRow" >> beam.CombinePerKey(sum)
                  | "ByKind" >> beam.Map(lambda kv: (kv[0][0], (1, kv[1])))
                  | "CountDead" >> beam.CombinePerKey(_sum_pairs) | "TagDead" >> beam.Map(lambda kv: ("dead", kv)))
        versions = (outputs | "Versions" >> beam.FlatMap(lambda b: set(b.column("model_version").to_pylist()))
                    | _at_end("VersionsAtEnd") | "DistinctVersions" >> beam.Distinct()
                    | "TagVersions" >> beam.Map(lambda v: ("model", v)))
        return ((per_key, dead_n, versions) | "SummaryParts" >> beam.Flatten()
                | "SummaryList" >> beam.CombineGlobally(beam.combiners.ToListCombineFn()).without_defaults()
                | "Write" >> beam.ParDo(_WriteSummary(self.root, self.metric)))


def _sum_pairs(pairs) -> tuple[int, int]:
    a = b = 0
    for x, y in pairs:
        a, b = a + x, b + y
    return a, b


def _n(n: int, what: str) -> str:
    return f"{n:,} {what}" + ("" if n == 1 else "s")


def dead_letter_line(summary: dict, *, unit: str) -> str:
    """``dead letters: 3 rows (duplicate 1 row, 7 bytes; invalid 2 rows)``: input rows, and their events
    where a row expands to several (a text row's bytes)."""
    events, rows = summary["dead_letters"], summary.get("dead_letter_rows") or summary["dead_letters"]
    parts = []
    for k in sorted(rows):
        more = f", {_n(events[k], unit)}" if events.get(k, rows[k]) != rows[k] else ""
        parts.append(f"{k} {_n(rows[k], 'row')}{more}")
    return f"dead letters: {_n(sum(rows.values()), 'row')}" + (f" ({'; '.join(parts)})" if parts else "")


def read_summary(root: str) -> dict | None:
    """The summary a pipeline wrote under ``root`` (small; read through Beam's filesystems), or None."""
    path = FileSystems.join(root, SUMMARY)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return json.loads(f.read().decode())


def print_summary(summary: dict, metric: MeanMetric, *, title: str, unit: str, out: IO[str] | None = None,
                  top: int = 20) -> None:
    """The readable end-of-job summary: the ``top`` keys by rows, the total, dead letters, model versions."""
    out = out or sys.stdout
    keys, count, name = summary["keys"], metric.count_name, metric.name
    out.write(f"\n{title}, {_n(len(keys), 'key')}\n")
    out.write(f"  {'key':<24} {count:>8} {unit:>10}\n")
    rows = sorted(keys.items(), key=lambda kv: -kv[1][count])

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for k, v in rows[:top]:
        out.write(f"  {k:<24} {v[count]:>8,} {fmt(v[name]):>10}\n")
    if len(rows) > top:
        out.write(f"  ... {_n(len(rows) - top, 'more key')} in {SUMMARY}\n")
    out.write(f"  {'all':<24} {summary['events']:>8,} {fmt(summary.get(name)):>10}\n")
    out.write(dead_letter_line(summary, unit="byte" if count == "bytes" else "event") + "\n")
    if summary.get("model_version"):
        out.write(f"model: {', '.join(summary['model_version'])}\n")


#: the online loss's unit and its factor from nats per scored event, by model task: a byte LM's loss in bits per
#: byte of text ("bits/char", as its summary table, ``summary.json`` and the docs name it); a forecast model's
#: in nats per bar (the NLL of the bar's % log return under the previous bar's forecast, as ``nll_h1``)
LOSS_UNITS = {"lm": ("bits/char", 1.0 / math.log(2.0)), "forecast": ("nats/bar", 1.0)}


def live_line(t: Mapping[str, float], task: str | None = None) -> str:
    """The running job's figures from its metrics (:func:`streamrnn.metrics.export.totals`), in one line.

    Events in and applied, active keys and their recurrent state, the online loss so far in the
    task's unit (:data:`LOSS_UNITS`; bits per scored event for an unknown task), dead letters by
    reason, model calls.
    """
    def n(name: str) -> float:
        return t.get(name, 0.0)

    parts = [f"{n('streamrnn_events_in_total'):,.0f} events in", f"{n('streamrnn_events_applied_total'):,.0f} applied",
             f"{_n(round(n('streamrnn_active_keys')), 'key')} ({_bytes(n('streamrnn_state_bytes'))} state)"]
    scored = n("streamrnn_online_scored_events_total")
    if scored:
        unit, factor = LOSS_UNITS.get(task or "", ("bits/event", 1.0 / math.log(2.0)))
        parts.append(f"{n('streamrnn_online_loss_nats_total') / scored * factor:.3f} {unit} online")
    dead = {k.split("reason=")[1].rstrip("}"): v for k, v in t.items()
            if k.startswith("streamrnn_dead_letters_total{") and v}
    parts.append(_n(round(sum(dead.values())), "dead letter")
                 + (f" ({', '.join(f'{k} {v:,.0f}' for k, v in sorted(dead.items()))})" if dead else ""))
    parts.append(_n(round(n("streamrnn_batches_total")), "model call"))
    return ", ".join(parts)


def _bytes(b: float) -> str:
    """Binary units, as the docs give state sizes (``9.1 KiB`` per charlm key)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{b:,.0f} B"
