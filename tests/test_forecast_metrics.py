"""Forecast scores against hand-computed values and scipy; baselines against their own references (arch, a loop)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from streamrnn.forecast import baselines
from streamrnn.forecast.metrics import covered, crps, nll, quantile, summarize
from streamrnn.forecast.synthetic import simulate


def test_nll_hand_values_and_scipy():
    # N(0, 1) at y = 1: 0.5 + 0.5 ln(2 pi)
    assert nll(np.array([1.0]), 0.0, 1.0, np.inf)[0] == pytest.approx(0.5 + 0.5 * math.log(2 * math.pi))
    # t with df = 1 (Cauchy), scale 2, at y = 2: ln(pi * 2 * (1 + 1)) = ln(4 pi)
    assert nll(np.array([2.0]), 0.0, 2.0, 1.0)[0] == pytest.approx(math.log(4 * math.pi))
    y = np.array([-3.0, 0.1, 2.5])
    loc, scale = np.array([0.2, -0.1, 1.0]), np.array([0.5, 1.5, 3.0])
    np.testing.assert_allclose(nll(y, loc, scale, np.array([3.0, 7.0, np.inf])),
                               [-stats.t.logpdf(-3.0, 3.0, 0.2, 0.5), -stats.t.logpdf(0.1, 7.0, -0.1, 1.5),
                                -stats.norm.logpdf(2.5, 1.0, 3.0)], rtol=1e-12)


def _crps_numeric(y, cdf):
    lo = integrate.quad(lambda x: cdf(x) ** 2, -np.inf, y, limit=200)[0]
    hi = integrate.quad(lambda x: (1 - cdf(x)) ** 2, y, np.inf, limit=200)[0]
    return lo + hi


@pytest.mark.parametrize(("y", "loc", "scale", "df"), [
    (0.0, 0.0, 1.0, np.inf), (1.3, -0.2, 0.7, np.inf), (-2.0, 0.5, 1.5, 4.0), (0.3, 0.0, 1.0, 2.5),
    (5.0, 0.1, 0.8, 30.0)])
def test_crps_closed_form_equals_the_integral_definition(y, loc, scale, df):
    dist = stats.norm(loc, scale) if np.isinf(df) else stats.t(df, loc, scale)
    got = crps(np.array([y]), loc, scale, np.array([df]))[0]
    assert got == pytest.approx(_crps_numeric(y, dist.cdf), rel=1e-6, abs=1e-9)
    # hand value for N(0,1) at 0: 2 phi(0) - 1/sqrt(pi) = (sqrt(2) - 1) / sqrt(pi)
    if (y, loc, scale) == (0.0, 0.0, 1.0):
        assert got == pytest.approx((math.sqrt(2) - 1) / math.sqrt(math.pi))


def test_quantiles_and_coverage_hand_values():
    assert quantile(0.9, np.array([1.0]), 2.0, np.inf)[0] == pytest.approx(1.0 + 2.0 * 1.2815515655446004)
    y = np.array([0.0, 1.5, -1.0, 3.0])  # 80% N(0,1) interval is +-1.2816; 95% is +-1.96
    assert covered(0.80, y, 0.0, 1.0, np.inf).tolist() == [True, False, True, False]
    assert covered(0.95, y, 0.0, 1.0, np.inf).tolist() == [True, True, True, False]


def test_summarize_tiny_series_by_hand():
    y = np.array([1.0, -1.0, 2.0, -2.0])
    loc = np.array([0.5, 0.0, 1.0, 0.0])
    g = np.array(["A", "A", "B", "B"], dtype=object)
    r = summarize(y, loc, np.ones(4), np.inf, g)
    assert r["mae"] == pytest.approx((0.5 + 1 + 1 + 2) / 4)
    # MASE per symbol: A (0.5 + 1) / (1 + 1) = 0.75, B (1 + 2) / (2 + 2) = 0.75 -> median 0.75
    assert r["mase"] == pytest.approx(0.75)
    assert r["nll"] == pytest.approx(np.mean([0.125, 0.5, 0.5, 2.0]) + 0.5 * math.log(2 * math.pi))
    assert r["coverage_80"] == pytest.approx(0.75) and r["coverage_95"] == pytest.approx(0.75)
    assert summarize(y[:0], loc[:0], np.ones(0), np.inf, g[:0])["nll"] is None


def test_ewma_baseline_equals_hand_recursion():
    r = np.array([1.0, -2.0, 0.5])
    v = baselines.ewma_recursion(r, 0.94, 1.0)
    assert v[0] == pytest.approx(0.94 + 0.06 * 1.0)
    assert v[1] == pytest.approx(0.94 * v[0] + 0.06 * 4.0)
    loc, scale, df = baselines.ewma(v, 3)
    np.testing.assert_allclose(scale[1], np.sqrt(v[1] * np.array([1, 2, 3])))
    assert (loc == 0).all() and np.isinf(df).all()


@pytest.mark.parametrize("dist", ["normal", "t"])
def test_garch_baseline_matches_arch_and_the_recursion(dist):
    from arch import arch_model

    b = simulate(["AAA"], start="2014-01-01", end="2016-12-31", seed=5)[0]
    ret = 100 * np.log(b.close[1:] / b.close[:-1])
    n_train = 500
    origins = np.arange(n_train, len(ret))
    (loc, scale, df), p = baselines.garch(ret, n_train, origins, 3, dist)
    # the library's own fit and forecast, independently
    res = arch_model(ret, mean="Constant", vol="GARCH", p=1, q=1, dist=dist, rescale=False).fit(
        last_obs=n_train, disp="off")
    f = res.forecast(horizon=3, start=n_train, reindex=False)
    var1 = np.asarray(f.variance)[:, 0]
    sd1 = np.sqrt(var1 * ((p["nu"] - 2) / p["nu"] if dist == "t" else 1.0))
    np.testing.assert_allclose(scale[:, 0], sd1, rtol=1e-10)
    np.testing.assert_allclose(scale[:, 2] ** 2 / scale[:, 0] ** 2,
                               np.asarray(f.variance).sum(axis=1) / var1, rtol=1e-10)
    # hand GARCH recursion with the fitted parameters: sigma2_{t+1} = w + a e_t^2 + b sigma2_t
    e = ret - p["mu"]
    s2 = np.asarray(res.conditional_volatility) ** 2  # known up to n_train; recurse past it
    w, a, bb = p["omega"], p["alpha[1]"], p["beta[1]"]
    for t in range(n_train, len(ret)):
        s2[t] = w + a * e[t - 1] ** 2 + bb * s2[t - 1]
    hand = w + a * e[origins] ** 2 + bb * s2[origins]
    np.testing.assert_allclose(var1, hand, rtol=1e-8)
    np.testing.assert_allclose(loc[:, 1], 2 * p["mu"])
    assert (np.isinf(df) if dist == "normal" else df == p["nu"]).all()


# -- the serving path's own Student-t (no scipy) against scipy.stats.t ---------------------------------
DFS = st.one_of(st.floats(2.0001, 50.0), st.floats(50.0, 1e12), st.just(math.inf))


@settings(max_examples=500, deadline=None)
@given(p=st.one_of(st.floats(1e-15, 1 - 1e-12), st.floats(0.5 - 1e-6, 0.5 + 1e-6)), df=DFS)
def test_student_t_quantile_matches_scipy(p, df):
    from streamrnn.forecast.distribution import std_quantile

    want = stats.norm.ppf(p) if math.isinf(df) else stats.t.ppf(p, df)
    assert std_quantile(p, df) == pytest.approx(want, rel=1e-9, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(df=st.one_of(st.floats(2.0001, 1e4), st.just(math.inf)), loc=st.floats(-5, 5), scale=st.floats(0.01, 10),
       seed=st.integers(0, 2**32 - 1))
def test_student_t_nll_matches_scipy(df, loc, scale, seed):
    """To df 1e4: beyond, the log-gamma difference loses ~1e-10 to cancellation (scipy's t.logpdf does better)."""
    y = np.random.default_rng(seed).standard_normal(64) * 10
    want = -(stats.norm.logpdf(y, loc, scale) if math.isinf(df) else stats.t.logpdf(y, df, loc, scale))
    np.testing.assert_allclose(nll(y, loc, scale, df), want, rtol=1e-10, atol=1e-10)


def test_student_t_quantile_edges():
    from streamrnn.forecast.distribution import std_quantile

    for df in (3.0, 5.0, 10.0):  # within 1e-9 of the median: the first-order expansion, to 1e-12 relative
        pdf0 = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        for p in (0.5 + 1e-9, 0.5 - 1e-13):
            assert std_quantile(p, df) == pytest.approx((p - 0.5) / pdf0, rel=1e-12)
    with np.errstate(all="raise"):  # a df outside (0, inf): NaN without a warning, as scipy's gammaln
        assert np.isnan(nll(np.ones(3), 0.0, 1.0, np.array([0.0, -1.0, -1.5]))).all()
    assert std_quantile(0.5, 4.0) == 0.0 and std_quantile(0.3, 4.0) == pytest.approx(-std_quantile(0.7, 4.0), rel=1e-14)
    assert all(math.isnan(std_quantile(p, df)) for p, df in ((0.0, 4.0), (1.0, 4.0), (0.5, 0.0), (0.5, math.nan)))
    q = quantile(0.9, np.zeros((2, 3)), 2.0, np.array([3.0, 5.0, math.inf]))  # per-column df, broadcast
    np.testing.assert_allclose(q[0], 2.0 * np.array([stats.t.ppf(0.9, 3), stats.t.ppf(0.9, 5), stats.norm.ppf(0.9)]))
