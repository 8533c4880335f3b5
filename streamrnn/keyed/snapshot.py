"""Keyed-state snapshots as Arrow tables (no pickle), and their strict decoding.

One row per key: ``key`` (binary), ``key_is_str``, ``steps``, ``last_seen``, one
``state_<name>`` float32 fixed-size list column per state tensor (``[layers * hidden]``,
row-major), and ``last_<output>`` columns when last outputs are kept. With carried-state health on
(:mod:`streamrnn.keyed.health`): ``health_<column>`` (float64 / int64, one per
:data:`streamrnn.keyed.slab.HEALTH_FILL` column but the pool slot), ``health_watched`` (bool), and under
``heal`` the shadow run of watched keys, ``shadow_<name>`` and ``shadow_last_<output>`` (zeros and NaN
for keys not watched). The schema
metadata names the model (its fingerprint, as :func:`streamrnn.load` binds it, and state shapes).
A snapshot is one table, or one Parquet file.

Decoding validates everything before anything is replaced: every defect is a
:class:`~streamrnn.errors.SnapshotError` (or :class:`~streamrnn.errors.StateError` for
NaN/inf state), never a raw Arrow, JSON, key or index error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SnapshotError, StateError
from .slab import HEALTH_FILL

#: the health columns a snapshot carries (all but the pool slot, which restore allocates anew)
HEALTH_COLUMNS = {n: dt for n, (dt, _) in HEALTH_FILL.items() if n != "shadow_slot"}

SNAPSHOT_KEY = b"streamrnn.snapshot"
SNAPSHOT_FORMAT = "streamrnn-snapshot/1"


def signature(spec) -> list[list]:
    return [[s.name, list(s.shape), s.dtype] for s in spec.state]


def encode(keys: list, steps: np.ndarray, seen: np.ndarray, states: dict[str, np.ndarray],
           last: dict[str, np.ndarray], spec, keep_last_output: bool, health: dict | None = None) -> pa.Table:
    """``states[name]`` is ``[keys, layers, *tail]``; ``last[name]`` is ``[keys, ...]``; ``health`` the
    health columns (``watched``, and ``shadow`` / ``shadow_last`` dicts under ``heal``)."""
    cols: dict[str, pa.Array] = {
        "key": pa.array([k.encode() if isinstance(k, str) else k for k in keys], pa.binary()),
        "key_is_str": pa.array([isinstance(k, str) for k in keys], pa.bool_()),
        "steps": pa.array(steps, pa.int64()),
        "last_seen": pa.array(seen, pa.float64()),
    }
    for n, a in states.items():
        cols[f"state_{n}"] = _fixed_list(a)
    for n, a in last.items():
        cols[f"last_{n}"] = _fixed_list(a)
    for n, a in (health or {}).items():
        if n in ("shadow", "shadow_last"):
            for s, v in a.items():
                if n == "shadow":
                    cols[f"shadow_{s}"] = _fixed_list(v)
                else:  # no prediction yet (NaN): zeros, and shadow_none_<output> says so
                    none = np.isnan(v.reshape(len(v), int(np.prod(v.shape[1:])))).any(axis=1)  # (-1 fails on no keys)
                    cols[f"shadow_last_{s}"] = _fixed_list(np.where(none.reshape(-1, *([1] * (v.ndim - 1))), 0.0, v))
                    cols[f"shadow_none_{s}"] = pa.array(none, pa.bool_())
        elif n == "watched":
            cols["health_watched"] = pa.array(a, pa.bool_())
        else:  # NaN (no value yet) as null, so that equal snapshots compare equal
            dt = HEALTH_COLUMNS[n]
            mask = np.isnan(a) if dt == np.float64 else None
            cols[f"health_{n}"] = pa.array(a, pa.from_numpy_dtype(dt), mask=mask)
    meta = {"format": SNAPSHOT_FORMAT, "model": spec.name, "version": spec.version,
            "fingerprint": spec.fingerprint, "state": signature(spec), "keep_last_output": keep_last_output}
    return pa.table(cols).replace_schema_metadata({SNAPSHOT_KEY: json.dumps(meta).encode()})


@dataclass
class Decoded:
    keys: list
    steps: np.ndarray
    seen: np.ndarray
    states: dict[str, np.ndarray]  # [keys, layers, *tail]
    last: dict[str, np.ndarray]    # [keys, ...]
    health: dict[str, np.ndarray] | None = None  # health column -> [keys] (None: the snapshot has none)
    watched: np.ndarray | None = None
    shadow: dict[str, np.ndarray] | None = None       # [keys, layers, *tail]
    shadow_last: dict[str, np.ndarray] | None = None  # [keys, ...]


def read(source: pa.Table | str | Path) -> pa.Table:
    """A snapshot table: the table itself, or one Parquet file (a directory is refused: it would merge
    every file in it, of whichever models, under the first file's metadata)."""
    if isinstance(source, pa.Table):
        return source
    if not isinstance(source, (str, Path)):
        raise SnapshotError(f"restore: source: expected an Arrow table or a Parquet path, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        n = sum(1 for f in path.iterdir() if f.is_file())
        raise SnapshotError(f"restore: source: expected one Parquet snapshot file, got a directory {str(source)!r} "
                            f"({n} files); restore its files one at a time")
    try:
        return pq.ParquetFile(str(source)).read()
    except (OSError, pa.ArrowException, ValueError) as e:
        raise SnapshotError(f"restore: expected a Parquet snapshot at {str(source)!r}, got: {e}") from e


def decode(table: pa.Table, spec, state_tail: dict[str, tuple[int, ...]], out_tail: dict[str, tuple[int, ...]],
           *, keep_last_output: bool, allow_other_model: bool, max_keys: int, health: str = "off") -> Decoded:
    """Validate a snapshot against a model and return its contents (nothing is modified)."""
    meta = _meta(table)
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"restore: format: expected {SNAPSHOT_FORMAT!r}, got {meta.get('format')!r}")
    want_sig = signature(spec)
    if meta.get("state") != want_sig:
        raise SnapshotError(f"restore: state shapes: expected {want_sig} (model {spec.name}), "
                            f"got {meta.get('state')} (model {meta.get('model')})")
    fp = meta.get("fingerprint")
    # a snapshot written before load bound model fingerprints carries the weights sha256 of its model
    same = fp == spec.fingerprint or (bool(spec.weights_sha256) and fp == spec.weights_sha256)
    if not same and not allow_other_model:
        raise SnapshotError(
            f"restore: model: expected a snapshot of {spec.name} v{spec.version} "
            f"(fingerprint {spec.fingerprint[:12]}), got one of {meta.get('model')} v{meta.get('version')} "
            f"(fingerprint {str(fp)[:12]}); "
            "pass allow_other_model=True to continue compatible state under new weights")
    n = table.num_rows
    if n > max_keys:
        raise SnapshotError(f"restore: keys: expected <= max_keys={max_keys}, got {n}")
    raw = _column(table, "key", pa.binary(), n)
    is_str = _column(table, "key_is_str", pa.bool_(), n)
    keys: list[Any] = []
    for i, (k, s) in enumerate(zip(raw, is_str, strict=True)):
        if s:
            try:
                k = k.decode("utf-8")
            except UnicodeDecodeError:
                raise SnapshotError(f"restore: key[{i}]: expected UTF-8 (key_is_str is true), got {k!r}") from None
        keys.append(k)
    if len(set(keys)) != n:
        seen: set = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise SnapshotError(f"restore: key: expected each key once, got {dup!r} more than once")
    steps = np.asarray(_column(table, "steps", pa.int64(), n), np.int64)
    if n and steps.min() < 0:
        raise SnapshotError(f"restore: steps: expected >= 0, got {int(steps.min())}")
    seen_at = np.asarray(_column(table, "last_seen", pa.float64(), n), np.float64)
    if not np.isfinite(seen_at).all():
        raise SnapshotError("restore: last_seen: expected finite times, got NaN or inf")
    states = {}
    for s, tail in state_tail.items():
        a = _floats(table, f"state_{s}", n, int(np.prod(tail))).reshape(n, *tail)
        bad = ~np.isfinite(a).reshape(n, int(np.prod(tail))).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            raise StateError(f"restore: state_{s} of key {keys[i]!r}: expected finite values, got NaN or inf")
        states[s] = a
    last = {}
    if keep_last_output:
        for o, tail in out_tail.items():
            name = f"last_{o}"
            last[o] = (_floats(table, name, n, int(np.prod(tail))).reshape(n, *tail)
                       if name in table.column_names else np.full((n, *tail), np.nan, np.float32))
    out = Decoded(keys, steps, seen_at, states, last)
    if health != "off" and "health_ew_num" in table.column_names:
        _decode_health(table, n, keys, state_tail, out_tail, health, out)
    return out


def _decode_health(table: pa.Table, n: int, keys: list, state_tail, out_tail, policy: str, out: Decoded) -> None:
    cols = {}
    for c, dt in HEALTH_COLUMNS.items():
        typ = pa.from_numpy_dtype(dt)
        if c in _NULLABLE:  # null: no value yet
            col = table.column(f"health_{c}") if f"health_{c}" in table.column_names else None
            if col is None:
                raise SnapshotError(f"restore: column 'health_{c}': expected it, got columns {table.column_names}")
            try:
                a = np.asarray(col.cast(typ).to_numpy(zero_copy_only=False), dt)
            except (pa.ArrowException, ValueError) as e:
                raise SnapshotError(f"restore: column 'health_{c}': expected {typ}, got {col.type}") from e
            cols[c] = np.where(np.isnan(a), np.nan, a)
            continue
        a = np.asarray(_column(table, f"health_{c}", typ, n), dt)
        if dt == np.int64 and n and a.min() < 0:
            raise SnapshotError(f"restore: column 'health_{c}': expected >= 0, got {int(a.min())}")
        if c in ("ew_num", "ew_den", "win_carried", "win_shadow") and not np.isfinite(a).all():
            raise SnapshotError(f"restore: column 'health_{c}': expected finite values, got NaN or inf")
        cols[c] = a
    out.health = cols
    out.watched = np.asarray(_column(table, "health_watched", pa.bool_(), n), bool)
    if policy == "heal" and out.watched.any():
        out.shadow, out.shadow_last = {}, {}
        for s, tail in state_tail.items():
            a = _floats(table, f"shadow_{s}", n, int(np.prod(tail))).reshape(n, *tail)
            bad = ~np.isfinite(a).reshape(n, -1).all(axis=1)
            if bad.any():
                i = int(np.argmax(bad))
                raise StateError(f"restore: shadow_{s} of key {keys[i]!r}: expected finite values, got NaN or inf")
            out.shadow[s] = a
        for o, tail in out_tail.items():
            name = f"shadow_last_{o}"
            if name not in table.column_names:
                raise SnapshotError(f"restore: column {name!r}: expected it, got columns {table.column_names}")
            a = _floats(table, name, n, int(np.prod(tail))).reshape(n, *tail).copy()
            a[np.asarray(_column(table, f"shadow_none_{o}", pa.bool_(), n), bool)] = np.nan
            out.shadow_last[o] = a
    else:
        out.watched = np.zeros(n, bool)


_NULLABLE = ("ratio", "last_health")


def _meta(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(SNAPSHOT_KEY)
    if raw is None:
        raise SnapshotError(f"restore: schema metadata: expected key {SNAPSHOT_KEY.decode()!r}, "
                            "got a table that is not a streamrnn snapshot")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise SnapshotError(f"restore: schema metadata: expected JSON, got {raw[:60]!r}") from e
    if not isinstance(meta, dict):
        raise SnapshotError(f"restore: schema metadata: expected a JSON object, got {type(meta).__name__}")
    return meta


def _column(table: pa.Table, name: str, typ: pa.DataType, n: int) -> list:
    if name not in table.column_names:
        raise SnapshotError(f"restore: column {name!r}: expected it, got columns {table.column_names}")
    col = table.column(name)
    if col.null_count:
        raise SnapshotError(f"restore: column {name!r}: expected no nulls, got {col.null_count}")
    if col.type != typ:
        try:
            col = col.cast(typ, safe=True)
        except (pa.ArrowException, ValueError) as e:
            raise SnapshotError(f"restore: column {name!r}: expected {typ}, got {col.type}") from e
    return col.to_pylist()


def _floats(table: pa.Table, name: str, n: int, width: int) -> np.ndarray:
    if name not in table.column_names:
        raise SnapshotError(f"restore: column {name!r}: expected it, got columns {table.column_names}")
    col = table.column(name)
    arr = col.combine_chunks()
    ok = pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
    if not ok or not pa.types.is_floating(arr.type.value_type):
        raise SnapshotError(f"restore: column {name!r}: expected a list of float32, got {arr.type}")
    if arr.null_count or arr.flatten().null_count:
        raise SnapshotError(f"restore: column {name!r}: expected no nulls")
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if flat.size != n * width:
        raise SnapshotError(f"restore: column {name!r}: expected {width} values per key, got {flat.size} "
                            f"values for {n} keys")
    if not pa.types.is_fixed_size_list(arr.type) and n:
        lens = np.diff(arr.offsets.to_numpy())
        if (lens != width).any():
            raise SnapshotError(f"restore: column {name!r}: expected {width} values per key, got {int(lens.max())}")
    return flat.reshape(n, width)


def _fixed_list(a: np.ndarray) -> pa.Array:
    """``[n, ...]`` float32 -> a fixed-size list column of width ``prod(...)`` (row-major)."""
    a = np.ascontiguousarray(a, np.float32)
    width = int(np.prod(a.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), width)
