"""Bar reading and features: online (bar by bar) == offline (vectorised); bad bars become dead letters."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrnn.dead_letters import DEAD_LETTER_SCHEMA, DeadLetter
from streamrnn.errors import InputError
from streamrnn.forecast.bars import Bars, parse_columns, read_bars, read_csv_text
from streamrnn.forecast.baselines import ewma_recursion
from streamrnn.forecast.dataset import check_frequency, prepare
from streamrnn.forecast.features import (
    FEATURE_NAMES,
    FeatureConfig,
    FeatureRow,
    OnlineFeatures,
    offline_features,
    targets,
)
from streamrnn.forecast.synthetic import simulate


def _online(bars: Bars, cfg: FeatureConfig | None = None) -> tuple[np.ndarray, list[DeadLetter]]:
    on = OnlineFeatures(cfg)
    xs, dead = [], []
    for i in range(len(bars)):
        r = on.update(bars.row(i))
        (xs.append(r.x) if isinstance(r, FeatureRow) else dead.append(r))
    return np.array(xs).reshape(-1, len(FEATURE_NAMES)), dead


def _bars(close, *, ts=None, sym="ABC", spread=0.01) -> Bars:
    close = np.asarray(close, np.float64)
    n = len(close)
    ts = np.arange(n) * 86400.0 + 1.5e9 if ts is None else np.asarray(ts, np.float64)
    return Bars(sym, ts, close * (1 - spread / 2), close * (1 + spread), close * (1 - spread), close,
                np.full(n, 1000.0))


def test_online_equals_offline_on_simulated_market():
    for b in simulate(["AAA", "BBB"], start="2015-01-01", end="2015-12-31", seed=3):
        x_on, dead = _online(b)
        s = offline_features(b)
        assert not dead and not s.dead
        np.testing.assert_allclose(x_on, s.x, rtol=0, atol=1e-9)


bar_values = st.one_of(st.floats(min_value=-5, max_value=200), st.just(float("nan")), st.just(0.0))


@settings(max_examples=60, deadline=None)
@given(closes=st.lists(st.one_of(st.floats(1.0, 200.0), bar_values), min_size=1, max_size=40),
       steps=st.lists(st.sampled_from([0.0, 0.0003, 86400.0, 3 * 86400.0, 9 * 86400.0, -86400.0]),
                      min_size=40, max_size=40),
       seed=st.integers(0, 2**16))
def test_online_equals_offline_with_bad_bars_jumps_gaps(closes, steps, seed):
    """Any mix of NaN/negative prices, duplicated/older/sub-ms timestamps, jumps, gaps: same rows, same features."""
    rng = np.random.default_rng(seed)
    n = len(closes)
    ts = 1.6e9 + np.cumsum(steps[:n])
    b = _bars(closes, ts=ts)
    b.high = b.high * np.where(rng.random(n) < 0.1, 0.5, 1.0)  # some high < low
    x_on, dead_on = _online(b)
    s = offline_features(b)
    np.testing.assert_allclose(x_on, s.x, rtol=0, atol=1e-9)
    assert [d.reason for d in dead_on] == [d.reason for d in s.dead]
    assert np.isfinite(s.x).all()


def test_jump_rule_rebases_and_keeps_ewma():
    b = _bars([100.0, 101.0, 45.0, 46.0, 93.0, 94.0])  # -55% then +102%: both flagged
    s = offline_features(b)
    assert s.jump.tolist() == [False, False, True, False, True, False]
    assert s.ret[2] == 0.0 and s.ret[4] == 0.0
    assert s.ret[3] == pytest.approx(100 * math.log(46 / 45))  # measured from the rebased level
    assert s.var[2] == s.var[1] and s.var[4] == s.var[3]  # jumps leave the EWMA alone
    y, m = targets(s.ret, s.jump, 2)
    assert m[:, 0].tolist() == [True, False, True, False, True, False]
    assert m[:, 1].tolist() == [False, False, False, False, False, False]
    assert y[2, 0] == pytest.approx(s.ret[3])


def test_gap_flag_and_days():
    ts = 1.6e9 + np.array([0, 1, 2, 9, 10]) * 86400.0
    s = offline_features(_bars([10, 10.1, 10.2, 10.3, 10.4], ts=ts))
    assert s.gap.tolist() == [False, False, False, True, False]
    assert s.x[3, FEATURE_NAMES.index("days")] == 7.0


def test_ewma_feature_matches_hand_recursion():
    b = simulate(["AAA"], start="2016-01-01", end="2016-06-01", seed=1)[0]
    s = offline_features(b, FeatureConfig(lam=0.94, prior_var=1.0))
    ref = ewma_recursion(100 * np.log(b.close[1:] / b.close[:-1]), 0.94, 1.0)
    np.testing.assert_allclose(s.var[1:], ref, rtol=1e-12)


BAD = [
    ({"close": float("nan")}, "close: expected a finite number"),
    ({"open": 0.0}, "open: expected a price > 0"),
    ({"low": -1.0}, "low: expected a price > 0"),
    ({"high": 9.0, "low": 9.5}, "high/low: expected high >= low"),
    ({"ts": 1.6e9}, "ts: duplicated timestamp"),
    ({"ts": 1.6e9 - 1}, "out of order"),
    ({"symbol": "bad symbol!"}, "symbol: expected a ticker"),
    ({"symbol": 42}, "symbol: expected a ticker"),
    ({"volume": "lots"}, "volume: expected a number"),
    ({"volume": -5.0}, "volume: expected >= 0"),
]


@pytest.mark.parametrize(("patch", "reason"), BAD)
def test_bad_bar_is_a_dead_letter_and_state_is_untouched(patch, reason):
    on = OnlineFeatures()
    good = {"symbol": "ABC", "ts": 1.6e9, "open": 10.0, "high": 10.5, "low": 9.8, "close": 10.2, "volume": 100.0}
    assert isinstance(on.update(good), FeatureRow)
    before = dict(vars(on.states["ABC"]))
    r = on.update({**good, "ts": 1.6e9 + 86400, **patch})
    assert isinstance(r, DeadLetter) and reason in r.reason
    assert vars(on.states["ABC"]) == before
    nxt = on.update({**good, "ts": 1.6e9 + 2 * 86400, "close": 10.4})
    assert isinstance(nxt, FeatureRow) and nxt.ret == pytest.approx(100 * math.log(10.4 / 10.2))


def test_a_bad_bar_is_the_dead_letter_record_the_jobs_write():
    """One DeadLetter type: the features' dead letter has the jobs' Parquet columns (key = the symbol, the bar as
    JSON) and the core that makes it imports no Beam."""
    bar = {"symbol": "ABC", "ts": 1.6e9, "open": 10.0, "high": 9.0, "low": 9.8, "close": 10.2, "volume": 100.0}
    r = OnlineFeatures().update(bar)
    assert r == DeadLetter("ABC", 1.6e9, None, None, "invalid", r.reason, json.dumps(bar, sort_keys=True))
    assert r.reason.startswith("high/low: expected high >= low")
    assert pa.Table.from_pylist([r._asdict()], schema=DEAD_LETTER_SCHEMA).num_rows == 1
    assert OnlineFeatures().update(["not", "a", "bar"]).event == json.dumps({"bar": "['not', 'a', 'bar']"})
    code = "import sys, streamrnn, streamrnn.forecast.serve; print('apache_beam' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_missing_column_is_a_dead_letter_online_and_an_error_in_files():
    r = OnlineFeatures().update({"symbol": "ABC", "ts": 1.0, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0})
    assert isinstance(r, DeadLetter) and r.reason.startswith("volume: expected a column")
    with pytest.raises(InputError, match="column 'volume'"):
        read_csv_text("date,open,high,low,close,Name\n2017-01-03,1,2,1,2,X\n", source="x.csv")


def test_reader_layouts_crlf_time_column_and_mapping(tmp_path):
    sp = read_csv_text("date,open,high,low,close,volume,Name\n2013-02-08,15.07,15.12,14.63,14.75,8407500,AAL\n"
                       "2013-02-11,14.89,15.01,14.26,,8882000,AAL\n", source="AAL_data.csv")
    assert sp[0].symbol == "AAL" and np.isnan(sp[0].close[1]) and sp[0].ts[0] == 1360281600.0
    long = tmp_path / "aep.us.txt"
    long.write_bytes(b"Date,Open,High,Low,Close,Volume,OpenInt\r\n1970-01-02,2.3,2.4,2.2,2.35,1000,0\r\n"
                     b"1970-01-05,2.35,2.5,2.3,2.45,1200,0\r\n")
    (b,) = read_bars(long)
    assert b.symbol == "AEP" and b.close.tolist() == [2.35, 2.45]
    intraday = read_csv_text("Date,Open,High,Low,Close,Volume,OpenInterest\r\n"
                             "2006-01-02,09:01:00,3578.73,3578.73,3578.73,3578.73,1,0\r\n", source="m1.txt")
    assert intraday[0].ts[0] == np.datetime64("2006-01-02T09:01:00", "s").astype(np.int64)
    mapped = read_csv_text("When,Ticker,o,h,l,c,v\n2017-01-03 14:30:00.250,XYZ,1,2,1,2,5\n", source="m.csv",
                           columns=parse_columns("ts=When,symbol=Ticker,open=o,high=h,low=l,close=c,volume=v"))
    assert mapped[0].symbol == "XYZ" and mapped[0].ts[0] % 1 == pytest.approx(0.25)
    with pytest.raises(InputError, match="--columns"):
        parse_columns("bogus")


def test_frequency_check_refuses_other_bar_intervals():
    minute = _bars(np.linspace(10, 11, 50), ts=1.6e9 + np.arange(50) * 60.0)
    data = [prepare(offline_features(minute), 1)]
    with pytest.raises(InputError, match="frequency"):
        check_frequency(data, 86400.0)
    assert check_frequency(data, 86400.0, allow=True) == 60.0


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "market"


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared market data is not on this machine")
def test_shared_market_files_read_with_no_flags():
    """Each layout of shared/data/market: row counts from its README, no dead letters, daily vs intraday frequency."""
    (aapl,) = read_bars(SHARED / "sp500_daily_2013_2018" / "AAPL_data.csv")
    (aep,) = read_bars(SHARED / "us_daily_long_1970_2017" / "stocks" / "aep.us.txt")  # CRLF
    (m1,) = read_bars(SHARED / "intraday_backtrader_2006" / "2006-01-02-volume-min-001.txt")  # 8 fields, 7 names
    assert (aapl.symbol, len(aapl), aep.symbol, len(aep), len(m1)) == ("AAPL", 1259, "AEP", 12075, 30889)
    daily = [prepare(offline_features(b), 1) for b in (aapl, aep)]
    intraday = [prepare(offline_features(m1), 1)]
    assert all(not p.series.dead for p in daily + intraday)
    assert check_frequency(daily, 86400.0) == 86400.0
    with pytest.raises(InputError, match="median interval of 60 s"):
        check_frequency(intraday, 86400.0)
