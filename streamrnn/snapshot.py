"""Keyed-state snapshots as Arrow tables (no pickle), and their strict decoding.

One row per key: ``key`` (binary), ``key_is_str``, ``steps``, ``last_seen``, one
``state_<name>`` float32 fixed-size list column per state tensor (``[layers * hidden]``,
row-major), and ``last_<output>`` columns when last outputs are kept. The schema
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

from .errors import SnapshotError, StateError

SNAPSHOT_KEY = b"streamrnn.snapshot"
SNAPSHOT_FORMAT = "streamrnn-snapshot/1"


def signature(spec) -> list[list]:
    return [[s.name, list(s.shape), s.dtype] for s in spec.state]


def encode(keys: list, steps: np.ndarray, seen: np.ndarray, states: dict[str, np.ndarray],
           last: dict[str, np.ndarray], spec, keep_last_output: bool) -> pa.Table:
    """``states[name]`` is ``[keys, layers, *tail]``; ``last[name]`` is ``[keys, ...]``."""
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
           *, keep_last_output: bool, allow_other_model: bool, max_keys: int) -> Decoded:
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
    return Decoded(keys, steps, seen_at, states, last)


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
