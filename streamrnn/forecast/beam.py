"""The market job's Beam steps: bar files in, per-symbol online features, forecast columns out.

Flow (``beam_jobs/market_forecast.py`` composes it)::

  bar files -> ReadBars / ReplayBars -> (symbol, bar) -> BarFeatures (stateful, per symbol)
            -> Event(symbol, ts, seq, x) -> StatefulInference(postprocess=ForecastPostprocess)

**Features before the model.** :class:`BarFeatures` keeps, per symbol, exactly the small
state of :class:`~streamrnn.forecast.features.OnlineFeatures` (last close, volume, time, EWMA
variance, bar count) and applies :func:`~streamrnn.forecast.features.step_features` to the
symbol's bars in timestamp order, so each bar's feature vector is the one
:class:`~streamrnn.forecast.serve.ForecastOperator` and ``eval forecast`` compute. Bars are
buffered until the watermark passes their fixed event-time window's end plus the allowed
lateness (the same release rule as :class:`~streamrnn.beam.StatefulInference`), then applied
sorted by ``(ts, file, row)``. A bad bar (:func:`~streamrnn.forecast.features.bar_problem`)
is a dead letter with the reason and touches no state; so is a bar of a window the symbol
already released (``late``: beyond the allowed lateness), and a bar older than, or at the time
of, the symbol's last applied bar (``late`` / ``duplicate``).

**The close rides in ``sub``.** StatefulInference's outputs carry ``key, ts, seq, sub`` and
the model's columns only, so the bar's close (needed to turn return quantiles into prices)
travels as the float64 bits of ``sub`` (``seq``, the bar's index in its symbol's stream,
alone names the event). :func:`close_of` decodes it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from apache_beam.coders import StrUtf8Coder, VarIntCoder
from apache_beam.io import fileio
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue

from ..beam.job.io import ParseFiles
from ..beam.job.live import LiveParser, Message, Parsed, message_rows
from ..beam.job.replay import drain_marks, gap_marks, play, step_bounds, stepped_stream
from ..beam.postprocess import Postprocess
from ..beam.records import DEAD, Event
from ..beam.step.clock import TS_LIMIT, release_micros, timestamp, to_micros
from ..beam.step.counters import Counters
from ..dead_letters import DeadLetter, event_json
from ..errors import InputError
from .bars import COLUMN_ALIASES, PRICE_COLUMNS, read_csv_text
from .distribution import nll, quantile
from .features import FeatureConfig, SymbolState, bar_dead_letter, bar_problem, step_features
from .scale import anchor_log_vol, previous_forecast
from .serve import LEVELS

BAR_EXTENSIONS = (".csv", ".txt", ".parquet")
_ORDER = "_order"  # (file index, row index within the file's symbol) for a deterministic tie-break


# -- input -----------------------------------------------------------------------------------------
def bar_files(spec: str) -> list[str]:
    """The bar files a comma-separated list of files, directories or globs names (listed, not opened).

    A directory means its ``*.csv``, ``*.txt`` and ``*.parquet`` files. InputError (one line)
    when a part matches nothing, or nothing matched has bytes.
    """
    out: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        pattern = FileSystems.join(part, "*") if FileSystems.exists(part) and os.path.isdir(part) else part
        try:
            found = [m for r in FileSystems.match([pattern]) for m in r.metadata_list]
        except BeamIOError:
            found = []
        except Exception as e:  # a scheme whose filesystem is not installed
            raise InputError(f"input: expected bar files at {part!r}, got: {str(e).splitlines()[0][:200]}") from None
        found = [m for m in found if m.path.lower().endswith(BAR_EXTENSIONS)]
        if not found:
            raise InputError(f"input: expected bar files ({', '.join(BAR_EXTENSIONS)}) at {part!r}, got none")
        out += [m.path for m in sorted(found, key=lambda m: m.path) if m.size_in_bytes > 0]
    if not out:
        raise InputError(f"input: expected bars in {spec!r}, got only empty files")
    return list(dict.fromkeys(out))


def parse_bar_file(data: bytes, path: str, file_index: int, columns: Mapping[str, str] | None = None
                   ) -> tuple[list[dict], list[DeadLetter]]:
    """Bars (dicts with the canonical columns) of one CSV or Parquet file, in file order per symbol.

    A file that cannot be read as bars (a missing column, a ragged row, not Parquet) is one
    dead letter naming the file and why.
    """
    try:
        if path.lower().endswith(".parquet"):
            sink = io.BytesIO()
            pcsv.write_csv(pq.read_table(io.BytesIO(data)), sink)
            data = sink.getvalue()
        series = read_csv_text(data.decode("utf-8", errors="replace"), source=path, columns=columns)
    except (InputError, pa.ArrowException, ValueError) as e:
        reason = str(e).splitlines()[0]
        return [], [DeadLetter(None, None, None, None, "invalid", reason, event_json({"file": path}))]
    bars = []
    for b in series:
        for i in range(len(b)):
            bars.append({**b.row(i), _ORDER: [file_index, i]})
    return bars, []


def check_bar_frequency(files: Sequence[str], columns: Mapping[str, str] | None, bar_seconds: float, *,
                        allow: bool = False, max_files: int = 3) -> float:
    """The median interval between consecutive bars of a symbol in the first ``max_files`` bar files (read at
    launch); InputError (one line) when it is outside 0.5x..4x the model's ``bar_seconds`` (the rule of
    ``eval forecast`` and ``train forecast``) unless ``allow``. NaN (no check) with fewer than two bars of a
    symbol."""
    gaps = []
    for i, path in enumerate(files[:max_files]):
        with FileSystems.open(path, compression_type="uncompressed") as f:
            bars, _ = parse_bar_file(f.read(), path, i, columns)
        by: dict[str, list[float]] = {}
        for b in bars:
            if isinstance(b["ts"], float) and math.isfinite(b["ts"]):
                by.setdefault(b["symbol"], []).append(b["ts"])
        for ts in by.values():
            d = np.diff(np.unique(ts))
            gaps.append(d[d > 0])
    got = float(np.median(np.concatenate(gaps))) if gaps and sum(map(len, gaps)) else math.nan
    if math.isfinite(got) and not (0.5 * bar_seconds <= got <= 4 * bar_seconds) and not allow:
        raise InputError(f"input: frequency: expected bars every {bar_seconds:g} s (the model's training "
                         f"frequency), got a median interval of {got:g} s in {files[0]!r} (pass --allow-frequency "
                         "to run anyway)")
    return got


class ReadBars(beam.PTransform):
    """Read bar files (``bar_files`` output) inside the pipeline: ``(bars, dead_letters)``."""

    def __init__(self, files: list[str], columns: Mapping[str, str] | None = None, label: str | None = None):
        super().__init__(label)
        self.files, self.columns = list(files), dict(columns or {})

    def expand(self, pbegin):
        res = (pbegin | "Files" >> beam.Create(self.files) | "Match" >> fileio.MatchAll()
               | "Open" >> fileio.ReadMatches(compression="uncompressed")
               | "Parse" >> beam.ParDo(ParseFiles(BarParser(self.columns), self.files, timestamped=False))
               .with_outputs(DEAD, main="bars"))
        return res.bars, res[DEAD]


class BarParser(LiveParser):
    """Bars for a live source (:mod:`streamrnn.beam.job.live`), by the batch readers' rules: a file through
    :func:`parse_bar_file`, a message's JSON row as a one-row CSV file through it too (so ``--columns`` and
    the column names mean the same). A row without a time takes the message's; one without a symbol is a
    dead letter (a file may name its symbol, a message cannot)."""

    def __init__(self, columns: Mapping[str, str] | None = None):
        self.columns = dict(columns or {})

    def accepts(self, path: str) -> bool:
        return path.lower().endswith(BAR_EXTENSIONS)

    def _parsed(self, bars: list[dict], dead: list[DeadLetter]) -> Parsed:
        times = [b["ts"] for b in bars if isinstance(b["ts"], float) and math.isfinite(b["ts"])]
        return Parsed([(b, _sort_ts(b)) for b in bars], dead, max(times) if times else None)

    def file(self, path: str, data: bytes, index: int) -> Parsed:
        return self._parsed(*parse_bar_file(data, path, index, self.columns))

    def messages(self, messages: Sequence[Message], source: str) -> Parsed:
        rows, pos, dead = message_rows(messages, fallbacks=False)
        # the names the bar reader takes for ts and symbol (or the one --columns maps)
        ts_names = (self.columns["ts"].lower(),) if "ts" in self.columns else COLUMN_ALIASES["ts"]
        sym_names = (self.columns["symbol"].lower(),) if "symbol" in self.columns else COLUMN_ALIASES["symbol"]
        bars: list[dict] = []
        for r, i in zip(rows, pos, strict=True):
            m = messages[i]
            name = f"{source} message {m.name or m.seq}"
            if not any(k.strip().lower() in sym_names and v not in (None, "") for k, v in r.items()):
                dead.append(DeadLetter(None, None, None, None, "invalid", f"{name}: symbol: expected one of "
                                       f"{list(sym_names)} (or --columns symbol=NAME), got none", event_json(r)))
                continue
            if m.time is not None and not any(k.strip().lower() in ts_names and v is not None for k, v in r.items()):
                r = {**r, self.columns.get("ts", "ts"): m.time}
            text = io.StringIO()
            w = csv.writer(text)
            w.writerow(list(r))
            w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in r.values()])
            b, d = parse_bar_file(text.getvalue().encode(), name, m.seq, self.columns)
            bars += b
            dead += d
        return self._parsed(bars, dead)

    def encode(self, item: dict) -> bytes:
        return json.dumps(item).encode()

    def decode(self, data: bytes) -> dict:
        return json.loads(data)


def _sort_ts(bar: dict) -> float:
    t = bar["ts"]
    return t if isinstance(t, float) and math.isfinite(t) else -math.inf


class ReplayBars(beam.PTransform):
    """Play bar files as an unbounded stream (TestStream, DirectRunner ``--streaming``), in time order.

    Bars are cut into steps of ``step`` event-time seconds; after each step the watermark advances to the
    step's end. The files are read when the pipeline is built (a TestStream holds its elements from the
    start). Returns ``(bars, dead_letters)``.

    ``window`` and ``lateness``: those of the :class:`Features` step this feeds. That step holds a bar until its
    window's end plus the lateness, and the DirectRunner holds no watermark for a timer's output, so what it
    releases reaches the next windowed step as late as the watermark has moved past it. With ``window`` given,
    the watermark therefore never moves more than one window at a time (``step`` is capped at it, and the steps
    of a gap without bars are crossed a window at a time: a weekend under a one-day window), and after
    the last bar it goes on, a window at a time, through ``2 * window + lateness``
    (:func:`~streamrnn.beam.job.replay.drain_marks`), so the forecasts of the last windows are released
    too. Without it, a step longer than the window made bars late (dead letters, or silently dropped past
    the dedupe horizon) and the last window's forecasts were lost.
    """

    def __init__(self, files: list[str], columns: Mapping[str, str] | None = None, *, step: float = 86400.0,
                 window: float | None = None, lateness: float = 0.0, label: str | None = None):
        super().__init__(label)
        if not step > 0:
            raise InputError(f"ReplayBars: step: expected seconds > 0, got {step!r}")
        if window is not None and not (isinstance(window, (int, float)) and 0 < window < 1e11):
            raise InputError(f"ReplayBars: window: expected seconds > 0, got {window!r}")
        if not (isinstance(lateness, (int, float)) and 0 <= lateness < 1e11):
            raise InputError(f"ReplayBars: lateness: expected seconds >= 0, got {lateness!r}")
        self.files, self.columns = list(files), dict(columns or {})
        self.step = float(step) if window is None else min(float(step), float(window))
        self.window, self.lateness = window, float(lateness)

    def expand(self, pbegin):
        bars, dead = [], []
        for i, path in enumerate(self.files):
            with FileSystems.open(path, compression_type="uncompressed") as f:
                b, d = parse_bar_file(f.read(), path, i, self.columns)
            bars += b
            dead += d
        bars.sort(key=_sort_ts)
        finite = [_sort_ts(b) for b in bars if math.isfinite(_sort_ts(b))]
        t0 = finite[0] if finite else 0.0
        at = np.array([max(_sort_ts(b), t0) for b in bars], np.float64)  # a bar without a usable time: first
        steps = []
        for a, e, k in step_bounds(at, t0, self.step):
            if steps and self.window is not None:  # a gap without bars: crossed a window at a time
                steps += [([], wm) for wm in gap_marks(steps[-1][1], t0 + k * self.step, t0 + (k + 1) * self.step,
                                                         float(self.window))]
            steps.append(([TimestampedValue(b, float(t)) for b, t in zip(bars[a:e], at[a:e], strict=True)],
                          t0 + (k + 1) * self.step))
        if steps and self.window is not None:
            drain = 2 * self.window + self.lateness
            steps += [([], wm) for wm in drain_marks(steps[-1][1], float(self.window), drain)]
        return play(pbegin, stepped_stream(steps, dead, t0), "bars")


# -- per-symbol features ---------------------------------------------------------------------------
def close_bits(close: float) -> int:
    """The float64 bits of a (positive) close as an int64, for the event's ``sub``."""
    return int(np.float64(close).view(np.int64))


def close_of(sub: np.ndarray) -> np.ndarray:
    """Closes back from ``sub`` columns (:func:`close_bits`)."""
    return np.asarray(sub, np.int64).view(np.float64)


def _dead_bar(bar: Mapping, reason: str, kind: str = "invalid") -> DeadLetter:
    """:func:`~streamrnn.forecast.features.bar_dead_letter` without the reader's order, its time a finite float
    or None (the dead-letter Parquet column)."""
    d = bar_dead_letter({k: v for k, v in bar.items() if k != _ORDER} if isinstance(bar, Mapping) else bar,
                        reason, kind)
    return d._replace(ts=float(d.ts) if isinstance(d.ts, (int, float)) and math.isfinite(d.ts) else None)


class KeyBars(beam.DoFn):
    """Bars -> ``(symbol, bar)``; a bar that is bad whatever came before is a dead letter here."""

    def setup(self) -> None:
        self.m = Counters()

    def process(self, bar) -> Iterator:
        if not isinstance(bar, Mapping):
            self.m.dead("invalid")
            yield beam.pvalue.TaggedOutput(DEAD, _dead_bar({}, f"bar: expected a mapping of columns, got "
                                                               f"{type(bar).__name__}"))
            return
        problem = bar_problem(bar, -math.inf)
        if problem is None and abs(float(bar["ts"])) > TS_LIMIT:
            problem = (f"ts: expected seconds since the epoch within ±{TS_LIMIT:.0e}, got {bar['ts']!r} "
                       "(epoch milliseconds or nanoseconds? ts is seconds)")
        if problem is not None:
            self.m.dead("invalid")
            yield beam.pvalue.TaggedOutput(DEAD, _dead_bar(bar, problem))
            return
        yield bar["symbol"], {**{c: float(bar[c]) for c in ("ts", *PRICE_COLUMNS)}, "symbol": bar["symbol"],
                              _ORDER: list(bar.get(_ORDER, [0, 0]))}


_BARS_SPEC = BagStateSpec("bars", StrUtf8Coder())
_STATE_SPEC = ReadModifyWriteStateSpec("state", StrUtf8Coder())
_DUE_SPEC = ReadModifyWriteStateSpec("due", VarIntCoder())
_DONE_SPEC = ReadModifyWriteStateSpec("released", VarIntCoder())  # the symbol's last release time applied
_FLUSH_SPEC = TimerSpec("flush", TimeDomain.WATERMARK)
# Beam's DoFn parameters, as module-level singletons
_BARS, _STATE, _DUE, _DONE = (beam.DoFn.StateParam(s) for s in (_BARS_SPEC, _STATE_SPEC, _DUE_SPEC, _DONE_SPEC))
_FLUSH = beam.DoFn.TimerParam(_FLUSH_SPEC)
_KEY, _NOW = beam.DoFn.KeyParam, beam.DoFn.TimestampParam


class BarFeatures(beam.DoFn):
    """Stateful per symbol: buffered bars applied in time order at their release time -> feature Events.

    State: the symbol's :class:`SymbolState` (JSON), the buffered bars (JSON), the due release
    time and the last release time applied (a bar of a window at or before it is ``late``).
    Outputs are timestamped at the release time that applied them.
    """

    def __init__(self, config: FeatureConfig, *, window: float, lateness: float, flush_all: bool = False):
        self.config = config
        self.size, self.lateness = to_micros(window), to_micros(lateness)
        self.flush_all = flush_all

    def setup(self) -> None:
        self.m = Counters()

    def _release(self, ts: float) -> int:
        return int(release_micros(np.array([to_micros(ts)]), size=self.size, lateness=self.lateness)[0])

    def process(self, kv, bars=_BARS, due=_DUE, done=_DONE, flush=_FLUSH) -> Iterator:
        _, bar = kv
        rel = self._release(bar["ts"])
        released = done.read()
        if released is not None and rel <= released:
            self.m.dead("late")
            yield beam.pvalue.TaggedOutput(DEAD, _dead_bar(bar, (
                f"ts: expected a bar of a window not yet released, got {bar['ts']!r} after its window's end plus "
                "the allowed lateness (late)"), "late"))
            return
        bars.add(json.dumps(bar))
        cur = due.read()
        if cur is None or rel < cur:
            due.write(rel)
            flush.set(timestamp(rel))

    @on_timer(_FLUSH_SPEC)
    def on_flush(self, key=_KEY, now=_NOW, bars=_BARS, state=_STATE, due=_DUE, done=_DONE, flush=_FLUSH
                 ) -> Iterator:
        held = [json.loads(s) for s in bars.read()]
        ready, rest = [], []
        for b in held:
            (ready if self.flush_all or self._release(b["ts"]) <= now.micros else rest).append(b)
        raw = state.read()
        st = SymbolState(**json.loads(raw)) if raw else SymbolState()
        for b in sorted(ready, key=lambda b: (b["ts"], *b[_ORDER])):
            problem = bar_problem(b, st.last_ts)
            if problem is not None:
                kind = "duplicate" if b["ts"] == st.last_ts else "late"
                self.m.dead(kind)
                yield beam.pvalue.TaggedOutput(DEAD, TimestampedValue(_dead_bar(b, problem, kind), now))
                continue
            row, st = step_features(st, b, self.config, key)
            yield TimestampedValue(Event(key, row.ts, st.n - 1, row.x.tolist(), close_bits(row.close)), now)
        state.write(json.dumps(asdict(st)))
        if not self.flush_all:
            done.write(max(now.micros, done.read() or now.micros))
        bars.clear()
        for b in rest:
            bars.add(json.dumps(b))
        if rest:
            nxt = min(self._release(b["ts"]) for b in rest)
            due.write(nxt)
            flush.set(timestamp(nxt))
        else:
            due.clear()


class Features(beam.PTransform):
    """Bars -> ``(feature Events, dead letters)``: validation, then :class:`BarFeatures` per symbol."""

    def __init__(self, config: FeatureConfig, *, window: float, lateness: float, label: str | None = None):
        super().__init__(label)
        self.config, self.window, self.lateness = config, window, lateness

    def expand(self, bars):
        keyed = bars | "KeyBars" >> beam.ParDo(KeyBars()).with_outputs(DEAD, main="keyed")
        flush_all = bool(getattr(bars, "is_bounded", True))
        step = beam.ParDo(BarFeatures(self.config, window=self.window, lateness=self.lateness, flush_all=flush_all))
        keyed.keyed.element_type = beam.typehints.Tuple[str, beam.typehints.Any]  # str keys: a deterministic coder
        feats = keyed.keyed | "BarFeatures" >> step.with_outputs(DEAD, main="events")
        dead = (keyed[DEAD], feats[DEAD]) | "FeatureDead" >> beam.Flatten()
        return feats.events, dead


# -- model outputs -> forecast columns ---------------------------------------------------------------
#: the served location (``--location``): ``zero`` (default) serves the model's scale and shape around zero drift,
#: ``model`` its own location; docs/market.md gives the rule and the numbers behind the default
LOCATIONS = ("zero", "model")
QUANTILES = {f"{side}{name}": p for name, (lo, hi) in LEVELS.items() for side, p in (("lo", lo), ("hi", hi))}


class ForecastPostprocess(Postprocess):
    """Student-t outputs -> per-horizon return quantiles (% log), plus this bar's own return for pairing.

    ``location="zero"`` serves every horizon's Student-t with location 0 (the model's scale and df): the
    median price is the last close and the bands are centred on it; ``"model"`` keeps the model's location.

    Columns ``[N, H]``: ``ret_loc`` (= the median), ``ret_scale``, and ``q_lo80 / q_hi80 /
    q_lo95 / q_hi95``; ``[N]``: ``ret`` and ``jump`` (this bar's cleaned return and jump flag,
    paired with the next bar as the realised one-bar-ahead return), ``days``, and ``logprob``:
    the log density of this bar's return under the previous bar's one-bar-ahead forecast (NaN
    on a symbol's first bar and on jumps), which feeds the job's live loss metrics; ``abs_err``,
    ``in_80`` and ``in_95`` score that previous forecast's median and intervals the same way.

    With ``anchor`` (a model trained with ``FeatureConfig(anchor=True)``, :mod:`.scale`) the outputs are
    relative to the EWMA sd: the current one is ``exp(x[:, 5])``, and the previous bar's, which anchored
    the previous forecast, is recovered exactly from this bar's features by inverting one EWMA step
    (``v_prev = v (1 - (1 - lam) z^2) / lam``, ``z = x[:, 0]``; unchanged on a jump bar).
    :meth:`for_model` reads both from the model's ``training.forecast`` block.
    """

    needs_prev = True

    def __init__(self, df: list[float], location: str = "model", *, anchor: bool = False, lam: float = 0.94):
        if location not in LOCATIONS:
            raise InputError(f"location: expected one of {LOCATIONS}, got {location!r}")
        self.df = [float(d) for d in df]
        self.location = location
        self.anchor = bool(anchor)
        self.lam = float(lam)

    @classmethod
    def for_model(cls, meta: dict, location: str = "model") -> ForecastPostprocess:
        """The postprocess a model's ``training.forecast`` block asks for (df, anchor, EWMA lambda)."""
        feats = dict(meta.get("features") or {})
        return cls(meta["df"], location, anchor=bool(feats.get("anchor", False)), lam=float(feats.get("lam", 0.94)))

    def _loc(self, mean: np.ndarray) -> np.ndarray:
        """The served location: the model's, or 0 (zero drift: the median price is the last close)."""
        m = mean.astype(np.float64)
        return m if self.location == "model" else np.zeros_like(m)

    def __call__(self, x, outputs, prev_outputs):
        x = np.asarray(x, np.float64)
        mean = outputs["mean"].astype(np.float64)
        log_scale = outputs["log_scale"].astype(np.float64)
        ret, prev_mean, prev_ls = previous_forecast(x, prev_outputs["mean"][:, 0], prev_outputs["log_scale"][:, 0],
                                                    anchor=self.anchor, lam=self.lam)
        if self.anchor:
            lv = anchor_log_vol(x)  # float32, as the model reads it (eval forecast and ForecastOperator alike)
            mean, log_scale = mean * np.exp(lv)[:, None], log_scale + lv[:, None]
        loc = self._loc(mean)
        scale = np.exp(log_scale)
        df = np.broadcast_to(np.asarray(self.df), loc.shape)
        out = {"ret_loc": loc, "ret_scale": scale}
        for name, p in QUANTILES.items():
            out[f"q_{name}"] = quantile(p, loc, scale, df)
        out.update(ret=ret, days=x[:, 6], jump=x[:, 7])
        prev_loc = self._loc(prev_mean)
        prev_scale = np.exp(prev_ls)
        with np.errstate(invalid="ignore"):
            lp = -nll(ret, prev_loc, prev_scale, np.full(len(x), self.df[0]))
        out["logprob"] = np.where(x[:, 7] > 0.5, np.nan, lp)
        # live forecast quality: the previous one-bar-ahead forecast against the return that arrived
        scored = np.isfinite(out["logprob"])
        out["abs_err"] = np.where(scored, np.abs(ret - prev_loc), np.nan)
        df0 = np.full(len(x), self.df[0])
        for name, (lo, hi) in LEVELS.items():
            with np.errstate(invalid="ignore"):
                inside = (quantile(lo, prev_loc, prev_scale, df0) <= ret) & (
                    ret <= quantile(hi, prev_loc, prev_scale, df0))
            out[f"in_{name}"] = np.where(scored, inside.astype(np.float64), np.nan)
        return out
