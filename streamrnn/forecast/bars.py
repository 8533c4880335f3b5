"""Read OHLCV bars from CSV files into per-symbol arrays.

Canonical columns: ``symbol, ts, open, high, low, close, volume``. The layouts in
``shared/data/market`` are recognised without a flag (names are matched
case-insensitively):

* ``date,open,high,low,close,volume,Name`` (S&P 500 daily): ``Name`` is the symbol;
* ``Date,Open,High,Low,Close,Volume,OpenInt`` (long daily, CRLF): no symbol column,
  so the symbol is the file name up to its first dot, upper-cased (``aep.us.txt`` -> ``AEP``);
* ``Date,Time,Open,...`` (intraday): ``ts`` is date + time;
* a header with one name fewer than each row's fields and ``Date`` first (the
  backtrader 1-minute file): the second field is read as the time.

Other layouts: ``columns={"ts": "When", "symbol": "Ticker"}`` (CLI
``--columns ts=When,symbol=Ticker``) maps a canonical name to a file column.

Parsing never drops a row silently: an unparseable number becomes NaN, an
unparseable timestamp NaN, and the online feature engine
(:mod:`streamrnn.forecast.features`) turns such rows into dead letters with a reason.
A missing column is an :class:`~streamrnn.errors.InputError` naming it.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

PRICE_COLUMNS = ("open", "high", "low", "close", "volume")
CANONICAL = ("symbol", "ts", *PRICE_COLUMNS)
#: the column names each canonical column is found under (lower case), in order of preference
COLUMN_ALIASES = {
    "symbol": ("symbol", "name", "ticker"),
    "ts": ("ts", "timestamp", "datetime", "date"),
    "time": ("time",),
}


@dataclass
class Bars:
    """Raw bars of one symbol in file order. ``ts`` is float seconds since 1970 (UTC), NaN if unparseable."""

    symbol: str
    ts: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.ts)

    def row(self, i: int) -> dict:
        return {"symbol": self.symbol, "ts": float(self.ts[i]),
                **{c: float(getattr(self, c)[i]) for c in PRICE_COLUMNS}}

    def take(self, idx: np.ndarray) -> Bars:
        return Bars(self.symbol, *(getattr(self, c)[idx] for c in ("ts", *PRICE_COLUMNS)), source=self.source)


def parse_columns(text: str | None) -> dict[str, str]:
    """``"ts=When,symbol=Ticker"`` -> ``{"ts": "When", "symbol": "Ticker"}``."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        k = k.strip().lower()
        if not sep or k not in (*CANONICAL, "time") or not v.strip():
            raise InputError(f"--columns: expected NAME=COLUMN pairs with NAME in {[*CANONICAL, 'time']}, "
                             f"got {part!r}")
        out[k] = v.strip()
    return out


def _to_float(values: Iterable[str]) -> np.ndarray:
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            out.append(np.nan)
    return np.asarray(out, np.float64)


def parse_ts(dates: list[str], times: list[str] | None = None) -> np.ndarray:
    """Seconds since 1970 UTC from ISO dates (``YYYY-MM-DD``), datetimes, or epoch numbers; NaN if unparseable."""
    if times is not None:
        dates = [f"{d.strip()}T{t.strip()}" for d, t in zip(dates, times, strict=True)]
    try:
        arr = np.array([d.strip().replace(" ", "T") for d in dates], dtype="datetime64[ms]")
        return arr.astype(np.int64).astype(np.float64) / 1000.0
    except ValueError:
        pass
    out = np.empty(len(dates), np.float64)
    for i, d in enumerate(dates):
        d = d.strip()
        try:
            out[i] = np.datetime64(d.replace(" ", "T"), "ms").astype(np.int64) / 1000.0
        except ValueError:
            try:
                out[i] = float(d)
            except ValueError:
                out[i] = np.nan
    return out


def _find(header: list[str], name: str, mapping: Mapping[str, str], path: str, required: bool = True) -> int | None:
    lower = [h.strip().lower() for h in header]
    if name in mapping:
        want = mapping[name].strip().lower()
        if want not in lower:
            raise InputError(f"{path}: column {mapping[name]!r} (mapped to {name}): expected in the header, "
                             f"got {header}")
        return lower.index(want)
    for alias in COLUMN_ALIASES.get(name, (name,)):
        if alias in lower:
            return lower.index(alias)
    if required:
        raise InputError(f"{path}: column {name!r}: expected in the header (or mapped with --columns), got {header}")
    return None


def read_csv_text(text: str, *, source: str = "bars", columns: Mapping[str, str] | None = None) -> list[Bars]:
    """Parse one CSV text (LF or CRLF) into per-symbol :class:`Bars`, symbols in order of first appearance."""
    columns = dict(columns or {})
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(f.strip() for f in r)]
    if not rows:
        raise InputError(f"{source}: expected a header and bars, got an empty file")
    header, body = rows[0], rows[1:]
    width = len(header)
    if body and len(body[0]) == width + 1 and header[0].strip().lower() == "date" and "time" not in [
            h.strip().lower() for h in header]:
        header = [header[0], "Time", *header[1:]]  # backtrader's 1-minute file: "date,time" under one name
        width += 1
    for i, r in enumerate(body):
        if len(r) != width:
            raise InputError(f"{source}: row {i + 2}: expected {width} fields like the header, got {len(r)}")
    idx = {c: _find(header, c, columns, source) for c in ("ts", *PRICE_COLUMNS)}
    sym_i = _find(header, "symbol", columns, source, required=False)
    time_i = _find(header, "time", columns, source, required=False)
    cols = list(zip(*body, strict=True)) if body else [() for _ in header]
    ts = parse_ts(list(cols[idx["ts"]]), list(cols[time_i]) if time_i is not None else None)
    values = {c: _to_float(cols[idx[c]]) for c in PRICE_COLUMNS}
    if sym_i is None:
        sym = np.full(len(body), Path(source).name.split(".")[0].upper(), dtype=object)
    else:
        sym = np.asarray([s.strip() for s in cols[sym_i]], dtype=object)
    out: list[Bars] = []
    order = list(dict.fromkeys(sym.tolist()))
    for s in order:
        m = sym == s
        out.append(Bars(s, ts[m], *(values[c][m] for c in PRICE_COLUMNS), source=source))
    return out


def read_bars(path: str | os.PathLike, *, columns: Mapping[str, str] | None = None,
              symbols: Iterable[str] | None = None) -> list[Bars]:
    """Read a CSV file, or every ``*.csv`` / ``*.txt`` file of a directory (sorted by name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".csv", ".txt") and f.is_file())
        if not files:
            raise InputError(f"--bars {p}: expected a CSV file or a directory of .csv/.txt files, got none inside")
    elif p.is_file():
        files = [p]
    else:
        raise InputError(f"--bars {p}: expected a CSV file or a directory, got nothing at that path")
    want = set(symbols) if symbols is not None else None
    out: list[Bars] = []
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        for b in read_csv_text(text, source=str(f), columns=columns):
            if want is None or b.symbol in want:
                out.append(b)
    return out
