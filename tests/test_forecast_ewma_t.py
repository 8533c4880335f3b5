"""The EWMA-t baseline: its NLL against arch's standardised Student-t, its shape fitted on the training part only."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from arch.univariate import StudentsT

from streamrnn.forecast import baselines
from streamrnn.forecast.bars import read_bars
from streamrnn.forecast.dataset import prepare
from streamrnn.forecast.evaluate import eval_forecast, render_table
from streamrnn.forecast.features import FeatureConfig, offline_features
from streamrnn.forecast.metrics import nll
from streamrnn.forecast.synthetic import simulate, write_sp500_layout

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "exported" / "market.onnx")
START = "2016-01-01"


def _arch_nll(y, var, nu) -> np.ndarray:
    """arch's Student-t has unit variance: its log-likelihood with sigma2 = var is the EWMA-t's."""
    return -StudentsT().loglikelihood(np.array([nu]), y, var, individual=True)


def test_ewma_t_nll_equals_arch_unit_variance_t():
    rng = np.random.default_rng(0)
    var = rng.uniform(0.3, 4.0, 500)
    y = rng.standard_t(4.0, 500) * np.sqrt(var / 2.0)
    for nu in (2.5, 4.0, 9.0, 60.0):
        loc, scale, df = baselines.ewma_t(var, 3, nu)
        np.testing.assert_allclose(nll(y, loc[:, 0], scale[:, 0], df[:, 0]), _arch_nll(y, var, nu), rtol=1e-10)
        # h-step: the same shape with variance h * var
        np.testing.assert_allclose(nll(y, loc[:, 2], scale[:, 2], df[:, 2]), _arch_nll(y, 3 * var, nu), rtol=1e-10)


def test_fitted_shape_maximises_arch_likelihood_and_recovers_nu():
    rng = np.random.default_rng(1)
    var = rng.uniform(0.5, 2.0, 20000)
    y = rng.standard_t(5.0, len(var)) * np.sqrt(var * 3 / 5)  # unit-variance t(5) times sqrt(var)
    nu = baselines.fit_t_shape(y, var)
    assert abs(nu - 5.0) < 0.5
    best = -_arch_nll(y, var, nu).sum()
    for other in (nu - 0.05, nu + 0.05, *np.linspace(2.1, 50, 60)):
        assert best >= -_arch_nll(y, var, other).sum() - 1e-6


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    bars = simulate(["TAA", "TBB"], start="2014-01-01", end="2016-07-01", seed=5, nu=4.0)
    folder = tmp_path_factory.mktemp("ewmat")
    write_sp500_layout(bars, folder)
    r = eval_forecast(MODEL, str(folder), garch=False, parity_symbols=1, start=START)
    return r, folder


def test_eval_ewma_t_is_fitted_before_the_period_and_scored_as_arch_scores_it(result, tmp_path):
    r, folder = result
    cfg = FeatureConfig()
    y_all, var_all, nu_all = [], [], []
    for sym in ("TAA", "TBB"):
        (b,) = read_bars(str(folder / f"{sym}_data.csv"))
        p = prepare(offline_features(b, cfg), r["horizons"])
        s = p.series
        n_train = int((s.ts < np.datetime64(START, "s").astype(np.int64)).sum())
        j = np.arange(baselines.EWMA_BURN_IN, n_train - 1)
        j = j[~s.jump[j + 1]]
        nu = baselines.fit_t_shape(s.ret[j + 1], s.var[j])
        assert r["ewma_t_nu"]["per_symbol"][sym] == pytest.approx(nu, rel=1e-12)
        o = np.flatnonzero(p.window(START, None)[:, 0])
        y_all.append(p.y[o, 0])
        var_all.append(s.var[o])
        nu_all.append(np.full(len(o), nu))
    y, var, nus = (np.concatenate(a) for a in (y_all, var_all, nu_all))
    want = np.mean([_arch_nll(y[i:i + 1], var[i:i + 1], nus[i])[0] for i in range(len(y))])
    assert r["metrics"]["ewma_t"]["h1"]["nll"] == pytest.approx(want, rel=1e-9)
    assert r["metrics"]["ewma_t"]["h1"]["n"] == len(y)
    table = render_table(r)
    assert "  EWMA-t        h1 " in table and "  EWMA-normal   h1 " in table and "EWMA-t shape fitted" in table


def test_ewma_t_shape_does_not_read_the_period(result, tmp_path):
    """Wild returns inside the period (scaled x5) leave the fitted shape exactly as it was."""
    r, folder = result
    start = np.datetime64(START, "s").astype(np.int64)
    out = []
    for sym in ("TAA", "TBB"):
        (b,) = read_bars(str(folder / f"{sym}_data.csv"))
        k = int((b.ts < start).sum())
        logc = np.log(b.close)
        logc[k:] = logc[k - 1] + 5 * (logc[k:] - logc[k - 1])
        c = np.exp(logc)
        out.append(b.__class__(sym, b.ts, c, c * 1.001, c * 0.999, c, b.volume))
    write_sp500_layout(out, tmp_path)
    wild = eval_forecast(MODEL, str(tmp_path), garch=False, parity_symbols=1, start=START)
    (b0,) = read_bars(str(folder / "TAA_data.csv"))
    # the shape is fitted on returns only (open/high/low do not enter it); the bars before START are unchanged
    assert np.allclose(out[0].close[:int((b0.ts < start).sum())], b0.close[:int((b0.ts < start).sum())])
    assert wild["ewma_t_nu"]["per_symbol"] == pytest.approx(r["ewma_t_nu"]["per_symbol"], rel=1e-12)
    assert wild["metrics"]["ewma_t"]["h1"]["nll"] != pytest.approx(r["metrics"]["ewma_t"]["h1"]["nll"])
