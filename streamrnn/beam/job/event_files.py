"""Event files (JSONL, CSV, Parquet, Arrow IPC) parsed into columnar events, row by row forgiving.

A file is read as bytes through Beam's filesystems (local, gs://, s3://, hdfs://, any
registered scheme). Columns: ``key`` (string), ``ts`` (seconds since the epoch, or an
ISO-8601 time), ``seq`` (int, optional for each row: a row without one, or with an
empty or null cell, takes its position in the file, counting rows from 0), and a
payload: ``text`` (UTF-8, one event per byte, ``sub`` = the byte offset) or ``token``
(int).

Nothing in a file aborts the read: every row that cannot be used becomes a
:class:`~streamrnn.beam.records.DeadLetter` of kind ``"invalid"`` with the row (as JSON)
and a reason naming the field, what was expected and what was got. That covers bytes
that are not UTF-8, CSV rows with the wrong number of fields, JSON that does not parse,
keys that are not strings (``123`` is not the key ``"123"``), times outside years
1..9999 (e.g. epoch milliseconds), and Arrow/Parquet blocks that cannot be decoded.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.ipc as ipc
import pyarrow.json as pjson
import pyarrow.parquet as pq

from ...errors import InputError
from ..records import EVENT, KEY, SEQ, SUB, TS, DeadLetter, copy_id, event_json

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
           ".csv": "csv", ".arrow": "arrow", ".arrows": "arrow", ".feather": "arrow", ".ipc": "arrow"}

#: Valid event times: years 1 to 9999 (what ISO-8601 can write; far inside Beam's timestamp range).
TS_MIN = datetime(1, 1, 1, tzinfo=UTC).timestamp()
TS_MAX = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()

#: One block of a file: its columns (name -> Python values, or a typed Arrow table) and each row's position
#: in the file.
Block = tuple[dict[str, list] | pa.Table, list[int]]


def format_of(path: str) -> str:
    """The format of an events file by its extension; InputError naming the extension otherwise."""
    name = path.rsplit("/", 1)[-1]
    ext = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext not in FORMATS:
        raise InputError(f"events file {path!r}: extension: expected one of {sorted(FORMATS)}, got {ext!r}")
    return FORMATS[ext]


def _dead(reason: str, row: dict[str, Any], key: Any = None, ts: Any = None, seq: Any = None) -> DeadLetter:
    return DeadLetter(key if isinstance(key, str) else None, ts, seq, None, "invalid", reason, event_json(row))


def _raw(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def utf8_error(field: str, e: UnicodeDecodeError) -> str:
    """The reason for bytes that are not UTF-8, naming the field, the byte and its offset (files and messages alike)."""
    return (f"{field}: expected UTF-8 text, got the byte 0x{e.object[e.start]:02x} at byte offset {e.start}, "
            "which is not UTF-8")


# ---- formats: bytes -> blocks of rows (+ dead letters for rows that cannot even be split) ----

def _jsonl_blocks(data: bytes, dead: list[DeadLetter]) -> Iterator[Block]:
    try:
        data.decode("utf-8")
        t = pjson.read_json(io.BytesIO(data))  # fast path: clean UTF-8, one type per column
        yield _table_block(t, 0)
        return
    except (UnicodeDecodeError, pa.ArrowInvalid):
        pass
    rows: list[dict] = []
    pos: list[int] = []
    n = 0
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        here = {"line": i + 1, "raw": _raw(line)}
        try:
            r = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            dead.append(_dead(utf8_error(f"line {i + 1}", e), here))
        except json.JSONDecodeError as e:
            dead.append(_dead(f"line {i + 1}: expected a JSON object, got invalid JSON ({e.msg})", here))
        else:
            if isinstance(r, dict):
                rows.append(r)
                pos.append(n)
            else:
                dead.append(_dead(f"line {i + 1}: expected a JSON object, got {type(r).__name__}", here))
        n += 1
    names = list(dict.fromkeys(k for r in rows for k in r))
    yield {c: [r.get(c) for r in rows] for c in names}, pos


def _csv_blocks(data: bytes, dead: list[DeadLetter]) -> Iterator[Block]:
    header = data.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        names = next(csv.reader([header.decode("utf-8")]), [])
    except UnicodeDecodeError as e:
        dead.append(_dead(utf8_error("CSV header", e), {"line": 1, "raw": _raw(header)}))
        return
    bad: list[int] = []

    def skip(row) -> str:
        bad.append(row.number - 2)
        dead.append(_dead(f"CSV row {row.number - 1}: expected {row.expected_columns} fields, got "
                          f"{row.actual_columns}", {"row": row.number - 1, "raw": row.text}))
        return "skip"

    try:  # every cell as bytes: no type inference that could reject a whole column
        t = pcsv.read_csv(io.BytesIO(data), read_options=pcsv.ReadOptions(use_threads=False),
                          parse_options=pcsv.ParseOptions(invalid_row_handler=skip, newlines_in_values=True),
                          convert_options=pcsv.ConvertOptions(column_types={n: pa.binary() for n in names}))
    except pa.ArrowInvalid as e:
        dead.append(_dead(f"CSV: expected a readable CSV file, got: {e}", {"file": "csv"}))
        return
    skipped = set(bad)
    pos = [i for i in range(t.num_rows + len(skipped)) if i not in skipped]
    yield {c: [None if v == b"" else v for v in t.column(c).to_pylist()] for c in t.column_names}, pos


def _table_block(t: pa.Table | pa.RecordBatch, start: int) -> Block:
    """A typed block (Arrow, Parquet, clean JSONL): kept as Arrow, its rows checked column-wise."""
    return (pa.Table.from_batches([t]) if isinstance(t, pa.RecordBatch) else t), list(range(start, start + t.num_rows))


def _pylist_cols(t: pa.Table) -> dict[str, list]:
    """A typed block's columns as Python values (timestamps as float seconds, exactly as the column says)."""
    cols = {}
    for name, col in zip(t.schema.names, t.columns, strict=True):
        if pa.types.is_timestamp(col.type):
            unit = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[col.type.unit]
            cols[name] = [None if v is None else v / unit for v in col.cast(pa.int64()).to_pylist()]
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            try:
                col.validate(full=True)
                cols[name] = col.to_pylist()
            except pa.ArrowInvalid:  # bytes that are not UTF-8: as bytes, which the row check names
                cols[name] = col.cast(pa.binary() if pa.types.is_string(col.type) else pa.large_binary()).to_pylist()
        else:
            cols[name] = col.to_pylist()
    return cols


def _parquet_blocks(data: bytes, dead: list[DeadLetter]) -> Iterator[Block]:
    try:
        f = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        dead.append(_dead(f"parquet: expected a readable Parquet file, got: {e}", {"file": "parquet"}))
        return
    start = 0
    for g in range(f.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        try:
            yield _table_block(f.read_row_group(g), start)
        except (pa.ArrowException, OSError) as e:
            dead.append(_dead(f"parquet row group {g}: expected a readable row group, got: {e}",
                              {"row_group": g, "rows": n}))
        start += n


def _arrow_blocks(data: bytes, dead: list[DeadLetter]) -> Iterator[Block]:
    start = 0
    try:
        reader = ipc.open_file(pa.BufferReader(data))
    except (pa.ArrowException, OSError):
        reader = None
    if reader is not None:  # file format: each block can be read (or fail) on its own
        for b in range(reader.num_record_batches):
            rb = None
            try:
                rb = reader.get_batch(b)
                rb.validate(full=True)
            except (pa.ArrowException, OSError) as e:
                dead.append(_dead(f"arrow block {b}: expected a readable record batch, got: {e}", {"block": b}))
            else:
                yield _table_block(rb, start)
            start += rb.num_rows if rb is not None else 0  # rows after an unreadable block keep their positions
        return
    try:  # stream format: blocks in sequence; what follows a broken block cannot be found
        stream = ipc.open_stream(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        dead.append(_dead(f"arrow: expected an Arrow IPC file or stream, got: {e}", {"block": 0}))
        return
    b = 0
    while True:
        try:
            rb = stream.read_next_batch()
            rb.validate(full=True)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            dead.append(_dead(f"arrow block {b}: expected a readable record batch, got: {e} (the rest of the "
                              "stream is unreadable)", {"block": b}))
            return
        yield _table_block(rb, start)
        start += rb.num_rows
        b += 1


_READERS = {"jsonl": _jsonl_blocks, "csv": _csv_blocks, "parquet": _parquet_blocks, "arrow": _arrow_blocks}


# ---- rows -> events ------------------------------------------------------------------

def _as_text(field: str, v: Any) -> tuple[str | None, str | None]:
    """(str, None) or (None, reason) for a text cell: a non-empty str, or bytes that are UTF-8."""
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, utf8_error(field, e)
    if isinstance(v, str) and v:
        return v, None
    return None, f"{field}: expected a non-empty string, got {v!r}"


def parse_ts(v: Any) -> tuple[float | None, str | None]:
    """Seconds since the epoch of a cell (a number, or an ISO-8601 time), or a reason."""
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, utf8_error("ts", e)
    got = v
    t: float | None = None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        t = float(v)
    elif isinstance(v, datetime):
        t = (v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp()
    elif isinstance(v, date):
        t = datetime(v.year, v.month, v.day, tzinfo=UTC).timestamp()
    elif isinstance(v, str):
        try:
            t = float(v)
        except ValueError:
            try:
                d = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
                t = (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()
            except ValueError:
                pass
    if t is None or not math.isfinite(t):
        return None, f"ts: expected float seconds since the epoch or an ISO-8601 time, got {got!r}"
    if not TS_MIN <= t <= TS_MAX:
        hint = " (epoch milliseconds? give seconds)" if TS_MAX < t <= TS_MAX * 1e3 else ""
        return None, (f"ts: expected seconds since the epoch in years 1..9999 ({TS_MIN:.0f}..{TS_MAX:.0f}), "
                      f"got {got!r}{hint}")
    return t, None


def _as_int(field: str, v: Any, from_text: bool) -> tuple[int | None, str | None]:
    if from_text and isinstance(v, bytes):
        try:
            return int(v.decode("ascii").strip()), None
        except (UnicodeDecodeError, ValueError):
            return None, f"{field}: expected an int, got {_raw(v)!r}"
    if isinstance(v, bool) or not isinstance(v, int):
        return None, f"{field}: expected an int, got {v!r}"
    return v, None


def _row(cols: dict[str, list], i: int) -> dict[str, Any]:
    return {c: (_raw(v[i]) if isinstance(v[i], bytes) else v[i]) for c, v in cols.items()}


def _payload(text: Any, tok: Any, vocab_size: int, from_text: bool) -> tuple[np.ndarray | None, str | None]:
    """The events of a row's payload: its text's UTF-8 bytes, or its one token."""
    if text is not None:
        t, why = _as_text("text", text)
        return (None, why) if why else (np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int64), None)
    if tok is not None:
        v, why = _as_int("token", tok, from_text)
        if why is None and not 0 <= v < vocab_size:
            why = f"token: expected an int in [0, {vocab_size}), got {v!r}"
        return (None, why) if why else (np.array([v], np.int64), None)
    return None, "text/token: expected a UTF-8 string in text or an int in token, got neither"


def block_events(cols: dict[str, list] | pa.Table, pos: list[int], *, vocab_size: int, from_text: bool,
                 path: str) -> tuple[pa.Table, list[DeadLetter]]:
    """Validate one block's rows; good rows expand to events (a table ``key, ts, seq, sub, x, event``).

    A typed block (an Arrow table whose columns have the expected types) is checked column-wise:
    its good rows expand at once, its bad rows (null, empty, non-finite or out-of-range cells) go
    through the row-by-row check, which gives each its reason. Any other block is checked row by row.
    """
    if isinstance(cols, pa.Table):
        typed = _typed_events(cols, pos, vocab_size=vocab_size, from_text=from_text, path=path)
        if typed is not None:
            return typed
        cols = _pylist_cols(cols)
    return _rows_events(cols, pos, vocab_size=vocab_size, from_text=from_text, path=path)


def _events_table(key, ts, seq, sub, x, event) -> pa.Table:
    return pa.table({KEY: pa.array(key, pa.string()), TS: pa.array(ts, pa.float64()), SEQ: pa.array(seq, pa.int64()),
                     SUB: pa.array(sub, pa.int64()), "x": pa.array(x, pa.int64()), EVENT: pa.array(event, pa.string())})


def _rows_events(cols: dict[str, list], pos: list[int], *, vocab_size: int, from_text: bool,
                 path: str) -> tuple[pa.Table, list[DeadLetter]]:
    """The row-by-row check (any cell types): good rows' events, and a dead letter with its reason per bad row."""
    names = set(cols)
    out: dict[str, list] = {KEY: [], TS: [], SEQ: [], SUB: [], "x": [], EVENT: []}
    if "key" not in names or "ts" not in names or not ({"text", "token"} & names):
        why = f"events file {path!r}: columns: expected key, ts and text or token, got {sorted(names)}"
        return _events_table(*out.values()), [_dead(why, _row(cols, i)) for i in range(len(pos))]
    none = [None] * len(pos)
    keys, tss, texts, toks = cols["key"], cols["ts"], cols.get("text", none), cols.get("token", none)
    seqs = cols.get("seq")
    dead: list[DeadLetter] = []
    for i, p in enumerate(pos):
        key, why = _as_text("key", keys[i])
        ts, w = parse_ts(tss[i])
        why = why or w
        # seq is optional per row: a row without one (no column, an empty cell, null) takes its position
        seq, w = (p, None) if seqs is None or seqs[i] is None or seqs[i] == b"" else _as_int("seq", seqs[i],
                                                                                             from_text)
        why = why or w
        if why is None:
            payload, why = _payload(texts[i], toks[i], vocab_size, from_text)
        if why is not None:
            dead.append(_dead(why, _row(cols, i), key, ts, seq))
            continue
        m = len(payload)
        out[KEY].extend([key] * m)
        out[TS].extend([ts] * m)
        out[SEQ].extend([seq] * m)
        out[SUB].extend(range(m))
        out["x"].append(payload)
        out[EVENT].extend([_row_copy_id(payload)] * m)
    x = np.concatenate(out["x"]) if out["x"] else np.zeros(0, np.int64)
    return _events_table(out[KEY], out[TS], out[SEQ], out[SUB], x, out[EVENT]), dead


def _row_copy_id(payload: np.ndarray) -> str | None:
    """Copies of one row name compete whole by this id (``apply.duplicates``); a one-event row needs none (its
    event is the whole row, and events without an id compete by payload, the same rule)."""
    return copy_id(payload.tobytes()) if len(payload) > 1 else None


def _typed_events(t: pa.Table, pos: list[int], *, vocab_size: int, from_text: bool,
                  path: str) -> tuple[pa.Table, list[DeadLetter]] | None:
    """:func:`block_events` of a typed block, column-wise (the same events and dead letters as row by row);
    None where a column's type needs the row-by-row check."""
    names = set(t.schema.names)
    if not ({"key", "ts"} <= names and {"text", "token"} & names):
        return None

    def typed(name: str, ok) -> pa.Array | None:
        if name not in names:
            return None
        c = t.column(name).combine_chunks()
        return c if pa.types.is_null(c.type) or ok(c.type) else False

    def is_int(ty) -> bool:
        return pa.types.is_integer(ty) and ty != pa.uint64()

    key, ts = typed("key", pa.types.is_string), t.column("ts").combine_chunks()
    seq, text, tok = typed("seq", is_int), typed("text", pa.types.is_string), typed("token", is_int)
    if (key is False or seq is False or text is False or tok is False or pa.types.is_null(key.type)
            or not (pa.types.is_integer(ts.type) or pa.types.is_floating(ts.type) or pa.types.is_timestamp(ts.type))):
        return None
    try:
        for c in (key, text):
            if c is not None:
                c.validate(full=True)  # string bytes that are not UTF-8: the row-by-row check names them
    except pa.ArrowInvalid:
        return None
    n = t.num_rows
    if pa.types.is_timestamp(ts.type):
        unit = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[ts.type.unit]
        tsv = pc.fill_null(ts.cast(pa.int64()), 0).to_numpy().astype(np.float64) / unit
    else:
        tsv = pc.fill_null(ts.cast(pa.float64()), np.nan).to_numpy()
    ts_ok = ts.is_valid().to_numpy(zero_copy_only=False) & np.isfinite(tsv)
    with np.errstate(invalid="ignore"):
        ts_ok &= (tsv >= TS_MIN) & (tsv <= TS_MAX)
    good = ts_ok & pc.fill_null(pc.greater(pc.binary_length(key), 0), False).to_numpy(zero_copy_only=False)
    has_text = (np.zeros(n, bool) if text is None or pa.types.is_null(text.type)
                else text.is_valid().to_numpy(zero_copy_only=False))
    tlen = (np.zeros(n, np.int64) if not has_text.any()
            else pc.fill_null(pc.binary_length(text), 0).to_numpy().astype(np.int64))
    if tok is None or pa.types.is_null(tok.type):
        tokv, tok_ok = np.zeros(n, np.int64), np.zeros(n, bool)
    else:
        tokv = pc.fill_null(tok.cast(pa.int64()), -1).to_numpy()
        tok_ok = tok.is_valid().to_numpy(zero_copy_only=False) & (tokv >= 0) & (tokv < vocab_size)
    good &= np.where(has_text, tlen > 0, tok_ok)
    posv = np.asarray(pos, np.int64)
    if seq is None or pa.types.is_null(seq.type):
        seqv = posv
    else:
        seqv = np.where(seq.is_valid().to_numpy(zero_copy_only=False), pc.fill_null(seq.cast(pa.int64()), 0)
                        .to_numpy(), posv)
    dead: list[DeadLetter] = []
    if not good.all():  # the bad rows, row by row, for their reasons
        bad = np.flatnonzero(~good)
        ev, dead = _rows_events(_pylist_cols(t.take(pa.array(bad))), [pos[i] for i in bad], vocab_size=vocab_size,
                                from_text=from_text, path=path)
        if ev.num_rows:  # (never: the two checks agree) keep the one rule
            return None
    g = np.flatnonzero(good)
    lengths = np.where(has_text[g], tlen[g], 1)
    total = int(lengths.sum())
    row = np.repeat(np.arange(len(g)), lengths)
    starts = np.cumsum(lengths) - lengths
    sub = np.arange(total, dtype=np.int64) - starts[row]
    x = tokv[g][row]
    if has_text[g].any():
        tg = pc.fill_null(text.take(pa.array(g)), "")
        off_t = np.int64 if pa.types.is_large_string(tg.type) else np.int32
        offsets = np.frombuffer(tg.buffers()[1], off_t)[tg.offset:tg.offset + len(tg) + 1].astype(np.int64)
        data = np.frombuffer(tg.buffers()[2], np.uint8) if tg.buffers()[2] is not None else np.zeros(0, np.uint8)
        in_text = has_text[g][row]
        x = np.where(in_text, data[np.where(in_text, offsets[row] + sub, 0)] if len(data) else 0, x)
    x = x.astype(np.int64)
    ids = [copy_id(x[a:a + m].tobytes()) if m > 1 else None
           for a, m in zip(starts.tolist(), lengths.tolist(), strict=True)] if (lengths > 1).any() else None
    rows_at = pa.array(row)
    table = pa.table({KEY: key.take(pa.array(g)).take(rows_at).cast(pa.string()), TS: pa.array(tsv[g][row]),
                      SEQ: pa.array(seqv[g][row]), SUB: pa.array(sub), "x": pa.array(x),
                      EVENT: (pa.array(ids, pa.string()).take(rows_at) if ids is not None
                              else pa.nulls(total, pa.string()))})
    return table, dead


def parse_events(data: bytes, path: str, *, vocab_size: int = 256) -> tuple[pa.Table, list[DeadLetter]]:
    """Events of a file's bytes as one table (``key, ts, seq, sub, x, event``) and its unusable rows.

    ``text`` rows expand to one event per UTF-8 byte (``sub`` = byte offset, same ts and
    seq); ``token`` rows are one event each. ``event``: the copy id of a row of more than one event
    (:func:`~streamrnn.beam.records.copy_id`), else null.
    """
    fmt = format_of(path)
    dead: list[DeadLetter] = []
    parts: list[pa.Table] = []
    blocks = _READERS[fmt](data, dead) if data.strip() else ()  # an empty file (e.g. in a glob) has no rows
    for cols, pos in blocks:
        ev, bad = block_events(cols, pos, vocab_size=vocab_size, from_text=fmt == "csv", path=path)
        dead.extend(bad)
        parts.append(ev)
    table = pa.concat_tables(parts) if parts else _events_table([], [], [], [], np.zeros(0, np.int64), [])
    return table, dead
