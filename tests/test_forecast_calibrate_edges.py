"""The market job's calibration step at its edges (issue 15): a row older than its symbol's last applied bar
fails loudly (it used to pass and get bands from a never-learned ``a``), a forecast the model gave as NaN, inf
or a zero scale gets null bands and issues no target (it used to be kept in the ring and stall the shard at the
next firing), state written under other settings is refused naming the flags, ``--gamma`` only with ``aci``.

References: ``OnlineConformal.run`` (the offline calibrator) over the symbol's targets without the unusable
origins, with ``conformal.bands``; one pass against chunks through Arrow IPC (what a cold worker reads)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from test_forecast_agaci_job import DF, KW, MODEL, _ipc_roundtrip

from beam_jobs import market_forecast
from streamrnn.cli.commands import main
from streamrnn.errors import DeployError
from streamrnn.forecast.calibrate_step import Calibrator
from streamrnn.forecast.conformal import OnlineConformal, bands

DAY = 86400.0
METHODS = ("aci", "agaci", "none")


def _rows(sym: str, bars, H: int = 2, bad: tuple[int, str, float] | None = None) -> pa.Table:
    bars = np.asarray(list(bars), np.int64)
    n = len(bars)
    rng = np.random.default_rng(7)
    close = (50 * np.exp(np.cumsum(rng.standard_t(5, 200)) / 100))[bars]
    t = {"symbol": [sym] * n, "ts": bars * DAY, "close": close, "bar": bars, "flags": [""] * n}
    for h in range(1, H + 1):
        t[f"h{h}_ret_loc"], t[f"h{h}_ret_scale"] = np.full(n, 0.05), np.full(n, np.sqrt(h))
    if bad is not None:
        at, field, v = bad
        t[field] = t[field].copy()
        t[field][list(bars).index(at)] = v
    t["model_version"] = ["m"] * n
    return pa.table(t)


def _chunks(c: Calibrator, parts: list[pa.Table]) -> pa.Table:
    state = ring = None
    outs = []
    for rows in parts:
        out, state, ring = c.apply(state, ring, rows)
        state, ring = _ipc_roundtrip(state), _ipc_roundtrip(ring)
        outs.append(out)
    return pa.concat_tables(outs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("late", [[9], [8], [3], [3, 10]])
def test_a_row_before_the_last_applied_bar_fails_loudly_and_changes_nothing(method, late):
    """Bars 0..9 applied (H = 2: the ring holds 8 and 9), then ``late``: an error naming the symbol and both bars,
    whatever the ring holds; the state the caller keeps then goes on as if the late rows never came."""
    c = Calibrator(DF, method=method, **KW)
    _, state, ring = c.apply(None, None, _rows("A", range(10)))
    with pytest.raises(RuntimeError, match=rf"'A': bar {late[0]} after bar 9: rows out of bar order"):
        c.apply(state, ring, _rows("A", late))
    after = c.apply(state, ring, _rows("A", range(10, 14)))[0]
    clean = _chunks(c, [_rows("A", range(10)), _rows("A", range(10, 14))]).slice(10)
    assert after.equals(clean)


def _assert_same(a: pa.Table, b: pa.Table) -> None:
    """Equal tables, NaN equal to NaN (the bad input itself), null to null."""
    assert a.column_names == b.column_names
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        assert x.is_valid().equals(y.is_valid()), name
        np.testing.assert_array_equal(x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False), name)


def _reference(rows: pa.Table, c: Calibrator, usable: np.ndarray) -> np.ndarray:
    """The calibrated 80% upper band (price) per row and horizon from the offline calibrator, every target of an
    unusable origin left out; NaN where the row's own forecast is unusable."""
    H, n = c.H, rows.num_rows
    close = rows.column("close").to_numpy()
    loc = np.stack([rows.column(f"h{h}_ret_loc").to_numpy() for h in range(1, H + 1)], 1)
    scale = np.stack([rows.column(f"h{h}_ret_scale").to_numpy() for h in range(1, H + 1)], 1)
    y, valid = np.zeros((1, n, H)), np.zeros((1, n, H), bool)
    for t in range(n):
        for h in range(H):
            if t + h + 1 < n and usable[t, h]:
                y[0, t, h], valid[0, t, h] = 100 * np.log(close[t + h + 1] / close[t]), True
    lo, sc = np.where(usable, loc, 0.0), np.where(usable, scale, 1.0)
    cal = OnlineConformal(c.df, levels=c.levels, tails=c.tails, gamma=c.gamma, method=c.method)
    a = cal.run(["A"], y, lo[None], sc[None], valid)[0]
    hi = close[:, None] * np.exp(bands(a, lo, sc, c.df, c.config)["hi80"] / 100)
    return np.where(usable, hi, np.nan)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [(5, "h1_ret_scale", np.nan), (5, "h1_ret_scale", np.inf), (5, "h1_ret_scale", 0.0),
                                 (5, "h2_ret_loc", np.nan), (5, "h1_ret_loc", -np.inf)])
def test_an_unusable_forecast_gets_null_bands_and_issues_no_target(method, bad):
    """Bar 5's forecast at one horizon is NaN, inf or a zero scale: in one pass and in chunks (one ending at bar
    5, as a streaming firing does), its bands at that horizon are null, the targets it would have issued are not
    scored, and every other band equals the offline calibrator's without those targets."""
    c = Calibrator(DF, method=method, **KW)
    rows = _rows("A", range(30), bad=bad)
    one = _chunks(c, [rows])
    _assert_same(_chunks(c, [rows.slice(0, 6), rows.slice(6, 10), rows.slice(16)]), one)
    h = int(bad[1][1])
    usable = np.ones((30, 2), bool)
    usable[5, h - 1] = False
    want = _reference(rows, c, usable)
    for k in (1, 2):
        got = one.column(f"h{k}_cal_hi80").to_numpy(zero_copy_only=False).astype(np.float64)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want[:, k - 1]))
        np.testing.assert_allclose(got, want[:, k - 1], rtol=1e-9)
    assert one.column(f"h{h}_cal_lo50")[5].as_py() is None and one.column(f"h{h}_var5")[5].as_py() is None
    scored = one.column(f"scored_h{h}_nll").is_valid().to_numpy(zero_copy_only=False)
    assert not scored[5 + h] and scored[6 + h]


def test_state_of_other_settings_is_refused_naming_the_flags():
    """A deploy mismatch (the job launcher's one line and exit 2), naming the flags and both configs."""
    _, state, ring = Calibrator(DF, method="aci", **KW).apply(None, None, _rows("A", range(10)))
    for other in (dict(KW, levels=(0.5, 0.8, 0.95)), dict(KW, method="agaci"), dict(KW, tails=(0.01,))):
        with pytest.raises(DeployError, match=r"expected .* got .*--levels, --var or --calibration"):
            Calibrator(DF, **other).apply(state, ring, _rows("A", range(10, 12)))


@pytest.mark.parametrize("method", ["agaci", "none"])
def test_gamma_is_only_for_aci_one_line(tmp_path, capsys, method):
    code = market_forecast.main(["--demo", "--output", str(tmp_path / "o"), "--calibration", method, "--gamma",
                                 "0.05", "--quiet", "--metrics-port", "0", "--model", MODEL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--gamma" in err[0] and method in err[0], err
    assert not (tmp_path / "o").exists()
    code = main(["eval", "forecast", "--model", MODEL, "--bars", str(tmp_path), "--calibration", method,
                 "--gamma", "0.05"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--gamma" in err[0] and method in err[0], err
