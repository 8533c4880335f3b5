"""Bytes that are not UTF-8 in string inputs: each such row is an ``invalid`` dead letter, never a pipeline failure.

Arrow does not check string bytes on construction or IPC read, so a ``string`` column can
hold any bytes; ``as_py`` / ``to_pylist`` then raise. Regression tests for issue 14, item 3.
"""

from __future__ import annotations

import itertools
import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import test_beam_transform as tbt
from apache_beam.testing import test_pipeline
from beam_gather import Gather
from hypothesis import given, settings
from hypothesis import strategies as st
from test_beam_transform import check_outputs, offline

from streamrnn.beam import Event, StatefulInference
from streamrnn.beam.records import from_ipc, to_ipc
from streamrnn.beam.step.intake import DEAD, Intake
from streamrnn.model.loaded import load
from streamrnn.model.runtime import CPU

beam_models = tbt.beam_models

BAD = [b"\xff\xfe", b"\xc3(", b"\xed\xa0\x80", b"ok\x80" + b"z" * 60]  # bad start, bad continuation, surrogate, long


def raw_strings(values: list[bytes | None], typ: pa.DataType = pa.string()) -> pa.Array:
    """A string array holding exactly these bytes (Arrow checks none of them)."""
    b = pa.array(values, pa.large_binary() if pa.types.is_large_string(typ) else pa.binary())
    return pa.Array.from_buffers(typ, len(b), b.buffers())


def ipc_round_trip(t: pa.RecordBatch | pa.Table) -> pa.Table:
    return from_ipc(to_ipc(t))


def _equal(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: expected {want}, got {got}")


def _reason(col: str, raw: bytes) -> str:
    shown = repr(raw[:40]) + (f"... ({len(raw)} bytes)" if len(raw) > 40 else "")
    return f"{col}: expected valid UTF-8 text, got {shown}"


# ---------------------------------------------------------------------------- Arrow blocks through the transform
def _block(column: str, rows: list[tuple[str, bytes | None]], how: str):
    """rows of (key, bad bytes or None): ``column`` holds the bad bytes where given; seq is the row index."""
    n = len(rows)
    keys = [k.encode() for k, _ in rows]
    events = [f"event {i}".encode() for i in range(n)]
    for i, (_k, b) in enumerate(rows):
        if b is not None:
            (keys if column == "key" else events)[i] = b
    cols = {"key": raw_strings(keys), "ts": pa.array(np.arange(n) + 10.0), "seq": pa.array(range(n), pa.int64()),
            "x": pa.array([(7 * i) % 256 for i in range(n)], pa.int64()), "event": raw_strings(events)}
    rb = pa.RecordBatch.from_pydict(cols)
    if how == "ipc":
        return ipc_round_trip(rb).to_batches()[0]
    if how == "chunks":  # a Table whose bad rows sit in some chunks only
        return pa.Table.from_batches([rb.slice(0, 3), rb.slice(3, 2), rb.slice(5)])
    return rb


@pytest.mark.parametrize(("column", "how"), [("key", "ipc"), ("event", "ipc"), ("key", "chunks")])
def test_rows_with_bytes_that_are_not_utf8_are_dead_letters_and_the_rest_apply(beam_models, column, how, tmp_path):
    rows = [("a", None), ("b", BAD[0]), ("a", None), ("b", None), ("a", BAD[1]), ("c", None), ("b", BAD[2]),
            ("a", None), ("c", BAD[3]), ("c", None)]
    block = _block(column, rows, how)
    good = [Event(k, 10.0 + i, i, (7 * i) % 256) for i, (k, b) in enumerate(rows) if b is None]
    more = [Event("a", 100.0, 100, 5), Event("d", 100.0, 0, 6)]  # Event records in the same bundle still apply
    want = offline(load(beam_models["tiny"], providers=[CPU]), [*good, *more])
    want_dead = [(None if column == "key" else k, i, "invalid", _reason(column, b))
                 for i, (k, b) in enumerate(rows) if b is not None]
    g = Gather(tmp_path)
    with test_pipeline.TestPipeline() as p:
        out, dead = (p | beam.Create([block, *more])
                     | StatefulInference(model=beam_models["tiny"], providers=[CPU], num_shards=2))
        g(out, "outputs")
        g(dead, "dead")
    check_outputs(want)(g["outputs"])
    _equal(sorted(((d.key, d.seq, d.kind, d.reason) for d in g["dead"]), key=lambda r: r[1]), want_dead,
           "dead letters")
    _equal(sorted((d.seq, d.event) for d in g["dead"]),
           sorted((i, f"event {i}" if column == "key" else b.decode("utf-8", "replace"))
                  for i, (_k, b) in enumerate(rows) if b is not None), "dead letters' events")


FIELDS = ["key", "seq", "sub", "ts", "x"]


def test_event_records_with_bytes_or_surrogate_keys_are_dead_letters(beam_models, tmp_path):
    good = [Event("a", 1.0, 0, 3), Event("a", 2.0, 1, 4), Event("b", 1.5, 0, 9)]
    bad = [Event(b"a", 1.2, 2, 5), Event("\udcff", 1.3, 3, 6), Event("k\ud800x", 1.4, 4, 7),
           Event(b"\xff\xfe", 1.6, 5, 8), Event("a", 1.7, 6, "\udcff")]
    want = offline(load(beam_models["tiny"], providers=[CPU]), good)
    g = Gather(tmp_path)
    with test_pipeline.TestPipeline() as p:
        out, dead = (p | beam.Create([*good, *bad])
                     | StatefulInference(model=beam_models["tiny"], providers=[CPU], num_shards=2))
        g(out, "outputs")
        g(dead, "dead")
    check_outputs(want)(g["outputs"])
    _equal(sorted((d.seq, d.kind, d.reason, d.key, sorted(json.loads(d.event))) for d in g["dead"]), [
        (2, "invalid", "key: expected a non-empty string, got bytes b'a'", None, FIELDS),
        (3, "invalid", "key: expected valid UTF-8 text, got '\\udcff'", None, FIELDS),
        (4, "invalid", "key: expected valid UTF-8 text, got 'k\\ud800x'", None, FIELDS),
        (5, "invalid", "key: expected a non-empty string, got bytes b'\\xff\\xfe'", None, FIELDS),
        (6, "invalid", "x: expected a token in [0, 256), got '\\udcff'", "a", FIELDS)], "dead letters")


# ---------------------------------------------------------------------------- the Intake DoFn, directly
def _intake(tokens: bool = True) -> Intake:
    d = Intake(tokens=tokens, vocab=256, n_features=3, num_shards=3, size_micros=1_000_000, lateness_micros=0)
    d.setup()
    d.start_bundle()
    return d


def _run_intake(d: Intake, *elements) -> tuple[list, pa.Table | None]:
    """(dead letters, the released rows as one table) of one bundle."""
    outs = [o for e in elements for o in d.process(e)]
    assert all(isinstance(o, beam.pvalue.TaggedOutput) and o.tag == DEAD for o in outs)
    dead = [o.value for o in outs]
    parts = [from_ipc(w.value[1][1]) for w in d.finish_bundle()]
    return dead, pa.concat_tables(parts) if parts else None


@given(keys=st.lists(st.one_of(st.text(max_size=6).map(str.encode), st.binary(max_size=6),
                               st.sampled_from([*BAD, b"\xf0\x9f\x98", b"\xf4\x90\x80\x80", b"\xc0\xaf"])),
                     min_size=1, max_size=40),
       typ=st.sampled_from([pa.string(), pa.large_string()]), ipc=st.booleans(), event=st.booleans(),
       cuts=st.lists(st.integers(0, 40), max_size=3))
@settings(max_examples=60, deadline=None)
def test_random_key_bytes_never_raise_and_every_row_is_kept_or_dead(keys, typ, ipc, event, cuts):
    n = len(keys)
    cols = {"key": raw_strings(keys, typ), "ts": pa.array(np.arange(n, dtype=np.float64)),
            "seq": pa.array(range(n), pa.int64()), "x": pa.array([i % 256 for i in range(n)], pa.int64()),
            "extra": raw_strings(keys)}  # another string column, only read for a dead letter's event
    if event:
        cols["event"] = pa.array([f"e{i}" for i in range(n)])
    t = pa.table(cols)
    if ipc:
        t = ipc_round_trip(t)
    bounds = sorted({0, n, *(min(c, n) for c in cuts)})
    t = pa.Table.from_batches([b for a, z in itertools.pairwise(bounds) for b in t.slice(a, z - a)
                               .to_batches()], schema=t.schema)
    dead, kept = _run_intake(_intake(), t)

    def valid(b: bytes) -> bool:
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    want_kept = {i: b.decode() for i, b in enumerate(keys) if b and valid(b)}
    got_kept = dict(zip(kept.column("seq").to_pylist(), kept.column("key").to_pylist(), strict=True)) if kept else {}
    assert got_kept == want_kept
    assert len(dead) + len(got_kept) == n
    for d in dead:
        b = keys[d.seq]
        assert d.kind == "invalid"
        assert d.key is None
        assert d.reason == (_reason("key", b) if not valid(b) else "key: expected a non-empty string, got ''")
        if event:
            assert d.event == f"e{d.seq}"
        else:
            row = json.loads(d.event)
            assert row["key"] == b.decode("utf-8", "replace") == row["extra"]


def test_event_column_of_large_strings_and_views_with_bad_bytes():
    keys = pa.array(["a", "b", "c"])
    for typ in (pa.large_string(), pa.string_view()):
        ev = raw_strings([b"one", b"\xff", b"three"]).cast(typ)
        t = pa.table({"key": keys.cast(typ), "ts": pa.array([1.0, 2.0, 3.0]), "seq": pa.array([0, 1, 2]),
                      "x": pa.array([1, 2, 3]), "event": ev})
        dead, kept = _run_intake(_intake(), t)
        assert [(d.key, d.seq, d.reason, d.event) for d in dead] == [
            ("b", 1, "event: expected valid UTF-8 text, got b'\\xff'", "\ufffd")], typ
        assert kept.column("event").to_pylist() == ["one", "three"]


def test_feature_lists_of_strings_are_dead_letters_not_errors():
    """x as list<string> (numbers as text, some not UTF-8): a column error, not a failed cast."""
    x = pa.ListArray.from_arrays(pa.array([0, 3, 6]), raw_strings([b"1", b"2", b"3", b"\xff", b"5", b"6"]))
    t = pa.table({"key": pa.array(["a", "b"]), "ts": pa.array([1.0, 2.0]), "seq": pa.array([0, 1]), "x": x})
    dead, kept = _run_intake(_intake(tokens=False), t)
    assert kept is None
    assert [(d.seq, d.reason) for d in dead] == [
        (i, "x: expected a list column of 3 floats, got a list<item: string> column") for i in (0, 1)]
    assert json.loads(dead[0].event)["x"] == ["1", "2", "3"]
    assert json.loads(dead[1].event)["x"] == '["\ufffd","5","6"]'  # Arrow's text of the list: the bytes replaced
