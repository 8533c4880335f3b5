"""Issue 15's regime-switching series (calm 0.5% sd, a 4% sd quarter, calm again): the generator's regimes
against numpy, and the wild-quarter coverage measurement through ``eval forecast`` against scipy's Student-t
and an online calibrator fed bar by bar."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
from scipy import stats

from streamrnn.errors import InputError
from streamrnn.forecast import conformal
from streamrnn.forecast.bars import read_bars
from streamrnn.forecast.dataset import load as load_data
from streamrnn.forecast.evaluate import eval_forecast, forecast_meta, model_outputs
from streamrnn.forecast.features import FeatureConfig
from streamrnn.forecast.synthetic import regime_switch, write_sp500_layout
from streamrnn.model.loaded import load

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "exported" / "market.onnx")


def _day(ts: np.ndarray) -> np.ndarray:
    return ts.astype(np.int64).astype("datetime64[s]").astype("datetime64[D]")


def _returns_by_segment(rs) -> dict[str, np.ndarray]:
    """% log close-to-close returns ``[symbols, days]`` of each segment, a return dated by its bar."""
    out = {}
    for seg in rs.segments:
        rows = []
        for b in rs.bars:
            d = _day(b.ts)[1:]
            r = 100.0 * np.diff(np.log(b.close))
            rows.append(r[(d >= np.datetime64(seg.start)) & (d < np.datetime64(seg.end))])
        out[seg.name] = np.array(rows)
    return out


def _tolerance(n: int, kurtosis: float = 9.0, z: float = 4.0) -> float:
    """``z`` standard errors of a sample sd relative to the true one (t5: kurtosis 9)."""
    return z * 0.5 * math.sqrt((kurtosis - 1.0) / n)


def test_regime_switch_has_the_sd_of_each_segment_and_switches_on_its_first_day():
    rs = regime_switch(seed=3)
    assert [s.name for s in rs.segments] == ["calm_before", "wild", "calm_after"]
    assert [s.sd for s in rs.segments] == [0.5, 4.0, 0.5]
    assert len(rs.bars) == 8 and len({b.symbol for b in rs.bars}) == 8
    d = _day(rs.bars[0].ts)
    assert np.all(np.is_busday(d)) and str(d[0]) == "2000-01-03" and str(d[-1]) == "2003-03-31"
    by = _returns_by_segment(rs)
    assert by["wild"].shape == (8, int(np.busday_count("2002-01-01", "2002-04-01")))
    for seg in rs.segments:
        r = by[seg.name]
        assert abs(np.std(r) / seg.sd - 1.0) < _tolerance(r.size), (seg.name, np.std(r))
        # each symbol on its own too (a wider band: fewer days)
        for row in r:
            assert abs(np.std(row) / seg.sd - 1.0) < _tolerance(row.size, z=5.0), (seg.name, np.std(row))
    # the bars' range scales with the day's sd as well (the model reads it)
    b = rs.bars[0]
    rng_pct = 100.0 * np.log(b.high / b.low)
    wild = (d >= np.datetime64("2002-01-01")) & (d < np.datetime64("2002-04-01"))
    assert 6.0 < rng_pct[wild].mean() / rng_pct[~wild].mean() < 10.0
    # the switch happens on the segment's first day: the cross-section of many symbols on the boundary days
    many = regime_switch([f"X{i}" for i in range(400)], seed=4)
    r = np.array([100.0 * np.diff(np.log(x.close)) for x in many.bars])
    days = _day(many.bars[0].ts)[1:]
    for day, sd in (("2001-12-31", 0.5), ("2002-01-01", 4.0), ("2002-03-29", 4.0), ("2002-04-01", 0.5)):
        col = r[:, int(np.flatnonzero(days == np.datetime64(day))[0])]
        assert abs(np.std(col) / sd - 1.0) < _tolerance(col.size), (day, np.std(col))


def test_regime_switch_is_seeded_and_checks_its_dates():
    a, b, c = regime_switch(seed=1), regime_switch(seed=1), regime_switch(seed=2)
    assert all(np.array_equal(x.close, y.close) and np.array_equal(x.high, y.high) for x, y in zip(a.bars, b.bars,
                                                                                                   strict=True))
    assert not np.array_equal(a.bars[0].close, c.bars[0].close)
    with pytest.raises(InputError, match="regime_switch: dates: expected start < wild_start < wild_end < end"):
        regime_switch(wild_start="2002-04-01", wild_end="2002-01-01")


def test_wild_quarter_window_scores_exactly_its_returns_raw_against_scipy_and_aci_against_a_bar_by_bar_loop(
        tmp_path):
    """``eval forecast --start/--end`` at ``Segment.window()`` scores exactly the wild quarter's h1 returns; its
    raw 80% coverage equals scipy's t interval around the model's forecasts, and its ACI coverage equals an
    :class:`OnlineConformal` fed each symbol's bars one at a time from its first (what the job serves)."""
    rs = regime_switch(["RA", "RB", "RC"], seed=5)
    write_sp500_layout(rs.bars, tmp_path)
    wild = rs.segment("wild")
    start, end = wild.window()
    assert start == "2001-12-31" and end == "2002-04-01"
    r = eval_forecast(MODEL, str(tmp_path), start=start, end=end, garch=False, parity_symbols=1)
    h1 = r["conformal"]["groups"]["all"]["h1"]
    model = load(MODEL, providers=["CPUExecutionProvider"])
    meta = forecast_meta(model)
    df = float(meta["df"][0])
    data = load_data(str(tmp_path), int(meta["horizons"]), features=FeatureConfig(**meta["features"]))
    outs = model_outputs(model, data)
    raw_in, aci_in = [], []
    for p, (loc, ls) in zip(data, outs, strict=True):
        (b,) = read_bars(str(tmp_path / f"{p.symbol}_data.csv"))
        y = 100.0 * np.diff(np.log(b.close))  # y[t]: the return from bar t to bar t + 1 (the written prices)
        day = _day(b.ts)
        cal = conformal.OnlineConformal([df], levels=(0.8,), tails=(), gamma=conformal.GAMMA)
        for t in range(len(b) - 1):
            if t == 0:
                cal.learn_one(p.symbol)
            else:
                cal.learn_one(p.symbol, y=[y[t - 1]], loc=[loc[t - 1, 0]], scale=[math.exp(ls[t - 1, 0])])
            if np.datetime64(wild.start) <= day[t + 1] < np.datetime64(wild.end):
                band = cal.predict_one(p.symbol, [loc[t, 0]], [math.exp(ls[t, 0])])
                lo, hi = stats.t.interval(0.8, df, loc[t, 0], math.exp(ls[t, 0]))
                raw_in.append(lo <= y[t] <= hi)
                aci_in.append(band["lo80"][0] <= y[t] <= band["hi80"][0])
    assert h1["n"] == len(raw_in) == 3 * np.busday_count(wild.start, wild.end)
    assert h1["levels"]["80"]["raw"]["coverage"] == pytest.approx(100.0 * np.mean(raw_in), abs=1e-9)
    assert h1["levels"]["80"]["aci"]["coverage"] == pytest.approx(100.0 * np.mean(aci_in), abs=1e-9)
