"""``eval forecast --pool W`` scores exactly the calibrated bands the market job serves with ``--pool W --location
model`` (found wanting in review, then fixed: release order by the job's ``--window``; ``--symbols`` pools over
the symbols loaded).

Each case writes a small bar folder (``<SYM>_data.csv``, the S&P layout); the job runs on it in the background
(tests/background.py) and ``eval_forecast(..., pool=W)`` here; per horizon and level the calibrated coverage, and
at h1 the calibrated band's mean width and interval score per level and the mean VaR and ES per tail (eval's
``aci`` numbers against the job's bands at the origins eval scores) must agree to ~1e-12.
"""

from __future__ import annotations

import pathlib

import background
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamrnn.forecast.conformal import LEVELS, TAILS, label
from streamrnn.forecast.evaluate import eval_forecast
from streamrnn.forecast.synthetic import simulate, write_sp500_layout

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "exported" / "market.onnx")
POOL = 0.3
START = "2017-01-02"
SYMS = ["SIMA", "SIMB", "SIMC", "SIMD"]


def _bars(folder: pathlib.Path, syms=SYMS, start="2016-01-01", end="2017-07-01", seed=7) -> pathlib.Path:
    write_sp500_layout(simulate(list(syms), start=start, end=end, seed=seed), folder)
    return folder


def _edit(folder: pathlib.Path, sym: str, fn) -> None:
    p = folder / f"{sym}_data.csv"
    head, *rows = p.read_text().splitlines()
    p.write_text("\n".join([head, *fn(rows)]) + "\n")


def _halved(row: str) -> str:
    f = row.split(",")
    return ",".join([f[0], *(f"{float(x) / 2:.4f}" for x in f[1:5]), *f[5:]])


#: halts inside one of the job's 7-day windows (they start on Thursdays): a Monday, Wed-Thu across a window's
#: start, Tue-Fri; and one that covers exactly one window
HALTS = {"SIMB": ("2017-03-13", "2017-03-13"), "SIMC": ("2017-03-08", "2017-03-09"),
         "SIMD": ("2017-03-14", "2017-03-17")}
JOB = "market_forecast runs of test_forecast_eval_pool"


def _edge_bars(f: pathlib.Path) -> pathlib.Path:
    """A corporate action (SIMC halves), a symbol that starts late (SIME, pooled but not scored), one that ends
    early (SIMD), a repeated bar with other values and a broken row in the middle (SIMA) and two dead letters at
    the end, and a halt that covers exactly one of the job's windows (SIMB, Thursday 2017-03-09 .. Wednesday
    2017-03-15)."""
    _bars(f)
    write_sp500_layout(simulate(["SIME"], start="2016-09-01", end="2017-07-01", seed=3), f)
    _edit(f, "SIMC", lambda rows: [_halved(r) if r[:10] >= "2017-02-01" else r for r in rows])
    _edit(f, "SIMD", lambda rows: [r for r in rows if r[:10] <= "2017-03-15"])
    _edit(f, "SIMB", lambda rows: [r for r in rows if not "2017-03-09" <= r[:10] <= "2017-03-15"])
    _edit(f, "SIMA", lambda rows: [x for r in rows for x in (
        [r, _halved(r)] if r[:10] == "2017-02-08" else ["2017-04-05,10.0,9.0,11.0,10.0,1000,SIMA"]
        if r[:10] == "2017-04-05" else [r])] + [rows[-1], "2017-07-03,10.0,9.0,11.0,10.0,1000,SIMA"])
    return f


def _halt_bars(f: pathlib.Path) -> pathlib.Path:
    _bars(f)
    for sym, (a, b) in HALTS.items():
        _edit(f, sym, lambda rows, a=a, b=b: [r for r in rows if not a <= r[:10] <= b])
    return f


def _two(f: pathlib.Path) -> pathlib.Path:
    _bars(f)
    for sym in ("SIMC", "SIMD"):
        (f / f"{sym}_data.csv").unlink()
    return f


@background.job(JOB, file=__file__)
def _runs(folder: pathlib.Path) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """{case: (bars, job output)}: the job with --pool and the model's location on each folder."""
    cases = {"edges": (_edge_bars, ()), "halts": (_halt_bars, ()), "halts_daily": (_halt_bars, ("--window", "86400")),
             "two": (_two, ())}
    got, runs = {}, {}
    for name, (make, extra) in cases.items():
        bars, out = make(folder / f"{name}_bars"), folder / f"{name}_out"
        got[name] = bars, out
        runs[name] = ("beam_jobs.market_forecast", [
            "--input", f"{bars}/*.csv", "--output", str(out), "--pool", str(POOL), "--location", "model", "--quiet",
            "--metrics-port", "0", "--model", MODEL, *extra])
    for name, r in background.run_jobs(folder, runs).items():
        assert r["rc"] == 0, f"{name}: {r['stderr'][-3000:]}"
    got["four"] = _bars(folder / "four_bars"), None  # (no job: eval --symbols reads it)
    return got


def _job(case: str) -> tuple[str, pa.Table]:
    bars, out = background.result(JOB)[case]
    t = pa.concat_tables([pq.read_table(str(f)) for f in sorted(out.glob("forecasts-*.parquet"))])
    return str(bars), t.sort_by([("symbol", "ascending"), ("bar", "ascending")])


def _col(t: pa.Table, name: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in t.column(name).to_pylist()], np.float64)


def _differences(job: pa.Table, ev: dict) -> list[tuple]:
    """(what, horizon, level or tail, eval, job) wherever eval's calibrated numbers are not the job's."""
    s0 = float(np.datetime64(START, "s").astype(np.int64))
    skip = [x["symbol"] for x in ev["skipped"]]
    sym = np.array(job.column("symbol").to_pylist(), dtype=object)
    bad = []
    for h in range(1, 6):
        sel = (_col(job, f"scored_h{h}_origin_ts") >= s0) & ~np.isin(sym, skip)
        g = ev["conformal"]["groups"]["all"][f"h{h}"]
        assert g["n"] == int(sel.sum()) > 100
        for lv in LEVELS:
            hits = np.array(job.column(f"scored_h{h}_cal_in{label(lv)}").to_pylist(), dtype=object)[sel].astype(bool)
            if g["levels"][label(lv)]["aci"]["coverage"] != pytest.approx(100 * hits.mean(), abs=1e-9):
                bad.append(("coverage", h, lv, g["levels"][label(lv)]["aci"]["coverage"], 100 * hits.mean()))
    # h1: the served band at each scored origin (width, interval score, VaR, ES)
    key = {(s, t): i for i, (s, t) in enumerate(zip(sym.tolist(), job.column("ts").to_pylist(), strict=True))}
    origin, ret = _col(job, "scored_h1_origin_ts"), _col(job, "scored_h1_ret")
    sel = np.flatnonzero((origin >= s0) & ~np.isin(sym, skip))
    oi = np.array([key[(sym[i], origin[i])] for i in sel])
    close, y = job.column("close").to_numpy()[oi], ret[sel]
    g = ev["conformal"]["groups"]["all"]["h1"]
    for lv in LEVELS:
        lo = 100 * np.log(job.column(f"h1_cal_lo{label(lv)}").to_numpy()[oi] / close)
        hi = 100 * np.log(job.column(f"h1_cal_hi{label(lv)}").to_numpy()[oi] / close)
        score = (hi - lo) + 2 / (1 - lv) * (np.maximum(lo - y, 0) + np.maximum(y - hi, 0))
        e = g["levels"][label(lv)]["aci"]
        for what, got, want in (("width", e["width"], np.mean(hi - lo)), ("interval_score", e["interval_score"],
                                                                          np.mean(score))):
            if got != pytest.approx(want, rel=1e-12):
                bad.append((what, 1, lv, got, float(want)))
    for p in TAILS:
        e = g["tails"][label(p)]["aci"]
        for what, got, col in (("var_mean", e["var_mean"], f"h1_var{label(p)}"),
                               ("es_mean", e["es_mean"], f"h1_es{label(p)}")):
            want = float(np.mean(job.column(col).to_numpy()[oi]))
            if got != pytest.approx(want, rel=1e-12):
                bad.append((what, 1, p, got, want))
    return bad


def test_edges_late_start_early_end_dead_letters_and_a_halt_over_a_whole_window():
    bars, job = _job("edges")
    ev = eval_forecast(MODEL, bars, start=START, garch=False, pool=POOL)
    assert {x["symbol"] for x in ev["skipped"]} == {"SIME"}
    assert _differences(job, ev) == []


def test_halts_inside_a_window_follow_the_jobs_window():
    """A row held over a halt inside one of the job's windows is released with that window, on time; eval takes
    the job's --window (default the job's) for that order. With other windows the bands differ, so the order
    matters and is tested both ways."""
    bars, job = _job("halts")
    assert _differences(job, eval_forecast(MODEL, bars, start=START, garch=False, pool=POOL)) == []
    bars, daily = _job("halts_daily")
    assert _differences(daily, eval_forecast(MODEL, bars, start=START, garch=False, pool=POOL, window=86400)) == []
    assert _differences(daily, eval_forecast(MODEL, bars, start=START, garch=False, pool=POOL)) != []


def test_symbols_pool_over_the_symbols_loaded():
    """--symbols: the term is pooled over those symbols only, as a job run on their files is (the same bars as
    the four-symbol folder's SIMA and SIMB)."""
    _, two = _job("two")
    four = background.result(JOB)["four"][0]
    ev = eval_forecast(MODEL, str(four), start=START, garch=False, pool=POOL, symbols=["SIMA", "SIMB"])
    assert ev["n_symbols"] == 2
    assert _differences(two, ev) == []
