"""Intake: one copy per event, validation, columnar blocks, shard and release time.

The user's input may be in any windowing. ``OneCopy`` keeps an element once even when a
multi-window ``WindowFn`` (sliding windows) put it in several windows; after that the
events are re-windowed into the global window (state is carried across the user's
windows) and ``Intake`` validates them into Arrow blocks, one per (shard, release time).

Ids: ``(key, seq)`` names one input row; ``sub`` orders the events one row expands to
(the bytes of a text record). Keys are strings: anything else is a dead letter, so
``123`` and ``"123"`` never merge into one stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.transforms.window import GlobalWindow, TimestampedValue, WindowFn

from ..records import DEAD, EVENT, KEY, SEQ, SUB, TS, DeadLetter, event_json, original_text, shard_of, to_ipc
from .clock import EARLIEST, TS_LIMIT, release_micros, timestamp, to_micros_array
from .counters import Counters

#: Internal columns: event time in micros, and the release time of the event's window (micros).
TSU, REL = "_tsu", "_rel"
#: Payload kinds travelling to the stateful step with a shard key.
EVENTS, UPDATE = 0, 1


class OneCopy(beam.DoFn):
    """Emit an element only in the first of the windows its ``WindowFn`` assigns it to.

    A sliding-window element reaches a DoFn once per window; it is one event, not
    several duplicates. An element whose window is not among the assigned ones (it was
    re-windowed or merged upstream) always passes.
    """

    def __init__(self, windowfn: WindowFn):
        self.windowfn = windowfn

    def process(self, element, window=beam.DoFn.WindowParam, ts=beam.DoFn.TimestampParam) -> Iterator:
        if isinstance(window, GlobalWindow):
            yield element
            return
        try:
            assigned = list(self.windowfn.assign(WindowFn.AssignContext(ts, element=element)))
        except Exception:  # a WindowFn that cannot re-assign (e.g. needs the original window): keep the copy
            yield element
            return
        if len(assigned) < 2 or window not in assigned or window == min(assigned, key=lambda w: (w.end, w.start)):
            yield element


def _reason_ts(v: Any) -> str:
    hint = " (epoch milliseconds or nanoseconds? ts is seconds)" if isinstance(v, (int, float)) and abs(v) > TS_LIMIT \
        and math.isfinite(v) else ""
    return f"ts: expected finite seconds since the epoch within ±{TS_LIMIT:.0e}, got {v!r}{hint}"


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int64(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """An integer column as int64 (nulls as 0) and the mask of values that do not fit."""
    big = np.zeros(len(col), bool)
    if col.type == pa.uint64():
        big = pc.fill_null(pc.greater(col, pa.scalar(2**63 - 1, pa.uint64())), False).to_numpy(zero_copy_only=False)
        col = pc.if_else(pa.array(big), pa.scalar(0, pa.uint64()), col)
    return pc.fill_null(col, 0).cast(pa.int64()).to_numpy(zero_copy_only=False), big


def _is_text(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)


def _is_bytes(typ: pa.DataType) -> bool:
    return pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_binary_view(typ)


def _as_bytes(a: pa.Array) -> pa.Array:
    """A string array as the binary array of the same bytes (no UTF-8 check, no copy)."""
    return a.cast(pa.large_binary() if pa.types.is_large_string(a.type) else
                  pa.binary_view() if pa.types.is_string_view(a.type) else pa.binary())


def _not_utf8(col: pa.ChunkedArray) -> np.ndarray:
    """Rows of a string column whose bytes are not valid UTF-8.

    Arrow does not check string bytes on construction or IPC read, and ``as_py`` then raises.
    Each chunk is validated in C++ (the fast path); only a chunk that fails is decoded row by row.
    """
    bad = np.zeros(len(col), bool)
    at = 0
    for chunk in col.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            for j, v in enumerate(_as_bytes(chunk).to_pylist()):
                if v is not None:
                    try:
                        v.decode("utf-8")
                    except UnicodeDecodeError:
                        bad[at + j] = True
        at += len(chunk)
    return bad


def _raw(b: bytes, limit: int = 40) -> str:
    """Bytes as a reason shows them (truncated when long)."""
    return repr(b[:limit]) + (f"... ({len(b)} bytes)" if len(b) > limit else "")


def _py(col: pa.ChunkedArray, i: int) -> Any:
    """A column's value at row ``i`` as Python, never raising on bytes that are not UTF-8.

    A string that is not UTF-8 is its bytes; any other value holding such a string is Arrow's text of it.
    """
    try:
        return col[i].as_py()
    except UnicodeDecodeError:
        one = col.slice(i, 1).combine_chunks()
        if _is_text(one.type):
            return _as_bytes(one)[0].as_py()
        return one.to_string(skip_new_lines=True)[1:-1]


def _event_text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """The original-event column as text (bytes that are not UTF-8 are replaced, never fatal).

    A string column is returned as is: its rows that are not UTF-8 are the caller's to reject.
    """
    if _is_bytes(col.type):
        return pa.chunked_array([pa.array([None if v is None else v.decode("utf-8", "replace")
                                           for v in col.cast(pa.large_binary()).to_pylist()], pa.string())])
    return col.cast(pa.string())


class Intake(beam.DoFn):
    """Validate events (``Event`` tuples or Arrow blocks) into per-(shard, release) Arrow blocks."""

    def __init__(self, *, tokens: bool, vocab: int, n_features: int, num_shards: int, size_micros: int,
                 lateness_micros: int):
        self.tokens = tokens
        self.vocab = vocab
        self.nfeat = n_features
        self.num_shards = num_shards
        self.size = size_micros
        self.lateness = lateness_micros

    def setup(self) -> None:
        self.m = Counters()

    def start_bundle(self) -> None:
        self._rows: list[tuple] = []
        self._blocks: list[pa.Table] = []

    # -- one Event per element --------------------------------------------------------
    def _check_event(self, e: Any, ts_default: float) -> tuple[tuple | None, str | None]:
        if not isinstance(e, tuple) or len(e) < 4:
            return None, f"event: expected an Event(key, ts, seq, x) or a pyarrow RecordBatch, got {type(e).__name__}"
        key, ts, seq, x = e[0], e[1], e[2], e[3]
        sub = e[4] if len(e) > 4 else 0
        if not isinstance(key, str) or not key:
            return None, f"key: expected a non-empty string, got {type(key).__name__} {key!r}"
        if not _utf8(key):
            return None, f"key: expected valid UTF-8 text, got {key!r}"
        if ts is None:
            ts = ts_default
        if isinstance(ts, bool) or not isinstance(ts, (int, float, np.integer, np.floating)) \
                or not math.isfinite(ts) or abs(ts) > TS_LIMIT:
            return None, _reason_ts(ts)
        for name, v in (("seq", seq), ("sub", sub)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not -(2**63) <= int(v) < 2**63:
                return None, f"{name}: expected a 64-bit int, got {v!r}"
        if self.tokens:
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= x < self.vocab:
                return None, f"x: expected a token in [0, {self.vocab}), got {x!r}"
        else:
            try:
                xv = np.asarray(x, np.float64)
            except (TypeError, ValueError):
                xv = None
            if xv is None or xv.shape != (self.nfeat,) or not np.isfinite(xv).all():
                return None, f"x: expected {self.nfeat} finite floats, got {x!r}"
            x = xv.astype(np.float32)
        return (key, float(ts), int(seq), int(sub), x), None

    def process(self, element, ts=beam.DoFn.TimestampParam) -> Iterator:
        if isinstance(element, (pa.RecordBatch, pa.Table)):
            t = pa.Table.from_batches([element]) if isinstance(element, pa.RecordBatch) else element
            yield from self._process_block(t)
            return
        self.m.events_in.inc()
        row, reason = self._check_event(element, float(ts.micros) / 1e6)
        if row is None:
            yield self._dead_one(element, reason)
            return
        self._rows.append(row)

    def _dead_one(self, element: Any, reason: str):
        self.m.dead("invalid")
        fields = element._asdict() if hasattr(element, "_asdict") else {"element": repr(element)}
        get = fields.get
        key = get("key") if isinstance(get("key"), str) and _utf8(get("key")) else None
        ts = get("ts")
        ts = float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts) else None
        seq = get("seq")
        seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and -(2**63) <= seq < 2**63 else None
        return beam.pvalue.TaggedOutput(DEAD, DeadLetter(key, ts, seq, None, "invalid", reason, event_json(fields)))

    # -- Arrow blocks -------------------------------------------------------------------
    def _process_block(self, t: pa.Table) -> Iterator:
        n = t.num_rows
        self.m.events_in.inc(n)
        if n == 0:
            return
        cols = set(t.column_names)
        bad = np.zeros(n, bool)
        reasons: list[str | None] = [None] * n

        def mark(mask: np.ndarray, fmt: Callable[[int], str]) -> None:
            for i in np.flatnonzero(mask & ~bad):
                reasons[i] = fmt(int(i))
            bad[:] |= mask

        def column_error(name: str, expected: str) -> None:
            got = f"a {t.column(name).type} column" if name in cols else f"no such column (columns {sorted(cols)})"
            mark(np.ones(n, bool), lambda _i: f"{name}: expected {expected}, got {got}")

        if KEY in cols and _is_text(t.column(KEY).type):
            keys = t.column(KEY).cast(pa.string())
        else:
            column_error(KEY, "a string column")
            keys = pa.chunked_array([pa.nulls(n, pa.string())])
        kbad = _not_utf8(keys)
        mark(kbad, lambda i: f"{KEY}: expected valid UTF-8 text, got {_raw(_py(keys, i))}")
        knull = keys.is_null().to_numpy(zero_copy_only=False)
        kempty = pc.fill_null(pc.equal(pc.binary_length(keys), 0), True).to_numpy(zero_copy_only=False)
        mark(knull | kempty, lambda i: f"key: expected a non-empty string, got {keys[i].as_py()!r}")
        if TS in cols and (pa.types.is_integer(t.column(TS).type) or pa.types.is_floating(t.column(TS).type)):
            ts = pc.fill_null(t.column(TS).cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        else:
            column_error(TS, "a numeric column of seconds since the epoch")
            ts = np.zeros(n)
        with np.errstate(invalid="ignore"):
            mark(~(np.abs(ts) <= TS_LIMIT), lambda i: _reason_ts(float(ts[i])))
        seq = self._int_column(t, SEQ, required=True, mark=mark, column_error=column_error)
        sub = self._int_column(t, SUB, required=False, mark=mark, column_error=column_error)
        x_arr = self._payload(t, mark, column_error)
        ev = self._event(t, column_error)
        ebad = _not_utf8(ev)
        mark(ebad, lambda i: f"{EVENT}: expected valid UTF-8 text, got {_raw(_py(ev, i))}")
        for i in np.flatnonzero(bad):
            self.m.dead("invalid")
            orig = ev[int(i)].as_py() if not ebad[i] else _py(ev, int(i)).decode("utf-8", "replace")
            orig = original_text(orig) or event_json({c: _py(t.column(c), int(i)) for c in t.column_names})
            k = keys[int(i)].as_py() if not kbad[i] else None
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(
                k if k else None, float(ts[i]) if np.isfinite(ts[i]) else None,
                int(seq[i]) if seq is not None else None, int(sub[i]), "invalid", reasons[i], orig))
        good = ~bad
        if good.any():
            block = pa.table({KEY: keys, TS: pa.array(ts), SEQ: pa.array(seq), SUB: pa.array(sub), "x": x_arr,
                              EVENT: ev})
            self._blocks.append(block.filter(pa.array(good)))

    @staticmethod
    def _event(t: pa.Table, column_error) -> pa.ChunkedArray:
        n = t.num_rows
        if EVENT in t.column_names:
            try:
                return _event_text(t.column(EVENT))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                column_error(EVENT, "a string column")
        return pa.chunked_array([pa.nulls(n, pa.string())])

    @staticmethod
    def _int_column(t: pa.Table, name: str, *, required: bool, mark, column_error) -> np.ndarray:
        n = t.num_rows
        if name not in t.column_names:
            if required:
                column_error(name, "an integer column (a unique id per input row of a key)")
            return np.zeros(n, np.int64)
        col = t.column(name)
        if not pa.types.is_integer(col.type):
            column_error(name, "an integer column")
            return np.zeros(n, np.int64)
        null = col.is_null().to_numpy(zero_copy_only=False)
        mark(null, lambda _i: f"{name}: expected an int, got null")
        vals, big = _int64(col)
        mark(big, lambda i: f"{name}: expected a 64-bit int, got {col[i].as_py()!r}")
        return vals

    def _payload(self, t: pa.Table, mark, column_error) -> pa.Array:
        n = t.num_rows
        if "x" not in t.column_names:
            column_error("x", "a column of tokens" if self.tokens else f"a column of {self.nfeat} floats")
            return (pa.array(np.zeros(n, np.int64)) if self.tokens else
                    pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * self.nfeat, np.float32)), self.nfeat))
        xcol = t.column("x")
        xnull = xcol.is_null().to_numpy(zero_copy_only=False)
        if self.tokens:
            if not pa.types.is_integer(xcol.type):
                column_error("x", "an integer column of tokens")
                return pa.array(np.zeros(n, np.int64))
            xv, big = _int64(xcol)
            mark(xnull | big | (xv < 0) | (xv >= self.vocab),
                 lambda i: f"x: expected a token in [0, {self.vocab}), got {xcol[i].as_py()!r}")
            return pa.array(np.where((xv < 0) | (xv >= self.vocab), 0, xv))
        if not (pa.types.is_list(xcol.type) or pa.types.is_fixed_size_list(xcol.type)
                or pa.types.is_large_list(xcol.type)):
            column_error("x", f"a list column of {self.nfeat} floats")
            return pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * self.nfeat, np.float32)), self.nfeat)
        lens = pc.fill_null(pc.list_value_length(xcol), -1).to_numpy(zero_copy_only=False)
        wrong = xnull | (lens != self.nfeat)
        flat = np.zeros((n, self.nfeat), np.float32)
        ok = ~wrong
        if ok.any():
            try:
                vals = pc.list_flatten(xcol.filter(pa.array(ok))).cast(pa.float32())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):  # e.g. list<string>
                column_error("x", f"a list column of {self.nfeat} floats")
                vals = pa.array(np.zeros(int(ok.sum()) * self.nfeat, np.float32))
            flat[ok] = pc.fill_null(vals, np.nan).to_numpy(zero_copy_only=False).reshape(-1, self.nfeat)
        mark(wrong | ~np.isfinite(flat).all(axis=1),
             lambda i: f"x: expected {self.nfeat} finite floats, got {_py(xcol, i)!r}")
        return pa.FixedSizeListArray.from_arrays(pa.array(np.nan_to_num(flat).reshape(-1)), self.nfeat)

    def finish_bundle(self) -> Iterator:
        if self._rows:
            key, ts, seq, sub, x = zip(*self._rows, strict=True)
            x_arr = (pa.array(np.asarray(x, np.int64)) if self.tokens else
                     pa.FixedSizeListArray.from_arrays(pa.array(np.stack(x).reshape(-1)), self.nfeat))
            self._blocks.append(pa.table({KEY: pa.array(key, pa.string()), TS: pa.array(ts, pa.float64()),
                                          SEQ: pa.array(seq, pa.int64()), SUB: pa.array(sub, pa.int64()),
                                          "x": x_arr, EVENT: pa.nulls(len(key), pa.string())}))
            self._rows = []
        if not self._blocks:
            return
        t = pa.concat_tables(self._blocks).combine_chunks()
        self._blocks = []
        tsu = to_micros_array(t.column(TS).to_numpy())
        rel = release_micros(tsu, size=self.size, lateness=self.lateness)
        t = t.append_column(TSU, pa.array(tsu)).append_column(REL, pa.array(rel))
        keys = t.column(KEY)
        uniq = pc.unique(keys)
        shard_u = np.array([shard_of(k, self.num_shards) for k in uniq.to_pylist()], np.int64)
        shards = shard_u[pc.index_in(keys, uniq).to_numpy(zero_copy_only=False)]
        # one block per (shard, release time), in that order, rows in arrival order: one stable sort of a
        # group code, one take, then slices (np.unique over rows and a filter per group took 3-7x as long)
        rel_u, rel_i = np.unique(rel, return_inverse=True)
        code = shards * len(rel_u) + rel_i.reshape(-1)
        order = np.argsort(code, kind="stable")
        code = code[order]
        starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
        if len(starts) > 1:
            t = t.take(pa.array(order))
        for a, b in zip(starts.tolist(), [*starts[1:].tolist(), len(code)], strict=True):
            s, r = divmod(int(code[a]), len(rel_u))
            yield beam.transforms.window.WindowedValue(
                (s, (EVENTS, to_ipc(t.slice(a, b - a)))), timestamp(int(rel_u[r])), [GlobalWindow()])


class UpdateIntake(beam.DoFn):
    """A valid :class:`ModelUpdate` goes to every shard, released with the window of its effective time.

    An update is checked before any shard sees it: its ``effective_ts``, and that its model
    loads and takes the same input and gives the same outputs as the transform's model. A
    bad update is an ``invalid`` dead letter and the current model stays.
    """

    def __init__(self, *, spec_json: str, num_shards: int, size_micros: int, lateness_micros: int):
        self.spec_json = spec_json
        self.num_shards = num_shards
        self.size = size_micros
        self.lateness = lateness_micros

    def setup(self) -> None:
        self.m = Counters()

    def _check(self, u: Any) -> tuple[str, float, str | None]:
        from ...model.runtime import CPU
        from ...model.spec import ModelSpec
        from ..models import load_model

        if not isinstance(u, tuple) or not u or not isinstance(u[0], str):
            return "", 0.0, f"model update: expected ModelUpdate(path, effective_ts), got {u!r}"
        eff = u[1] if len(u) > 1 and u[1] is not None else -math.inf
        if isinstance(eff, bool) or not isinstance(eff, (int, float)) or math.isnan(eff) or (
                math.isfinite(eff) and abs(eff) > TS_LIMIT) or eff == math.inf:
            return u[0], 0.0, f"effective_ts: expected seconds within ±{TS_LIMIT:.0e} (or -inf), got {eff!r}"
        try:
            spec = load_model(u[0], [CPU]).spec
        except Exception as ex:  # any load failure is this update's, not the job's
            return u[0], float(eff), f"path: expected a loadable streamrnn model, got {u[0]!r}: " + \
                str(ex).splitlines()[0]
        base = ModelSpec.from_json(self.spec_json)
        want = (base.input.kind, base.input.vocab_size, base.input.n_features, [o.name for o in base.outputs])
        got = (spec.input.kind, spec.input.vocab_size, spec.input.n_features, [o.name for o in spec.outputs])
        if got != want:
            return u[0], float(eff), (f"model: expected input and outputs like the running model "
                                      f"(kind, vocab, features, outputs) {want}, got {got}")
        return u[0], float(eff), None

    def process(self, u) -> Iterator:
        path, eff, reason = self._check(u)
        if reason is not None:
            self.m.dead("invalid")
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(None, eff if math.isfinite(eff) else None, None, None,
                                                            "invalid", reason, event_json({"update": repr(u)})))
            return
        effu = EARLIEST if not math.isfinite(eff) else int(to_micros_array(np.array([eff]))[0])
        rel = int(release_micros(np.array([max(effu, EARLIEST)]), size=self.size, lateness=self.lateness)[0])
        payload = (UPDATE, event_json({"path": path, "effective_ts": eff, "effective_micros": effu}).encode())
        for s in range(self.num_shards):
            yield TimestampedValue((s, payload), timestamp(rel))
