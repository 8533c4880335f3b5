"""Typed event blocks (Arrow, Parquet, clean JSONL) are checked column-wise: the same events and dead letters as
the row-by-row check, which is the reference (it names each bad row's reason)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrnn.beam.job.event_files import TS_MAX, _pylist_cols, _rows_events, block_events, parse_events

KEYS = st.one_of(st.none(), st.just(""), st.sampled_from(["a", "b", "ключ", "k" * 40]))
TSS = st.one_of(st.none(), st.sampled_from([0.0, 1e-4, 1_700_000_000.123456, float("nan"), float("inf"),
                                            -float("inf"), TS_MAX * 10, -1e12]),
                st.floats(-1e11, 1e11, allow_nan=False))
TEXTS = st.one_of(st.none(), st.just(""), st.text(max_size=6))
TOKENS = st.one_of(st.none(), st.integers(-3, 300))
SEQS = st.one_of(st.none(), st.integers(-2**40, 2**40))


@st.composite
def typed_tables(draw) -> pa.Table:
    n = draw(st.integers(0, 12))
    cols = {"key": pa.array([draw(KEYS) for _ in range(n)], pa.string())}
    ts_kind = draw(st.sampled_from(["float", "int", "ts_ms", "ts_ns_tz"]))
    if ts_kind == "float":
        cols["ts"] = pa.array([draw(TSS) for _ in range(n)], pa.float64())
    elif ts_kind == "int":
        cols["ts"] = pa.array([draw(st.one_of(st.none(), st.integers(-10**12, 10**12))) for _ in range(n)],
                              pa.int64())
    else:
        unit, tz = ("ms", None) if ts_kind == "ts_ms" else ("ns", "UTC")
        vals = [draw(st.one_of(st.none(), st.integers(0, 2 * 10**12))) for _ in range(n)]
        scale = 1 if unit == "ms" else 10**6
        cols["ts"] = pa.array([None if v is None else v * scale for v in vals], pa.timestamp(unit, tz))
    if draw(st.booleans()):
        cols["seq"] = pa.array([draw(SEQS) for _ in range(n)], pa.int64())
    payload = draw(st.sampled_from(["text", "token", "both"]))
    if payload in ("text", "both"):
        cols["text"] = pa.array([draw(TEXTS) for _ in range(n)], pa.string())
    if payload in ("token", "both"):
        cols["token"] = pa.array([draw(TOKENS) for _ in range(n)], pa.int32())
    return pa.table(cols)


def _same(a, b) -> None:
    (ta, da), (tb, db) = a, b
    assert ta.to_pydict() == tb.to_pydict()
    assert [tuple(d) for d in da] == [tuple(d) for d in db]


@given(t=typed_tables(), start=st.integers(0, 5))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_typed_block_gives_what_the_row_by_row_check_gives(t, start):
    pos = list(range(start, start + t.num_rows))
    kw = {"vocab_size": 256, "from_text": False, "path": "x.parquet"}
    _same(block_events(t, pos, **kw), _rows_events(_pylist_cols(t), pos, **kw))


@given(t=typed_tables())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_parquet_and_arrow_files_read_the_same_events(t):
    pq_buf, ipc_buf = io.BytesIO(), io.BytesIO()
    pq.write_table(t, pq_buf)
    with pa.ipc.new_file(ipc_buf, t.schema) as w:
        w.write_table(t)
    ref = _rows_events(_pylist_cols(t), list(range(t.num_rows)), vocab_size=256, from_text=False, path="x.parquet")
    _same(parse_events(pq_buf.getvalue(), "x.parquet"), ref)
    _same(parse_events(ipc_buf.getvalue(), "x.arrow"), ref)


def test_a_text_row_expands_to_its_bytes_with_one_copy_id_and_a_one_event_row_has_none():
    t = pa.table({"key": ["a", "b"], "ts": [1.0, 2.0], "text": ["hé", "z"]})
    ev, dead = block_events(t, [0, 1], vocab_size=256, from_text=False, path="x.arrow")
    assert not dead
    d = ev.to_pydict()
    assert d["x"] == [*"hé".encode(), ord("z")] and d["sub"] == [0, 1, 2, 0] and d["seq"] == [0, 0, 0, 1]
    assert len(set(d["event"][:3])) == 1 and d["event"][0] is not None and d["event"][3] is None


def test_invalid_utf8_in_a_string_column_falls_back_to_the_row_check_that_names_it():
    good, bad = pa.array(["ok"]), pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(
        np.array([0, 2], np.int32).tobytes()), pa.py_buffer(b"\xff\xfe")])
    t = pa.table({"key": pa.concat_arrays([good, pa.array(["b"])]), "ts": [1.0, 2.0],
                  "text": pa.concat_arrays([good, bad])})
    ev, dead = block_events(t, [0, 1], vocab_size=256, from_text=False, path="x.parquet")
    assert ev.column("key").to_pylist() == ["ok", "ok"]
    assert len(dead) == 1 and "text: expected UTF-8 text, got the byte 0xff" in dead[0].reason
