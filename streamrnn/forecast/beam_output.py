"""The market job's output rows (forecast prices, realised error) and its live summary.

One Parquet row per accepted bar: ``symbol, ts, close, bar`` (its index in the symbol's
stream), ``flags``, per horizon ``h`` the price forecasts ``h{h}_median, h{h}_lo80,
h{h}_hi80, h{h}_lo95, h{h}_hi95`` and the Student-t over the cumulative % log return
``h{h}_ret_loc, h{h}_ret_scale`` (df per horizon in the model card), and, once the symbol's
next bar arrives, the realised one-bar-ahead outcome: ``realised_ret_h1`` (% log return),
``realised_close_h1``, ``error_h1`` (realised minus median, % log), ``nll_h1`` and
``in80_h1 / in95_h1``. They are null while unknown, at the end of the input, and where the
next bar is a corporate-action jump (its return is not a return; the features' rule).

After them (:func:`output_schema`) come the online-calibrated bands, VaR and ES, and the live scores of
every horizon (:mod:`.calibrate_step`), then, with ``--health flag`` or ``heal`` only, ``state_health`` (the
symbol's carried-state health at this bar, :mod:`streamrnn.keyed.health`; null where unknown), then
``model_version, fresh, reset`` (``reset="health"``: the symbol's state was replaced by its fresh shadow's).

``summary.json``: per symbol and overall, bars, scored bars, mean ``nll_h1``, ``mae_h1``,
``coverage_80`` and ``coverage_95`` of the live one-bar-ahead forecasts; with a :class:`Calibration`, per
symbol and overall ``horizons.h{h}`` (scored, NLL, MAE, raw and calibrated coverage per level and VaR breach
rate per tail, from the ``scored_h{h}_*`` columns) and the calibration settings; dead letters by kind.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import IO, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import trigger
from apache_beam.transforms.window import GlobalWindows

from ..beam.job.summary import SUMMARY, dead_letter_line, write_json
from .beam import QUANTILES, close_of
from .calibrate_step import calibrated_fields, horizon_summary, score_sums, scored_fields, sum_names
from .conformal import GAMMA, LEVELS, METHOD, TAILS
from .distribution import nll

PRICE_NAMES = ("median", *QUANTILES)
TRAILING = ("model_version", "fresh", "reset")
STATS = ("scored", "nll_h1", "abs_error_h1", "in80_h1", "in95_h1")


HEALTH_FIELD = pa.field("state_health", pa.float64())  #: with carried-state health on (flag, heal) only


def base_schema(horizons: int, health: bool = False) -> pa.Schema:
    """The rows :func:`job_columns` makes: the model's forecast and its h1 outcome (before calibration); with
    ``health``, ``state_health`` before the trailing columns."""
    fields = [("symbol", pa.string()), ("ts", pa.float64()), ("close", pa.float64()), ("bar", pa.int64()),
              ("flags", pa.string())]
    for h in range(1, horizons + 1):
        fields += [(f"h{h}_{n}", pa.float64()) for n in PRICE_NAMES]
        fields += [(f"h{h}_ret_loc", pa.float64()), (f"h{h}_ret_scale", pa.float64())]
    fields += [("realised_ret_h1", pa.float64()), ("realised_close_h1", pa.float64()), ("error_h1", pa.float64()),
               ("nll_h1", pa.float64()), ("in80_h1", pa.bool_()), ("in95_h1", pa.bool_()),
               *([HEALTH_FIELD] if health else []),
               *((c, pa.string() if c != "fresh" else pa.bool_()) for c in TRAILING)]
    return pa.schema(fields)


def output_schema(horizons: int, levels: Sequence[float] = LEVELS, tails: Sequence[float] = TAILS, *,
                  health: bool = False) -> pa.Schema:
    """The job's output rows: :func:`base_schema`, then the calibrated bands and the live scores of every horizon
    (:mod:`.calibrate_step`), then ``state_health`` (``health`` only) and ``model_version, fresh, reset``."""
    base = base_schema(horizons)
    head = [f for f in base if f.name not in TRAILING]
    return pa.schema([*head, *calibrated_fields(horizons, levels, tails), *scored_fields(horizons, levels, tails),
                      *([HEALTH_FIELD] if health else []), *(base.field(c) for c in TRAILING)])


def _matrix(col: pa.Array | pa.ChunkedArray, n: int) -> np.ndarray:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.flatten().to_numpy(zero_copy_only=False).reshape(n, -1).astype(np.float64)


def _nullable(values: np.ndarray, known: np.ndarray, typ: pa.DataType | None = None) -> pa.Array:
    return pa.array(values, typ or pa.float64(), mask=~known)


def job_columns(batch: pa.RecordBatch, df: list[float], gap_bars: float) -> pa.RecordBatch:
    """A StatefulInference output block (ForecastPostprocess columns, ``ret``/``jump`` paired) as job rows."""
    n = batch.num_rows
    close = close_of(batch.column("sub").to_numpy(zero_copy_only=False))
    loc, scale = _matrix(batch.column("ret_loc"), n), _matrix(batch.column("ret_scale"), n)
    H = loc.shape[1]
    seq = batch.column("seq").to_numpy(zero_copy_only=False)
    jump = batch.column("jump").to_numpy(zero_copy_only=False) > 0.5
    gap = batch.column("days").to_numpy(zero_copy_only=False) > gap_bars
    flags = [",".join(f for f, on in (("first", s == 0), ("jump", j), ("gap", g and s > 0)) if on)
             for s, j, g in zip(seq, jump, gap, strict=True)]
    cols: dict[str, pa.Array] = {"symbol": batch.column("key"), "ts": batch.column("ts"), "close": pa.array(close),
                                 "bar": batch.column("seq"), "flags": pa.array(flags, pa.string())}
    prices = {"median": loc, **{q: _matrix(batch.column(f"q_{q}"), n) for q in QUANTILES}}
    for h in range(H):
        for name, q in prices.items():
            cols[f"h{h + 1}_{name}"] = pa.array(close * np.exp(q[:, h] / 100.0))
        cols[f"h{h + 1}_ret_loc"] = pa.array(loc[:, h])
        cols[f"h{h + 1}_ret_scale"] = pa.array(scale[:, h])
    nxt = batch.column("ret_next").cast(pa.float64())
    jn = pc.fill_null(batch.column("jump_next").cast(pa.float64()), 1.0).to_numpy(zero_copy_only=False)
    known = ~nxt.is_null().to_numpy(zero_copy_only=False) & (jn < 0.5)
    y = pc.fill_null(nxt, 0.0).to_numpy(zero_copy_only=False)
    lo80, hi80, lo95, hi95 = (prices[q][:, 0] for q in ("lo80", "hi80", "lo95", "hi95"))
    cols["realised_ret_h1"] = _nullable(y, known)
    cols["realised_close_h1"] = _nullable(close * np.exp(y / 100.0), known)
    cols["error_h1"] = _nullable(y - loc[:, 0], known)
    cols["nll_h1"] = _nullable(nll(y, loc[:, 0], scale[:, 0], np.full(n, df[0])), known)
    cols["in80_h1"] = _nullable((y >= lo80) & (y <= hi80), known, pa.bool_())
    cols["in95_h1"] = _nullable((y >= lo95) & (y <= hi95), known, pa.bool_())
    health = HEALTH_FIELD.name in batch.schema.names
    if health:  # NaN (no reference, no shadow window yet) is unknown: null
        sh = batch.column(HEALTH_FIELD.name).to_numpy(zero_copy_only=False).astype(np.float64)
        cols[HEALTH_FIELD.name] = _nullable(sh, ~np.isnan(sh))
    for c in ("model_version", "fresh", "reset"):
        cols[c] = batch.column(c)
    schema = base_schema(H, health)
    return pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema)


# -- summary ----------------------------------------------------------------------------------------
class _SymbolStats(beam.DoFn):
    """(symbol, (bars, scored, sum nll, sum |error|, n in 80%, n in 95%)) per symbol of a job block."""

    def process(self, block: pa.RecordBatch):
        t = pa.Table.from_batches([block]).select(["symbol", "nll_h1", "error_h1", "in80_h1", "in95_h1"])
        t = t.set_column(2, "error_h1", pc.abs(t.column("error_h1")))
        for c in ("in80_h1", "in95_h1"):
            t = t.set_column(t.column_names.index(c), c, t.column(c).cast(pa.int64()))
        g = t.group_by("symbol").aggregate([("symbol", "count"), ("nll_h1", "count"), ("nll_h1", "sum"),
                                            ("error_h1", "sum"), ("in80_h1", "sum"), ("in95_h1", "sum")])
        names = ("symbol", "symbol_count", "nll_h1_count", "nll_h1_sum", "error_h1_sum", "in80_h1_sum", "in95_h1_sum")
        for k, *vals in zip(*(g.column(c).to_pylist() for c in names), strict=True):
            yield k, tuple(float(v or 0.0) for v in vals)


def _add(vs: Iterable[tuple]) -> tuple:
    acc = [0.0] * 6
    for v in vs:
        acc = [a + b for a, b in zip(acc, v, strict=True)]
    return tuple(acc)


def _scores(v: tuple) -> dict:
    bars, scored, s_nll, s_abs, n80, n95 = v
    per = (lambda s: s / scored) if scored else (lambda s: None)
    return {"bars": int(bars), "scored": int(scored), "nll_h1": per(s_nll), "mae_h1": per(s_abs),
            "coverage_80": per(n80), "coverage_95": per(n95)}


class Calibration(NamedTuple):
    """What the summary's ``horizons`` blocks are over: the model's horizons, the job's levels, VaR tails, ACI
    step and its scaling (:mod:`.conformal`)."""

    horizons: int
    levels: tuple[float, ...] = LEVELS
    tails: tuple[float, ...] = TAILS
    gamma: float = GAMMA
    scaling: str = "proportional"
    method: str = METHOD  # conformal.METHODS: aci, agaci or none (the raw bands)
    pool: float = 0.0  # the market-wide scale term's weight (.pooled; 0: off)

    def scores(self, flat: Sequence[float] | None) -> dict:
        n = len(sum_names(self.levels, self.tails))
        sums = np.asarray(flat if flat else np.zeros(self.horizons * n), np.float64).reshape(self.horizons, n)
        return horizon_summary(sums, self.levels, self.tails)


class _HorizonStats(beam.DoFn):
    """(symbol, flattened ``[H, len(sum_names)]`` score sums) per symbol of a job block (:func:`score_sums`)."""

    def __init__(self, calibration: Calibration):
        self.c = calibration

    def process(self, block: pa.RecordBatch):
        for k, v in score_sums(block, self.c.horizons, self.c.levels, self.c.tails).items():
            yield k, tuple(v.reshape(-1).tolist())


def _add_vectors(vs: Iterable[tuple]) -> tuple:
    acc = None
    for v in vs:
        acc = np.asarray(v, np.float64) if acc is None else acc + np.asarray(v, np.float64)
    return () if acc is None else tuple(acc.tolist())


class _Write(beam.DoFn):
    def __init__(self, root: str, simulated: bool, calibration: Calibration | None):
        self.root, self.simulated, self.calibration = root, simulated, calibration

    def process(self, items):
        per: dict = {}
        per_h: dict = {}
        dead: dict = {}
        versions: set = set()
        for kind, v in items:
            if kind == "key":
                per[v[0]] = v[1]
            elif kind == "hkey":
                per_h[v[0]] = v[1]
            elif kind == "dead":
                dead[v[0]] = int(v[1])
            else:
                versions.add(v)
        total = _add(per.values())
        symbols = {k: _scores(v) for k, v in sorted(per.items())}
        overall: dict = {}
        c = self.calibration
        if c is not None:
            for k in symbols:
                symbols[k]["horizons"] = c.scores(per_h.get(k))
            overall = {"horizons": c.scores(_add_vectors(per_h.values())),
                       "calibration": {"levels": list(c.levels), "var": list(c.tails),
                                       **({"gamma": c.gamma} if c.method == "aci" else {}),
                                       "gamma_scaling": c.scaling,
                                       **({"method": c.method} if c.method != METHOD else {}),
                                       **({"pool": c.pool} if c.pool else {})}}
        write_json(FileSystems.join(self.root, SUMMARY), {
            "simulated": self.simulated, "symbols": symbols, **_scores(total), **overall,
            "dead_letters": dict(sorted(dead.items())), "model_version": sorted(versions)})


def _at_end(label: str):
    return label >> beam.WindowInto(GlobalWindows(), trigger=trigger.AfterWatermark(),
                                    accumulation_mode=trigger.AccumulationMode.DISCARDING)


class WriteMarketSummary(beam.PTransform):
    """``(job rows, dead_letters) | WriteMarketSummary(root)``: ``root/summary.json`` when the input ends.

    ``simulated`` labels a summary of the simulated demo market as such.
    """

    def __init__(self, root: str, *, simulated: bool = False, calibration: Calibration | None = None,
                 label: str | None = None):
        super().__init__(label)
        self.root, self.simulated, self.calibration = root, simulated, calibration

    def expand(self, pcolls):
        rows, dead = pcolls
        per = (rows | "SymbolStats" >> beam.ParDo(_SymbolStats()) | _at_end("StatsAtEnd")
               | "SumPerSymbol" >> beam.CombinePerKey(_add) | "TagKeys" >> beam.Map(lambda kv: ("key", kv)))
        parts = [per]
        if self.calibration is not None:
            parts.append(rows | "HorizonStats" >> beam.ParDo(_HorizonStats(self.calibration))
                         | _at_end("HorizonsAtEnd") | "SumHorizons" >> beam.CombinePerKey(_add_vectors)
                         | "TagHorizons" >> beam.Map(lambda kv: ("hkey", kv)))
        dead_n = (dead | "DeadKind" >> beam.Map(lambda d: d.kind) | _at_end("DeadAtEnd")
                  | "CountDead" >> beam.combiners.Count.PerElement() | "TagDead" >> beam.Map(lambda kv: ("dead", kv)))
        versions = (rows | "Versions" >> beam.FlatMap(lambda b: set(b.column("model_version").to_pylist()))
                    | _at_end("VersionsAtEnd") | "Distinct" >> beam.Distinct()
                    | "TagVersions" >> beam.Map(lambda v: ("model", v)))
        return ((*parts, dead_n, versions) | "Parts" >> beam.Flatten()
                | "AsList" >> beam.CombineGlobally(beam.combiners.ToListCombineFn()).without_defaults()
                | "Write" >> beam.ParDo(_Write(self.root, self.simulated, self.calibration)))


def print_market_summary(s: dict, out: IO[str] | None = None, top: int = 20) -> None:
    """The readable end-of-job table: the ``top`` symbols by bars, then all."""
    out = out or sys.stdout

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    label = " (SIMULATED market)" if s.get("simulated") else ""
    out.write(f"\nlive one-bar-ahead forecast scores{label}, {len(s['symbols'])} symbols\n")
    out.write(f"  {'symbol':<12} {'bars':>7} {'scored':>7} {'nll (nats/bar)':>14} {'mae%':>7} {'cov80':>6} "
              f"{'cov95':>6}\n")
    rows = sorted(s["symbols"].items(), key=lambda kv: -kv[1]["bars"])
    for k, v in [*rows[:top], ("all", s)]:
        out.write(f"  {k:<12} {v['bars']:>7,} {v['scored']:>7,} {f(v['nll_h1']):>14} {f(v['mae_h1']):>7} "
                  f"{f(v['coverage_80']):>6} {f(v['coverage_95']):>6}\n")
    if len(rows) > top:
        out.write(f"  ... {len(rows) - top} more symbols in {SUMMARY}\n")
    if s.get("horizons"):
        print_horizons(s["horizons"], out)
    out.write(dead_letter_line(s, unit="bar") + "\n")


def print_horizons(horizons: dict, out: IO[str]) -> None:
    """The live scores of every horizon (all symbols): coverage and VaR breaches raw / calibrated, in %."""
    def pct(v: dict) -> str:
        return "/".join("-" if v[k] is None else f"{100 * v[k]:.1f}" for k in ("raw", "calibrated"))

    first = next(iter(horizons.values()))
    levels, tails = list(first["coverage"]), list(first["var_breaches"])
    out.write("\nlive scores per horizon, all symbols (coverage and VaR breaches in %, raw/calibrated)\n")
    head = "".join(f" {'cov' + lv:>11}" for lv in levels) + "".join(f" {'var' + p:>11}" for p in tails)
    out.write(f"  {'h':<3} {'scored':>8} {'nll':>7} {'mae%':>7}{head}\n")
    for h, v in horizons.items():
        f = "-" if v["nll"] is None else f"{v['nll']:.3f}"
        e = "-" if v["mae"] is None else f"{v['mae']:.3f}"
        cells = "".join(f" {pct(v['coverage'][lv]):>11}" for lv in levels)
        cells += "".join(f" {pct(v['var_breaches'][p]):>11}" for p in tails)
        out.write(f"  {h:<3} {v['scored']:>8,} {f:>7} {e:>7}{cells}\n")
