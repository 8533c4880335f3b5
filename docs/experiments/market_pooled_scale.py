"""Experiment (issue 15, not a product feature): does a market-wide scale term fix common-shock periods?

Per-symbol ACI (the job's calibrator, gamma 0.01) learns of a shock common to every symbol only from each
symbol's own misses. This script adds one shared multiplier to every symbol's h1 scale:

    u <- (1 - w_n) u + w_n log(mean |z| / E|T_df|),      w_n = w n / (n + N0)

over the ``n`` h1 targets completed on a day (``z`` the model's raw standardised error), so the band issued at an
origin is ``q(a_symbol) * exp(u)``; the per-symbol ACI then learns from the misses of that band (its long-run
guarantee holds: ``u`` is bounded). ``N0`` shrinks the step when few symbols report (3 ETFs). Only the 80% band at
h1 is simulated; the interval score is in scale units (``width + 10 * distance outside``).

Run from the project root (about 2 minutes on 2 cores)::

    .venv/bin/python docs/experiments/market_pooled_scale.py > pooled.json

Results and the choice of ``w`` are in docs/market.md ("A market-wide scale term").
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys

import numpy as np

from streamrnn.forecast.dataset import load as load_data
from streamrnn.forecast.distribution import std_quantiles
from streamrnn.forecast.evaluate import forecast_meta, model_outputs
from streamrnn.forecast.features import FeatureConfig
from streamrnn.model.loaded import load

DATA = "../shared/data/market"
SETS = {  # name: (bars, first origin scored, end of the span the weight may be chosen on)
    "sp500": (f"{DATA}/sp500_daily_2013_2018", "2014-02-10", "2017-01-01"),
    "long_histories": (f"{DATA}/us_daily_long_1970_2017/stocks", "1973-02-01", "2014-01-01"),
    "etfs": (f"{DATA}/us_daily_long_1970_2017/etfs", "2006-03-01", "2014-01-01"),
}
A, GAMMA, N0 = 0.2, 0.01, 20.0
WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def secs(day: str) -> float:
    return dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp()


def points(bars: str, model, meta) -> dict[str, np.ndarray]:
    """Every symbol's h1 origins: symbol index, origin time, target day, |z|, validity."""
    data = load_data(bars, int(meta["horizons"]), features=FeatureConfig(**meta["features"]))
    df = float(meta["df"][0])
    cols: dict[str, list] = {"sym": [], "ts": [], "end": [], "absz": [], "ok": []}
    for k, (p, (loc, log_scale)) in enumerate(zip(data, model_outputs(model, data), strict=True)):
        y = np.where(p.valid[:, 0], p.y[:, 0], 0.0)
        cols["sym"].append(np.full(len(y), k))
        cols["ts"].append(p.series.ts)
        cols["end"].append(p.end_ts[:, 0])
        cols["absz"].append(np.abs((y - loc[:, 0]) / np.exp(log_scale[:, 0])))
        cols["ok"].append(p.valid[:, 0])
    out = {k: np.concatenate(v) for k, v in cols.items()}
    out["df"] = df
    return out


def simulate(pts: dict, w: float) -> tuple[np.ndarray, np.ndarray]:
    """Day by day: learn the targets completed that day (per-symbol ACI, then the shared ``u``), then issue
    every origin of the day at ``q(a_symbol) * exp(u)``. Returns the half-width issued and the misses."""
    df, absz, ok = pts["df"], pts["absz"], pts["ok"]
    day = pts["ts"] // 86400
    end_day = np.where(ok & np.isfinite(pts["end"]), pts["end"] // 86400, np.inf)
    # E|T| of a standard Student-t with df > 1
    eabs = 2 * math.sqrt(df / math.pi) * math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / (df - 1)
    days = np.unique(day)
    o_ord, e_ord = np.argsort(day, kind="stable"), np.argsort(end_day, kind="stable")
    o_lo, o_hi = np.searchsorted(day[o_ord], days), np.searchsorted(day[o_ord], days, "right")
    e_lo, e_hi = np.searchsorted(end_day[e_ord], days), np.searchsorted(end_day[e_ord], days, "right")
    a = np.full(int(pts["sym"].max()) + 1, A)
    u = 0.0
    hw, miss = np.full(len(day), np.nan), np.zeros(len(day), bool)
    for k in range(len(days)):
        e = e_ord[e_lo[k]:e_hi[k]]
        if len(e):
            m = absz[e] > hw[e]
            miss[e] = m
            np.add.at(a, pts["sym"][e], GAMMA * (A - m))
            if w:
                wn = w * len(e) / (len(e) + N0)
                u = (1 - wn) * u + wn * np.log(np.mean(absz[e]) / eabs)
        o = o_ord[o_lo[k]:o_hi[k]]
        hw[o] = std_quantiles(1 - np.clip(a[pts["sym"][o]], 1e-6, 1 - 1e-6) / 2, df) * np.exp(u)
    return hw, miss


def summary(pts: dict, hw: np.ndarray, miss: np.ndarray, first: str, choose_end: str) -> dict:
    ts, absz = pts["ts"], pts["absz"]
    sel = pts["ok"] & (ts >= secs(first))
    when = [dt.datetime.fromtimestamp(t, dt.UTC) for t in ts]
    year = np.array([d.year for d in when])
    quarter = np.array([f"{d.year}Q{(d.month - 1) // 3 + 1}" for d in when])

    def cov(m):
        return round(100 * (1 - float(miss[m].mean())), 2)

    def iscore(m):
        return round(float(np.mean(2 * hw[m] + (2 / A) * np.maximum(absz[m] - hw[m], 0))), 4)

    years = {int(y): cov(sel & (year == y)) for y in np.unique(year[sel])}
    quarters = {q: cov(sel & (quarter == q)) for q in np.unique(quarter[sel]) if (sel & (quarter == q)).sum() > 50}
    wy = max(years, key=lambda y: abs(years[y] - 80))
    wq = max(quarters, key=lambda q: abs(quarters[q] - 80))
    early = sel & (ts < secs(choose_end))
    wq_early = max((q for q in quarters if secs(q[:4] + "-01-01") < secs(choose_end)),
                   key=lambda q: abs(quarters[q] - 80))
    return {"coverage80": cov(sel), "interval_score_before": iscore(early), "interval_score_after": iscore(
        sel & ~early), "worst_year": [wy, round(years[wy] - 80, 2)], "years_within_3": [
        sum(abs(v - 80) <= 3 for v in years.values()), len(years)], "worst_quarter": [wq, round(quarters[wq] - 80, 2)],
        "worst_quarter_before": [wq_early, round(quarters[wq_early] - 80, 2)], "years": years}


def main() -> int:
    model = load("streamrnn/exported/market.onnx", providers=["CPUExecutionProvider"])
    meta = forecast_meta(model)
    out = {}
    for name, (bars, first, choose_end) in SETS.items():
        pts = points(bars, model, meta)
        out[name] = {f"w={w:g}": summary(pts, *simulate(pts, w), first, choose_end) for w in WEIGHTS}
        print(f"{name}: done", file=sys.stderr)
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
