"""The market job's served location rule, its bar-frequency check at launch, and the plot's symbols, axes and
coverage (against the run summary's own code), without running a pipeline."""

from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from beam_jobs import market_forecast
from streamrnn.errors import InputError
from streamrnn.forecast.beam import QUANTILES, ForecastPostprocess, check_bar_frequency
from streamrnn.forecast.beam_output import _add, _scores, _SymbolStats, output_schema

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "exported" / "market.onnx")
DATA = ROOT.parent / "shared" / "data" / "market"
MINUTE = DATA / "intraday_backtrader_2006" / "2006-01-02-volume-min-001.txt"
needs_minute_bars = pytest.mark.skipif(not MINUTE.is_file(), reason="the shared intraday bars are not on this machine")
DAILY = DATA / "sp500_daily_2013_2018" / "AAPL_data.csv"


def _outputs(n=4, H=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"mean": rng.normal(0.1, 0.05, (n, H)).astype(np.float32),
            "log_scale": rng.normal(0.0, 0.3, (n, H)).astype(np.float32)}


@pytest.mark.parametrize("location", ["zero", "model"])
def test_served_location_rule(location):
    df = [4.0, 5.0, 6.0]
    out, prev = _outputs(), _outputs(seed=1)
    x = np.zeros((4, 8), np.float32)
    x[:, 0] = [0.5, -1.0, 2.0, 0.1]
    r = ForecastPostprocess(df, location=location)(x, out, prev)
    loc = out["mean"].astype(np.float64) if location == "model" else np.zeros((4, 3))
    scale = np.exp(out["log_scale"].astype(np.float64))
    np.testing.assert_array_equal(r["ret_loc"], loc)
    for name, p in QUANTILES.items():
        np.testing.assert_allclose(r[f"q_{name}"], stats.t.ppf(p, np.array(df), loc=loc, scale=scale), rtol=1e-9,
                                   atol=1e-12)
    prev_loc = prev["mean"][:, 0].astype(np.float64) if location == "model" else 0.0
    want = stats.t.logpdf(x[:, 0], 4.0, loc=prev_loc, scale=np.exp(prev["log_scale"][:, 0].astype(np.float64)))
    np.testing.assert_allclose(r["logprob"], want, rtol=1e-9)
    with pytest.raises(InputError, match="location: expected one of"):
        ForecastPostprocess(df, location="drift")


@needs_minute_bars
def test_bar_frequency_checked_at_launch():
    with pytest.raises(InputError, match=r"input: frequency: expected bars every 86400 s .* got a median interval "
                                         r"of 60 s .*--allow-frequency"):
        check_bar_frequency([str(MINUTE)], {}, 86400.0)
    assert check_bar_frequency([str(MINUTE)], {}, 86400.0, allow=True) == 60.0
    assert check_bar_frequency([str(DAILY)], {}, 86400.0) == 86400.0


@needs_minute_bars
def test_job_refuses_minute_bars_for_a_daily_model_in_one_line(tmp_path, capsys):
    code = market_forecast.main(["--input", str(MINUTE), "--output", str(tmp_path / "o"), "--model", MODEL,
                                 "--quiet", "--metrics-port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "median interval of 60 s" in err, err
    assert not list((tmp_path / "o").glob("forecasts-*"))


def _forecasts(folder: pathlib.Path) -> pa.Table:
    """A job output table by hand: three symbols, one with a tie in rows, random hits and unscored rows."""
    rng = np.random.default_rng(3)
    schema = output_schema(1)
    rows = []
    for sym, n in (("BBB", 40), ("AAA", 40), ("CCC", 25), ("DDD", 60)):
        close = 100 * np.exp(np.cumsum(rng.normal(0, 1, n)) / 100)
        for i in range(n):
            known = i < n - 1 and rng.random() > 0.1
            r = {f.name: None for f in schema}
            r.update(symbol=sym, ts=1.6e9 + 86400.0 * i, close=close[i], bar=i, flags="", h1_median=close[i],
                     h1_lo80=close[i] * 0.99, h1_hi80=close[i] * 1.01, h1_lo95=close[i] * 0.98,
                     h1_hi95=close[i] * 1.02, h1_ret_loc=0.0, h1_ret_scale=0.8)
            if known:
                e = float(rng.normal(0, 1))
                r.update(realised_ret_h1=e, error_h1=e, nll_h1=abs(e), in80_h1=abs(e) < 1.0, in95_h1=abs(e) < 2.0)
            rows.append(r)
    t = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(t, folder / "forecasts-00000-of-00001.parquet")
    return t


def test_plot_symbols_axes_and_coverage_equal_the_summary(tmp_path):
    pytest.importorskip("matplotlib", reason="needs the 'plot' extra")
    import matplotlib.axes

    from streamrnn.forecast import plot

    t = _forecasts(tmp_path)
    stats_ = {}
    for b in t.to_batches():  # the run summary's own per-symbol code
        for k, v in _SymbolStats().process(b):
            stats_[k] = _add([stats_.get(k, (0.0,) * 6), v])
    summary = {k: _scores(v) for k, v in stats_.items()}
    labels, titles = [], []
    real_ylabel, real_title = matplotlib.axes.Axes.set_ylabel, matplotlib.axes.Axes.set_title

    def ylabel(self, s, *a, **k):
        labels.append(s)
        return real_ylabel(self, s, *a, **k)

    def title(self, s, *a, **k):
        titles.append(s)
        return real_title(self, s, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(matplotlib.axes.Axes, "set_ylabel", ylabel)
    mp.setattr(matplotlib.axes.Axes, "set_title", title)
    try:
        drawn = plot.plot_forecasts(str(tmp_path), str(tmp_path / "p.png"))
    finally:
        mp.undo()
    # the documented rule: the 3 with the most rows, ties alphabetically (AAA before BBB at 40 rows)
    assert list(drawn) == ["DDD", "AAA", "BBB"]
    for s, c in drawn.items():
        assert c["scored"] == summary[s]["scored"]
        assert c["coverage_80"] == pytest.approx(summary[s]["coverage_80"], abs=1e-12)
        assert c["coverage_95"] == pytest.approx(summary[s]["coverage_95"], abs=1e-12)
        assert any(f"coverage 80%: {summary[s]['coverage_80']:.1%}" in x and x.startswith(s) for x in titles)
    assert labels.count("% log return") == 3 and labels.count("price (the bars' currency)") == 3
    last = plot.plot_forecasts(str(tmp_path), str(tmp_path / "q.png"), symbols=["CCC"], last=10)
    assert last["CCC"]["scored"] == sum(1 for h in t.filter(pa.compute.equal(t["symbol"], "CCC"))
                                        ["in80_h1"].to_pylist()[-10:] if h is not None)
