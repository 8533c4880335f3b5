"""Event files: every format read into the same events; every bad row a dead letter, never an abort.

The reference is a plain-Python expansion of the rows that are good (one event per UTF-8
byte of ``text``, or one per ``token``), independent of the readers.
"""

from __future__ import annotations

import csv
import io
import json

import apache_beam as beam
import beam_memfs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrnn.beam.job.event_files import TS_MAX, parse_events
from streamrnn.beam.job.io import ReadEvents, ReplayEvents, match_inputs, read_events
from streamrnn.errors import InputError

T0 = 1_700_000_000.0


def expand(rows: list[dict]) -> list[tuple]:
    """(key, ts, seq, sub, x) of good rows; seq defaults to the row's position."""
    out = []
    for pos, r in enumerate(rows):
        seq = r.get("seq", pos)
        if "text" in r:
            out += [(r["key"], float(r["ts"]), seq, i, b) for i, b in enumerate(r["text"].encode())]
        else:
            out.append((r["key"], float(r["ts"]), seq, 0, r["token"]))
    return out


def events(table: pa.Table) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in ("key", "ts", "seq", "sub", "x")), strict=True))


def encode(rows: list[dict], fmt: str) -> bytes:
    """Rows in a file format (the writers are the formats' own libraries, not the readers under test)."""
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    names = list(dict.fromkeys(k for r in rows for k in r))
    if fmt == "csv":
        s = io.StringIO()
        w = csv.DictWriter(s, names)  # CRLF rows: the writer then quotes any \r or \n in a value
        w.writeheader()
        w.writerows({k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
        return s.getvalue().encode()
    t = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(t, sink)
    else:
        with pa.ipc.new_file(sink, t.schema) as w:
            w.write_table(t, max_chunksize=3)
    return sink.getvalue()


EXT = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
_row = st.fixed_dictionaries({
    "key": st.sampled_from(["a", "a", "a", "b", "ключ", "k 3"]),  # skewed keys, non-ASCII
    "ts": st.floats(0, 5000).map(lambda d: round(T0 + d, 4)),  # sub-ms event times
    "text": _text})


@pytest.mark.parametrize("fmt", list(EXT))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, min_size=1, max_size=12), with_seq=st.booleans())
def test_formats_read_the_same_events(fmt, rows, with_seq):
    if with_seq:
        rows = [{**r, "seq": 100 - i} for i, r in enumerate(rows)]
    table, dead = parse_events(encode(rows, fmt), f"e.{EXT[fmt]}")
    assert dead == []
    assert events(table) == expand(rows)


def _line(r: dict) -> bytes:
    return json.dumps({"key": r["key"], "ts": r["ts"], "text": r["text"]}, ensure_ascii=False).encode()


_BAD = {  # a corrupted JSONL line made from a row, and the field its dead letter names
    "byte": (lambda r: _line(r).replace(b'"text": "', b'"text": "\xff', 1), "line"),  # not UTF-8
    "ms": (lambda r: _line({**r, "ts": r["ts"] * 1000}), "ts"),  # epoch milliseconds
    "empty": (lambda r: _line({**r, "text": ""}), "text"),
}


@settings(max_examples=20, deadline=None)
@given(rows=st.lists(st.tuples(_row, st.sampled_from([None, None, "byte", "ms", "empty"])), min_size=1, max_size=10),
       big=st.booleans())
def test_bad_rows_among_good_ones(rows, big):
    """Any mix of good and corrupted JSONL lines: the good rows' events exactly, one dead letter per bad line."""
    if big:  # a huge event among them
        rows = [*rows, ({"key": "big", "ts": T0, "text": "ü" * 50_000}, None)]
    lines, good, want_dead = [], [], []
    for pos, (r, bad) in enumerate(rows):
        if bad is None:
            good.append({**r, "seq": pos})
            lines.append(_line(r))
        else:
            lines.append(_BAD[bad][0](r))
            want_dead.append(_BAD[bad][1])
    table, dead = parse_events(b"\n".join(lines), "e.jsonl")
    assert events(table) == expand(good)
    assert sorted(d.reason.split(" ")[0].rstrip(":") for d in dead) == sorted(want_dead)
    assert all(d.kind == "invalid" and d.event for d in dead)


def _bad_reasons(dead) -> list[str]:
    return sorted(d.reason.split(":")[0] for d in dead)


def test_jsonl_bad_lines_are_dead_letters():
    good = [{"key": "a", "ts": T0, "text": "héllo"}, {"key": "b", "ts": T0 + 0.25, "token": 7}]
    lines = [json.dumps(good[0]).encode(),
             b'{"key": "a", "ts": 1, "text": "x\xffy"}',        # one non-UTF-8 byte
             b"{not json",
             b"[1, 2]",
             json.dumps({"key": 123, "ts": T0, "token": 1}).encode(),      # int key: not the key "123"
             json.dumps({"key": "a", "ts": -1e13, "token": 1}).encode(),
             json.dumps({"key": "a", "ts": 1e13, "token": 1}).encode(),
             json.dumps({"key": "a", "ts": T0 * 1000, "token": 1}).encode(),  # epoch milliseconds
             json.dumps({"key": "a", "ts": T0, "text": ""}).encode(),
             json.dumps({"key": "a", "ts": T0, "token": 256}).encode(),
             json.dumps(good[1]).encode()]
    table, dead = parse_events(b"\n".join(lines) + b"\n", "e.jsonl")
    assert events(table) == expand([{**good[0], "seq": 0}, {**good[1], "seq": 10}])  # seq: the row's position
    assert _bad_reasons(dead) == sorted(["line 2", "line 3", "line 4", "key", "ts", "ts", "ts", "text", "token"])
    utf8 = next(d for d in dead if d.reason.startswith("line 2"))
    assert "0xff" in utf8.reason and json.loads(utf8.event)["raw"] == '{"key": "a", "ts": 1, "text": "x\\xffy"}'
    ms = next(d for d in dead if json.loads(d.event).get("ts") == T0 * 1000)
    assert "(epoch milliseconds? give seconds)" in ms.reason and ms.kind == "invalid" and ms.key == "a"
    assert sum("milliseconds" in d.reason for d in dead) == 2  # 1e13 reads as ms too; -1e13 does not


def test_csv_bad_rows_are_dead_letters():
    data = (b"key,ts,seq,text\n"
            b"a,1700000000.5,0,\"two\nlines\"\n"
            b"b,1700000001\n"                        # too few fields
            b"c,1700000002,1,x\xffy\n"               # not UTF-8
            b"d,1700000003,2,ok,extra\n"             # too many fields
            b"e,1700000004,z,ok\n"                   # seq not an int
            b"f,yesterday,3,ok\n"
            b"g,1700000005,4,fine\n")
    table, dead = parse_events(data, "e.csv")
    assert events(table) == expand([{"key": "a", "ts": 1700000000.5, "seq": 0, "text": "two\nlines"},
                                    {"key": "g", "ts": 1700000005, "seq": 4, "text": "fine"}])
    assert _bad_reasons(dead) == ["CSV row 2", "CSV row 4", "seq", "text", "ts"]
    assert json.loads(next(d for d in dead if d.reason.startswith("ts")).event)["ts"] == "yesterday"


def test_parquet_binary_text_column_rows_are_kept():
    t = pa.table({"key": ["a", "b", "c"], "ts": [T0, T0 + 1, T0 + 2],
                  "text": pa.array([b"ok", b"\xff\xfe", "ü".encode()], pa.binary())})
    sink = io.BytesIO()
    pq.write_table(t, sink)
    table, dead = parse_events(sink.getvalue(), "e.parquet")
    assert events(table) == expand([{"key": "a", "ts": T0, "text": "ok", "seq": 0},
                                    {"key": "c", "ts": T0 + 2, "text": "ü", "seq": 2}])
    assert [d.key for d in dead] == ["b"] and "0xff" in dead[0].reason


def _batch(keys, ts, texts) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"key": keys, "ts": ts, "text": texts})


def test_arrow_malformed_block_is_one_dead_letter_and_the_rest_is_read():
    ok1 = _batch(["a", "b"], [T0, T0 + 1], ["xy", "z"])
    bad = _batch(["c", "d"], [T0, T0], ["QQQQQQQQ", "zz"])  # its string data is made invalid UTF-8 below
    ok2 = _batch(["e"], [T0 + 3], ["w"])
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, ok1.schema) as w:
        for b in (ok1, bad, ok2):
            w.write_batch(b)
    data = sink.getvalue()
    assert data.count(b"QQQQQQQQ") == 1
    table, dead = parse_events(data.replace(b"QQQQQQQQ", b"\xff" * 8), "e.arrow")
    assert events(table) == [(k, t, s if s < 2 else s + 2, i, x) for k, t, s, i, x in expand(
        [{"key": "a", "ts": T0, "text": "xy"}, {"key": "b", "ts": T0 + 1, "text": "z"},
         {"key": "e", "ts": T0 + 3, "text": "w"}])]
    assert len(dead) == 1 and dead[0].reason.startswith("arrow block 1:") and dead[0].kind == "invalid"
    # the stream format: a truncated stream keeps the blocks before the break
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, ok1.schema) as w:
        w.write_batch(ok1)
        w.write_batch(ok2)
    cut = sink.getvalue()[:-40]
    table, dead = parse_events(cut, "e.arrows")
    assert events(table) == expand([{"key": "a", "ts": T0, "text": "xy"}, {"key": "b", "ts": T0 + 1, "text": "z"}])
    assert len(dead) == 1 and dead[0].reason.startswith("arrow block 1:")


def test_seq_is_optional_per_row_and_a_missing_payload_is_named():
    """A row without seq (no field, null, or an empty CSV cell) takes its position, even when other rows have
    one; a row without text or token is blamed on them, not on seq."""
    lines = [json.dumps(r).encode() for r in (
        {"key": "a", "ts": 1.0, "seq": 10, "text": "x"}, {"key": "a", "ts": 2.0, "text": "y"},
        {"key": "a", "ts": 3.0, "seq": None, "text": "z"}, {"key": "a", "ts": 4.0, "seq": 11})]
    table, dead = parse_events(b"\n".join(lines) + b"\n", "e.jsonl")
    assert table.column("seq").to_pylist() == [10, 1, 2]
    assert [d.reason for d in dead] == ["text/token: expected a UTF-8 string in text or an int in token, got neither"]
    table, dead = parse_events(b"key,ts,seq,text\na,1,7,x\na,2,,y\n", "e.csv")
    assert table.column("seq").to_pylist() == [7, 1] and not dead


def test_ts_bounds():
    rows = [{"key": "a", "ts": TS_MAX, "token": 1}, {"key": "a", "ts": TS_MAX + 1, "token": 1},
            {"key": "a", "ts": "2024-02-29T12:00:00.000250+01:00", "token": 2}]
    table, dead = parse_events(encode(rows, "jsonl"), "e.jsonl")
    assert table.column("ts").to_pylist() == [TS_MAX, 1709204400.00025]
    assert len(dead) == 1 and dead[0].reason.startswith("ts: expected seconds since the epoch in years 1..9999")


# ---- through Beam's filesystems: a scheme that is not the local one -------------------

@pytest.fixture()
def memfs():
    beam_memfs.reset()
    yield beam_memfs.FILES
    beam_memfs.reset()


def test_match_inputs_errors(memfs):
    memfs["memfs://in/empty.jsonl"] = b""
    memfs["memfs://in/notes.txt"] = b"x"
    for path, want in [("memfs://in/none.jsonl", "got no such file"), ("memfs://in/empty.jsonl", "got an empty file"),
                       ("memfs://in/notes.txt", "extension: expected one of")]:
        with pytest.raises(InputError, match=want):
            match_inputs(path)


def test_read_events_from_a_remote_scheme(memfs):
    rows = [{"key": "a", "ts": T0, "text": "hi"}, {"key": "b", "ts": T0 + 1, "token": 3}]
    memfs["memfs://in/e.jsonl"] = encode(rows, "jsonl")
    table, dead = read_events("memfs://in/e.jsonl")
    assert events(table) == expand(rows) and dead == []


@pytest.mark.parametrize("replay", [False, True])
def test_sources_read_remote_globs_in_the_pipeline(memfs, replay):
    a = [{"key": "a", "ts": T0, "text": "hi"}, {"key": "a", "ts": T0 + 1, "text": "x!"}]
    b = [{"key": "b", "ts": T0 + 40, "token": 3}]
    memfs["memfs://in/part-0.jsonl"] = encode(a, "jsonl") + b'{"key": "a", "ts": 1, "text": "\xff"}\n'
    memfs["memfs://in/part-1.parquet"] = encode(b, "parquet")
    want = expand(a) + expand(b)
    opts = ["--streaming"] if replay else []
    with beam.Pipeline(options=PipelineOptions(opts)) as p:
        src = ReplayEvents("memfs://in/part-*", step=10) if replay else ReadEvents("memfs://in/part-*")
        blocks, dead = p | src
        assert_that(blocks | beam.FlatMap(lambda b: events(pa.Table.from_batches([b]))), equal_to(want))
        assert_that(dead | beam.Map(lambda d: (d.kind, d.reason.split(":")[0])),
                    equal_to([("invalid", "line 3")]), label="dead")


@pytest.mark.parametrize("fmt", list(EXT))
def test_an_empty_file_has_no_rows(fmt):
    """An empty file (e.g. one part of a glob) has no rows and no dead letters; a header-only CSV neither."""
    for data in (b"", b"\n") + ((b"key,ts,text\n",) if fmt == "csv" else ()):
        table, dead = parse_events(data, f"e.{EXT[fmt]}")
        assert table.num_rows == 0 and dead == []


def test_a_file_without_the_needed_columns_dead_letters_each_row():
    table, dead = parse_events(b'{"user": "a", "ts": 1, "text": "x"}\n{"user": "b", "ts": 2, "text": "y"}\n', "e.jsonl")
    assert table.num_rows == 0 and len(dead) == 2
    assert all("columns: expected key, ts and text or token, got ['text', 'ts', 'user']" in d.reason for d in dead)
    assert [json.loads(d.event)["user"] for d in dead] == ["a", "b"]
