"""``--calibration aci|agaci|none`` in the market job and ``eval forecast`` (issue 15): AgACI's state carried per
symbol through the job's calibration step (Arrow IPC, as Beam state holds it) is rebuilt identically (chunks ==
one pass == the offline calibrator run over the symbol's rows), ``none`` serves the raw bands, the edge tables
agree with scipy, a bad value is one line naming the flag.

References: scipy's Student-t (the tables and the scores), ``OnlineConformal.run`` (the offline calibrator),
the raw model's bands (``none``)."""

from __future__ import annotations

import itertools
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from scipy import stats

from beam_jobs import market_forecast
from streamrnn.cli.commands import main
from streamrnn.forecast import conformal
from streamrnn.forecast.calibrate_step import Calibrator
from streamrnn.forecast.conformal import OnlineConformal, bands

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "exported" / "market.onnx")
DAY = 86400.0
DF = [4.0, 6.0]
KW = dict(levels=(0.5, 0.8), tails=(0.05,), gamma=0.05)


def _rows(sym: str, n: int = 80, H: int = 2) -> pa.Table:
    """A symbol's job rows with a volatility jump the forecasts miss (bars 40.. at 3x the forecast scale)."""
    rng = np.random.default_rng(ord(sym[0]))
    sd = np.where(np.arange(n) < 40, 1.0, 3.0)
    close = 50 * np.exp(np.cumsum(rng.standard_t(5, n) * sd) / 100)
    t = {"symbol": [sym] * n, "ts": np.arange(n) * DAY, "close": close, "bar": np.arange(n), "flags": [""] * n}
    for h in range(1, H + 1):
        t[f"h{h}_ret_loc"], t[f"h{h}_ret_scale"] = np.zeros(n), np.full(n, np.sqrt(h))
    t["model_version"] = ["m"] * n
    return pa.table(t)


def _ipc_roundtrip(t: pa.Table) -> pa.Table:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def _apply(c: Calibrator, cuts: list[int], syms=("A", "B")) -> tuple[pa.Table, pa.Table]:
    state = ring = None
    outs = []
    for a, b in itertools.pairwise(cuts):
        rows = pa.concat_tables([_rows(s).slice(a, b - a) for s in syms])
        out, state, ring = c.apply(state, ring, rows)
        state, ring = _ipc_roundtrip(state), _ipc_roundtrip(ring)  # what Beam state holds: a cold worker's view
        outs.append(out)
    return pa.concat_tables(outs).sort_by([("symbol", "ascending"), ("bar", "ascending")]), state


@pytest.fixture(scope="module")
def agaci_pass():
    return _apply(Calibrator(DF, method="agaci", **KW), [0, 80])


def test_agaci_state_in_chunks_equals_one_pass_and_the_offline_run(agaci_pass):
    whole, state = agaci_pass
    c = Calibrator(DF, method="agaci", **KW)
    got, state2 = _apply(c, [0, 1, 3, 17, 40, 41, 79, 80])
    assert got.equals(whole)
    assert state2.equals(state)
    # the offline calibrator over each symbol's rows from its first (targets from the closes): same bands
    cal = OnlineConformal(DF, method="agaci", **KW)
    for sym in ("A", "B"):
        r = _rows(sym)
        close, n = r.column("close").to_numpy(), r.num_rows
        y = np.zeros((n, 2))
        valid = np.zeros((n, 2), bool)
        for h in (1, 2):
            y[:n - h, h - 1] = 100 * np.log(close[h:] / close[:-h])
            valid[:n - h, h - 1] = True
        loc = np.zeros((n, 2))
        sc = np.stack([r.column(f"h{h}_ret_scale").to_numpy() for h in (1, 2)], 1)
        a = cal.run([sym], y[None], loc[None], sc[None], valid[None])[0]
        b = bands(a, loc, sc, np.asarray(DF), cal.config)
        w = whole.filter(pc.equal(whole.column("symbol"), sym))
        for h in (1, 2):
            hi = close * np.exp(b["hi80"][:, h - 1] / 100)
            np.testing.assert_array_equal(w.column(f"h{h}_cal_hi80").to_numpy(), hi)
            np.testing.assert_array_equal(w.column(f"h{h}_var5").to_numpy(), b["var5"][:, h - 1])


def test_agaci_widens_after_the_jump_and_its_state_is_small(agaci_pass):
    whole, state = agaci_pass
    a = whole.filter(pc.equal(whole.column("symbol"), "A"))
    # 10 bars into the 3x regime the served 80% band is wider than the raw one (the experts reacted)
    cal = a.column("h1_cal_hi80").to_numpy() - a.column("h1_cal_lo80").to_numpy()
    sc = a.column("h1_ret_scale").to_numpy()
    half = stats.t.ppf(0.9, DF[0]) * sc / 100
    raw = a.column("close").to_numpy() * (np.exp(half) - np.exp(-half))
    assert cal[50] > 1.2 * raw[50]
    # state: the float32/uint8 arrays of conformal.state_bytes per key in the Arrow table
    per_key = sum(state.column(f).nbytes for f in conformal.AGACI_FIELDS) / state.num_rows
    assert per_key == pytest.approx(conformal.state_bytes(2, 3, len(conformal.GAMMAS)), rel=0.05)


def test_none_serves_the_raw_bands_and_scores_them():
    got, state = _apply(Calibrator(DF, method="none", **KW), [0, 5, 80])
    assert state.column_names == ["key", "seq"]
    for h in (1, 2):
        sc = got.column(f"h{h}_ret_scale").to_numpy()
        close = got.column("close").to_numpy()
        want = close * np.exp(stats.t.ppf(0.9, DF[h - 1]) * sc / 100)
        np.testing.assert_allclose(got.column(f"h{h}_cal_hi80").to_numpy(), want, rtol=1e-12)
        assert got.column(f"scored_h{h}_cal_in80").equals(got.column(f"scored_h{h}_in80"))


def test_edge_tables_agree_with_scipy():
    df = np.array([3.0, 5.5, np.inf])
    table = conformal.EdgeTable(df)
    # up to 0.999: the a of a tail target near 1 is float32 (1 - a loses digits there; tails stay below 0.5)
    a = np.concatenate([np.geomspace(1e-6, 0.5, 200), np.linspace(0.5, 0.999, 200)])
    ts = np.array([True, False])
    e = table.edges(np.broadcast_to(a[None, None, None, :], (1, 3, 2, 400)).astype(np.float32), ts)
    for h, d in enumerate(df):
        for k, two in enumerate(ts):
            want = stats.t.ppf(1 - a / 2, d) if two else stats.t.ppf(a, d)
            np.testing.assert_allclose(e[0, h, k], want, rtol=1e-5, atol=1e-5)
    q = np.array([[[0.1, -2.0], [1.5, -0.3], [3.0, 0.4]]], np.float32)
    want = np.array([[[2 * stats.t.sf(abs(x), d) if two else stats.t.cdf(x, d) for x, two in zip(row, ts, strict=True)]
                      for row, d in zip(q[0], df, strict=True)]])
    np.testing.assert_allclose(table.alphas(q, ts), want, rtol=1e-5)


def test_bad_calibration_is_one_line_naming_the_flag(tmp_path, capsys):
    code = market_forecast.main(["--demo", "--output", str(tmp_path / "o"), "--calibration", "bogus", "--quiet",
                                 "--metrics-port", "0", "--model", MODEL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--calibration" in err[0] and "bogus" in err[0], err
    assert not (tmp_path / "o").exists()
    code = main(["eval", "forecast", "--model", MODEL, "--bars", str(tmp_path), "--calibration", "agacy"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--calibration" in err[0] and "agacy" in err[0], err
