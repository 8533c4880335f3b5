"""eval forecast's rolling-origin backtest (issue 15): yearly refits without look-ahead, regimes without look-ahead,
CRPS, the Diebold-Mariano test, the per-year / per-regime tables, skipped-symbol lines, flags, progress, the report."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import warnings

import numpy as np
import pytest
from scipy import integrate, stats

from streamrnn.cli.commands import main
from streamrnn.forecast import backtest, conformal
from streamrnn.forecast.bars import Bars, read_bars
from streamrnn.forecast.dataset import prepare
from streamrnn.forecast.evaluate import eval_forecast, forecast_meta, model_outputs, render_table
from streamrnn.forecast.features import FeatureConfig, offline_features
from streamrnn.forecast.metrics import summarize
from streamrnn.forecast.synthetic import simulate, write_sp500_layout
from streamrnn.model.loaded import load

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "exported" / "market.onnx")
SP500 = ROOT.parent / "shared" / "data" / "market" / "sp500_daily_2013_2018"
START = "2015-06-01"
H = 3


def _secs(day: str) -> float:
    return float(np.datetime64(day, "s").astype(np.int64))


def _series(b: Bars):
    return offline_features(b, FeatureConfig())


def _altered_after(b: Bars, t: int, seed: int = 1) -> Bars:
    """The same bars up to index ``t``; after it, returns x4 plus noise (a different future)."""
    rng = np.random.default_rng(seed)
    logc = np.log(b.close)
    r = np.diff(logc)
    r[t:] = 4 * r[t:] + rng.normal(0, 0.02, len(r) - t)
    c = np.exp(np.concatenate([[logc[0]], logc[0] + np.cumsum(r)]))
    keep = np.arange(len(b)) <= t
    o, hi, lo = (np.where(keep, getattr(b, k), c * f) for k, f in (("open", 1.0), ("high", 1.01), ("low", 0.99)))
    hi, lo = np.maximum(hi, np.maximum(o, c)), np.minimum(lo, np.minimum(o, c))
    return Bars(b.symbol, b.ts, o, hi, lo, np.where(keep, b.close, c), b.volume)


@pytest.fixture(scope="module")
def one():
    (b,) = simulate(["AAA"], start="2013-01-01", end="2017-09-01", seed=7)
    return b


# -- yearly refits, no look-ahead ------------------------------------------------------------------------------
def test_yearly_origins():
    assert [backtest.date_of(c) for c in backtest.yearly_origins("2015-06-01", None, _secs("2017-03-01"))] == [
        "2015-06-01", "2016-01-01", "2017-01-01"]
    assert [backtest.date_of(c) for c in backtest.yearly_origins("2015-06-01", "2017-01-01", _secs("2019-01-01"))] \
        == ["2015-06-01", "2016-01-01"]
    # a 1 January after the last bar is no origin
    assert len(backtest.yearly_origins("2016-01-01", None, _secs("2016-12-30"))) == 1


def test_baselines_are_refitted_yearly_on_the_bars_before_each_origin(one):
    """Each segment's parameters equal arch's own fit / numpy's sd / the shape fit on the returns before its cut."""
    from arch import arch_model

    s = _series(one)
    cuts = backtest.yearly_origins(START, None, float(s.ts[-1]))
    origins = np.flatnonzero(s.ts >= cuts[0])[:-H]
    f, fits = backtest.baseline_forecasts(s, origins, cuts, H)
    assert [x["origin"] for x in fits] == ["2015-06-01", "2016-01-01", "2017-01-01"]
    seg = backtest.segment_of(s.ts[origins], cuts)
    for k, fit in enumerate(fits):
        n = int((s.ts < cuts[k]).sum())
        assert fit["naive_sd"] == pytest.approx(float(np.std(s.ret[1:n])), rel=1e-12)
        rows = seg == k
        np.testing.assert_allclose(f["naive"][1][rows, 0], fit["naive_sd"])
        np.testing.assert_allclose(f["ewma_normal"][1][rows, 1], np.sqrt(2 * s.var[origins[rows]]), rtol=1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = arch_model(s.ret[1:n], mean="Constant", vol="GARCH", p=1, q=1, dist="t", rescale=False).fit(
                disp="off")
        for name, v in res.params.items():
            assert fit["garch_t"][name] == pytest.approx(float(v), rel=1e-4, abs=1e-6), (k, name)
        assert (f["garch_t"][2][rows] == fit["garch_t"]["nu"]).all()
        assert (f["ewma_t"][2][rows] == fit["ewma_t_nu"]).all()
    assert len({x["ewma_t_nu"] for x in fits}) == 3  # refitted, not carried


@pytest.mark.parametrize("day", ["2015-09-15", "2015-12-31", "2016-07-01"])
def test_no_look_ahead_a_baselines_forecast_for_day_t_ignores_every_later_bar(one, day):
    """Altering every bar after day t (inside a segment, at a segment's last day) leaves every baseline's forecasts
    and every regime for origins up to t exactly as they were; later origins do change."""
    s = _series(one)
    t = int(np.searchsorted(s.ts, _secs(day)))
    s2 = _series(_altered_after(one, t))
    np.testing.assert_array_equal(s.ret[:t + 1], s2.ret[:t + 1])
    assert not np.allclose(s.ret[t + 1:], s2.ret[t + 1:])
    cuts = backtest.yearly_origins(START, None, float(s.ts[-1]))
    origins = np.flatnonzero(s.ts >= cuts[0])[:-H]
    a, _ = backtest.baseline_forecasts(s, origins, cuts, H)
    b, _ = backtest.baseline_forecasts(s2, origins, cuts, H)
    early = origins <= t
    for m in backtest.BASELINES:
        for x, y in zip(a[m], b[m], strict=True):
            np.testing.assert_array_equal(x[early], y[early], err_msg=m)
        if m != "naive" or day == "2015-12-31":  # naive's sd moves only at the next refit
            assert not np.allclose(a[m][1][~early], b[m][1][~early]), m
    ra, rb = backtest.regime_codes(s, origins, cuts), backtest.regime_codes(s2, origins, cuts)
    np.testing.assert_array_equal(ra[early], rb[early])
    assert (ra[~early] != rb[~early]).any()


# -- regimes ---------------------------------------------------------------------------------------------------
def test_regimes_are_terciles_of_the_symbols_history_before_each_origin(one):
    """Against pandas' rolling window (jump bars left out) and numpy's quantiles of the bars before the cut."""
    import pandas as pd

    s = _series(one)
    s.jump[300] = True  # one corporate-action bar: left out of the window
    W = 10
    use = np.arange(len(s)) > 0
    use &= ~s.jump
    rv = np.sqrt(pd.Series(np.where(use, s.ret ** 2, np.nan)).rolling(W, min_periods=1).mean().to_numpy())
    rv[:W - 1] = np.nan
    np.testing.assert_allclose(backtest.realised_vol(s.ret, s.jump, W), rv, rtol=1e-12, equal_nan=True)
    cuts = backtest.yearly_origins(START, None, float(s.ts[-1]))
    origins = np.flatnonzero(s.ts >= cuts[0])
    got = backtest.regime_codes(s, origins, cuts, W)
    for k, c in enumerate(cuts):
        hist = rv[:int((s.ts < c).sum())]
        q1, q2 = np.quantile(hist[np.isfinite(hist)], [1 / 3, 2 / 3])
        rows = backtest.segment_of(s.ts[origins], cuts) == k
        v = rv[origins[rows]]
        np.testing.assert_array_equal(got[rows], (v > q1).astype(int) + (v > q2))
    assert set(np.unique(got)) == {0, 1, 2}


def test_regimes_follow_a_volatility_switch():
    """Calm for two years, then 4x the sd: the wild months are 'high', the calm ones spread over the terciles."""
    rng = np.random.default_rng(3)
    n = 650
    r = rng.standard_normal(n) * np.where((np.arange(n) >= 520) & (np.arange(n) < 583), 4.0, 1.0)
    from streamrnn.forecast.synthetic import with_returns

    s = _series(with_returns(r))
    cuts = [float(s.ts[510])]
    origins = np.arange(510, n)
    got = backtest.regime_codes(s, origins, cuts)
    wild = (origins >= 540) & (origins < 583)
    assert (got[wild] == 2).all()
    assert (got[origins >= 610] < 2).mean() > 0.5


# -- CRPS ------------------------------------------------------------------------------------------------------
def _crps_integral(y: float, dist) -> float:
    lo = integrate.quad(lambda x: dist.cdf(x) ** 2, -np.inf, y, limit=200)[0]
    hi = integrate.quad(lambda x: (1 - dist.cdf(x)) ** 2, y, np.inf, limit=200)[0]
    return lo + hi


def test_point_scores_crps_equals_the_integral_and_nll_scipy_for_mixed_shapes():
    """Gaussian and Student-t points with many shapes in one call (the EWMA-t case: a shape per symbol and refit)."""
    rng = np.random.default_rng(2)
    n = 12
    y, loc = rng.normal(0, 2, (n, 2)), rng.normal(0, 0.3, (n, 2))
    scale = rng.uniform(0.4, 3.0, (n, 2))
    df = np.where(rng.random((n, 2)) < 0.3, np.inf, rng.uniform(2.2, 40.0, (n, 2)))
    p = backtest.point_scores(y, loc, scale, df)
    for i in range(n):
        for h in range(2):
            dist = stats.norm(loc[i, h], scale[i, h]) if np.isinf(df[i, h]) else stats.t(df[i, h], loc[i, h],
                                                                                             scale[i, h])
            assert p["crps"][i, h] == pytest.approx(_crps_integral(y[i, h], dist), rel=1e-6, abs=1e-9)
            assert p["nll"][i, h] == pytest.approx(-dist.logpdf(y[i, h]), rel=1e-10)
            assert p["pit"][i, h] == pytest.approx(dist.cdf(y[i, h]), rel=1e-9, abs=1e-12)
            assert p["ae"][i, h] == abs(y[i, h] - loc[i, h])


def test_aggregate_equals_summarize():
    rng = np.random.default_rng(4)
    N = 400
    y = rng.standard_t(4, (N, 2))
    loc, scale, df = rng.normal(0, 0.1, (N, 2)), rng.uniform(0.5, 2, (N, 2)), np.full((N, 2), 5.0)
    sym = rng.integers(0, 5, N)
    scored = rng.random((N, 2)) < 0.8
    got = backtest.aggregate(backtest.point_scores(y, loc, scale, df), y, scored, sym, (0.5, 0.8, 0.95))
    for h in range(2):
        m = scored[:, h]
        want = summarize(y[m, h], loc[m, h], scale[m, h], df[m, h], sym[m], levels=(0.5, 0.8, 0.95))
        for k, v in want.items():
            assert got[f"h{h + 1}"][k] == pytest.approx(v, rel=1e-12), k


# -- Diebold-Mariano -------------------------------------------------------------------------------------------
def _dm_case(seed: int = 0, days: int = 300, symbols: int = 4):
    rng = np.random.default_rng(seed)
    day = np.repeat(np.arange(days), symbols)
    y = rng.standard_normal(len(day))
    right = backtest.point_scores(y[:, None], 0.0, 1.0, np.inf)
    wide = backtest.point_scores(y[:, None], 0.0, 2.0, np.inf)
    return day, right, wide


def test_dm_sign_where_one_forecaster_is_known_better():
    """y ~ N(0, 1): the true N(0, 1) beats N(0, 4) on NLL and CRPS; the test says so with the right sign, and the
    swapped comparison gives the opposite t."""
    day, right, wide = _dm_case()
    for loss in ("nll", "crps"):
        d = right[loss][:, 0] - wide[loss][:, 0]
        got = backtest.diebold_mariano(d, day)
        assert got["t"] < -5 and got["p"] < 1e-6 and got["better"] == "model", got
        back = backtest.diebold_mariano(-d, day)
        assert back["t"] == pytest.approx(-got["t"]) and back["better"] == "baseline"
        assert got["days"] == 300 and got["n"] == 1200
    # two forecasters that differ by noise only: no verdict
    rng = np.random.default_rng(9)
    noise = backtest.diebold_mariano(rng.normal(0, 1, 1200), day)
    assert noise["better"] == "neither" and abs(noise["t"]) < 3


def test_dm_equals_statsmodels_hac_on_the_daily_means():
    """The statistic is a Newey-West t of the per-day mean difference: statsmodels' OLS on a constant with HAC
    (Bartlett, same lag, no small-sample correction) gives the same t."""
    sm = pytest.importorskip("statsmodels.api")
    day, right, wide = _dm_case(seed=5, days=250, symbols=3)
    rng = np.random.default_rng(1)
    keep = rng.random(len(day)) < 0.9  # unbalanced days
    d = (right["nll"] - wide["nll"])[keep, 0] + np.sin(day[keep] / 3.0)  # serially correlated
    for h, lag in ((1, None), (5, None), (1, 7)):
        got = backtest.diebold_mariano(d, day[keep], horizon=h, lag=lag)
        u, inv = np.unique(day[keep], return_inverse=True)
        daily = np.bincount(inv, d) / np.bincount(inv)
        L = lag if lag is not None else max(h - 1, int(4 * (len(u) / 100) ** (2 / 9)))
        res = sm.OLS(daily, np.ones(len(daily))).fit(cov_type="HAC", cov_kwds={"maxlags": L, "use_correction": False})
        assert got["lag"] == L
        assert got["t"] == pytest.approx(float(res.tvalues[0]), rel=1e-9)
        assert got["p"] == pytest.approx(2 * stats.t.sf(abs(res.tvalues[0]), len(u) - 1), rel=1e-9)


# -- eval forecast end to end on a small simulated market ------------------------------------------------------
def _cut(b: Bars, lo: str | None = None, hi: str | None = None) -> Bars:
    m = np.ones(len(b), bool)
    if lo:
        m &= b.ts >= _secs(lo)
    if hi:
        m &= b.ts < _secs(hi)
    return b.take(np.flatnonzero(m))


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> pathlib.Path:
    """AAA and BBB span 2013-2017; EARLY ends before the period; LATE starts after it; YOUNG starts too close."""
    aaa, bbb, early, late, young = simulate(["AAA", "BBB", "EARLY", "LATE", "YOUNG"], start="2013-06-01",
                                            end="2017-05-01", seed=21)
    folder = tmp_path_factory.mktemp("backtest")
    write_sp500_layout([aaa, bbb, _cut(early, hi="2015-01-01"), _cut(late, lo="2017-03-01"),
                        _cut(young, lo="2015-03-01")], folder)
    return folder


@pytest.fixture(scope="module")
def result(market) -> dict:
    return eval_forecast(MODEL, str(market), parity_symbols=1, start=START, end="2017-03-01",
                         levels=(0.5, 0.8, 0.95))


def test_tables_per_year_and_regime_partition_the_points_and_equal_summarize(result, market):
    r = result
    bt = r["backtest"]
    assert bt["origins"] == ["2015-06-01", "2016-01-01", "2017-01-01"]
    assert [f["origin"] for f in bt["fits"]["AAA"]] == bt["origins"]
    tab = bt["groups"]["all"]
    for m in ("lstm", "naive", "ewma_t", "garch_t"):
        for h in ("h1", f"h{r['horizons']}"):
            n = r["metrics"][m][h]["n"]
            assert sum(t[m][h]["n"] for t in tab["by_year"].values()) == n
            assert sum(t[m][h]["n"] for t in tab["by_regime"].values()) == n - bt["regime"]["unknown"] * (h == "h1")
    assert list(tab["by_year"]) == ["2015", "2016", "2017"]
    # the model's cells against summarize on points rebuilt here: its outputs, the period's targets, the regimes
    y, loc, sc, g, yr, reg, _, df = _rebuilt(market, bt)
    for key, sel in (("2016", yr == 2016), ("high", reg == 2), ("low", reg == 0)):
        part = "by_year" if key.isdigit() else "by_regime"
        want = summarize(y[sel], loc[sel], sc[sel], df, g[sel], levels=(0.5, 0.8, 0.95))
        got = tab[part][key]["lstm"]["h1"]
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-9), (key, k)


def _rebuilt(market: pathlib.Path, bt: dict, levels=(0.5, 0.8, 0.95)):
    """The model's h1 points of AAA and BBB in the period, rebuilt here: target, loc, scale, symbol, year, regime,
    and whether each target fell inside the online-calibrated band of every level (an OnlineConformal run over the
    symbol's whole history from its first bar, its bands drawn by conformal.bands), and the h1 df."""
    model = load(MODEL, providers=["CPUExecutionProvider"])
    meta = forecast_meta(model)
    Hm = int(meta["horizons"])
    cfg = FeatureConfig(**meta["features"])
    cuts = [_secs(d) for d in bt["origins"]]
    df_all = np.asarray(meta["df"], np.float64)
    rows = []
    for sym in ("AAA", "BBB"):
        (b,) = read_bars(str(market / f"{sym}_data.csv"))
        p = prepare(offline_features(b, cfg), Hm)
        loc, ls = model_outputs(model, [p])[0]
        cal = conformal.OnlineConformal(df_all, levels=levels, tails=())
        alpha = cal.run([sym], np.where(p.valid, p.y, 0.0)[None], loc[None], np.exp(ls)[None], p.valid[None])[0]
        w = p.window(START, "2017-03-01")
        o = np.flatnonzero(w[:, 0])
        band = conformal.bands(alpha[o, :1], loc[o, :1], np.exp(ls[o, :1]), df_all[:1], cal.config)
        inside = np.stack([(band[f"lo{conformal.label(lv)}"][:, 0] <= p.y[o, 0])
                           & (p.y[o, 0] <= band[f"hi{conformal.label(lv)}"][:, 0]) for lv in levels], 1)
        yr = (p.series.ts[o] // 86400).astype("datetime64[D]").astype("datetime64[Y]").astype(int) + 1970
        reg = backtest.regime_codes(p.series, o, cuts)
        rows.append((p.y[o, 0], loc[o, 0], np.exp(ls[o, 0]), np.full(len(o), sym, object), yr, reg, inside))
    return (*(np.concatenate(a) for a in zip(*rows, strict=True)), float(df_all[0]))


def test_tables_show_the_aci_calibrated_coverage_beside_the_raw(result, market):
    """Every table cell of the model has the coverage of the bands the job serves (recalibrated online, ACI)
    beside the raw: equal to bands rebuilt here per year and per regime, and to the conformal block's."""
    bt = result["backtest"]
    tab = bt["groups"]["all"]
    *_, yr, reg, inside, _ = _rebuilt(market, bt)
    for key, sel in (("2015", yr == 2015), ("2016", yr == 2016), ("2017", yr == 2017), ("low", reg == 0),
                     ("mid", reg == 1), ("high", reg == 2)):
        got = tab["by_year" if key.isdigit() else "by_regime"][key]["lstm"]["h1"]
        for k, lv in enumerate((0.5, 0.8, 0.95)):
            assert got[backtest.aci_coverage_key(lv)] == pytest.approx(inside[sel, k].mean(), rel=1e-12), (key, lv)
        if key.isdigit():
            assert 100 * got["aci_coverage_80"] == pytest.approx(
                result["conformal"]["groups"]["all"]["h1"]["by_year"][key]["aci"]["80"], rel=1e-12)
    assert result["metrics"]["lstm"]["h1"]["aci_coverage_80"] == pytest.approx(inside[:, 1].mean(), rel=1e-12)
    assert "aci_coverage_80" not in result["metrics"]["ewma_t"]["h1"]
    text = render_table(result)
    assert "h1 by year, all symbols (coverage %: raw/ACI-calibrated bands of the model)" in text
    row = next(x for x in text.splitlines() if x.startswith("  2016 "))
    a = tab["by_year"]["2016"]["lstm"]["h1"]
    assert f"{100 * a['coverage_80']:5.1f}/{100 * a['aci_coverage_80']:5.1f}" in row
    assert any(x.startswith("  lstm + ACI    h1") for x in text.splitlines())


def test_dm_block_and_best_baseline(result):
    r = result
    bt = r["backtest"]
    nll = {m: r["metrics"][m]["h1"]["nll"] for m in backtest.BASELINES}
    assert bt["best_baseline"] == min(nll, key=nll.get)
    for m in backtest.BASELINES:
        dm = bt["dm"]["all"]["overall"][m]
        for h in range(1, r["horizons"] + 1):
            v = dm[f"h{h}"]["nll"]
            assert v["n"] == r["metrics"]["lstm"][f"h{h}"]["n"] and v["lag"] >= h - 1
            # both symbols trade every day: the mean of daily means is the pooled mean difference
            assert v["mean_diff"] == pytest.approx(
                r["metrics"]["lstm"][f"h{h}"]["nll"] - r["metrics"][m][f"h{h}"]["nll"], rel=1e-9, abs=1e-12)
            assert (v["t"] < 0) == (v["mean_diff"] < 0)
        assert set(bt["dm"]["all"]["by_year"]["2016"][m]["h1"]) == {"nll", "crps"}
        assert set(bt["dm"]["all"]["by_regime"]) == {"low", "mid", "high"}
    assert sum(bt["pit"]["h1"]["lstm"]) == r["metrics"]["lstm"]["h1"]["n"]
    text = render_table(r)
    assert "Diebold-Mariano, model minus baseline" in text and "h1 by year" in text and "h1 by regime" in text
    assert "cov50" in text and "GARCH-t" in text


def test_no_look_ahead_end_to_end_bars_after_the_period_change_nothing(result, market, tmp_path):
    """The same run on the bars cut a week after the period's end (every target ends before it): identical tables,
    DM tests and refits, with the GARCH baselines (arch filters forward from each refit)."""
    for sym in ("AAA", "BBB", "EARLY", "LATE", "YOUNG"):
        (b,) = read_bars(str(market / f"{sym}_data.csv"))
        write_sp500_layout([_cut(b, hi="2017-03-08")], tmp_path)
    cut = eval_forecast(MODEL, str(tmp_path), parity_symbols=1, start=START, end="2017-03-01",
                        levels=(0.5, 0.8, 0.95))
    for k in ("metrics", "groups"):
        assert json.dumps(cut[k], sort_keys=True) == json.dumps(result[k], sort_keys=True), k
    a, b = dict(cut["backtest"]), dict(result["backtest"])
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_skipped_symbols_each_get_a_line_with_the_reason(market, capsys):
    argv = ["eval", "forecast", "--model", MODEL, "--bars", str(market), "--no-garch", "--start", START,
            "--end", "2017-03-01", "--symbols", "AAA,EARLY,LATE,YOUNG,NOPE"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [x.strip() for x in out if x.strip().startswith("skipped ")]
    assert lines == ["skipped NOPE (not in the bars)", "skipped EARLY (ends 2014-12-31, before the period)",
                     "skipped LATE (starts 2017-03-01, after the period)",
                     lines[3]]
    assert lines[3].startswith("skipped YOUNG (starts 2015-03-02: ") and f"before {START}" in lines[3]
    assert "scored 1 symbol (0 held out); skipped 4:" in out[0]
    # with --json the JSON is stdout alone, and the same lines go to stderr
    assert main([*argv, "--json"]) == 0
    cap = capsys.readouterr()
    r = json.loads(cap.out)
    assert [f"skipped {k['symbol']} {k['reason']}" for k in r["skipped"]] == lines
    assert [x for x in cap.err.splitlines() if x.startswith("skipped ")] == lines


def test_symbols_none_of_which_are_in_the_bars_is_one_error(market, capsys):
    code = main(["eval", "forecast", "--model", MODEL, "--bars", str(market), "--symbols", "NOPE,NADA"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "symbols: expected symbols that are in" in err and "got none of NOPE, NADA" in err


# -- flags -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "want"), [
    (["--regime-window", "1"], "argument --regime-window: expected an int >= 2, got '1'"),
    (["--regime-window", "2.5"], "argument --regime-window: expected an int, got '2.5'"),
    (["--report", "out.txt"], "--report: expected a .png file name, got 'out.txt'"),
    (["--report", "/no/such/folder/r.png"], "--report: expected a file in an existing folder"),
    (["--report", "/"], "argument --report: expected a file path to write, got '/'"),
    (["--columns", "when=Date"], "--columns: expected NAME=COLUMN pairs"),
    (["--symbols", " , "], "argument --symbols: expected comma-separated symbols"),
    (["--levels", "0.8,0.8"], "argument --levels: expected comma-separated interval levels in (0, 1)"),
    (["--start", "2016-13-01"], "argument --start: expected a date YYYY-MM-DD"),
])
def test_bad_eval_flags_are_one_line_exit_2_before_any_work(market, capsys, monkeypatch, argv, want):
    import streamrnn.forecast.evaluate as ev

    def never(*a, **k):
        raise AssertionError("eval_forecast ran")

    monkeypatch.setattr(ev, "eval_forecast", never)
    code = main(["eval", "forecast", "--model", MODEL, "--bars", str(market), *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and want in err, err


@pytest.mark.parametrize(("argv", "want"), [
    (["--hidden", "0"], "argument --hidden: expected an int >= 1, got '0'"),
    (["--hidden", "x"], "argument --hidden: expected an int, got 'x'"),
    (["--checkpoint", "/"], "argument --checkpoint: expected a file path to write, got '/'"),
    (["--columns", "ts"], "--columns: expected NAME=COLUMN pairs"),
    (["--lr", "0"], "argument --lr: expected a number > 0.0, got '0'"),
    (["--bar-seconds", "inf"], "argument --bar-seconds: expected a finite number"),
])
def test_bad_train_flags_are_one_line_exit_2(capsys, tmp_path, argv, want):
    code = main(["train", "forecast", "--out", str(tmp_path / "m.onnx"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and want in err, err


def test_report_without_matplotlib_is_one_line_before_any_work(market, capsys, monkeypatch, tmp_path):
    import streamrnn.forecast.evaluate as ev

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError

    def never(*a, **k):
        raise AssertionError("eval_forecast ran")

    monkeypatch.setattr(ev, "eval_forecast", never)
    code = main(["eval", "forecast", "--model", MODEL, "--bars", str(market), "--report", str(tmp_path / "r.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "streamrnn eval: error: --report: expected matplotlib (pip install 'streamrnn[plot]'), got it not "
        "installed"], err
    assert not (tmp_path / "r.png").exists()


# -- the report and progress -----------------------------------------------------------------------------------
def test_report_draws_the_tables(result, tmp_path):
    pytest.importorskip("matplotlib")
    from streamrnn.forecast.report import write_report

    png = tmp_path / "r.png"
    d = write_report(result, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(str(png)).shape[:2]
    assert (w, h) == (1000, 1200)
    bt = result["backtest"]
    assert d["years"] == ["2015", "2016", "2017"] and d["best"] == bt["best_baseline"]
    assert d["coverage"]["80"]["raw"] == [100 * bt["groups"]["all"]["by_year"][y]["lstm"]["h1"]["coverage_80"]
                                          for y in d["years"]]
    aci = result["conformal"]["groups"]["all"]["h1"]["by_year"]
    assert d["coverage"]["80"]["aci"] == [aci[y]["aci"]["80"] for y in d["years"]]
    assert np.mean(d["pit"]["lstm"]) == pytest.approx(1.0)  # a density over [0, 1]
    assert d["nll"]["lstm"] == [bt["groups"]["all"]["by_year"][y]["lstm"]["h1"]["nll"] for y in d["years"]]


def test_cli_report_and_progress_lines_on_stderr(market, tmp_path, capsys, monkeypatch):
    """A run that (by its clock) takes longer than 10 s prints plain progress lines on stderr, never on stdout."""
    pytest.importorskip("matplotlib")
    import functools

    import streamrnn.forecast.evaluate as ev
    from streamrnn.forecast.progress import Progress

    now = [0.0]

    def clock() -> float:  # every reading 3 s later: the heartbeat is due after a few steps
        now[0] += 3.0
        return now[0]

    monkeypatch.setattr(ev, "Progress", functools.partial(Progress, clock=clock))
    png = tmp_path / "r.png"
    assert main(["eval", "forecast", "--model", MODEL, "--bars", str(market), "--no-garch", "--start", START,
                 "--symbols", "AAA,BBB", "--json", "--report", str(png)]) == 0
    cap = capsys.readouterr()
    json.loads(cap.out)
    progress = [x for x in cap.err.splitlines() if x.startswith("eval forecast: ")]
    assert progress and all(x.endswith(" s") for x in progress), cap.err
    assert any("symbols fitted and scored" in x for x in progress), progress
    assert f"wrote {png} (h1 coverage by year 2015..2017, PIT histogram, NLL by year against EWMA-t" in cap.err
    assert png.exists()


# -- the shared S&P data (skipped where absent) ----------------------------------------------------------------
@pytest.mark.skipif(not SP500.is_dir(), reason="shared S&P 500 data not present")
def test_real_bars_refits_and_no_look_ahead(tmp_path):
    """AAPL and NI (NI has a corporate-action jump) over the test period: GARCH-t refitted at 2017-01-01 and
    2018-01-01 equals arch's fit on the returns before each; cutting the bars after 2017-06-30 leaves every
    baseline forecast and regime up to that day unchanged."""
    from arch import arch_model

    for sym in ("AAPL", "NI"):
        (b,) = read_bars(str(SP500 / f"{sym}_data.csv"))
        s = _series(b)
        cuts = backtest.yearly_origins("2017-01-01", None, float(s.ts[-1]))
        assert [backtest.date_of(c) for c in cuts] == ["2017-01-01", "2018-01-01"]
        origins = np.flatnonzero(s.ts >= cuts[0])[:-5]
        f, fits = backtest.baseline_forecasts(s, origins, cuts, 5)
        for k, c in enumerate(cuts):
            n = int((s.ts < c).sum())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = arch_model(s.ret[1:n], mean="Constant", vol="GARCH", p=1, q=1, dist="t",
                                 rescale=False).fit(disp="off")
            assert fits[k]["garch_t"]["beta[1]"] == pytest.approx(float(res.params["beta[1]"]), rel=1e-4)
        t = int(np.searchsorted(s.ts, _secs("2017-07-01"))) - 1
        short = _series(b.take(np.arange(t + 1)))
        early = origins[origins <= t]
        g, _ = backtest.baseline_forecasts(short, early, cuts, 5)
        for m in backtest.BASELINES:
            for x, y in zip(f[m], g[m], strict=True):
                np.testing.assert_array_equal(x[:len(early)], y, err_msg=f"{sym} {m}")
        np.testing.assert_array_equal(backtest.regime_codes(s, origins, cuts)[:len(early)],
                                      backtest.regime_codes(short, early, cuts))
        assert math.isfinite(fits[0]["ewma_t_nu"])
